"""Independent references and shared jitted drivers for the approximate-attention tests.

References (none calls the code under test, except the drivers that run it):
  * the Taylor kernel e_g(t) = sum_{j<=g} t^j/j! and brute-force monomial features;
  * dense attention with that kernel (exact exp inside the exact region), differentiated by jax.grad;
  * the paper's gradient formula dS = P̃ ∘ (dO Vᵀ − δ 1ᵀ) written densely;
  * dense exact softmax attention differentiated by jax.grad.
Drivers are jitted once per static configuration and shared by tests: on a busy 2-core machine compilation,
not arithmetic, is what these tests pay for.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from maskjax.attention.approx import approx_attention

MODES = ("lowrank", "exact_fwd", "paper")


# ----------------------------------------------------------------------------------------------- references


def taylor(t, g):
    return sum(t ** j / math.factorial(j) for j in range(g + 1))


def explicit_features(x, g):
    """phi by brute force over multisets (no tables): x^a / sqrt(a!) for |a| <= g."""
    d = x.shape[-1]
    cols = []
    for j in range(g + 1):
        # colexicographic order (by largest coordinate), the order taylor_features documents
        for combo in sorted(itertools.combinations_with_replacement(range(d), j), key=lambda c: c[::-1]):
            counts = np.bincount(np.array(combo, int), minlength=d) if combo else np.zeros(d, int)
            weight = 1.0 / math.sqrt(math.prod(math.factorial(c) for c in counts))
            col = jnp.ones(x.shape[:-1], x.dtype)
            for i in combo:
                col = col * x[..., i]
            cols.append(col * weight)
    return jnp.stack(cols, axis=-1)


def regions(n, causal=False, window=None, block=None):
    """(allowed, exact) [n, n] boolean pattern each masking case stands for."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    allowed = (j <= i) if causal else np.ones((n, n), bool)
    if window is not None:
        exact = allowed & (np.abs(i - j) < window)
    elif causal and block is not None:
        exact = allowed & (i // block == j // block)
    else:
        exact = np.zeros((n, n), bool)
    return allowed, exact


def dense_kernel_attention(q, k, v, g, allowed, exact, key_valid=None, kernel=None):
    """Dense attention (scale 1) with kernel exp on `exact` pairs and e_g elsewhere; [b, n, h, d] layout."""
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    t = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    kernel = (lambda s: taylor(s, g)) if kernel is None else kernel
    weights = jnp.where(exact, jnp.exp(jnp.where(exact, t, 0.0)), kernel(t))
    ok = jnp.asarray(allowed)
    if key_valid is not None:
        ok = ok & key_valid[:, None, None, :]
    weights = jnp.where(ok, weights, 0.0)
    p = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v), p


def dense_softmax(q, k, v, allowed, key_valid=None):
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    t = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    ok = jnp.asarray(allowed)
    if key_valid is not None:
        ok = ok & key_valid[:, None, None, :]
    p = jax.nn.softmax(jnp.where(ok, t, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v), p


def paper_gradient_dense(q, k, v, d_out, g, allowed, exact, key_valid=None):
    """dq, dk, dv from dS = P̃ ∘ (dO Vᵀ − δ), δ_i = dO_i·Õ_i (the paper's formula, written densely)."""
    rep = q.shape[2] // k.shape[2]
    out, p = dense_kernel_attention(q, k, v, g, allowed, exact, key_valid)
    kr, vr = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out, out)
    ds = p * (jnp.einsum("bqhd,bkhd->bhqk", d_out, vr) - delta[..., None])
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, kr)
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q)
    dv = jnp.einsum("bhqk,bqhd->bkhd", p, d_out)
    group = lambda x: x.reshape(x.shape[:2] + (k.shape[2], rep, x.shape[-1])).sum(3)
    return dq, group(dk), group(dv)


def sphere_inputs(key, batch, n, heads, d, bound, kv_heads=None):
    """The stated distribution: q, k = sqrt(B)·(uniform unit vectors), so |q·k| <= B; v, dO ~ N(0, I)."""
    kq, kk, kv, ko = jax.random.split(key, 4)
    kv_heads = heads if kv_heads is None else kv_heads
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(kq, (batch, n, heads, d))) * math.sqrt(bound)
    k = unit(jax.random.normal(kk, (batch, n, kv_heads, d))) * math.sqrt(bound)
    v = jax.random.normal(kv, (batch, n, kv_heads, d))
    d_out = jax.random.normal(ko, (batch, n, heads, d))
    return q, k, v, d_out


def assert_close(actual, expected, atol, what):
    err = float(jnp.max(jnp.abs(actual - expected)))
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:.3g}"


# ----------------------------------------------------------------------------------------------- jitted drivers


@functools.partial(jax.jit, static_argnames=("g", "config"))
def approx_all_modes(q, k, v, d_out, mask, g, config):
    """{mode: (out, dq, dk, dv)} of approx_attention for every mode; config = sorted kwargs items."""
    kw = dict(config)
    result = {}
    for mode in MODES:
        fn = lambda a, b, c, mode=mode: approx_attention(a, b, c, mask, scale=1.0, degree=g, approx_mode=mode, **kw)
        out, pullback = jax.vjp(fn, q, k, v)
        result[mode] = (out,) + pullback(d_out)
    return result


@functools.partial(jax.jit, static_argnames=("g", "causal", "window", "block"))
def dense_references(q, k, v, d_out, key_valid, g, causal, window, block):
    """Dense references: the Taylor model (out + jax.grad), the paper formula, exact softmax (out + jax.grad, P)."""
    allowed, exact = regions(q.shape[1], causal, window, block)
    taylor_fn = lambda a, b, c: dense_kernel_attention(a, b, c, g, allowed, exact, key_valid)[0]
    softmax_fn = lambda a, b, c: dense_softmax(a, b, c, allowed, key_valid)[0]
    t_out, t_pull = jax.vjp(taylor_fn, q, k, v)
    s_out, s_pull = jax.vjp(softmax_fn, q, k, v)
    return {
        "taylor": (t_out,) + t_pull(d_out),
        "paper": (t_out,) + paper_gradient_dense(q, k, v, d_out, g, allowed, exact, key_valid),
        "softmax": (s_out,) + s_pull(d_out),
        "softmax_p": dense_softmax(q, k, v, allowed, key_valid)[1],
    }


def run_case(kw, q, k, v, d_out, g, key_valid=None):
    kw = dict(kw)
    mask = None if key_valid is None else key_valid[:, None, None, :]
    ours = approx_all_modes(q, k, v, d_out, mask, g=g, config=tuple(sorted(kw.items())))
    refs = dense_references(q, k, v, d_out, key_valid, g=g, causal=kw.get("causal", False),
                            window=kw.get("window"), block=kw.get("block_size"))
    return ours, refs


