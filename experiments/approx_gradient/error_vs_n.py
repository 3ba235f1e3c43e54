"""Error of approximate-gradient attention vs sequence length (issue 4, reproduction 1).

    python experiments/approx_gradient/error_vs_n.py                  # default grid (~10-20 min on 2 busy cores)
    python experiments/approx_gradient/error_vs_n.py --ns 256 1024 --ds 16 --bounds 1   # quick look

Input distribution: q, k = sqrt(B)·(independent uniform unit vectors in R^d), scale 1, so every logit lies in
[-B, B]; v and dO are standard normal. One head, batch 1. For each (d, B, n) the exact gradients come from
dense XLA attention (n <= 2048) or maskjax's blocked exact path (beyond); every approximation uses the same
inputs. Reported: relative Frobenius error and cosine of dQ, dK, dV (and the forward output) for
  lowrank (= exact_fwd's gradient: exact_fwd runs the lowrank backward), paper, and Performer FAVOR+ with the
  same number of features r = C(d+g, g) (positive orthogonal random features, autodiff gradient).
Skipped cells are listed with the reason. Writes results/error_vs_n.{md,json} and error_vs_n.png.
"""

import argparse
import json
import math
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from maskjax.attention.approx_features import feature_rank, taylor_exp  # noqa: E402

METRICS = ("out", "dq", "dk", "dv")


def closed_form(bound, g):
    """Sup over |t| <= B of the kernel's relative error |e_g(t)/e^t − 1| and of its derivative's."""
    f = lambda t, h: float(taylor_exp(np.float64(t), h)) * math.exp(-t)
    return (max(f(-bound, g) - 1, 1 - f(bound, g)), max(1 - f(-bound, g - 1), 1 - f(bound, g - 1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[256, 1024, 4096, 16384, 32768])
    parser.add_argument("--ds", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--bounds", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--degrees", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--max-rank", type=int, default=5000, help="skip (d, g) whose rank r exceeds this")
    parser.add_argument("--max-n-large-d", type=int, default=16384, help="largest n for d > 16")
    parser.add_argument("--no-favor", action="store_true")
    parser.add_argument("--out", default=os.path.join(common.RESULTS, "error_vs_n"))
    args = parser.parse_args()
    command = "python experiments/approx_gradient/error_vs_n.py " + " ".join(sys.argv[1:])

    rows, skipped = [], []
    compiled = {}  # one jitted function per (method, degree, ...); shapes are handled by jit's own cache

    def jitted(key, make):
        if key not in compiled:
            compiled[key] = common.out_and_grads(make())
        return compiled[key]

    for g in args.degrees:
        if g % 2:
            for bound in args.bounds:
                root_note = ("e_3 has a real root at t≈-1.596" if g == 3 else f"e_{g} has a real root")
                e_min = min(float(taylor_exp(np.float64(t), g)) for t in np.linspace(-bound, bound, 2001))
                skipped.append(f"g={g}, B={bound:g}: odd degree rejected by approx_attention ({root_note}; "
                               f"min of e_{g} on [-B, B] = {e_min:.3f}{' < 0: negative weights' if e_min < 0 else ''})")
    for d in args.ds:
        for bound in args.bounds:
            for n in args.ns:
                if d > 16 and n > args.max_n_large_d:
                    skipped.append(f"d={d}, n={n}, B={bound:g}: beyond --max-n-large-d={args.max_n_large_d}")
                    continue
                q, k, v, d_out = common.sphere_inputs(jax.random.key(n * 7 + d), n, d, bound)
                dense = n <= common.DENSE_MAX_N
                exact = jitted(("exact", dense), lambda: common.exact_attention_fn(n))(q, k, v, d_out)
                for g in args.degrees:
                    if g % 2:
                        continue
                    r = feature_rank(d, g)
                    if r > args.max_rank:
                        skipped.append(f"d={d}, g={g}: {common.rank_note(d, g)} > --max-rank={args.max_rank}")
                        continue
                    methods = {"lowrank": (("lowrank", g), lambda: common.approx_fn("lowrank", g)),
                               "paper": (("paper", g), lambda: common.approx_fn("paper", g))}
                    if not args.no_favor:  # fixed random features per (m, d)
                        methods[f"favor+ (m={r})"] = (("favor", r, d), lambda: common.favor_plus_fn(r, d, seed=d))
                    for name, (key, make) in methods.items():
                        try:
                            got = jitted(key, make)(q, k, v, d_out)
                        except Exception as err:  # noqa: BLE001 - out-of-memory etc. are recorded, not fatal
                            skipped.append(f"d={d}, g={g}, B={bound:g}, n={n}, {name}: {type(err).__name__}")
                            continue
                        row = dict(d=d, g=g, bound=bound, n=n, method=name, rank=r)
                        for metric, a, b in zip(METRICS, got, exact):
                            row[f"{metric}_rel"] = common.rel_err(a, b)
                            row[f"{metric}_cos"] = common.cosine(a, b)
                        rows.append(row)
                        print({k_: (round(v_, 5) if isinstance(v_, float) else v_) for k_, v_ in row.items()},
                              flush=True)
    skipped = sorted(set(skipped), key=skipped.index)

    with open(args.out + ".json", "w") as f:
        json.dump(dict(command=command, rows=rows, skipped=skipped), f, indent=1)
    write_report(args, command, rows, skipped)
    plot(args, rows)


def write_report(args, command, rows, skipped):
    sections = [
        "Machine: " + common.machine_note(),
        "Inputs: q, k = sqrt(B)·uniform unit vectors (|q·k| <= B, scale 1), v, dO ~ N(0, I); 1 head, batch 1. "
        "Exact gradients: dense XLA (n <= 2048) or maskjax `blocked` (beyond). `lowrank` is also the gradient "
        "of `exact_fwd` (same backward). Relative errors are Frobenius norms of the difference over the exact "
        "value; `cos` is the cosine with the exact gradient.",
    ]
    # Growth with n: ratio of the error at the largest n to the smallest n, per configuration.
    growth = []
    keys = sorted({(r["d"], r["g"], r["bound"], r["method"]) for r in rows})
    for key in keys:
        sel = sorted((r for r in rows if (r["d"], r["g"], r["bound"], r["method"]) == key), key=lambda r: r["n"])
        if len(sel) >= 2:
            growth.append([key[0], key[1], f"{key[2]:g}", key[3], f"{sel[0]['n']}→{sel[-1]['n']}",
                           f"{sel[0]['dq_rel']:.2e} → {sel[-1]['dq_rel']:.2e}",
                           f"{sel[-1]['dq_rel'] / sel[0]['dq_rel']:.2f}",
                           f"{sel[-1]['dv_rel'] / sel[0]['dv_rel']:.2f}"])
    sections.append("## Does the error grow with n?\n\nRatio of the relative error at the largest n to that at "
                    "the smallest n (1.00 = flat).\n\n" + common.md_table(
                        ["d", "g", "B", "method", "n", "dQ rel. error", "dQ ratio", "dV ratio"], growth))
    table = []
    for r in rows:
        e, e_deriv = closed_form(r["bound"], r["g"])
        table.append([r["d"], r["g"], f"{r['bound']:g}", r["n"], r["method"],
                      f"{r['out_rel']:.2e}", f"{r['dq_rel']:.2e}", f"{r['dk_rel']:.2e}", f"{r['dv_rel']:.2e}",
                      f"{r['dq_cos']:.6f}", f"{r['dk_cos']:.6f}", f"{r['dv_cos']:.6f}", f"{e:.3g} / {e_deriv:.3g}"])
    sections.append("## All cells\n\nLast column: closed-form sup over |t| <= B of the kernel's relative error "
                    "|e_g(t)e^-t − 1| / of its derivative's |e_{g-1}(t)e^-t − 1| (worst case; typical logits "
                    "are ~B/sqrt(d), hence much smaller measured errors).\n\n" + common.md_table(
                        ["d", "g", "B", "n", "method", "out rel", "dQ rel", "dK rel", "dV rel", "dQ cos", "dK cos",
                         "dV cos", "E / E'"], table))
    sections.append("## Skipped\n\n" + ("\n".join(f"- {s}" for s in skipped) if skipped else "none"))
    common.write_md(args.out + ".md", "Approximate-gradient attention: error vs n", command, sections)


def plot(args, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = sorted({r["d"] for r in rows})
    fig, axes = plt.subplots(1, len(ds), figsize=(5 * len(ds), 4), squeeze=False)
    styles = {"lowrank": "-", "paper": "--"}
    for ax, d in zip(axes[0], ds):
        for key in sorted({(r["g"], r["bound"], r["method"]) for r in rows if r["d"] == d}):
            sel = sorted((r for r in rows if r["d"] == d and (r["g"], r["bound"], r["method"]) == key),
                         key=lambda r: r["n"])
            g, bound, method = key
            ax.loglog([r["n"] for r in sel], [r["dq_rel"] for r in sel], styles.get(method, ":"), marker="o",
                      ms=3, label=f"{method} g={g} B={bound:g}")
        ax.set_title(f"dQ relative error, d={d}")
        ax.set_xlabel("n")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)


if __name__ == "__main__":
    main()
