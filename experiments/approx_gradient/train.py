"""Training with approximate attention gradients: a small ViT (head dim 16) trained with exact attention and
with the `approx` backend (`exact_fwd`, `lowrank`, hybrid), all with bounded logits, plus unbounded runs.

    python experiments/approx_gradient/train.py                       # both data sets, every run
    python experiments/approx_gradient/train.py --datasets builtin_shapes --steps 100   # quick look

Each run is `python -m maskjax.main --config=configs/vit_<data>.py --config.model.attention.*=...` in its own
process, one after another (same machine, same steps); a finished run (final eval in its metrics.jsonl) is not
repeated, so an interrupted sweep continues where it stopped. Writes results/train.{md,json,png}.
"""

import argparse
import json
import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import sweep  # noqa: E402

RESULTS = os.path.join(HERE, "results")

DATASETS = {"builtin_shapes": "configs/vit_builtin.py", "fashion_mnist": "configs/vit_fashion_mnist.py"}
# width 96 / 6 heads: head dim 16, feature rank C(16+2, 2) = 153 at degree 2.
MODEL = {"model.variant": "Ti/4", "model.width": 96, "model.num_heads": 6, "model.mlp_dim": 384,
         "model.depth": 4, "model.attention.record_max_logit": True}
BOUND = 2.0
WINDOW = 9  # hybrid: keys within 8 positions (about one grid row on either side of a patch) are exact
RUNS = {
    "exact": dict(backend="auto", logit_bound=BOUND),
    "exact_fwd": dict(backend="approx", approx_mode="exact_fwd", logit_bound=BOUND),
    "lowrank": dict(backend="approx", approx_mode="lowrank", logit_bound=BOUND),
    "hybrid": dict(backend="approx", approx_mode="lowrank", approx_window=WINDOW, logit_bound=BOUND),
    "exact (seed 1)": dict(backend="auto", logit_bound=BOUND, seed=1),
    "hybrid (seed 1)": dict(backend="approx", approx_mode="lowrank", approx_window=WINDOW, logit_bound=BOUND, seed=1),
    "exact unbounded": dict(backend="auto", logit_bound=0.0),
    "lowrank unbounded": dict(backend="approx", approx_mode="lowrank", logit_bound=0.0),
}


def slug(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "")


def run_overrides(name: str, steps: int) -> dict:
    settings = dict(RUNS[name])
    seed = settings.pop("seed", 0)
    overrides = dict(MODEL, **{f"model.attention.{k}": v for k, v in settings.items()})
    overrides.update({"seed": seed, "evals.eval.every": 0, "batch_size": 64, "checkpoint_every": steps,
                      "log_every": 10, "optimizer.warmup_steps": max(steps // 20, 1), "evals.predictions.every": -1})
    return overrides


def summarize(records: list, steps: int, seconds: float) -> dict:
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    final = [r for r in evals if r["step"] == steps][-1]
    logit = [r["train/max_abs_logit"] for r in train if "train/max_abs_logit" in r]
    rates = [r["train/images_per_second"] for r in train[1:] if "train/images_per_second" in r]
    return dict(eval_accuracy=final["eval/accuracy"], eval_loss=final["eval/loss"],
                final_train_loss=float(np.mean([r["train/loss"] for r in train[-5:]])),
                max_abs_logit=max(logit) if logit else None, last_max_abs_logit=logit[-1] if logit else None,
                images_per_second=float(np.median(rates)) if rates else None, wall_seconds=seconds,
                curve=[(r["step"], r["train/loss"]) for r in train],
                eval_curve=[(r["step"], r["eval/accuracy"]) for r in evals],
                logit_curve=[(r["step"], r["train/max_abs_logit"]) for r in train if "train/max_abs_logit" in r])


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(results)
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.6 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        for name, r in results[dataset].items():
            style = "--" if "unbounded" in name else "-"
            steps, loss = zip(*r["curve"])
            axes[row, 0].plot(steps, loss, style, label=f"{name} ({100 * r['eval_accuracy']:.1f}%)")
            if r["logit_curve"]:
                s, m = zip(*r["logit_curve"])
                axes[row, 1].plot(s, m, style, label=name)
        axes[row, 0].set(title=f"{dataset}: train loss (final eval accuracy)", xlabel="step", ylabel="loss")
        axes[row, 1].axhline(BOUND, color="k", lw=0.8, ls=":")
        axes[row, 1].set(title=f"{dataset}: observed max |q·k| (dotted: bound {BOUND})", xlabel="step",
                         ylabel="max |logit|", yscale="log")
        axes[row, 0].legend(fontsize=7)
        axes[row, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, command: str, steps: int) -> None:
    meta = dict(command=command, steps=steps, model=MODEL, bound=BOUND, window=WINDOW, runs=RUNS,
                machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
                load_avg_end=os.getloadavg())
    with open(os.path.join(RESULTS, "train.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    plot(results, os.path.join(RESULTS, "train.png"))
    lines = ["# Training with approximate attention gradients", "", "Command (from the repository root):", "",
             f"```\n{command}\n```", "",
             f"Model: ViT width 96, 6 heads (head dim 16), depth 4, MLP 384, patch 4 (65 tokens with cls); "
             f"{steps} steps of batch 64 per run (evaluation on the whole eval split at the end), one run after another on this machine ({meta['machine']}, shared; load "
             f"average at the end {meta['load_avg_end'][0]:.1f}). Bounded runs: q and k L2-normalised, learned "
             f"per-head temperature in (0, {BOUND}), so |q·k| <= {BOUND}. Approximate runs use degree 2 "
             f"(rank 153); hybrid: exact for |i - j| < {WINDOW}, low-rank beyond. Every run records the "
             "observed max |q·k| over all blocks (per step, exact).", ""]
    for dataset, runs in results.items():
        lines += [f"## {dataset}", "",
                  "| run | eval accuracy | vs exact (points) | final train loss | max observed logit (last) | "
                  "img/s (median) | wall-clock |", "|---|---|---|---|---|---|---|"]
        for name, r in runs.items():
            # each run against the exact run of its own logit regime (bounded or not)
            reference = "exact unbounded" if "unbounded" in name and name != "exact unbounded" else "exact"
            if "(seed 1)" in name and name != "exact (seed 1)":
                reference = "exact (seed 1)"
            base = runs.get(reference, {}).get("eval_accuracy")
            delta = (f"{100 * (r['eval_accuracy'] - base):+.1f}" + (f" (vs {reference})" if reference != "exact" else "")
                     if base is not None else "—")
            logit = "—" if r["max_abs_logit"] is None else f"{r['max_abs_logit']:.2f} ({r['last_max_abs_logit']:.2f})"
            rate = "—" if r["images_per_second"] is None else f"{r['images_per_second']:.0f}"
            lines.append(f"| {name} | {100 * r['eval_accuracy']:.1f}% | {delta} | {r['final_train_loss']:.3f} | "
                         f"{logit} | {rate} | {r['wall_seconds'] / 60:.1f} min |")
        lines.append("")
    lines += ["Reading the table: 'vs exact' compares with the exact run under the same logit regime; the "
              "'exact (seed 1)' row shows how much a different seed alone moves accuracy. img/s and wall-clock are "
              "dominated by other jobs sharing the machine (the same exact configuration ran at 90 and 250 img/s); at "
              "65 tokens the low-rank kernel (rank 153 > 65) cannot be faster than exact attention, so equal "
              "wall-clock favours exact training: see time_vs_n.md for where the method is faster.", "",
              "![curves](train.png)", ""]
    with open(os.path.join(RESULTS, "train.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--workdir-root", default=os.path.join(sweep.REPO, "workdirs", "approx_train"))
    args = p.parse_args(argv)
    command = "python experiments/approx_gradient/train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {}
    for dataset in args.datasets:
        results[dataset] = {}
        for name in args.runs:
            workdir = os.path.join(args.workdir_root, f"{dataset}_{args.steps}", slug(name))
            records, seconds = sweep.run(DATASETS[dataset], workdir, run_overrides(name, args.steps), args.steps)
            results[dataset][name] = summarize(records, args.steps, seconds)
            print(dataset, name, {k: v for k, v in results[dataset][name].items() if "curve" not in k}, flush=True)
            write(results, command.strip(), args.steps)


if __name__ == "__main__":
    main()
