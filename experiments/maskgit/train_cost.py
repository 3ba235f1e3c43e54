"""Training cost of the runs of experiments/maskgit/reproduce.py on this machine: median images per second of each
run (the trainer's `train/images_per_second`, logged every 10 steps) and the minutes 2000 steps take at that rate.
The median is taken over the logged windows; runs that shared the CPU with another job for part of their steps
show it as a lower median (the 90th percentile is the closest to the run alone).

    python experiments/maskgit/train_cost.py                       # built-in shapes
    python experiments/maskgit/train_cost.py --dataset fashion_mnist
Writes experiments/results/<maskgit_builtin|maskgit_fashion_mnist>_cost.md.
"""

import argparse
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RUNS = ("classifier", "tokenizer_fsq", "tokenizer_vq", "tokenizer_vq_pull", "maskgit", "autoregressive", "m2t")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="builtin_shapes", choices=("builtin_shapes", "fashion_mnist"))
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args()
    fmnist = args.dataset == "fashion_mnist"
    workdirs = os.path.join(ROOT, "workdirs", "maskgit_repro_fmnist" if fmnist else "maskgit_repro")
    name = "maskgit_fashion_mnist_cost" if fmnist else "maskgit_builtin_cost"
    command = "python experiments/maskgit/train_cost.py" + (" --dataset fashion_mnist" if fmnist else "")
    lines = [f"# Training cost of the MaskGIT reproduction runs ({args.dataset})", "", f"Command: `{command}`", "",
             f"From each run's metrics.jsonl in `{os.path.relpath(workdirs, ROOT)}` (2-core CPU).", "",
             "| run | batch | logged windows | median images/s | 90th percentile images/s | "
             f"minutes for {args.steps} steps at the median | at the 90th percentile |", "|---|---|---|---|---|---|---|"]
    for run in RUNS:
        path = os.path.join(workdirs, run, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        with open(os.path.join(workdirs, run, "config.json")) as f:
            batch = int(json.load(f)["batch_size"])
        rates = sorted(r["train/images_per_second"] for r in map(json.loads, open(path))
                       if "train/images_per_second" in r)
        median, p90 = statistics.median(rates), rates[int(0.9 * (len(rates) - 1))]
        lines.append(f"| {run} | {batch} | {len(rates)} | {median:.1f} | {p90:.1f} | "
                     f"{args.steps * batch / median / 60:.1f} | {args.steps * batch / p90 / 60:.1f} |")
    with open(os.path.join(ROOT, "experiments", "results", name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
