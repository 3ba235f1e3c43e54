"""MaskGIT's ablations on CPU, on the built-in shapes and Fashion-MNIST: decoding steps, mask schedules, choice
temperature, classifier-free guidance, FSQ vs VQ codebook usage, MaskGIT vs its autoregressive baseline, and M2T's
cached decoding.

    python experiments/maskgit/reproduce.py                      # trains what is missing, then every study
    python experiments/maskgit/reproduce.py --dataset fashion_mnist   # the same on Fashion-MNIST (FSQ tokenizer only)
    python experiments/maskgit/reproduce.py --samples 500 --workdirs /tmp/mg --results-name maskgit_builtin_500

Runs (each `python -m maskjax.main`, resumable; see experiments/sweep.py), in `--workdirs`:
  classifier        configs/vit_builtin.py: the supervised ViT whose pre-logits are the feature space of the
                    sample metrics (Fréchet distance, KID, precision/recall k=3, class accuracy)
  tokenizer_fsq     configs/tokenizer_builtin.py (FSQ 8,5,5,5 = 1000 codes); the generators' tokenizer
  tokenizer_vq      the same with VQ (1000 codes), no restarts; with --vq-restarts also tokenizer_vq_pull: VQ with
                    the dead-code pull
  maskgit, autoregressive, m2t   configs/{maskgit,autoregressive,m2t}_builtin.py on tokenizer_fsq: one
                    transformer size, equal steps and batch (equal training compute: one forward/backward of the
                    65-token sequence per example and step)
Studies (samples: `--samples` class-balanced, compared with as many validation images):
  steps       MaskGIT with 1, 2, 4, 8, 12, 16, 32 decoding steps (cosine)
  schedule    cosine, square, linear, log, exp at 8 steps
  temperature choice temperature 4.5 (annealed) vs 0
  guidance    w = 0, 0.5, 1, 2, 4 (constant)
  tokenizer   codebook usage and perplexity on the validation split, PSNR
  ar          MaskGIT-8 vs AR (cached): sample metrics; decode wall-clock at batch 1 and 64
  m2t         bits per token of M2T (its Halton schedule), MaskGIT (confidence order) and AR (raster); M2T cached vs
              uncached decoding wall-clock at batch 1 and 64
Fashion-MNIST (`--dataset fashion_mnist`, workdirs `workdirs/maskgit_repro_fmnist`, results `maskgit_fashion_mnist`):
the *_fashion_mnist configs, 28x28 grey images, 7x7 = 49 tokens, compared with the test split: MaskGIT's studies
(steps, schedules, choice temperature, guidance) and the FSQ tokenizer; the VQ tokenizers, the AR baseline and M2T
run on the built-in shapes only (this CPU's hours).
Writes experiments/results/<results-name>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
import sweep  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
FMNIST_DATA = {"data.name": "fashion_mnist", "data.image_size": 28, "data.eval_split": "test"}
DATASETS = {
    "builtin_shapes": dict(title="the built-in shapes", image_size=32, eval_split="validation",
                           workdirs="maskgit_repro", results="maskgit_builtin", classifier="configs/vit_builtin.py",
                           tokenizer="configs/tokenizer_builtin.py", maskgit="configs/maskgit_builtin.py",
                           generator_data={}, vq_tokenizers=True, baselines=True),
    "fashion_mnist": dict(title="Fashion-MNIST", image_size=28, eval_split="test", workdirs="maskgit_repro_fmnist",
                          results="maskgit_fashion_mnist", classifier="configs/vit_fashion_mnist.py",
                          tokenizer="configs/tokenizer_fashion_mnist.py", maskgit="configs/maskgit_fashion_mnist.py",
                          generator_data=FMNIST_DATA, vq_tokenizers=False, baselines=False),
}
STEPS_SWEEP = (1, 2, 4, 8, 12, 16, 32)
SCHEDULES = ("cosine", "square", "linear", "log", "exp")
GUIDANCE = (0.0, 0.5, 1.0, 2.0, 4.0)


def train_all(workdirs: str, steps: dict, extra: dict, dataset: dict, with_restarts: bool = False) -> dict:
    """Trains (or finds) every run; returns {run: (workdir, records, seconds)}."""
    tok = os.path.join(workdirs, "tokenizer_fsq")
    d = dataset
    plan = [
        ("classifier", d["classifier"], {}, steps["classifier"]),
        ("tokenizer_fsq", d["tokenizer"], {}, steps["tokenizer"]),
        ("maskgit", d["maskgit"], {"maskgit.tokenizer_workdir": tok}, steps["generator"]),
    ]
    if d["baselines"]:
        plan += [("autoregressive", "configs/autoregressive_builtin.py",
                  {"autoregressive.tokenizer_workdir": tok, **d["generator_data"]}, steps["generator"]),
                 ("m2t", "configs/m2t_builtin.py", {"m2t.tokenizer_workdir": tok, **d["generator_data"]},
                  steps["generator"])]
    if d["vq_tokenizers"]:
        plan += [("tokenizer_vq", d["tokenizer"] + ":quantizer=vq", {}, steps["tokenizer"])]
    if d["vq_tokenizers"] and with_restarts:
        plan += [("tokenizer_vq_pull", d["tokenizer"] + ":quantizer=vq", {"model.dead_code_weight": 1.0},
                  steps["tokenizer"])]
    runs = {}
    for name, config, overrides, total in plan:
        workdir = os.path.join(workdirs, name)
        print(f"== {name}: {config} {overrides} ({total} steps)", flush=True)
        records, seconds = sweep.run(config, workdir, {**overrides, **extra}, total)
        runs[name] = (workdir, records, seconds)
    return runs


class Scorer:
    """Sample metrics in the classifier's features against `count` images of the data set's evaluation split."""

    def __init__(self, classifier_workdir: str, count: int, seed: int = 0, dataset: str = "builtin_shapes"):
        import jax
        import numpy as np

        from maskjax.data import pipeline
        from maskjax.tasks.sample_quality import load_classifier
        from maskjax.train.checkpoint import load_params

        size, split = DATASETS[dataset]["image_size"], DATASETS[dataset]["eval_split"]
        self.model, self.params, self.num_classes = load_classifier(classifier_workdir, -1, load_params, size,
                                                                    "classifier")
        self._apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x, train=False))
        source = pipeline.make_source(dataset, split, seed=0, image_size=size)
        features = []
        for batch in pipeline.eval_batches(source, global_batch_size=250, image_size=size, num_examples=count,
                                           num_threads=0, prefetch=1):
            features.append(self.features(batch["image"])[0][np.asarray(batch["valid"])])
        self.real = np.concatenate(features)[:count]
        self.seed = seed

    def features(self, images):
        import numpy as np
        logits, aux = self._apply(self.params, images)
        return np.asarray(aux["pre_logits"], np.float64), np.asarray(logits)

    def score(self, images, labels) -> dict:
        import numpy as np

        from maskjax.evaluate import generative as G
        feats, logits = [], []
        for start in range(0, len(images), 250):
            f, lg = self.features(images[start:start + 250])
            feats.append(f)
            logits.append(lg)
        fake, logits = np.concatenate(feats), np.concatenate(logits)
        fd = G.frechet_distance(*G.gaussian_stats(self.real), *G.gaussian_stats(fake))
        kid, kid_std = G.kernel_inception_distance(self.real, fake, rng=np.random.default_rng(self.seed))
        precision, recall = G.precision_recall(self.real, fake, k=3)
        return {"frechet_distance": fd, "kid": kid, "kid_std": kid_std, "precision": precision, "recall": recall,
                "class_accuracy": float(np.mean(logits.argmax(-1) == labels))}


def load_task(workdir: str):
    import jax
    import jax.numpy as jnp
    import ml_collections

    from maskjax.tasks import make_task
    from maskjax.train.checkpoint import load_params
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    task = make_task(config, load_params=load_params)
    params, _ = load_params(workdir)
    return task, jax.tree.map(jnp.asarray, params)


def draw(task, params, count: int, batch: int, seed: int, **sampling):
    """(images [count, H, W, C] float32, labels [count]); class-balanced labels."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    labels = (np.arange(count) % task.config.model.num_classes).astype(np.int32)
    fn = jax.jit(lambda p, l, k: task.generate_images(p, l, k, **sampling))
    images = [np.asarray(fn(params, jnp.asarray(labels[s:s + batch]), jax.random.fold_in(jax.random.key(seed), s)))
              for s in range(0, count, batch)]
    return np.concatenate(images), labels


def decode_seconds(task, params, batch: int, repeats: int = 3, **sampling) -> float:
    """Median wall-clock of one jitted decode of `batch` samples (tokens only), after compilation."""
    import jax
    import jax.numpy as jnp

    def tokens(p, labels, key):
        out = task.sample(p, labels, key, **sampling)
        return out[0] if isinstance(out, tuple) else out
    fn = jax.jit(tokens)
    labels = jnp.arange(batch, dtype=jnp.int32) % task.config.model.num_classes
    jax.block_until_ready(fn(params, labels, jax.random.key(0)))
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(params, labels, jax.random.key(i + 1)))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def final_eval(records: list) -> dict:
    out = {}
    for r in records:
        out.update({k: v for k, v in r.items() if k.startswith("eval/")})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="builtin_shapes", choices=sorted(DATASETS))
    p.add_argument("--workdirs", default="", help="default: workdirs/maskgit_repro (built-in), "
                   "workdirs/maskgit_repro_fmnist (Fashion-MNIST)")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--tokenizer-steps", type=int, default=2000)
    p.add_argument("--generator-steps", type=int, default=2000)
    p.add_argument("--classifier-steps", type=int, default=300)
    p.add_argument("--results-name", default="", help="default: maskgit_builtin / maskgit_fashion_mnist")
    p.add_argument("--vq-restarts", action="store_true",
                   help="also train the VQ tokenizer with dead-code pull (tokenizer_vq_pull; ~20 more minutes)")
    p.add_argument("--smoke", action="store_true", help="check the script end to end: 20-step runs, 40 samples")
    args = p.parse_args()
    dataset = DATASETS[args.dataset]
    args.workdirs = args.workdirs or os.path.join(ROOT, "workdirs", dataset["workdirs"])
    args.results_name = args.results_name or dataset["results"]
    extra = {}
    if args.smoke:
        args.samples, args.batch, args.tokenizer_steps, args.generator_steps, args.classifier_steps = 40, 20, 20, 20, 20
        extra = {"optimizer.warmup_steps": 2, "checkpoint_every": 20}
    start = time.time()
    runs = train_all(args.workdirs, {"classifier": args.classifier_steps, "tokenizer": args.tokenizer_steps,
                                     "generator": args.generator_steps}, extra, dataset, args.vq_restarts)
    scorer = Scorer(runs["classifier"][0], args.samples, dataset=args.dataset)
    maskgit, mg_params = load_task(runs["maskgit"][0])
    real_check = scorer.score(*_real_images(args.samples, args.dataset))  # real vs real: the floor of every metric
    n = args.samples

    def mg(**sampling):
        print("  maskgit", sampling, flush=True)
        return scorer.score(*draw(maskgit, mg_params, n, args.batch, 0, **sampling))

    studies = {
        "steps": {t: mg(num_steps=t, schedule="cosine") for t in STEPS_SWEEP},
        "schedule": {s: mg(num_steps=8, schedule=s) for s in SCHEDULES},
        "temperature": {"4.5 (annealed)": mg(num_steps=8, choice_temperature=4.5),
                        "0": mg(num_steps=8, choice_temperature=0.0)},
        "guidance": {w: mg(num_steps=8, guidance_scale=w) for w in GUIDANCE},
    }
    timing = {}
    if dataset["baselines"]:
        ar, ar_params = load_task(runs["autoregressive"][0])
        m2t, m2t_params = load_task(runs["m2t"][0])
        print("  autoregressive / m2t samples", flush=True)
        studies["generators"] = {
            "maskgit (8 steps)": studies["schedule"]["cosine"],
            "autoregressive (cached)": scorer.score(*draw(ar, ar_params, n, args.batch, 0)),
            "m2t (8 groups, cached)": scorer.score(*draw(m2t, m2t_params, n, args.batch, 0)),
        }
    for batch in ((1, 64) if dataset["baselines"] else ()):
        timing[batch] = {"maskgit (8 steps)": decode_seconds(maskgit, mg_params, batch, num_steps=8),
                         "autoregressive (cached)": decode_seconds(ar, ar_params, batch),
                         "autoregressive (uncached)": decode_seconds(ar, ar_params, batch, repeats=1, cached=False),
                         "m2t (cached)": decode_seconds(m2t, m2t_params, batch),
                         "m2t (uncached)": decode_seconds(m2t, m2t_params, batch, cached=False)}
    evals = {name: final_eval(runs[name][1]) for name in runs}
    results = {"real_vs_real": real_check, "studies": {k: {str(s): v for s, v in d.items()}
                                                       for k, d in studies.items()},
               "decode_seconds": {str(b): v for b, v in timing.items()}, "evals": evals,
               "train_seconds": {name: runs[name][2] for name in runs}, "minutes": (time.time() - start) / 60}
    command = "python experiments/maskgit/reproduce.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v != p.get_default(k) and k not in ("workdirs", "smoke", "results_name"))
    write(results, command, args)


def _real_images(count: int, dataset: str = "builtin_shapes"):
    import numpy as np

    from maskjax.data import pipeline
    size = DATASETS[dataset]["image_size"]
    source = pipeline.make_source(dataset, "train", seed=0, image_size=size)
    images, labels = [], []
    for batch in pipeline.eval_batches(source, global_batch_size=250, image_size=size, num_examples=count,
                                       num_threads=0, prefetch=1):
        images.append(np.asarray(batch["image"])[np.asarray(batch["valid"])])
        labels.append(np.asarray(batch["label"])[np.asarray(batch["valid"])])
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def _row(name, m) -> str:
    return (f"| {name} | {m['frechet_distance']:.2f} | {m['kid']:.4f} ± {m['kid_std']:.4f} | {m['precision']:.3f} | "
            f"{m['recall']:.3f} | {100 * m['class_accuracy']:.1f} |")


def write(results: dict, command: str, args) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    header = ["| setting | Fréchet distance | KID | precision | recall | class accuracy % |",
              "|---|---|---|---|---|---|"]
    s, ev = results["studies"], results["evals"]
    d = DATASETS[args.dataset]
    what = "ablations, tokenizers, AR and M2T" if d["baselines"] else "ablations and the FSQ tokenizer"
    lines = [f"# MaskGIT on {d['title']}: {what}", "", f"`{command}`", "",
             f"Date: {datetime.date.today()}. maskjax commit `{commit}`. {args.samples} class-balanced samples per "
             f"setting vs {args.samples} images of the {d['eval_split']} split, in the features of the classifier "
             f"run ({d['classifier']}, {args.classifier_steps} steps; its {d['eval_split']} accuracy "
             f"{100 * ev['classifier'].get('eval/accuracy', float('nan')):.1f} %). Generators: "
             f"{args.generator_steps} steps each; tokenizers {args.tokenizer_steps} steps. Total "
             f"{results['minutes']:.0f} minutes on this 2-core CPU (training included where it ran).", "",
             f"Floor: real training images vs the {d['eval_split']} images, same counts:", "", *header,
             _row("real (train split)", results["real_vs_real"]), "",
             "## Decoding steps (cosine schedule, choice temperature 4.5)", "", *header,
             *[_row(f"{t} steps", m) for t, m in s["steps"].items()], "",
             "## Mask schedule (8 steps)", "", *header, *[_row(k, m) for k, m in s["schedule"].items()], "",
             "## Choice temperature (8 steps, cosine)", "", *header, *[_row(k, m) for k, m in s["temperature"].items()],
             "", "## Classifier-free guidance (8 steps, cosine; w constant)", "", *header,
             *[_row(f"w = {k}", m) for k, m in s["guidance"].items()], "",
             f"## Tokenizers ({d['eval_split']} split)", "",
             "| tokenizer | codebook usage | perplexity | PSNR dB |", "|---|---|---|---|"]
    for name in [n for n in ("tokenizer_fsq", "tokenizer_vq", "tokenizer_vq_pull") if n in ev]:
        e = ev[name]
        lines.append(f"| {name} | {100 * e['eval/codebook_usage']:.1f} % | {e['eval/perplexity']:.0f} | "
                     f"{e['eval/psnr']:.2f} |")
    if "generators" not in s:
        lines += ["", f"MaskGIT bits per token ({d['eval_split']}, confidence order): "
                  f"{ev['maskgit']['eval/bits_per_token']:.3f}. The AR baseline and M2T: see maskgit_builtin.md."]
        _save(lines, results, command, commit, args)
        return
    lines += ["", "## Generators at equal training compute", "", *header,
              *[_row(k, m) for k, m in s["generators"].items()], "",
              f"| generator | bits per token ({d['eval_split']}) |", "|---|---|",
              f"| autoregressive (raster order) | {ev['autoregressive']['eval/bits_per_token']:.3f} |",
              f"| M2T (Halton groups, masked attention) | {ev['m2t']['eval/bits_per_token']:.3f} |",
              f"| MaskGIT (confidence order) | {ev['maskgit']['eval/bits_per_token']:.3f} |", "",
              "Decode wall-clock (median, tokens only, jitted, after compilation):", "",
              "| decoder | batch 1 s | batch 64 s |", "|---|---|---|"]
    for name in results["decode_seconds"]["1"]:
        lines.append(f"| {name} | {results['decode_seconds']['1'][name]:.3f} | "
                     f"{results['decode_seconds']['64'][name]:.3f} |")
    t1, t64 = results["decode_seconds"]["1"], results["decode_seconds"]["64"]
    lines += ["", f"- AR cached / MaskGIT-8: {t1['autoregressive (cached)'] / t1['maskgit (8 steps)']:.2f}x at batch "
              "1, "
              f"{t64['autoregressive (cached)'] / t64['maskgit (8 steps)']:.2f}x at batch 64.",
              f"- M2T uncached / cached: {t1['m2t (uncached)'] / t1['m2t (cached)']:.2f}x at batch 1, "
              f"{t64['m2t (uncached)'] / t64['m2t (cached)']:.2f}x at batch 64."]
    _save(lines, results, command, commit, args)


def _save(lines: list, results: dict, command: str, commit: str, args) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.results_name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(RESULTS, f"{args.results_name}.json"), "w") as f:
        json.dump({"command": command, "commit": commit, **results}, f, indent=1, default=float)


if __name__ == "__main__":
    main()
