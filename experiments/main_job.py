"""The main job (`make run`: configs/mae_builtin.py) over several seeds: its wall-clock time with the machine to
itself, and the gain of the MAE encoder's linear probe and 20-NN over the same encoder at initialisation.

Command (runs one seed after another; about 15 minutes each on 2 CPU cores; a finished seed is not run again):
  python experiments/main_job.py                       # seeds 0 1 2 of configs/mae_builtin.py
  python experiments/main_job.py --arg full --seeds 0  # the longer recipe (configs/mae_builtin.py:full)
Writes experiments/results/main_job[_<arg>].{md,json}. Each run is exactly `python -m maskjax.main
--config=configs/mae_builtin.py --workdir=... --config.seed=<seed>`, the command `make run` uses, plus the seed.
Run it on an otherwise idle machine: the load average before and after each run is recorded beside its time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import sweep

RESULTS = os.path.join(sweep.REPO, "experiments", "results")
PROBES = ("linear_accuracy", "knn_accuracy")


def run_seed(config: str, workdir: str, seed: int) -> dict:
    """One run of the main job (skipped when its workdir holds a finished run), with its wall time and load."""
    record = os.path.join(workdir, "main_job_run.json")
    if os.path.exists(record):
        return json.load(open(record))
    load_before = os.getloadavg()[0]
    start = time.time()
    subprocess.run([sys.executable, "-m", "maskjax.main", f"--config={config}", f"--workdir={workdir}",
                    f"--config.seed={seed}", "--config.progress_bar=False"], cwd=sweep.REPO, check=True)
    seconds = time.time() - start
    records = sweep.read_metrics(workdir)
    steps = max(r["step"] for r in records)
    final = sweep.final(records, steps)
    row = {"seed": seed, "steps": steps, "minutes": seconds / 60, "load_before": load_before,
           "load_after": os.getloadavg()[0], "eval_loss": final.get("eval/loss"), "eval_psnr": final.get("eval/psnr")}
    for probe in PROBES:
        row[probe] = final[f"probe/{probe}"]
        row[f"random_init_{probe}"] = final[f"probe/random_init_{probe}"]
        row[f"{probe}_gain"] = row[probe] - row[f"random_init_{probe}"]
    json.dump(row, open(record, "w"), indent=1)
    return row


def table(rows: list, command: str, config: str) -> str:
    lines = [f"# The main job over {len(rows)} seeds", "", f"`{command}`", "",
             f"Date: {time.strftime('%Y-%m-%d')}. maskjax commit `{commit()}`. Config: `{config}`. Each run alone on "
             "this machine (load average before / after in the table); minutes are wall-clock time of the whole "
             "command (start-up, compilation, training, evaluations, probes).", "",
             "| seed | steps | minutes | load before / after | linear probe: MAE / init / gain | 20-NN: MAE / init / "
             "gain | eval loss | PSNR dB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        probes = [f"{100 * r[p]:.1f} / {100 * r['random_init_' + p]:.1f} / **{100 * r[p + '_gain']:+.1f}**"
                  for p in PROBES]
        lines.append(f"| {r['seed']} | {r['steps']} | {r['minutes']:.1f} | {r['load_before']:.1f} / "
                     f"{r['load_after']:.1f} | {probes[0]} | {probes[1]} | {r['eval_loss']:.3f} | "
                     f"{r['eval_psnr']:.2f} |")
    lines.append("")
    for p, name in zip(PROBES, ("linear probe", "20-NN")):
        gains = [100 * r[p + "_gain"] for r in rows]
        spread = f" ± {statistics.stdev(gains):.1f} (std)" if len(gains) > 1 else ""
        lines.append(f"- {name} gain over the encoder at initialisation: mean {statistics.mean(gains):+.1f} points"
                     f"{spread}, smallest {min(gains):+.1f}.")
    lines.append(f"- Longest run: {max(r['minutes'] for r in rows):.1f} minutes.")
    return "\n".join(lines) + "\n"


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=sweep.REPO, capture_output=True,
                          text=True).stdout.strip()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arg", default="", help="argument of configs/mae_builtin.py, e.g. 'full'")
    p.add_argument("--workdir-root", default=os.path.join(sweep.REPO, "workdirs", "main_job"))
    args = p.parse_args(argv)
    config = "configs/mae_builtin.py" + (f":{args.arg}" if args.arg else "")
    suffix = f"_{args.arg}" if args.arg else ""
    command = ("python experiments/main_job.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    rows = [run_seed(config, os.path.join(args.workdir_root, f"{args.arg or 'default'}_seed{seed}"), seed)
            for seed in args.seeds]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"main_job{suffix}.md"), "w") as f:
        f.write(table(rows, command, config))
    with open(os.path.join(RESULTS, f"main_job{suffix}.json"), "w") as f:
        json.dump({"command": command, "config": config, "commit": commit(), "rows": rows}, f, indent=1)
    print(table(rows, command, config))


if __name__ == "__main__":
    main()
