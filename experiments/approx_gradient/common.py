"""Shared pieces of the approximate-gradient experiments: the input distribution, exact and approximate
gradients, a Performer (FAVOR+) baseline, timing, and table writing. Scripts only; never imported by maskjax."""

import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from maskjax.attention.approx import approx_attention
from maskjax.attention.approx_features import feature_rank
from maskjax.attention import masks
from maskjax.attention.blocked import blocked_attention
from maskjax.attention.reference import reference_attention

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DENSE_MAX_N = 2048  # exact references: dense XLA up to here, maskjax's blocked path (O(tile) memory) beyond


def sphere_inputs(key, n, d, bound, heads=1):
    """q, k = sqrt(B)·(uniform unit vectors), so every logit q·k (scale 1) lies in [-B, B]; v, dO ~ N(0, I)."""
    kq, kk, kv, ko = jax.random.split(key, 4)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(kq, (1, n, heads, d))) * math.sqrt(bound)
    k = unit(jax.random.normal(kk, (1, n, heads, d))) * math.sqrt(bound)
    v = jax.random.normal(kv, (1, n, heads, d))
    d_out = jax.random.normal(ko, (1, n, heads, d))
    return q, k, v, d_out


def exact_attention_fn(n, causal=False):
    """Exact softmax attention at scale 1 (dense for short sequences, blocked beyond)."""
    if n <= DENSE_MAX_N:
        mask = jnp.tril(jnp.ones((n, n), bool))[None, None] if causal else None
        return lambda q, k, v: reference_attention(q, k, v, mask, scale=1.0)
    mask = masks.causal() if causal else None
    return lambda q, k, v: blocked_attention(q, k, v, mask, scale=1.0)


def favor_plus_fn(num_features, d, seed=0):
    """Performer FAVOR+ (positive orthogonal random features) for exp(q·k), as a softmax-attention estimate."""
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(-(-num_features // d)):
        qmat, _ = np.linalg.qr(rng.normal(size=(d, d)))
        blocks.append(qmat.T)
    w = np.concatenate(blocks)[:num_features]
    w = w * np.sqrt(rng.chisquare(d, size=(num_features, 1)))  # row norms of a Gaussian matrix
    w = jnp.asarray(w, jnp.float32)

    def feats(x):
        return jnp.exp(x @ w.T - 0.5 * jnp.sum(x * x, -1, keepdims=True)) / math.sqrt(num_features)

    def attend(q, k, v):
        fq, fk = feats(q), feats(k)  # [1, n, h, m]
        state = jnp.einsum("bkhm,bkhd->bhmd", fk, v)
        num = jnp.einsum("bqhm,bhmd->bqhd", fq, state)
        den = jnp.einsum("bqhm,bhm->bqh", fq, jnp.sum(fk, axis=1))
        return num / den[..., None]

    return attend


def approx_fn(mode, degree, causal=False, window=None, block_size=128):
    """block_size applies to causal/windowed attention only: on the global path it would set the streaming
    chunk (rows per loop step), which the library chooses itself."""
    if not causal and window is None:
        block_size = None
    return lambda q, k, v: approx_attention(q, k, v, scale=1.0, degree=degree, approx_mode=mode,
                                            causal=causal, window=window, block_size=block_size)


def out_and_grads(fn):
    """jit(q, k, v, dO) -> (out, dq, dk, dv)."""
    def run(q, k, v, d_out):
        out, pullback = jax.vjp(fn, q, k, v)
        return (out,) + pullback(d_out)
    return jax.jit(run)


def fwd_bwd(fn):
    """jit(q, k, v, dO) -> (out, dq, dk, dv): the forward+backward whose time we measure. The output is
    returned so that it is computed (exact_fwd's backward does not need it and XLA would drop it)."""
    def run(q, k, v, d_out):
        out, pullback = jax.vjp(fn, q, k, v)
        return (out,) + pullback(d_out)
    return jax.jit(run)


def rel_err(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def cosine(a, b):
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def time_call(fn, args, reps, max_seconds):
    """Minimum wall time over `reps` calls after one compile+warm-up call (fewer reps when slow)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        if times and sum(times) + times[-1] > max_seconds:
            break
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times), first


def machine_note():
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"{platform.node()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · "
            f"jax {jax.__version__} ({jax.default_backend()}) · python {sys.version.split()[0]} · "
            f"load average at start {load[0]:.1f}")


def rank_note(d, g):
    return f"r = C({d}+{g},{g}) = {feature_rank(d, g)}"


def write_md(path, title, command, sections):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {title}\n\nCommand (from the repository root):\n\n```\n{command}\n```\n\n")
        for section in sections:
            f.write(section.rstrip() + "\n\n")


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
