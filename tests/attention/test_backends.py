"""reference and blocked backends against an independent dense jnp attention (np_reference.py) with
masks written out in numpy: outputs and gradients w.r.t. q, k, v, bias and score-modifier parameters.

Coverage is pairwise, not a full product: every mask kind runs on both backends; dtype, GQA/MQA, bias
shape and block sizes rotate across the cases so that each pair of those factors appears.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.attention import attention, masks as M, score_mods as S
from maskjax.attention.blocked import blocked_attention
from maskjax.attention.reference import reference_attention
from tests.attention import np_reference as R
from tests.attention.test_masks import KINDS, _expected

BACKENDS = ("reference", "blocked")
DTYPES = (jnp.float32, jnp.bfloat16)
KV = ("mha", "gqa", "mqa")
BIAS = (None, "bhqk", "1hqk", "b1qk", "qk")
BLOCKS = ((4, 8), (8, 4), (16, 16), (5, 3))


def _cases():
    """(kind, backend, dtype, kv, bias, blocks): kinds x backends, other factors rotated pairwise."""
    other = list(itertools.product(DTYPES, KV, BIAS[:4]))
    out = []
    for i, (kind, backend) in enumerate(itertools.product(KINDS, BACKENDS)):
        dtype, kv, bias = other[(i * 7) % len(other)]
        if backend == "blocked" and (i // 2) % 2:
            backend = "blocked-eval"  # per-tile mask evaluation instead of the trace-time tile table
        out.append((kind, backend, dtype, kv, bias, BLOCKS[i % len(BLOCKS)]))
    return out


def _inputs(rng, batch, q_len, k_len, heads, kv_heads, dim, dtype):
    q = jnp.asarray(rng.normal(size=(batch, q_len, heads, dim)), jnp.float32).astype(dtype)
    k = jnp.asarray(rng.normal(size=(batch, k_len, kv_heads, dim)), jnp.float32).astype(dtype)
    v = jnp.asarray(rng.normal(size=(batch, k_len, kv_heads, dim)), jnp.float32).astype(dtype)
    return q, k, v


def _bias(rng, kind, batch, heads, q_len, k_len):
    shape = {"bhqk": (batch, heads, q_len, k_len), "1hqk": (1, heads, q_len, k_len),
             "b1qk": (batch, 1, q_len, k_len), "qk": (q_len, k_len)}[kind]
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _run(backend, q, k, v, mask, bias=None, score_mod=None, blocks=(8, 8), scale=None):
    if backend == "reference":
        return reference_attention(q, k, v, mask, bias, scale=scale, score_mod=score_mod)
    return blocked_attention(q, k, v, mask, bias, scale=scale, score_mod=score_mod, block_q=blocks[0],
                             block_k=blocks[1], tile_table=backend != "blocked-eval")


def _out_and_grads(fn, args, cot):
    """(fn(*args), d<fn(*args), cot>/d args) in one jitted computation (one compile, no eager ops)."""

    @jax.jit
    def run(args, cot):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cot.astype(out.dtype))

    return run(args, cot)


def _tols(dtype):
    return (dict(atol=2e-5, rtol=2e-5), dict(atol=1e-4, rtol=1e-4)) if dtype == jnp.float32 else \
        (dict(atol=3e-2, rtol=3e-2), dict(atol=8e-2, rtol=8e-2))


@pytest.mark.parametrize("kind, backend, dtype, kv, bias_kind, blocks", _cases())
def test_backend_matches_dense_reference(kind, backend, dtype, kv, bias_kind, blocks):
    mask, q_len, k_len, expected = _expected(kind)
    dep_b, dep_h = mask.depends_on()
    heads = 3 if dep_h else 4
    kv_heads = {"mha": heads, "gqa": 2 if heads == 4 else 3, "mqa": 1}[kv]
    if not dep_h:
        expected = np.broadcast_to(expected[:, :1], (2, heads, q_len, k_len))
    rng = np.random.default_rng(abs(hash((kind, backend))) % 2 ** 32)
    q, k, v = _inputs(rng, 2, q_len, k_len, heads, kv_heads, 8, dtype)
    bias = None if bias_kind is None else _bias(rng, bias_kind, 2, heads, q_len, k_len)
    cot = jnp.asarray(rng.normal(size=(2, q_len, heads, 8)), jnp.float32)
    args = (q, k, v) if bias is None else (q, k, v, bias)
    f32 = lambda x: x.astype(jnp.float32)
    out, got_g = _out_and_grads(lambda q, k, v, b=None: _run(backend, q, k, v, mask, b, blocks=blocks), args, cot)
    want, want_g = _out_and_grads(lambda q, k, v, b=None: R.dense_attention(q, k, v, expected, b),
                                  tuple(map(f32, args)), cot)
    assert out.dtype == dtype and out.shape == q.shape
    tol_out, tol_grad = _tols(dtype)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want), **tol_out)
    for name, a, b in zip("qkvb", got_g, want_g):
        assert a.dtype == (dtype if name != "b" else jnp.float32), name
        assert not np.isnan(np.asarray(a, np.float32)).any(), name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), err_msg=name, **tol_grad)


def _mod_cases():
    heads, n = 3, 12
    grid = M.TokenGrid(3, 3, num_prefix=3)
    qi, ki = np.arange(n)[:, None], np.arange(n)[None]
    r, c = R.grid_coords(3, 3, 3)
    d2 = ((r[:, None] - r[None]) ** 2 + (c[:, None] - c[None]) ** 2).astype(np.float32)
    d2[(r[:, None] < 0) | (r[None] < 0)] = 0
    cases = {
        "alibi": (lambda p: S.alibi(p), np.array([0.5, 0.25, 0.125], np.float32),
                  lambda s, p: s - p[None, :, None, None] * np.abs(qi - ki)),
        "alibi_causal": (lambda p: S.alibi(p, causal=True), np.array([0.3, 0.2, 0.1], np.float32),
                         lambda s, p: s - p[None, :, None, None] * (qi - ki)),
        "soft_cap": (lambda p: S.soft_cap(p), np.float32(1.5), lambda s, p: p * jnp.tanh(s / p)),
        "relpos_1d": (lambda p: S.relative_position_1d(p),
                      np.random.default_rng(1).normal(size=(heads, 7)).astype(np.float32),
                      lambda s, p: s + p[:, np.clip(ki - qi, -3, 3) + 3][None]),
        "gaussian_2d": (lambda p: S.gaussian_2d(grid, p), np.array([1.0, 2.0, 0.7], np.float32),
                        lambda s, p: s - d2 / (2 * p[None, :, None, None] ** 2)),
        "function_temp": (lambda p: S.score_function(lambda s, b, h, q, k, t: s * t, p, axes=("h",)),
                          np.array([0.5, 1.0, 2.0], np.float32), lambda s, p: s * p[None, :, None, None]),
        "chain": (lambda p: S.alibi(p) + S.soft_cap(2.0), np.array([0.5, 0.25, 0.125], np.float32),
                  lambda s, p: 2.0 * jnp.tanh((s - p[None, :, None, None] * np.abs(qi - ki)) / 2.0)),
    }
    return cases


@pytest.mark.parametrize("name, backend", list(itertools.product(
    ["alibi", "alibi_causal", "soft_cap", "relpos_1d", "gaussian_2d", "function_temp", "chain"], BACKENDS)))
def test_score_mods_values_and_param_gradients(name, backend):
    make, params, formula = _mod_cases()[name]
    n, heads = 12, 3
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng, 2, n, n, heads, heads, 8, jnp.float32)
    mask = M.causal() | M.local_1d(left=2, right=2)
    dense = R.np_causal(n, n) | R.np_local(n, n, 2, 2)
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    params = jnp.asarray(params)

    out, got = _out_and_grads(lambda q, k, v, p: _run(backend, q, k, v, mask, score_mod=make(p), blocks=(4, 8)),
                              (q, k, v, params), cot)
    want, want_g = _out_and_grads(lambda q, k, v, p: R.dense_attention(q, k, v, dense, score_fn=lambda s: formula(s, p)),
                                  (q, k, v, params), cot)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    for a, b, what in zip(got, want_g, "qkvp"):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4, err_msg=what)


@pytest.mark.parametrize("backend, dtype", list(itertools.product(BACKENDS, DTYPES)))
def test_fully_masked_rows_are_zero_with_zero_grads(backend, dtype):
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, 2, 13, 10, 2, 1, 8, dtype)
    mask = M.lengths(q_lengths=np.array([9, 13]), kv_lengths=np.array([10, 0])) & M.causal(offset=-2)
    bias = jnp.asarray(rng.normal(size=(2, 2, 13, 10)) * 30, jnp.float32)
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    out, (gq, gk, gv, gb) = _out_and_grads(lambda q, k, v, b: _run(backend, q, k, v, mask, b, blocks=(4, 4)),
                                           (q, k, v, bias), cot)
    dead = np.zeros((2, 13), bool)
    dead[0, 9:] = dead[0, :2] = True
    dead[1] = True
    out32 = np.asarray(out, np.float32)
    assert not np.isnan(out32).any()
    assert np.all(out32[dead] == 0)
    assert np.abs(out32[~dead]).max() > 0
    for g in (gq, gk, gv, gb):
        assert not np.isnan(np.asarray(g, np.float32)).any()
    assert np.all(np.asarray(gq, np.float32)[dead] == 0)
    assert np.all(np.asarray(gk, np.float32)[1] == 0) and np.all(np.asarray(gb)[1] == 0)


@pytest.mark.parametrize("kind", ["causal", "local_1d", "segments", "dense", "per_head", "window_2d_row"])
def test_reference_matches_jax_nn_dot_product_attention(kind):
    """jax.nn.dot_product_attention returns mean(V) on fully masked rows: those rows are excluded."""
    mask, q_len, k_len, expected = _expected(kind)
    heads = expected.shape[1]
    rng = np.random.default_rng(11)
    q, k, v = _inputs(rng, 2, q_len, k_len, heads, 1 if heads == 3 else 2, 16, jnp.float32)
    bias = jnp.asarray(rng.normal(size=(1, heads, q_len, k_len)), jnp.float32)
    got = jax.jit(lambda q, k, v, b: reference_attention(q, k, v, mask, b))(q, k, v, bias)
    want = jax.jit(jax.nn.dot_product_attention)(q, k, v, bias=bias, mask=jnp.asarray(expected))
    live = np.asarray(expected).any(-1).transpose(0, 2, 1)  # [b, q, h]
    np.testing.assert_allclose(np.asarray(got)[live], np.asarray(want)[live], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, tile_table", [(k, i % 2 == 0) for i, k in enumerate(
    ["full", "causal", "prefix_lm_batch", "window_2d_tile_dilated", "directional", "segments", "routing",
     "lengths", "query_masks_fallback", "function_arrays", "and_or_not", "per_head"])])
def test_blocked_computes_exactly_the_nonempty_tiles(kind, tile_table):
    """Counters measured inside the blocked forward loop vs the block kinds of the numpy dense mask."""
    mask, q_len, k_len, expected = _expected(kind)
    heads = expected.shape[1]
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, 2, q_len, k_len, heads, heads, 4, jnp.float32)
    kinds = R.np_block_kinds(expected, 4, 4)
    _, stats = jax.jit(lambda q, k, v: blocked_attention(q, k, v, mask, block_q=4, block_k=4,
                                                         return_stats=True, tile_table=tile_table))(q, k, v)
    np.testing.assert_array_equal(np.asarray(stats["tiles"]), (kinds > 0).sum((-1, -2)))
    np.testing.assert_array_equal(np.asarray(stats["masked_tiles"]), (kinds == 1).sum((-1, -2)))


def test_blocked_with_traced_mask_counts_tiles_and_matches():
    mask, q_len, k_len, expected = _expected("query_masks")
    rng = np.random.default_rng(6)
    q, k, v = _inputs(rng, 2, q_len, k_len, 2, 2, 4, jnp.float32)

    @jax.jit
    def f(q, k, v, qm):
        return blocked_attention(q, k, v, M.query_masks(qm, fallback_to_all=False), block_q=4, block_k=4,
                                 chunk_elems=32, return_stats=True)

    out, stats = f(q, k, v, jnp.asarray(QMASK_T := expected[:, 0]))
    kinds = R.np_block_kinds(QMASK_T, 4, 4)
    np.testing.assert_array_equal(np.asarray(stats["tiles"]), np.repeat((kinds > 0).sum((-1, -2))[:, None], 2, 1))
    # The while loop stops after the last non-empty tile: slots visited < all tiles when the map is sparse.
    assert np.all(np.asarray(stats["slots"]) <= ((kinds > 0).sum((-1, -2))[:, None] // 2 + 1) * 2)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(R.dense_attention)(q, k, v, QMASK_T[:, None])),
                               atol=2e-5, rtol=2e-5)


def test_blocked_accepts_precomputed_static_block_map_for_traced_mask():
    seg = np.repeat(np.arange(4), 8)[None]
    rng = np.random.default_rng(8)
    q, k, v = _inputs(rng, 1, 32, 32, 2, 2, 4, jnp.float32)
    bm = M.segment_ids(seg).block_map(32, 32, 8, 8)

    @jax.jit
    def f(q, k, v, s):
        return blocked_attention(q, k, v, M.segment_ids(s), block_q=8, block_k=8, block_map=bm,
                                 return_stats=True)

    out, stats = f(q, k, v, jnp.asarray(seg))
    assert np.all(np.asarray(stats["slots"]) == 4) and np.all(np.asarray(stats["tiles"]) == 4)
    np.testing.assert_allclose(np.asarray(out), np.asarray(R.dense_attention(q, k, v, R.np_segments(seg, seg)[:, None])),
                               atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="block_map"):
        blocked_attention(q, k, v, M.segment_ids(seg), block_q=4, block_k=8, block_map=bm)


def test_entry_point_backends_agree_and_validate():
    rng = np.random.default_rng(9)
    q, k, v = _inputs(rng, 2, 24, 24, 4, 2, 8, jnp.float32)
    bool_mask = jnp.asarray(rng.random((2, 1, 24, 24)) < 0.7)
    outs = [jax.jit(lambda q, k, v, m, b=b: attention(q, k, v, mask=m, backend=b))(q, k, v, bool_mask)
            for b in ("auto", "reference", "blocked")]
    want = jax.jit(R.dense_attention)(q, k, v, bool_mask)
    for o in outs:
        np.testing.assert_allclose(np.asarray(o), np.asarray(want), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="score_mod"):
        attention(q, k, v, score_mod=lambda s: s)
    with pytest.raises(ValueError, match="incompatible"):
        attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))
    with pytest.raises(ValueError, match="block_q"):
        blocked_attention(q, k, v, block_q=0)


def test_entry_point_dispatches_to_pallas_interpret_on_cpu():
    rng = np.random.default_rng(10)
    q, k, v = _inputs(rng, 1, 16, 16, 2, 1, 8, jnp.float32)
    seg = np.array([[0] * 6 + [1] * 10])
    mask = M.segment_ids(seg) & M.causal()
    got = jax.jit(lambda q, k, v: attention(q, k, v, mask=mask, backend="pallas", block_q=8, block_k=8))(q, k, v)
    want = jax.jit(R.dense_attention)(q, k, v, (R.np_segments(seg, seg) & R.np_causal(16, 16))[:, None])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="dtypes"):
        attention(q, k.astype(jnp.bfloat16), v, mask=mask, backend="pallas")


@pytest.mark.parametrize("kind, traced", [("causal", False), ("window_2d_tile_dilated", False), ("per_head", False),
                                          ("lengths", False), ("query_masks", True)])
def test_blocked_multi_chunk_loops_with_bias_and_score_mod(kind, traced):
    """Three tiles per chunk: exercises the chunk loops (fori / while), the accumulator windows and the
    scatter-added dK / dV across chunks, with a bias and a learnable score modifier."""
    mask, q_len, k_len, expected = _expected(kind)
    dep_h = mask.depends_on()[1]
    heads = 3 if dep_h else 2
    if not dep_h:
        expected = np.broadcast_to(expected[:, :1], (2, heads, q_len, k_len))
    rng = np.random.default_rng(12)
    q, k, v = _inputs(rng, 2, q_len, k_len, heads, 1, 8, jnp.float32)
    bias = _bias(rng, "1hqk", 2, heads, q_len, k_len)
    cap = jnp.float32(2.5)
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    if traced:  # an empty query block between non-empty ones: accumulator rows are ranks, not blocks
        expected = expected.copy()
        expected[:, :, 4:8] = False
    arr = jnp.asarray(expected[:, 0]) if traced else None

    def f(q, k, v, b, c):
        m = M.query_masks(arr, fallback_to_all=False) if traced else mask
        return blocked_attention(q, k, v, m, b, score_mod=S.soft_cap(c), block_q=4, block_k=4, chunk_elems=48)

    out, got = _out_and_grads(f, (q, k, v, bias, cap), cot)
    want, want_g = _out_and_grads(
        lambda q, k, v, b, c: R.dense_attention(q, k, v, expected, b, score_fn=lambda s: c * jnp.tanh(s / c)),
        (q, k, v, bias, cap), cot)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5, rtol=2e-5)
    for a, b, what in zip(got, want_g, "qkvbc"):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4, err_msg=what)
