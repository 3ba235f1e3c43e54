"""A/B timing of `blocked` attention between two revisions of maskjax, on bench_attention.py's masks.

    python experiments/bench_blocked_ab.py --base 2cfdb9c      # base revision vs this checkout
    python experiments/bench_blocked_ab.py --base main --ns 1024 --rounds 1 --out /tmp/ab

The base revision is exported with `git archive` into a temporary directory; each side runs in its own process
with its own `maskjax` first on PYTHONPATH (the masks come from this checkout's bench_attention.make_masks, so both
sides compute the same problems), alternating base / head for `--rounds` rounds. Per (n, mask, mode): the minimum
over rounds of each side's best-of-`--reps` time (compile excluded), and head / base. Writes
experiments/results/blocked_ab.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
MODES = ("fwd", "fwdbwd")


def worker(ns: list[int], masks, reps: int, out: str) -> None:
    """Times blocked for every bench_attention mask at each n (runs in a child with the side's maskjax)."""
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, HERE)
    import bench_attention as ba

    times = {}
    for n in ns:
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((ba.BATCH, n, ba.HEADS, ba.DIM)), jnp.float32) for _ in range(3))
        for name, (mask, arr, block) in ba.make_masks(n, np.random.default_rng(0)).items():
            if masks and name not in masks:
                continue
            fwd, fwdbwd = ba.build("blocked", mask, n, block, False)
            a = None if arr is None else jnp.asarray(arr[:, None])
            for mode, f in zip(MODES, (fwd, fwdbwd)):
                times[f"{n}|{name}|{mode}"], _ = ba.timed(f, (q, k, v, a), reps)
    with open(out, "w") as f:
        json.dump(times, f)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=False, help="git revision to compare against")
    p.add_argument("--ns", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--masks", nargs="+", default=None, help="subset of bench_attention's mask names")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=os.path.join(RESULTS, "blocked_ab"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.ns, args.masks, args.reps, args.worker_out)
        return
    if not args.base:
        p.error("--base: a git revision is required")
    base_commit = git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    head_commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "maskjax"))
    command = "python experiments/bench_blocked_ab.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = os.getloadavg()
    results = {"base": [], "head": []}
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = os.path.join(tmp, "base")
        os.makedirs(base_tree)
        archive = subprocess.run(["git", "archive", base_commit, "maskjax"], cwd=REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", base_tree], input=archive, check=True)
        trees = {"base": base_tree, "head": REPO}
        for r in range(args.rounds):
            for side in ("base", "head"):
                out = os.path.join(tmp, f"{side}_{r}.json")
                env = dict(os.environ, PYTHONPATH=trees[side] + os.pathsep + os.environ.get("PYTHONPATH", ""))
                subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", side, "--worker-out", out,
                                "--ns", *map(str, args.ns), "--reps", str(args.reps)]
                               + (["--masks", *args.masks] if args.masks else []), env=env, check=True)
                with open(out) as f:
                    results[side].append(json.load(f))
                print(f"round {r} {side} done", flush=True)
    keys = list(results["head"][0])
    rows = []
    for key in keys:
        n, mask, mode = key.split("|")
        base = min(t[key] for t in results["base"])
        head = min(t[key] for t in results["head"])
        rows.append(dict(n=int(n), mask=mask, mode=mode, base=base, head=head, ratio=head / base))
    meta = dict(command=command.strip(), base=base_commit, head=head_commit, head_dirty=dirty,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                load_avg_before=load_before, load_avg_after=os.getloadavg(), rounds=args.rounds, reps=args.reps)
    slower = [r for r in rows if r["ratio"] > 1.05]
    lines = ["# blocked attention: this revision vs a base revision", "", f"Command: `{meta['command']}`", "",
             f"{meta['date']}; base {base_commit[:10]}, head {head_commit[:10]}"
             f"{' + uncommitted changes' if dirty else ''}; load average before {load_before[0]:.2f}, after "
             f"{meta['load_avg_after'][0]:.2f}. bench_attention.py's masks and sizes (batch 1, 4 heads, head dim 64, "
             f"float32); seconds, minimum over {args.rounds} alternating rounds of best-of-{args.reps}.", "",
             "| n | mask | mode | base | head | head / base |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['mask']} | {r['mode']} | {r['base']:.4f} | {r['head']:.4f} | {r['ratio']:.2f} |"
              for r in rows]
    slower_text = ", ".join(f"{r['n']} {r['mask']} {r['mode']} ({r['ratio']:.2f})" for r in slower) or "none"
    lines += ["", f"Head / base: {min(r['ratio'] for r in rows):.2f}–{max(r['ratio'] for r in rows):.2f}; rows more "
              f"than 5 % slower: {slower_text}."]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
