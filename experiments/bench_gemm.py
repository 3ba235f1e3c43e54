"""Matrix-multiply throughput, XLA:CPU vs PyTorch, at the shapes maskjax's CPU benchmarks spend their time in.

    .venv-bench/bin/python experiments/bench_gemm.py      # writes experiments/results/gemm.{md,json}

Why: `blocked` attention and the ViT train step are mostly matmuls (experiments/results/attention.md,
train_throughput.md), so how fast XLA's CPU matmul is at those shapes, against the library torch calls (oneDNN /
MKL sgemm), bounds how close either can get to its PyTorch peer.

Shapes (float32): the two forward matmuls of one default `blocked` piece (4 heads x 512 query rows x 2048 keys, head
dim 64) and the same with 128 x 512 tiles; the ViT-Ti train step of bench_train.py (batch 64 x 65 tokens = 4160
rows, width 192, MLP 768, 3 heads of 64): each dense layer's forward x W, input gradient dY W^T and weight gradient
X^T dY, and the attention scores / weighted values batched over 64 x 3 (batch, head) pairs.

Method: each side multiplies the same `inner` distinct operand pairs (inner = enough pairs for ~1 GFLOP, at least 2),
so no operand stays in cache from the previous product. XLA, two ways, the faster counts: one jitted call per product
(waiting for each; its dispatch, ~0.1 ms, weighs on small products), and one jitted program taking every pair and
returning every product (XLA may run independent products concurrently, as in blocked attention and a train step;
at some shapes that is slower). Neither adds another op: an elementwise pass over the operands, as an earlier version
of this script used against loop-invariant hoisting, costs as much as a low-intensity matmul such as p v with head
dim 64, and made XLA look 10-40% slower than it is. torch: `torch.matmul` on the same layouts (transposed operands as
views, as autograd passes them) in a Python loop over the pairs, at each thread count. Best of `--reps` rounds
(torch: of 2 x `--reps`). GFLOP/s = 2 M N K (x batch) / seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# name -> (einsum, lhs shape, rhs shape): lhs / rhs are stored in the layout the computation holds them in.
TOKENS, WIDTH, MLP, BH = 64 * 65, 192, 768, 64 * 3
SHAPES = {
    "attention piece: scores q k^T (4 x 512 x 2048, d 64)": ("hrd,hkd->hrk", (4, 512, 64), (4, 2048, 64)),
    "attention piece: p v (4 x 512 x 2048, d 64)": ("hrk,hkd->hrd", (4, 512, 2048), (4, 2048, 64)),
    "attention piece: v^T p^T, output transposed": ("hdk,hrk->hdr", (4, 64, 2048), (4, 512, 2048)),
    "attention tile: scores q k^T (4 x 128 x 512, d 64)": ("hrd,hkd->hrk", (4, 128, 64), (4, 512, 64)),
    "attention tile: p v (4 x 128 x 512, d 64)": ("hrk,hkd->hrd", (4, 128, 512), (4, 512, 64)),
    "ViT-Ti qkv: x W (4160 x 192 -> 576)": ("mk,kn->mn", (TOKENS, WIDTH), (WIDTH, 3 * WIDTH)),
    "ViT-Ti qkv: dY W^T": ("mn,kn->mk", (TOKENS, 3 * WIDTH), (WIDTH, 3 * WIDTH)),
    "ViT-Ti qkv: X^T dY (weight grad)": ("mk,mn->kn", (TOKENS, WIDTH), (TOKENS, 3 * WIDTH)),
    "ViT-Ti MLP in: x W (4160 x 192 -> 768)": ("mk,kn->mn", (TOKENS, WIDTH), (WIDTH, MLP)),
    "ViT-Ti MLP in: dY W^T": ("mn,kn->mk", (TOKENS, MLP), (WIDTH, MLP)),
    "ViT-Ti MLP in: X^T dY (weight grad)": ("mk,mn->kn", (TOKENS, WIDTH), (TOKENS, MLP)),
    "ViT-Ti MLP out: x W (4160 x 768 -> 192)": ("mk,kn->mn", (TOKENS, MLP), (MLP, WIDTH)),
    "ViT-Ti attention scores (192 x 65 x 65, d 64)": ("bqd,bkd->bqk", (BH, 65, 64), (BH, 65, 64)),
    "ViT-Ti attention p v (192 x 65 x 65, d 64)": ("bqk,bkd->bqd", (BH, 65, 65), (BH, 65, 64)),
}


def flops_of(eq: str, a_shape, b_shape) -> int:
    sizes = {}
    lhs, rest = eq.split(",")
    rhs, out = rest.split("->")
    for letters, shape in ((lhs, a_shape), (rhs, b_shape)):
        sizes.update(dict(zip(letters, shape)))
    contracted = set(lhs) & set(rhs) - set(out)
    return 2 * int(np.prod([sizes[c] for c in out])) * int(np.prod([sizes[c] for c in contracted]))


def _best(f, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def operand_pairs(eq: str, a_shape, b_shape, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`inner` distinct (lhs, rhs) pairs: ~1 GFLOP in total, at least 2 pairs, at most ~256 MiB of operands."""
    flops = flops_of(eq, a_shape, b_shape)
    pair_bytes = 4 * (int(np.prod(a_shape)) + int(np.prod(b_shape)))
    inner = max(2, min(int(1e9 // flops), int(256 * 2 ** 20 // pair_bytes)))
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(a_shape, dtype=np.float32), rng.standard_normal(b_shape, dtype=np.float32))
            for _ in range(inner)]


def xla_gflops(eq: str, pairs: list, reps: int = 5) -> tuple[float, float]:
    """(GFLOP/s of one product per jitted call, of all pairs' products in one jitted program)."""
    import jax
    import jax.numpy as jnp

    flops = flops_of(eq, pairs[0][0].shape, pairs[0][1].shape)
    lhs, rhs = [jnp.asarray(a) for a, _ in pairs], [jnp.asarray(b) for _, b in pairs]
    one = jax.jit(lambda a, b: jnp.einsum(eq, a, b))
    jax.block_until_ready(one(lhs[0], rhs[0]))
    single = _best(lambda: [jax.block_until_ready(one(a, b)) for a, b in zip(lhs, rhs)], reps) / len(pairs)
    products = jax.jit(lambda lhs, rhs: [jnp.einsum(eq, a, b) for a, b in zip(lhs, rhs)])
    jax.block_until_ready(products(lhs, rhs))
    together = _best(lambda: jax.block_until_ready(products(lhs, rhs)), reps) / len(pairs)
    return flops / single / 1e9, flops / together / 1e9


def torch_gflops(torch, eq: str, pairs: list, threads: int, reps: int = 5) -> float:
    """torch.matmul on the layouts of `eq` (a transposed operand is a view, as autograd passes it)."""
    lhs, rest = eq.split(",")
    rhs, out = rest.split("->")
    (c,) = set(lhs) & set(rhs) - set(out)

    def views(a_np, b_np):  # the contracted letter last in a and first in b, with transposed views only
        a, b = torch.from_numpy(a_np), torch.from_numpy(b_np)
        return (a if lhs[-1] == c else a.transpose(-1, -2)), (b if rhs[-2] == c else b.transpose(-1, -2))

    operands = [views(a, b) for a, b in pairs]
    torch.set_num_threads(threads)

    def run():
        for a, b in operands:
            torch.matmul(a, b)

    run()
    seconds = _best(run, 2 * reps)
    return flops_of(eq, pairs[0][0].shape, pairs[0][1].shape) * len(pairs) / seconds / 1e9


def rates(shapes: dict, threads: list[int], reps: int = 5) -> list[dict]:
    """One row per shape: XLA and torch GFLOP/s (torch per thread count) and XLA / the best torch."""
    import torch

    default = torch.get_num_threads()
    rows = []
    try:
        for name, (eq, sa, sb) in shapes.items():
            pairs = operand_pairs(eq, sa, sb)
            single, together = xla_gflops(eq, pairs, reps)
            row = dict(matmul=name, einsum=eq, lhs=list(sa), rhs=list(sb), pairs=len(pairs), xla_single_gflops=single,
                       xla_together_gflops=together, xla_gflops=max(single, together))
            for t in threads:
                row[f"torch_{t}t_gflops"] = torch_gflops(torch, eq, pairs, t, reps)
            row["xla_over_torch_best"] = row["xla_gflops"] / max(row[f"torch_{t}t_gflops"] for t in threads)
            rows.append(row)
            print(f"{name}: XLA {single:.0f} / {together:.0f} GFLOP/s, "
                  + ", ".join(f"torch {t} thr. {row[f'torch_{t}t_gflops']:.0f}" for t in threads), flush=True)
    finally:
        torch.set_num_threads(default)
    return rows


def render_rates(rows: list[dict], threads: list[int]) -> list[str]:
    lines = ["| matmul | einsum (lhs, rhs) | pairs | XLA 1 per call | XLA all in one program | "
             + " | ".join(f"torch {t} thr." for t in threads) + " | XLA best / torch best |",
             "|---|---|---|---|---|" + "---|" * len(threads) + "---|"]
    for r in rows:
        lines.append(f"| {r['matmul']} | `{r['einsum']}` {tuple(r['lhs'])}, {tuple(r['rhs'])} | {r['pairs']} | "
                     f"{r['xla_single_gflops']:.0f} | {r['xla_together_gflops']:.0f} | "
                     + " | ".join(f"{r[f'torch_{t}t_gflops']:.0f}" for t in threads)
                     + f" | {r['xla_over_torch_best']:.2f} |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=os.path.join(RESULTS, "gemm"))
    args = p.parse_args(argv)
    import jax
    import torch

    load_before = os.getloadavg()
    rows = rates(SHAPES, args.threads, args.reps)
    command = "python experiments/bench_gemm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = dict(command=command.strip(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                jax=jax.__version__, torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                cores=os.cpu_count(), load_avg_before=load_before, load_avg_after=os.getloadavg())
    vit = [r["xla_over_torch_best"] for r in rows if r["matmul"].startswith("ViT")]
    lines = ["# Matmul throughput: XLA:CPU vs PyTorch", "", f"Command: `.venv-bench/bin/{meta['command']}`", "",
             f"{meta['date']}; jax {meta['jax']}, torch {meta['torch']}; {meta['cpu']} ({meta['cores']} cores); load "
             f"average before {load_before[0]:.2f}, after {meta['load_avg_after'][0]:.2f}. float32. XLA at its "
             "default settings (both cores), torch at each thread count; GFLOP/s; see the script's docstring for the "
             "method.",
             ""] + render_rates(rows, args.threads) + [
             "", f"ViT-Ti train-step shapes: XLA reaches {min(vit):.2f}–{max(vit):.2f}x of torch's best "
             f"(median {float(np.median(vit)):.2f}x)."]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
