"""Forward+backward time of approximate-gradient attention vs sequence length (issue 4, reproduction 2).

    python experiments/approx_gradient/time_vs_n.py                      # default grid (~20-40 min, 2 busy cores)
    python experiments/approx_gradient/time_vs_n.py --configs 16:2 --ns 1024 4096 --reps 1   # quick look

Times one jitted call computing dQ, dK, dV (forward + backward) for batch 1, one head, float32, on CPU, as
the minimum over repetitions after a warm-up call; methods are interleaved at each n and the grid is
repeated --rounds times (minimum kept), so that load drift on a shared machine hits all methods alike. Methods:
  approx:  lowrank, paper, exact_fwd (exact forward + lowrank backward), lowrank causal (block 128)
  exact:   xla = jax.nn.dot_product_attention, reference = maskjax dense XLA, blocked = maskjax blocked XLA
           (non-causal and causal).
Slopes are least-squares fits of log(time) on log(n) over n in [2048, 32768]; the crossover is the smallest
measured n from which the method is faster than every exact baseline measured at that n (non-causal methods
vs non-causal baselines, causal vs causal). Dense baselines are skipped above --dense-max-n (their n×n
buffers do not fit a shared 16 GB machine next to other jobs); any method whose predicted next time exceeds
--max-seconds is skipped from there on. Writes results/time_vs_n.{md,json} and time_vs_n.png.
"""

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from maskjax.attention.approx_features import feature_rank  # noqa: E402

# name -> (kind, causal, expected growth exponent used for skip prediction)
METHODS = {
    "lowrank": ("approx", False, 1),
    "paper": ("approx", False, 1),
    "exact_fwd": ("approx", False, 2),
    "lowrank causal": ("approx", True, 1),
    "xla": ("exact", False, 2),
    "reference": ("exact", False, 2),
    "blocked": ("exact", False, 2),
    "blocked causal": ("exact", True, 2),
}
DENSE = ("xla", "reference")


def make_fn(name, g):
    from maskjax.attention import masks
    from maskjax.attention.blocked import blocked_attention
    from maskjax.attention.reference import reference_attention

    if name in ("lowrank", "paper", "exact_fwd"):
        return common.approx_fn(name, g)
    if name == "lowrank causal":
        return common.approx_fn("lowrank", g, causal=True)
    if name == "xla":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation="xla")
    if name == "reference":
        return lambda q, k, v: reference_attention(q, k, v, scale=1.0)
    if name == "blocked":
        return lambda q, k, v: blocked_attention(q, k, v, None, scale=1.0)
    if name == "blocked causal":
        return lambda q, k, v: blocked_attention(q, k, v, masks.causal(), scale=1.0)
    raise ValueError(name)


def fit_slope(points, lo=2048, hi=32768):
    pts = [(n, t) for n, t in points if lo <= n <= hi]
    if len(pts) < 3:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--configs", nargs="+", default=["16:2", "16:4", "32:2", "64:2"], help="d:g pairs")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="repeat the whole grid, keep the minimum")
    parser.add_argument("--max-seconds", type=float, default=40.0)
    parser.add_argument("--dense-max-n", type=int, default=8192)
    parser.add_argument("--out", default=os.path.join(common.RESULTS, "time_vs_n"))
    parser.add_argument("--render", metavar="JSON", help="only re-render the report and plot from a results JSON "
                        "written by an earlier run (no timing)")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's Notes section "
                        "(kept in the JSON; with --render, added to the saved notes)")
    args = parser.parse_args()
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        args.note = saved.get("notes", []) + args.note
        if args.render == args.out + ".json":
            saved["notes"] = args.note
            with open(args.render, "w") as f:
                json.dump(saved, f, indent=1)
        args.configs = saved.get("configs") or list(dict.fromkeys(f"{r['d']}:{r['g']}" for r in saved["rows"]))
        args.methods = [m for m in METHODS if any(r["method"] == m for r in saved["rows"])]
        summary = summarize(saved["rows"], args.configs)
        write_report(args, saved["command"], saved["machine"], saved["rows"], summary, saved["skipped"])
        plot(args, saved["rows"], summary)
        return
    command = "python experiments/approx_gradient/time_vs_n.py " + " ".join(sys.argv[1:])
    machine = common.machine_note()

    # Methods are interleaved at each n and the whole grid is repeated --rounds times, keeping the minimum per
    # cell: on a shared machine the load drifts, and interleaving keeps the ratios between methods fair.
    best, first_call, skipped = {}, {}, []
    compiled = {}
    for round_index in range(args.rounds):
        for config in args.configs:
            d, g = (int(x) for x in config.split(":"))
            stop = {}
            for n in args.ns:
                q, k, v, d_out = common.sphere_inputs(jax.random.key(0), n, d, 1.0)
                for name in args.methods:
                    kind, _, growth = METHODS[name]
                    key = (d, 0 if kind == "exact" else g, name, n)  # exact baselines do not depend on g
                    if kind == "exact" and g != min(int(c.split(":")[1]) for c in args.configs
                                                    if int(c.split(":")[0]) == d):
                        continue  # timed with the first config of this d
                    if name in DENSE and n > args.dense_max_n:
                        skipped.append(f"d={d}: {name} at n > {args.dense_max_n}: dense n×n buffers "
                                       "(--dense-max-n)")
                        continue
                    if name in stop:
                        skipped.append(f"d={d}, g={g}: {name} at n >= {n}: predicted {stop[name]:.0f} s "
                                       "> --max-seconds")
                        continue
                    fn_key = (name, g if kind == "approx" else 0)
                    if fn_key not in compiled:
                        compiled[fn_key] = common.fwd_bwd(make_fn(name, g))
                    try:
                        t, first = common.time_call(compiled[fn_key], (q, k, v, d_out), args.reps,
                                                    args.max_seconds)
                    except Exception as err:  # noqa: BLE001 - e.g. out of memory: record and move on
                        skipped.append(f"d={d}, g={g}: {name} at n={n}: {type(err).__name__}: {str(err)[:80]}")
                        stop[name] = float("inf")
                        continue
                    best[key] = min(t, best.get(key, float("inf")))
                    first_call.setdefault(key, first)
                    print(f"round {round_index} d={d} g={g} n={n} {name}: {t * 1e3:.1f} ms", flush=True)
                    if t * 2 ** growth > args.max_seconds:
                        stop[name] = t * 2 ** growth
    rows = []
    for config in args.configs:
        d, g = (int(x) for x in config.split(":"))
        for (kd, kg, name, n), t in sorted(best.items()):
            if kd == d and kg in (0, g):
                rows.append(dict(d=d, g=g, n=n, method=name, seconds=t, first_call=first_call[(kd, kg, name, n)]))
    skipped = sorted(set(skipped), key=skipped.index)
    summary = summarize(rows, args.configs)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(command=command, machine=machine, configs=args.configs, rows=rows, summary=summary,
                       skipped=skipped, notes=args.note), f, indent=1)
    write_report(args, command, machine, rows, summary, skipped)
    plot(args, rows, summary)


def summarize(rows, configs):
    out = []
    for config in configs:
        d, g = (int(x) for x in config.split(":"))
        sel = [r for r in rows if r["d"] == d and r["g"] == g]
        by_method = {}
        for r in sel:
            by_method.setdefault(r["method"], []).append((r["n"], r["seconds"]))
        for name, pts in by_method.items():
            kind, causal, _ = METHODS[name]
            entry = dict(d=d, g=g, method=name, slope=fit_slope(pts), crossover=None, speedup_16384=None)
            if kind == "approx":
                baselines = {m: dict(p) for m, p in by_method.items() if METHODS[m][0] == "exact"
                             and METHODS[m][1] == causal}
                wins = []
                for n, t in sorted(pts):
                    exact_at_n = [b[n] for b in baselines.values() if n in b]
                    if exact_at_n:
                        wins.append((n, t < min(exact_at_n)))
                for i, (n, _) in enumerate(wins):
                    if all(w for _, w in wins[i:]):
                        entry["crossover"] = n
                        break
                t16 = dict(pts).get(16384)
                exact16 = {m: b[16384] for m, b in baselines.items() if 16384 in b}
                if t16 and exact16:
                    best = min(exact16, key=exact16.get)
                    entry["speedup_16384"] = (exact16[best] / t16, best)
            out.append(entry)
    return out


def write_report(args, command, machine, rows, summary, skipped):
    sections = ["Machine: " + machine + ". Other jobs shared the 2 cores while this ran, so absolute times are "
                "noisy (minimum over repetitions); slopes and ratios are the robust part.",
                "Inputs: q, k = unit vectors (|q·k| <= 1), batch 1, one head, float32; one call = forward + "
                "backward (dQ, dK, dV)."]
    goals = goal_lines(summary)
    if goals:
        sections.append("## Goals (issue 4)\n\n" + "\n".join(f"- {line}" for line in goals))
    table = []
    for e in summary:
        sp = e["speedup_16384"]
        table.append([e["d"], e["g"], rank_of(e), e["method"], "—" if e["slope"] is None else f"{e['slope']:.2f}",
                      "—" if e["crossover"] is None else e["crossover"],
                      "—" if sp is None else f"{sp[0]:.1f}× vs {sp[1]}"])
    sections.append("## Slopes, crossover, speed-up at n = 16384\n\n" + common.md_table(
        ["d", "g", "rank r", "method", "log-log slope (n=2048…32768)", "crossover n", "speed-up at n=16384"],
        table))
    ns = sorted({r["n"] for r in rows})
    for config in args.configs:
        d, g = (int(x) for x in config.split(":"))
        methods = [m for m in args.methods if any(r["method"] == m and r["d"] == d and r["g"] == g for r in rows)]
        grid = []
        for m in methods:
            t = {r["n"]: r["seconds"] for r in rows if r["method"] == m and r["d"] == d and r["g"] == g}
            grid.append([m] + [f"{t[n] * 1e3:.1f}" if n in t else "—" for n in ns])
        sections.append(f"## d = {d}, g = {g} ({common.rank_note(d, g)}): milliseconds per forward+backward\n\n"
                        + common.md_table(["method"] + [str(n) for n in ns], grid))
    if args.note:
        sections.append("## Notes\n\n" + "\n".join(f"- {line}" for line in args.note))
    sections.append("## Skipped\n\n" + ("\n".join(f"- {s}" for s in skipped) if skipped else "none"))
    common.write_md(args.out + ".md", "Approximate-gradient attention: time vs n", command, sections)


SLOPE_GOAL, SPEEDUP_GOAL, COSINE_GOAL = 1.15, 20.0, 0.999


def gradient_cosine(d, g, bound=1.0, n=16384, method="lowrank"):
    """Smallest of the dQ/dK/dV cosines with the exact gradient from results/error_vs_n.json (None if absent)."""
    path = os.path.join(common.RESULTS, "error_vs_n.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = json.load(f)["rows"]
    for r in rows:
        if (r["d"], r["g"], r["bound"], r["n"], r["method"]) == (d, g, bound, n, method):
            return min(r["dq_cos"], r["dk_cos"], r["dv_cos"])
    return None


def goal_lines(summary):
    """Plain statements of the two issue-4 goals for lowrank at d = 16, g = 2 (when that config was run)."""
    entry = next((e for e in summary if (e["d"], e["g"], e["method"]) == (16, 2, "lowrank")), None)
    if entry is None:
        return []
    lines = []
    slope = entry["slope"]
    if slope is not None:
        lines.append(f"Slope of lowrank (d=16, g=2) over n = 2048…32768 <= {SLOPE_GOAL}: "
                     f"**{'met' if slope <= SLOPE_GOAL else 'not met'}** (fitted slope {slope:.2f}).")
    sp, cos = entry["speedup_16384"], gradient_cosine(16, 2)
    if sp is not None:
        cos_note = ("no error_vs_n.json cell for d=16, g=2, B=1, n=16384" if cos is None else
                    f"smallest gradient cosine (dQ, dK, dV) at B=1, n=16384: {cos:.5f}, from results/error_vs_n.json")
        met = sp[0] >= SPEEDUP_GOAL and cos is not None and cos >= COSINE_GOAL
        lines.append(f"Speed-up of lowrank (d=16, g=2) at n=16384 >= {SPEEDUP_GOAL:.0f}× with gradient cosine >= "
                     f"{COSINE_GOAL} at B=1: **{'met' if met else 'not met'}** ({sp[0]:.1f}× vs {sp[1]}, the fastest "
                     f"exact baseline measured at n=16384; {cos_note}).")
    return lines


def rank_of(entry):
    if METHODS[entry["method"]][0] == "exact":
        return "—"
    return feature_rank(entry["d"], entry["g"]) * ((entry["d"] + 1) if entry["method"] == "paper" else 1)


def plot(args, rows, summary):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slopes = {(e["d"], e["g"], e["method"]): e["slope"] for e in summary}
    fig, axes = plt.subplots(1, len(args.configs), figsize=(5 * len(args.configs), 4.2), squeeze=False)
    for ax, config in zip(axes[0], args.configs):
        d, g = (int(x) for x in config.split(":"))
        for m in args.methods:
            pts = sorted((r["n"], r["seconds"]) for r in rows if r["method"] == m and r["d"] == d and r["g"] == g)
            if not pts:
                continue
            slope = slopes.get((d, g, m))
            label = m + ("" if slope is None else f" (slope {slope:.2f})")
            style = "-" if METHODS[m][0] == "approx" else "--"
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=label)
        ax.set_title(f"fwd+bwd time, d={d}, g={g}")
        ax.set_xlabel("n")
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)


if __name__ == "__main__":
    main()
