"""The segmentation claims on the built-in panoptic shapes (64x64, ViT-Ti/8 with 6 blocks, 2000 steps at batch 32
unless `--steps`), each run `python -m maskjax.main` (resumable; see experiments/sweep.py):

    python experiments/segmentation/reproduce.py                 # every study, seeds 0 1 2 where asked
    python experiments/segmentation/reproduce.py --studies heads,annealing --seeds 0 --steps 500
    python experiments/segmentation/reproduce.py --seeds 0 --lanes 2   # two runs at a time, one core each

Studies (runs in `--workdirs`, default workdirs/seg_repro; configs/{eomt,mask2former,perpixel}_builtin.py):
  masked      Mask2Former-style decoder with masked vs plain cross-attention, same steps and seeds: PQ and mIoU at
              every evaluation (`--eval-every`), so the table shows convergence (the paper: masked converges
              faster and ends higher).
  heads       EoMT vs Mask2Former-style vs per-pixel: PQ, mIoU; inference images/s of the same three trained
              models, side by side in one process (jitted `predict`, batch 32, after warm-up).
  annealing   EoMT with mask annealing (evaluated without masks, as always) vs EoMT trained with masks always on
              (also evaluated without them).
  points      the point-sampled loss vs the full-mask loss (num_points=0), EoMT: PQ; the peak memory of the two
              train steps is in experiments/results/segmentation_bench.md (`memory_analysis`).
  remax       (only when named) EoMT with ReMaX's ReMask + ReClass (eta 0.1) vs without: PQ and mIoU per evaluation.
  pretrained  (only when named) EoMT and Mask2Former-style with the same MAE-pretrained backbone vs both from
              scratch. EoMT's accuracy claim rests on a pretrained ViT (the paper's: DINOv2-pretrained ViT-L and
              larger); here the backbone is pretrained with MAE on the built-in images for `--pretrain-steps` (the main
              job's recipe, configs/mae_builtin.py, at 64x64 with ViT-Ti/8), then fine-tuned with the same recipe as
              the from-scratch runs (fixed sin-cos position embedding, as MAE's).
Seeds: `--seeds` (default 0 1 2) for every run, so differences come with their spread.
Writes experiments/results/segmentation_builtin.{md,json} (`--results-name`; it refuses, before training, to replace a
results file that reports runs this invocation does not plan). A reproduction that spans machines or sessions whose
workdirs are gone uses `--reuse <earlier results .json> ...`: runs without a finished workdir are taken from the first
file that has them (same steps and evaluation protocol, checked), are not trained again, and the report names them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
import sweep  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
STUDIES = ("masked", "heads", "annealing", "points")
OPTIONAL_STUDIES = ("remax", "pretrained")  # run only when named in --studies
PRETRAIN = "mae"  # run-name prefix of the backbone pretraining runs (the pretrained study trains them first)
METRICS = ("pq", "pq_things", "pq_stuff", "sq", "rq", "miou")


def plan(studies: list[str], seeds: list[int], workdirs: str = "workdirs/seg_repro") -> dict[str, tuple[str, dict]]:
    """{run name: (config, overrides)} of every run the studies need (shared runs appear once). Runs named
    f'{PRETRAIN}_s<seed>' pretrain a backbone the runs with init_from start from; train them first."""
    runs = {}
    for seed in seeds:
        s = {"seed": seed}
        if "pretrained" in studies:
            pretrain = f"{PRETRAIN}_s{seed}"
            runs[pretrain] = ("configs/mae_builtin.py", {**s, "data.image_size": 64, "model.variant": "Ti/8"})
            init = {"model.posemb": "sincos2d", "init_from.workdir": os.path.join(workdirs, pretrain),
                    "init_from.params_key": "encoder"}
            runs[f"eomt_mae_s{seed}"] = ("configs/eomt_builtin.py", {**s, **init})
            runs[f"mask2former_mae_s{seed}"] = ("configs/mask2former_builtin.py",
                                                {**s, **init, "init_from.target_key": "backbone"})
        if "masked" in studies or "heads" in studies or "pretrained" in studies:
            runs[f"mask2former_s{seed}"] = ("configs/mask2former_builtin.py", s)
        if "masked" in studies:
            runs[f"mask2former_plain_s{seed}"] = ("configs/mask2former_builtin.py",
                                                  {**s, "model.masked_attention": False})
        if {"heads", "annealing", "points", "remax", "pretrained"} & set(studies):
            runs[f"eomt_s{seed}"] = ("configs/eomt_builtin.py", s)
        if "heads" in studies:
            runs[f"perpixel_s{seed}"] = ("configs/perpixel_builtin.py", s)
        if "annealing" in studies:
            runs[f"eomt_always_s{seed}"] = ("configs/eomt_builtin.py", {**s, "model.mask_annealing": "always"})
        if "remax" in studies:
            runs[f"eomt_remax_s{seed}"] = ("configs/eomt_builtin.py", {**s, "segmentation.remask": True,
                                                                       "segmentation.reclass_eta": 0.1})
        if "points" in studies:
            runs[f"eomt_full_s{seed}"] = ("configs/eomt_builtin.py", {**s, "segmentation.num_points": 0})
    return runs


def steps_of(name: str, args: argparse.Namespace) -> int:
    return args.pretrain_steps if name.startswith(PRETRAIN + "_") else args.steps


def batch_of(workdir: str) -> int:
    """The batch size a run in `workdir` trained with (its config.json)."""
    with open(os.path.join(workdir, "config.json")) as f:
        return int(json.load(f)["batch_size"])


def eval_curve(records: list) -> dict[int, dict]:
    """{step: {metric: value}} of every evaluation in a run's metrics.jsonl."""
    curve = {}
    for r in records:
        evals = {k[len("eval/"):]: v for k, v in r.items() if k.startswith("eval/")}
        if evals:
            curve.setdefault(r["step"], {}).update(evals)
    return curve


def train_minutes(records: list, steps: int, batch: int = 32) -> float:
    """Minutes of training steps alone: `steps` at the 90th percentile of the run's logged images/s. The logged rate
    counts training steps only (no compiles, evaluations, saves) and is unaffected by pauses and resumes; the 90th
    percentile is the rate when nothing else competes for the run's cores (the median drops on a shared machine)."""
    rates = sorted(r["train/images_per_second"] for r in records if "train/images_per_second" in r)
    return steps * batch / rates[int(0.9 * (len(rates) - 1))] / 60 if rates else float("nan")


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def inference_speed(workdirs: dict[str, str], batch: int = 32, repeats: int = 5) -> dict[str, float]:
    """Images/s of each trained run's jitted `predict`, measured round-robin in one process (medians)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from maskjax.tasks import make_task
    from maskjax.train.checkpoint import load_params, load_run_config

    fns = {}
    for name, workdir in workdirs.items():
        config = load_run_config(workdir)  # runs saved before a config key existed get its default
        task = make_task(config)
        params, _ = load_params(workdir, -1, "", config_key="reproduce")
        params = jax.tree.map(jnp.asarray, params)
        images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, config.data.image_size,
                                                                       config.data.image_size, 3)), jnp.float32)
        fn = jax.jit(task.predict)
        jax.block_until_ready(fn(params, {"image": images}))
        fns[name] = (fn, params, images)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, params, images) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, {"image": images}))
            times[name].append(time.perf_counter() - start)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def lanes_of(runs: dict, lanes: int) -> list[tuple[list[str], Optional[list[int]]]]:
    """Splits the runs over `lanes` parallel lanes, each pinned to its own share of this process's CPUs:
    [(run names, cores or None for unpinned)]. XLA:CPU gains well under 2x from a second thread, so two 1-core runs
    train more images per second in total than one 2-core run and a sweep finishes sooner; each run's own speed is
    then its 1-core speed, which the report says (column 'cores')."""
    if lanes <= 1:
        return [(list(runs), None)]
    cpus = sorted(os.sched_getaffinity(0))
    if lanes > len(cpus):
        raise ValueError(f"--lanes={lanes}: this process may use only {len(cpus)} CPUs ({cpus})")
    share = len(cpus) // lanes
    return [(list(runs)[i::lanes], cpus[i * share:(i + 1) * share]) for i in range(lanes)]


def train(runs: dict, args: argparse.Namespace, extra: dict, earlier: Sequence[dict] = ()) -> None:
    """Trains (resumes, or skips when finished) every run, lane by lane in parallel (`--lanes`, at most one lane per
    run); the lanes share out the runs still to finish, so finished ones leave no lane idle. Runs that `collect`
    takes from an earlier results file (`earlier`, see load_earlier) are not trained again."""
    from maskjax.train.workdir import WorkdirLock

    runs = {name: run for name, run in runs.items()
            if not sweep.finished(sweep.read_metrics(os.path.join(args.workdirs, name)), steps_of(name, args))}
    for name in [name for name in runs if source_of(name, earlier)]:
        print(f"== {name}: not trained, taken from {source_of(name, earlier)['path']}", flush=True)
        del runs[name]

    def lane(names: list[str], cores: Optional[list[int]]) -> None:
        for name in names:
            config, overrides = runs[name]
            holder = WorkdirLock(os.path.join(args.workdirs, name)).live_holder()
            if holder:  # another reproduction (or a hand-started run) is training it: leave it to that one
                print(f"== {name}: skipped, its workdir is in use by {holder}", flush=True)
                continue
            where = f" on cores {cores}" if cores is not None else ""
            steps = steps_of(name, args)
            print(f"== {name}: {config} {overrides} ({steps} steps){where}", flush=True)
            sweep.run(config, os.path.join(args.workdirs, name), {**overrides, **extra}, steps, cores=cores)

    with ThreadPoolExecutor(max(1, args.lanes)) as pool:  # a failed run raises here once the other lanes end
        for future in [pool.submit(lane, names, cores)
                       for names, cores in lanes_of(runs, min(args.lanes, len(runs)))]:
            future.result()


def load_earlier(paths: Sequence[str], args: argparse.Namespace) -> list[dict]:
    """Earlier results files of this script, each checked to follow this report's protocol (steps, evaluation every
    and on how many images, read from the command it states), with its 'path' added; a run is taken from the first
    file that has it."""
    earlier = []
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        theirs = build_parser().parse_args(shlex.split(results["command"])[2:])
        differ = {key: (getattr(theirs, key), getattr(args, key))
                  for key in ("steps", "pretrain_steps", "eval_every", "eval_examples")
                  if getattr(theirs, key) != getattr(args, key)}
        if differ:
            raise ValueError(f"--reuse {path}: its runs follow another protocol, {{key: (theirs, this report's)}}: "
                             f"{differ}")
        earlier.append({**results, "path": path})
    return earlier


def source_of(name: str, earlier: Sequence[dict]) -> Optional[dict]:
    """The first earlier results file (see load_earlier) that has run `name`, or None."""
    return next((e for e in earlier if name in e["curves"]), None)


def collect(runs: dict, args: argparse.Namespace, earlier: Sequence[dict] = ()) -> dict:
    """Every run's curve, train minutes, cores and wall seconds, from its finished workdir or else from the first
    earlier results file that has it: {'curves', 'train_minutes', 'cores', 'wall_seconds', 'reused': {name: path},
    'missing': [names]}."""
    got = {"curves": {}, "train_minutes": {}, "cores": {}, "wall_seconds": {}, "reused": {}, "missing": []}
    for name in runs:
        workdir = os.path.join(args.workdirs, name)
        records = sweep.read_metrics(workdir)
        source = source_of(name, earlier)
        if sweep.finished(records, steps_of(name, args)):
            got["curves"][name] = eval_curve(records)
            got["train_minutes"][name] = train_minutes(records, steps_of(name, args), batch_of(workdir))
            got["cores"][name] = "/".join(str(n) for n in sorted(set(sweep.core_counts(workdir)), reverse=True)) or "?"
            got["wall_seconds"][name] = sweep.wall_seconds(workdir)
        elif source is not None:
            got["curves"][name] = {int(step): evals for step, evals in source["curves"][name].items()}  # JSON keys
            for key in ("train_minutes", "cores", "wall_seconds"):
                got[key][name] = source[key].get(name, float("nan") if key != "cores" else "?")
            got["reused"][name] = source["path"]
        else:  # unfinished: skipped as busy, or a report of a reproduction under way
            got["missing"].append(name)
    return got


def check_not_replacing(path: str, runs: dict) -> None:
    """A report must not replace a results file that reports runs it does not plan (a partial training invocation
    with the default --results-name once overwrote the all-studies file); checked before any training."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        results = json.load(f)
    lost = sorted((set(results["curves"]) | set(results.get("missing_runs", []))) - set(runs))
    if lost:
        raise ValueError(f"{os.path.relpath(path, ROOT)} reports runs this invocation does not plan ({', '.join(lost)})"
                         f"; give another --results-name (and --reuse {os.path.relpath(path, ROOT)} to report with "
                         "them)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", default=",".join(STUDIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--pretrain-steps", type=int, default=1200,
                        help="steps of the MAE runs of the pretrained study (batch 128, configs/mae_builtin.py)")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument("--workdirs", default=os.path.join(ROOT, "workdirs", "seg_repro"))
    parser.add_argument("--results-name", default="segmentation_builtin")
    parser.add_argument("--lanes", type=int, default=1,
                        help="train this many runs at once, each pinned to its share of the CPUs (see lanes_of)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the tables of the studies whose runs have all finished and list "
                             "the runs still missing (progress of a reproduction that spans sessions)")
    parser.add_argument("--reuse", nargs="+", default=[], help="earlier results .json files of this script: runs "
                        "without a finished workdir are taken from the first that has them (same protocol, checked), "
                        "are not trained, and are named in the report")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    studies = [s for s in args.studies.split(",") if s]
    unknown = sorted(set(studies) - set(STUDIES + OPTIONAL_STUDIES))
    if unknown:
        parser.error(f"--studies: unknown {unknown}; known: {STUDIES + OPTIONAL_STUDIES}")
    command = "python experiments/segmentation/reproduce.py " + " ".join(sys.argv[1:])
    extra = {"evals.eval.every": args.eval_every, "evals.eval.examples": args.eval_examples}
    inside = os.path.relpath(args.workdirs, ROOT)  # runs start in ROOT: short init_from paths in the tables
    runs = plan(studies, args.seeds, args.workdirs if inside.startswith("..") else inside)
    earlier = load_earlier(args.reuse, args)  # before any training: a bad file stops here
    check_not_replacing(os.path.join(RESULTS, f"{args.results_name}.json"), runs)
    if not args.report_only:
        pretrain = {name: run for name, run in runs.items() if name.startswith(PRETRAIN + "_")}
        if pretrain:  # the fine-tuning runs start from their checkpoints
            train(pretrain, args, extra, earlier)
        train({name: run for name, run in runs.items() if name not in pretrain}, args, extra, earlier)
    got = collect(runs, args, earlier)
    curves, seconds, minutes_of, cores_of = got["curves"], got["wall_seconds"], got["train_minutes"], got["cores"]
    missing, reused = got["missing"], got["reused"]

    def complete(*prefixes: str) -> bool:
        return all(f"{p}_s{s}" in curves for p in prefixes for s in args.seeds)

    def cores_in(prefix: str) -> str:  # the cores column of a prefix's runs over the seeds
        return ", ".join(sorted({cores_of[f"{prefix}_s{s}"] for s in args.seeds}))

    def final(prefix: str, metric: str) -> list[float]:
        return [curves[f"{prefix}_s{s}"].get(args.steps, {}).get(metric, float("nan")) for s in args.seeds
                if f"{prefix}_s{s}" in curves]

    lines = ["# Segmentation on the built-in panoptic shapes (64x64)", "",
             f"Command: `{command.strip()}`  ", f"Date: {datetime.date.today()}; load average at the end "
             f"{os.getloadavg()[0]:.1f}; {args.steps} steps at batch 32 per run, seeds {args.seeds}; metrics on "
             f"{args.eval_examples} validation images (mean ± std over seeds, ×100). Train minutes: the steps at "
             "the 90th percentile of the run's logged images/s (training steps only, without competing load), on the "
             "number of CPU cores given under 'cores' (runs trained two at a time with `--lanes 2` had one core each; "
             "'2/1': started on 2, resumed on 1; the 90th percentile then reflects the faster part).", ""]
    out = {"command": command, "steps": args.steps, "seeds": args.seeds, "curves": curves, "wall_seconds": seconds,
           "train_minutes": minutes_of, "cores": cores_of, "missing_runs": missing, "reused_runs": reused}
    for source in earlier:
        names = [name for name, path in reused.items() if path == source["path"]]
        if names:
            lines += [f"Runs taken from `{source['path']}` (their workdirs are not on this machine; command there: "
                      f"`{source['command']}`): {', '.join(names)}.", ""]
    if missing:
        lines += [f"**Partial**: runs not finished yet (tables that need them are left out): {', '.join(missing)}.",
                  ""]
    lines += ["## Finished runs (final evaluation)", "", "| run | config, overrides | PQ | PQ things | PQ stuff | mIoU "
              "| train minutes | cores |", "|---|---|---|---|---|---|---|---|"]
    for name in curves:
        config, overrides = runs[name]
        last = curves[name].get(steps_of(name, args), {})
        cells = " | ".join(f"{100 * last[m]:.1f}" if m in last else "–" for m in ("pq", "pq_things", "pq_stuff", "miou"))
        lines.append(f"| {name} | `{config}` {overrides} | {cells} | {minutes_of[name]:.1f} | {cores_of[name]} |")
    lines.append("")
    if "masked" in studies and complete('mask2former', 'mask2former_plain'):
        lines += ["## Masked vs plain cross-attention (Mask2Former-style decoder)", "",
                  "| step | PQ masked | PQ plain | mIoU masked | mIoU plain |", "|---|---|---|---|---|"]
        steps = sorted({st for n in curves if n.startswith("mask2former") for st in curves[n]})
        for st in steps:
            cell = lambda p, m: mean_std([curves[f"{p}_s{s}"].get(st, {}).get(m, float("nan")) for s in args.seeds])
            lines.append(f"| {st} | {cell('mask2former', 'pq')} | {cell('mask2former_plain', 'pq')} | "
                         f"{cell('mask2former', 'miou')} | {cell('mask2former_plain', 'miou')} |")
        lines.append("")
    if "heads" in studies and complete('eomt', 'mask2former', 'perpixel'):
        speed_runs = {h: f"{h}_s{args.seeds[0]}" for h in ("eomt", "mask2former", "perpixel")}
        sources = [e for e in earlier if e["path"] in {reused.get(name) for name in speed_runs.values()}]
        if not set(speed_runs.values()) & set(reused):
            speed = inference_speed({h: os.path.join(args.workdirs, name) for h, name in speed_runs.items()})
        elif set(speed_runs.values()) <= set(reused) and len(sources) == 1 and "images_per_second" in sources[0]:
            speed = sources[0]["images_per_second"]  # the trained weights are not here to measure again
            lines += [f"Inference images/s below: from `{sources[0]['path']}` (trained models not on this machine).",
                      ""]
        else:
            raise ValueError(f"heads: the speed runs {sorted(speed_runs.values())} are split between workdirs and "
                             f"--reuse files ({reused}); measure them together (all in workdirs) or reuse all three "
                             "from one file that measured them")
        out["images_per_second"] = speed
        lines += ["## EoMT vs Mask2Former-style vs per-pixel (same ViT-Ti/8 backbone, steps, batch)", "",
                  "| head | PQ | PQ things | PQ stuff | mIoU | inference images/s (batch 32) | train minutes | cores |",
                  "|---|---|---|---|---|---|---|---|"]
        for head in ("eomt", "mask2former", "perpixel"):
            minutes = statistics.mean(minutes_of[f"{head}_s{s}"] for s in args.seeds)
            pq = [mean_std(final(head, m)) for m in ("pq", "pq_things", "pq_stuff")] if head != "perpixel" \
                else ["–"] * 3
            lines.append(f"| {head} | {' | '.join(pq)} | {mean_std(final(head, 'miou'))} | {speed[head]:.1f} | "
                         f"{minutes:.1f} | {cores_in(head)} |")
        lines += ["", f"EoMT / Mask2Former-style inference speed: {speed['eomt'] / speed['mask2former']:.2f}x "
                  "(trained models, jitted predict incl. panoptic inference, measured round-robin in one process).",
                  ""]
    if "annealing" in studies and complete('eomt', 'eomt_always'):
        lines += ["## EoMT: mask annealing vs masks always on in training (both evaluated without masks)", "",
                  "| training | PQ | mIoU |", "|---|---|---|",
                  f"| annealed (poly) | {mean_std(final('eomt', 'pq'))} | {mean_std(final('eomt', 'miou'))} |",
                  f"| masks always on | {mean_std(final('eomt_always', 'pq'))} | "
                  f"{mean_std(final('eomt_always', 'miou'))} |", ""]
    if "points" in studies and complete('eomt', 'eomt_full'):
        lines += ["## Point-sampled vs full-mask loss (EoMT)", "", "| loss | PQ | mIoU | train minutes | cores |",
                  "|---|---|---|---|---|"]
        for name, label in (("eomt", "points (1024 of 4096 pixels)"), ("eomt_full", "full masks")):
            minutes = statistics.mean(minutes_of[f"{name}_s{s}"] for s in args.seeds)
            lines.append(f"| {label} | {mean_std(final(name, 'pq'))} | {mean_std(final(name, 'miou'))} | "
                         f"{minutes:.1f} | {cores_in(name)} |")
        paired = mean_std([p - f for p, f in zip(final('eomt', 'pq'), final('eomt_full', 'pq'))])
        lines += ["", f"PQ points − full masks, paired by seed: {paired}.", "", "Peak memory of the two train steps: experiments/results/segmentation_bench.md.", ""]
    if "remax" in studies and complete('eomt', 'eomt_remax'):
        lines += ["## EoMT with ReMaX's relaxations (ReMask + ReClass, eta 0.1) vs without", "",
                  "| step | PQ plain | PQ ReMaX | PQ ReMaX − plain (paired by seed) | mIoU plain | mIoU ReMaX |",
                  "|---|---|---|---|---|---|"]
        for st in sorted({st for n in curves if n.startswith("eomt_remax") for st in curves[n]}):
            at = lambda p, m: [curves[f"{p}_s{s}"].get(st, {}).get(m, float("nan")) for s in args.seeds]
            cell = lambda p, m: mean_std(at(p, m))
            paired = mean_std([r - b for r, b in zip(at('eomt_remax', 'pq'), at('eomt', 'pq'))])
            lines.append(f"| {st} | {cell('eomt', 'pq')} | {cell('eomt_remax', 'pq')} | {paired} | "
                         f"{cell('eomt', 'miou')} | {cell('eomt_remax', 'miou')} |")
        lines += ["", "Per seed: " + "; ".join(
            f"{s}: PQ {100 * curves[f'eomt_s{s}'].get(args.steps, {}).get('pq', float('nan')):.1f} plain, "
            f"{100 * curves[f'eomt_remax_s{s}'].get(args.steps, {}).get('pq', float('nan')):.1f} ReMaX"
            for s in args.seeds) + ".", ""]
    if "pretrained" in studies and complete('eomt', 'mask2former', 'eomt_mae', 'mask2former_mae'):
        lines += [f"## EoMT vs Mask2Former-style, from scratch and from the same MAE-pretrained backbone ("
                  f"{args.pretrain_steps} MAE steps at batch 128)", "",
                  "| head | backbone | PQ | PQ things | PQ stuff | mIoU | train minutes | cores |",
                  "|---|---|---|---|---|---|---|---|"]
        for head in ("eomt", "mask2former"):
            for prefix, label in ((head, "from scratch"), (f"{head}_mae", "MAE-pretrained")):
                cells = " | ".join(mean_std(final(prefix, m)) for m in ("pq", "pq_things", "pq_stuff", "miou"))
                minutes = statistics.mean(minutes_of[f"{prefix}_s{s}"] for s in args.seeds)
                lines.append(f"| {head} | {label} | {cells} | {minutes:.1f} | {cores_in(prefix)} |")
        gap = lambda suffix: mean_std([e - m for e, m in zip(final(f"eomt{suffix}", "pq"),
                                                             final(f"mask2former{suffix}", "pq"))])
        lines += ["", f"EoMT minus Mask2Former-style PQ, per seed then mean: from scratch {gap('')}, MAE-pretrained "
                  f"{gap('_mae')} (the issue's goal: within 2 points at 2x the images/s).", ""]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.results_name}.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(RESULTS, f"{args.results_name}.json"), "w") as f:
        json.dump(out, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
