"""Masked image modeling on CPU: does MAE pre-training give better frozen features than random init, how does it
compare with supervised training, which masking strategy and which mask ratio work best?

    python experiments/mim/reproduce.py                              # every study, both data sets
    python experiments/mim/reproduce.py --studies ratio --datasets builtin_shapes --steps 300 \
        --results-dir /tmp/mim300                                  # a shorter sweep, kept apart

Studies (each run: `python -m maskjax.main` with the MAE configs, then a linear probe and a k-NN on the frozen
encoder, and the same probes on the encoder at its initialisation):
  baseline   MAE (random masking, ratio 0.75) vs supervised training of the same ViT at the same batch size
             (probed the same way)
  strategy   random vs block (BEiT) vs attention-guided (AttMask-High, the encoder's own cls attention) vs
             hard-patch mining (HPM, its loss predictor, hardest share 0 -> 0.5) at ratio 0.75
  strategy_extra  grid (ConvMAE, 2x2 cells) and noise (ColorMAE green) masking at ratio 0.75
  ratio      random masking at 0.25, 0.5, 0.75, 0.9 (MAE reports ~0.75 as best on ImageNet: checked, not assumed)
Runs are sequential and resumable (see experiments/sweep.py). Writes results/mim.{md,json,png}; a results
directory holds one step count, so a sweep of another length needs its own --results-dir.
"""

import argparse
import importlib
import json
import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import sweep  # noqa: E402

RESULTS = os.path.join(HERE, "results")
MAE_CONFIGS = {"builtin_shapes": "configs/mae_builtin.py", "fashion_mnist": "configs/mae_fashion_mnist.py"}
SUPERVISED_CONFIGS = {"builtin_shapes": "configs/vit_builtin.py", "fashion_mnist": "configs/vit_fashion_mnist.py"}
STUDIES = {
    "baseline": {"MAE random 0.75": {}, "supervised": None},
    "strategy": {"random": {"mim.masking": "random"}, "block": {"mim.masking": "block"},
                 "attention (AttMask-High)": {"mim.masking": "attention"},
                 "hard patches (HPM)": {"mim.masking": "hard_patch"}},
    "strategy_extra": {"grid 2x2": {"mim.masking": "grid"}, "noise (green)": {"mim.masking": "noise"}},
    "ratio": {f"ratio {r}": {"mim.mask_ratio": r} for r in (0.25, 0.5, 0.75, 0.9)},
}


def mae_batch_size(dataset: str) -> int:
    """Batch size of the MAE config of `dataset`: the supervised run uses it too (equal steps and images)."""
    sys.path.insert(0, sweep.REPO)
    module = importlib.import_module("configs." + os.path.basename(MAE_CONFIGS[dataset])[:-3])
    return int(module.get_config().batch_size)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--studies", nargs="+", default=["baseline", "strategy", "ratio"], choices=list(STUDIES))
    p.add_argument("--datasets", nargs="+", default=list(MAE_CONFIGS), choices=list(MAE_CONFIGS))
    p.add_argument("--steps", type=int, default=2000)  # 600 MAE steps are too few to move the probes (README)
    p.add_argument("--runs", nargs="+", default=None,
                   help="only the runs whose name contains one of these (case-insensitive), in this order, e.g. "
                        "--runs attention hard")
    p.add_argument("--collect-only", action="store_true",
                   help="tabulate the finished runs, start none (e.g. while another invocation is still running)")
    p.add_argument("--workdir-root", default=os.path.join(sweep.REPO, "workdirs", "mim"))
    p.add_argument("--results-dir", default=RESULTS, help="where mim.{md,json,png} go (default: %(default)s)")
    args = p.parse_args(argv)
    saved_steps, saved = read_saved(args.results_dir)
    if saved_steps not in (None, args.steps):
        p.error(f"{args.results_dir}/mim.json holds {saved_steps}-step runs and --steps is {args.steps}: pass "
                "--results-dir for a sweep of another length (the tables would otherwise be replaced)")
    command = ("python experiments/mim/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    results, pending = {}, []
    for dataset in args.datasets:
        for study in args.studies:
            for name, overrides in selected(STUDIES[study], args.runs):
                if overrides is None:  # supervised: the MAE config's encoder and batch size, probed at the end
                    config = SUPERVISED_CONFIGS[dataset]
                    overrides = {"evals.probe.every": 0, "evals.probe.train_examples": 10000,
                                 "model.posemb": "sincos2d", "batch_size": mae_batch_size(dataset)}
                else:
                    config = MAE_CONFIGS[dataset]
                    overrides = {"mim.masking": "random", "mim.mask_ratio": 0.75, **overrides}
                    if dataset == "builtin_shapes":  # the study's recipe (configs/mae_builtin.py:full)
                        overrides.update({"model.decoder_depth": 2, "evals.eval.every": 200})
                overrides["optimizer.warmup_steps"] = max(1, min(40, args.steps // 10))
                if dataset == "fashion_mnist" and overrides.get("mim.masking") == "grid":
                    print(dataset, name, "skipped: 2x2 cells do not tile the 7x7 patch grid", flush=True)
                    continue
                # identical settings share one run (e.g. random 0.75 appears in every study)
                run_name = os.path.basename(config)[:-3] + "_" + "_".join(
                    f"{k}={v}" for k, v in sorted(overrides.items()) if k.startswith("mim."))
                workdir = os.path.join(args.workdir_root, f"{dataset}_{args.steps}", slug(run_name))
                if args.collect_only and not sweep.finished(sweep.read_metrics(workdir), args.steps):
                    if name not in saved.get(dataset, {}).get(study, {}):  # rows of earlier machines stay
                        pending.append(f"{dataset} / {study} / {name}")
                    continue
                records, seconds = sweep.run(config, workdir, overrides, args.steps)
                final = sweep.final(records, args.steps)
                row = {k: final.get(f"probe/{k}") for k in
                       ("linear_accuracy", "knn_accuracy", "random_init_linear_accuracy", "random_init_knn_accuracy")}
                row.update(eval_loss=final.get("eval/loss"), eval_psnr=final.get("eval/psnr"),
                           eval_accuracy=final.get("eval/accuracy"), wall_seconds=seconds)
                results.setdefault(dataset, {}).setdefault(study, {})[name] = row
                print(dataset, study, name, row, flush=True)
                write(results, command, args.steps, args.results_dir)
    if args.collect_only:
        write(results, command, args.steps, args.results_dir, pending)


def selected(runs: dict, patterns) -> list:
    """The (name, overrides) of `runs`, all of them or those matching `patterns` in the patterns' order."""
    if not patterns:
        return list(runs.items())
    names = [n for p in patterns for n in runs if p.lower() in n.lower()]
    return [(n, runs[n]) for n in dict.fromkeys(names)]


def _minutes(seconds):
    return "—" if seconds is None or not np.isfinite(seconds) else f"{seconds / 60:.1f} min"


def _pct(x):
    return "—" if x is None else f"{100 * x:.1f}%"


def read_saved(results_dir: str) -> tuple:
    """(step count, rows) of `results_dir`/mim.json; (None, {}) if there is no such file."""
    path = os.path.join(results_dir, "mim.json")
    if not os.path.exists(path):
        return None, {}
    with open(path) as f:
        saved = json.load(f)
    return saved["meta"]["steps"], saved["results"]


def merged_with_saved(results: dict, results_dir: str) -> dict:
    """`results` on top of the rows already in `results_dir`/mim.json (several invocations, e.g. one per data
    set, build one table; main() has checked that they ran the same number of steps)."""
    _, saved = read_saved(results_dir)
    for dataset, studies in results.items():
        for study, rows in studies.items():
            saved.setdefault(dataset, {}).setdefault(study, {}).update(rows)
    return in_study_order(saved)


def in_study_order(results: dict) -> dict:
    """`results` with data sets, studies and runs in the order of MAE_CONFIGS and STUDIES (ratios ascending), so
    tables and plots read in that order whichever invocation finished first."""
    def rank(order, key):
        order = list(order)
        return order.index(key) if key in order else len(order)

    return {dataset: {study: {name: rows[name] for name in sorted(rows, key=lambda n: rank(STUDIES.get(study, {}), n))}
                      for study, rows in sorted(studies.items(), key=lambda kv: rank(STUDIES, kv[0]))}
            for dataset, studies in sorted(results.items(), key=lambda kv: rank(MAE_CONFIGS, kv[0]))}


def write(results, command, steps, results_dir, pending=()):
    os.makedirs(results_dir, exist_ok=True)
    results = merged_with_saved(results, results_dir)
    meta = dict(command=command, steps=steps, machine=f"{platform.machine()}, {os.cpu_count()} cores",
                load_avg_end=os.getloadavg())
    json_path = os.path.join(results_dir, "mim.json")
    with open(json_path + ".tmp", "w") as f:  # every finished run's row is in here: never leave it half-written
        json.dump(dict(meta=meta, results=results), f, indent=1)
    os.replace(json_path + ".tmp", json_path)
    lines = ["# Masked image modeling on CPU: frozen-feature probes", "",
             "Command: `python experiments/mim/reproduce.py` (every study, both data sets; one data set or study "
             f"at a time with --datasets / --studies; this file was last written by `{command}`).", "",
             f"{steps} steps per run (configs/mae_*.py, ViT-Ti/4 at depth 6, decoder 128 x 2; supervised: "
             f"configs/vit_*.py with the same encoder). Probes: linear (standardised features, weight decay chosen "
             "on a held-out part of the train features) and weighted 20-NN, on the encoder's cls token after its "
             "final norm (MAE's linear-probing protocol; supervised: the cls pre-logits), 10000 train images, the "
             "whole eval split. 'at init' = the same encoder before training. Eval loss and PSNR use random masks "
             "of the run's ratio for the score-guided strategies. Wall-clock includes the probes; runs shared the "
             f"machine ({meta['machine']}) with other work, so compare accuracies, not minutes.", "",
             "![probes](mim.png)", ""]
    for dataset, studies in results.items():
        for study, rows in studies.items():
            lines += [f"## {dataset}: {study}", "", "| run | linear probe | k-NN | linear at init | k-NN at init | "
                      "eval (MAE: masked-patch loss, PSNR; supervised: top-1) | wall-clock |",
                      "|---|---|---|---|---|---|---|"]
            for name, r in rows.items():
                if r.get("eval_accuracy") is not None:
                    evaluation = f"top-1 {_pct(r['eval_accuracy'])}"
                elif r["eval_loss"] is not None:
                    psnr = "" if r["eval_psnr"] is None else f", {r['eval_psnr']:.2f} dB"
                    evaluation = f"{r['eval_loss']:.3f}{psnr}"
                else:
                    evaluation = "—"
                lines.append(f"| {name} | {_pct(r['linear_accuracy'])} | {_pct(r['knn_accuracy'])} | "
                             f"{_pct(r['random_init_linear_accuracy'])} | {_pct(r['random_init_knn_accuracy'])} | "
                             f"{evaluation} | {_minutes(r['wall_seconds'])} |")
            lines.append("")
    if pending:
        lines += ["## Not measured yet", "", "Runs of `python experiments/mim/reproduce.py` not finished when this "
                  "file was written (the same command resumes them):", ""] + [f"- {p}" for p in pending] + [""]
    with open(os.path.join(results_dir, "mim.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(results, os.path.join(results_dir, "mim.png"))


def plot(results: dict, path: str) -> None:
    """One row per data set: linear-probe accuracy by run for each study (the init probe as a grey tick)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = list(results)
    studies = [s for s in STUDIES if any(s in results[d] for d in datasets)]
    if not datasets or not studies:
        return
    fig, axes = plt.subplots(len(datasets), len(studies), figsize=(4.2 * len(studies), 3.2 * len(datasets)),
                             squeeze=False)
    for i, dataset in enumerate(datasets):
        for j, study in enumerate(studies):
            ax = axes[i][j]
            rows = results[dataset].get(study, {})
            names = [n for n, r in rows.items() if r["linear_accuracy"] is not None]
            if study == "ratio":
                ratios = [float(n.split()[-1]) for n in names]
                ax.plot(ratios, [100 * rows[n]["linear_accuracy"] for n in names], "o-", label="linear probe")
                ax.plot(ratios, [100 * rows[n]["knn_accuracy"] for n in names], "s--", label="20-NN")
                ax.set_xlabel("mask ratio")
                ax.legend(fontsize=7)
            else:
                x = np.arange(len(names))
                ax.bar(x - 0.2, [100 * rows[n]["linear_accuracy"] for n in names], 0.4, label="linear probe")
                ax.bar(x + 0.2, [100 * rows[n]["knn_accuracy"] for n in names], 0.4, label="20-NN")
                init = [rows[n]["random_init_linear_accuracy"] for n in names]
                ax.scatter(x - 0.2, [100 * v if v is not None else np.nan for v in init], marker="_", s=300,
                           color="grey", label="linear at init", zorder=3)
                ax.set_xticks(x, [n.split(" (")[0] for n in names], rotation=20, fontsize=7)
                ax.legend(fontsize=7)
            ax.set_title(f"{dataset}: {study}", fontsize=9)
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
