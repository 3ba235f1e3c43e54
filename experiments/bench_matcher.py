"""On-device Hungarian matching vs scipy: `jax.jit(jax.vmap(linear_sum_assignment))` on a batch of cost matrices,
side by side with `scipy.optimize.linear_sum_assignment` called in a Python loop over the same batch.

    python experiments/bench_matcher.py

scipy runs at its fastest: a list of C-contiguous float64 numpy arrays built before timing, nothing converted in
the timed region. The JAX matcher gets a float32 device array and is timed after compilation, waiting for its
result (`block_until_ready`); a second JAX variant also copies the result to the host (`np.asarray`), which is
what a host-side caller of scipy would need. `jit(vmap(match_padded))` (all targets valid) is the form a loss
uses. The variants alternate call by call (`--rounds` rounds of `--calls` calls each, the order reversed every
other round), so load from other processes falls on all of them alike; medians (and minima) of the per-batch
time are reported with their ratios. Before timing, every matrix's total cost is checked against scipy's
(relative 1e-4) and the largest deviation is recorded. Writes experiments/results/matcher.{md,json}.

The machine is shared (load average recorded): JAX on CPU dispatches through a thread pool and suffers more
from other processes than single-threaded scipy does, so the medians and the minima are both given.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
import scipy
from scipy import optimize

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(ROOT, "experiments", "results")
sys.path.insert(0, ROOT)

CASES = [(64, 50, 10), (64, 100, 20), (8, 100, 20), (8, 50, 10)]  # (batch, queries n, targets m)
GOAL_CASE = (64, 50, 10)


def _time(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def bench_case(batch: int, n: int, m: int, rounds: int, calls: int, seed: int) -> dict:
    from maskjax.tasks.hungarian import linear_sum_assignment, match_padded

    rng = np.random.default_rng(seed)
    costs32 = rng.random((batch, n, m)).astype(np.float32)
    mats = [np.ascontiguousarray(c, dtype=np.float64) for c in costs32]  # scipy's input, built untimed
    device_costs = jax.device_put(costs32)
    valid = jax.device_put(np.ones((batch, m), bool))
    lsa = jax.jit(jax.vmap(linear_sum_assignment))
    match = jax.jit(jax.vmap(match_padded))

    # Correctness first: total cost per matrix against scipy's.
    rows, cols = map(np.asarray, lsa(device_costs))
    qft = np.asarray(match(device_costs, valid).query_for_target)
    deviation = 0.0
    for b, c in enumerate(mats):
        r, k = optimize.linear_sum_assignment(c)
        want = c[r, k].sum()
        for got in (c[rows[b], cols[b]].sum(), c[qft[b], np.arange(m)].sum()):
            deviation = max(deviation, abs(got - want) / max(1.0, abs(want)))
    assert deviation <= 1e-4, f"{batch}x{n}x{m}: total cost deviates from scipy's by {deviation:.2e} (relative)"

    def scipy_loop():
        for c in mats:
            optimize.linear_sum_assignment(c)

    variants = {
        "jax": lambda: jax.block_until_ready(lsa(device_costs)),
        "jax + to host": lambda: [np.asarray(x) for x in lsa(device_costs)],
        "jax match_padded": lambda: jax.block_until_ready(match(device_costs, valid)),
        "scipy loop": scipy_loop,
    }
    for fn in variants.values():  # warm-up (compilation, caches)
        fn()
    times = {name: [] for name in variants}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            times[name].append(_time(variants[name], calls))
    median = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    times_us = {name: [round(x * 1e6, 1) for x in t] for name, t in times.items()}
    return {"batch": batch, "n": n, "m": m, "median_s": median, "min_s": best, "times_us": times_us,
            "max_rel_cost_deviation": deviation,
            "scipy_over_jax_median": median["scipy loop"] / median["jax"],
            "scipy_over_jax_to_host_median": median["scipy loop"] / median["jax + to host"],
            "scipy_over_jax_min": best["scipy loop"] / best["jax"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    load_before = os.getloadavg()
    results = [bench_case(b, n, m, args.rounds, args.calls, args.seed) for b, n, m in CASES]
    load_after = os.getloadavg()

    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "maskjax/tasks/hungarian.py"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    defaults = {"rounds": 300, "calls": 1, "seed": 0}
    command = "python experiments/bench_matcher.py" + "".join(
        f" --{k} {v}" for k, v in vars(args).items() if v != defaults[k])
    goal = next(r for r in results if (r["batch"], r["n"], r["m"]) == GOAL_CASE)
    met = goal["scipy_over_jax_median"] >= 1.0

    def us(s: float) -> str:
        return f"{s * 1e6:.0f}"

    lines = [
        "# On-device Hungarian matcher vs scipy in a Python loop", "", f"`{command}`", "",
        f"Date: {datetime.date.today()}. maskjax commit `{commit}`"
        f"{' (maskjax/tasks/hungarian.py modified, not committed)' if dirty else ''}. jax {jax.__version__} "
        f"(backend {jax.default_backend()}, {len(jax.devices())} device), scipy {scipy.__version__}, numpy "
        f"{np.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPU cores. Load average "
        f"(1, 5, 15 min) {tuple(round(x, 2) for x in load_before)} before, "
        f"{tuple(round(x, 2) for x in load_after)} after: the machine is shared with other jobs.", "",
        f"Uniform random costs (seed {args.seed}). Per batch, microseconds: median (min) over {args.rounds} "
        f"alternating rounds of {args.calls} call{'s' if args.calls > 1 else ''} per variant. `jax`: "
        "`jax.jit(jax.vmap(linear_sum_assignment))`, float32, result left on the device; `jax + to host`: the "
        "same and `np.asarray` of both outputs; `jax match_padded`: `jax.jit(jax.vmap(match_padded))` with all "
        "targets valid; `scipy loop`: "
        "`scipy.optimize.linear_sum_assignment` on each float64 matrix of a prebuilt list. Ratio = scipy / jax "
        "(> 1: the JAX matcher is faster). Max deviation = largest relative difference of a matrix's total cost "
        "from scipy's (both JAX variants).", "",
        "| batch x n x m | jax | jax + to host | jax match_padded | scipy loop | ratio (median) | ratio with "
        "transfer | ratio (min) | max deviation |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        md, mn = r["median_s"], r["min_s"]
        cell = {k: f"{us(md[k])} ({us(mn[k])})" for k in md}
        lines.append(f"| {r['batch']} x {r['n']} x {r['m']} | {cell['jax']} | {cell['jax + to host']} | "
                     f"{cell['jax match_padded']} | {cell['scipy loop']} | {r['scipy_over_jax_median']:.2f} | "
                     f"{r['scipy_over_jax_to_host_median']:.2f} | {r['scipy_over_jax_min']:.2f} | "
                     f"{r['max_rel_cost_deviation']:.1e} |")
    lines += ["", f"Goal (jit+vmap at least as fast as scipy in a loop, batch 64 of 50x10, medians): "
                  f"**{'met' if met else 'not met'}**, ratio {goal['scipy_over_jax_median']:.2f} "
                  f"({goal['scipy_over_jax_to_host_median']:.2f} with the transfer to the host).", "",
              "Reading the numbers: JAX runs one loop for the whole batch, until the matrix that needs the most "
              "search steps is done (about 6 steps for 64 matrices of 50x10 with the greedy start, 11 for 100x20), "
              "each step ~25 small XLA operations over [columns, batch] arrays, plus a fixed start (dispatch, one "
              "transposing copy of the costs, the greedy start). Its time grows more slowly with the batch than "
              "scipy's, which is linear: small batches favour scipy, large ones JAX. Inside a jitted train step "
              "the dispatch (~10-20 us) is not paid separately. JAX on CPU wakes worker threads for each call, so "
              "it suffers more than single-threaded scipy from other processes on the machine: compare the "
              "minima too, and the load average above."]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "matcher.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(RESULTS, "matcher.json"), "w") as f:
        json.dump({"command": command, "date": str(datetime.date.today()), "commit": commit,
                   "hungarian_modified": dirty, "jax": jax.__version__, "scipy": scipy.__version__,
                   "numpy": np.__version__, "cpu_count": os.cpu_count(), "loadavg_before": load_before,
                   "loadavg_after": load_after, "goal_met": met, "cases": results}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
