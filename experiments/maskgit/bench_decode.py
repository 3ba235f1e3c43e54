"""Decode speed of one transformer three ways, side by side on this CPU: MaskGIT parallel decoding (8 steps), the
autoregressive baseline with a key/value cache (one token per step), and M2T's fixed schedule (8 groups) with and
without its cache. Random weights: speed does not depend on them.

    python experiments/maskgit/bench_decode.py                  # 8x8 and 16x16 grids, batch 1 and 64
    python experiments/maskgit/bench_decode.py --quick          # fewer repeats

The transformer is the one of configs/maskgit_builtin.py (its width, depth, heads, MLP and classes are read from
it; 1000 codes); the 16x16 grid (256 tokens) is the paper's. Each variant is one jitted program, compiled before
timing; the median of `--repeats` runs is reported, and ratios within one grid and batch size. FLOPs and bytes
accessed per decoding step come from XLA's cost analysis of the single step (a loop's cost analysis counts its
body once), summed over the steps. Writes experiments/results/maskgit_decode.{md,json}.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from maskjax.decode import autoregressive as ar
from maskjax.decode import decode as maskgit_decode
from maskjax.decode import m2t
from maskjax.masking import schedules
from maskjax.models.maskgit import MaskGITTransformer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(ROOT, "experiments", "results")
CODES = 1000  # FSQ (8, 5, 5, 5) of configs/tokenizer_builtin.py


def _generator_size() -> tuple:
    sys.path.insert(0, ROOT)
    from configs import maskgit_builtin
    m = maskgit_builtin.get_config().model
    return m.num_classes, m.width, m.depth, m.num_heads, m.mlp_dim


CLASSES, WIDTH, DEPTH, HEADS, MLP = _generator_size()
STEPS = 8
# H100 SXM (bf16 dense): peak 989 TFLOP/s, HBM3 3.35 TB/s; ~10 kernels per block at ~4 us launch + sync each.
H100_FLOPS, H100_BYTES_PER_S, H100_KERNEL_S, KERNELS_PER_BLOCK = 989e12, 3.35e12, 4e-6, 10


def cost(fn, *args) -> tuple[float, float]:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))


def timed(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(grid: int, batch: int, repeats: int, uncached_ar: bool) -> dict:
    n = grid * grid
    length = n + 1
    model = MaskGITTransformer(codebook_size=CODES, num_classes=CLASSES, num_tokens=n, width=WIDTH, depth=DEPTH,
                               num_heads=HEADS, mlp_dim=MLP, dropout=0.0)
    labels = jnp.arange(batch, dtype=jnp.int32) % CLASSES
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, n), jnp.int32), jnp.zeros((1,), jnp.int32))
    params = {"params": params["params"]}
    prefix = (labels + CODES + 1)[:, None]  # class-token ids (MaskGITTransformer.class_token_ids)
    mask_all = jnp.full((batch, n), CODES, jnp.int32)
    causal = ar.causal_mask(length)
    groups = np.concatenate([[0], schedules.token_groups(schedules.halton_order((grid, grid)),
                                                         schedules.step_group_sizes("cosine", n, STEPS))])
    _, state = model.apply(params, jnp.zeros((batch, length), jnp.int32), jnp.arange(length), causal,
                           method=MaskGITTransformer.at_positions, mutable=["cache"])
    empty_cache = jax.tree.map(jnp.zeros_like, state["cache"])

    def step_fn(cache, ids, positions, mask):
        logits, new = model.apply({**params, "cache": cache}, ids, positions, mask,
                                  method=MaskGITTransformer.at_positions, mutable=["cache"])
        return logits, new["cache"]

    def run_maskgit(key):
        return maskgit_decode(mask_all, key, lambda t: model.apply(params, t, labels), STEPS, "cosine",
                              mask_id=CODES)[0]

    def run_ar_cached(key):
        return ar.decode_cached(prefix, key, step_fn, empty_cache, length)

    def run_ar_uncached(key):
        return ar.uncached_decode(prefix, key, lambda s: model.apply(params, s[:, 1:], labels, mask=causal,
                                                                      all_positions=True), length)

    def run_m2t_cached(key):
        return m2t.decode_cached(prefix, key, step_fn, empty_cache, groups, mask_id=CODES)

    def run_m2t_uncached(key):
        def forward(sequence, mask):
            logits = model.apply(params, sequence[:, 1:], labels, mask=mask)
            return jnp.concatenate([jnp.zeros_like(logits[:, :1]), logits], axis=1)
        return m2t.decode_uncached(prefix, key, forward, groups, mask_id=CODES)

    key = jax.random.key(1)
    variants = {"maskgit_8": run_maskgit, "ar_cached": run_ar_cached, "m2t_8_cached": run_m2t_cached,
                "m2t_8_uncached": run_m2t_uncached}
    if uncached_ar:
        variants["ar_uncached"] = run_ar_uncached
    seconds = {name: timed(jax.jit(fn), (key,), repeats) for name, fn in variants.items()}

    # FLOPs and bytes: single steps, summed over the steps each variant takes.
    full_cost = cost(lambda t: model.apply(params, t, labels), mask_all)
    ar_step = cost(lambda c, i, p: step_fn(c, i, p, (jnp.arange(length) <= p[0])[None, None, None]),
                   empty_cache, prefix, jnp.asarray([n // 2]))  # a middle step; cost is flat in the position
    by_group = [np.flatnonzero(groups == g) for g in range(STEPS + 1)]
    m2t_costs = [cost(lambda c, i, p=np.concatenate([by_group[t - 1], by_group[t]]): step_fn(
        c, i, jnp.asarray(p), m2t.attention_mask(groups, p)), empty_cache,
        jnp.zeros((batch, len(by_group[t - 1]) + len(by_group[t])), jnp.int32)) for t in range(1, STEPS + 1)]
    flops = {"maskgit_8": STEPS * full_cost[0], "ar_cached": n * ar_step[0],
             "m2t_8_cached": sum(c[0] for c in m2t_costs), "m2t_8_uncached": STEPS * full_cost[0],
             "ar_uncached": n * full_cost[0]}
    bytes_ = {"maskgit_8": STEPS * full_cost[1], "ar_cached": n * ar_step[1],
              "m2t_8_cached": sum(c[1] for c in m2t_costs), "m2t_8_uncached": STEPS * full_cost[1],
              "ar_uncached": n * full_cost[1]}
    sequential = {"maskgit_8": STEPS, "ar_cached": n, "m2t_8_cached": STEPS, "m2t_8_uncached": STEPS,
                  "ar_uncached": n}
    h100 = {name: sum_steps for name, sum_steps in (
        (name, sequential[name] * DEPTH * KERNELS_PER_BLOCK * H100_KERNEL_S
         + max(flops[name] / H100_FLOPS, bytes_[name] / H100_BYTES_PER_S)) for name in flops)}
    return {"grid": grid, "batch": batch, "seconds": seconds,
            "flops": {k: flops[k] for k in seconds}, "bytes": {k: bytes_[k] for k in seconds},
            "sequential_steps": {k: sequential[k] for k in seconds},
            "h100_model_seconds": {k: h100[k] for k in seconds}}


def write(results: list[dict], command: str) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = ["# Decode speed: MaskGIT vs autoregressive (KV cache) vs M2T (cached / uncached)", "",
             f"`{command}`", "",
             f"Date: {datetime.date.today()}. maskjax commit `{commit}`. CPU: {os.cpu_count()} cores, "
             f"jax {jax.__version__}. Transformer of configs/maskgit_builtin.py (width {WIDTH}, depth {DEPTH}, "
             f"{HEADS} heads, MLP {MLP}, {CODES} codes), random weights, float32. Median wall-clock of the whole "
             "decode (one jitted program each, compiled before timing).", "",
             "| grid | batch | variant | sequential steps | seconds | vs maskgit_8 | GFLOP | GB accessed | "
             "H100 model ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, sec in r["seconds"].items():
            lines.append(f"| {r['grid']}x{r['grid']} | {r['batch']} | {name} | {r['sequential_steps'][name]} | "
                         f"{sec:.3f} | {sec / r['seconds']['maskgit_8']:.2f}x | {r['flops'][name] / 1e9:.1f} | "
                         f"{r['bytes'][name] / 1e9:.2f} | {r['h100_model_seconds'][name] * 1e3:.2f} |")
    lines += ["", "Ratios:"]
    for r in results:
        s = r["seconds"]
        lines.append(f"- {r['grid']}x{r['grid']}, batch {r['batch']}: AR cached / MaskGIT-8 = "
                     f"{s['ar_cached'] / s['maskgit_8']:.2f}x wall-clock "
                     f"({r['flops']['maskgit_8'] / r['flops']['ar_cached']:.2f}x the FLOPs for MaskGIT); "
                     f"M2T uncached / cached = {s['m2t_8_uncached'] / s['m2t_8_cached']:.2f}x "
                     f"({r['flops']['m2t_8_uncached'] / r['flops']['m2t_8_cached']:.2f}x the FLOPs).")
    lines += ["", "H100 model: per variant, sequential steps x depth x "
              f"{KERNELS_PER_BLOCK} kernels x {H100_KERNEL_S * 1e6:.0f} us (launch and synchronisation) + "
              f"max(FLOPs / {H100_FLOPS / 1e12:.0f} TFLOP/s, bytes / {H100_BYTES_PER_S / 1e12:.2f} TB/s). It is a "
              "model on paper, not a measurement: it says where latency-bound hardware puts the difference (the "
              "per-step overhead of 256 sequential AR steps), which a 2-core CPU, bound by FLOPs, does not show."]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "maskgit_decode.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(RESULTS, "maskgit_decode.json"), "w") as f:
        json.dump({"command": command, "commit": commit, "results": results}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repeat")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    results = []
    for grid in (8, 16):
        for batch in (1, 64):
            # Uncached AR re-runs the whole sequence per token: only where it takes seconds, not hours.
            results.append(bench(grid, batch, repeats, uncached_ar=(grid == 8)))
            print(json.dumps(results[-1]["seconds"]), flush=True)
    command = "python experiments/maskgit/bench_decode.py" + (" --quick" if args.quick else
                                                                f" --repeats {args.repeats}" if args.repeats != 3
                                                                else "")
    write(results, command)


if __name__ == "__main__":
    main()
