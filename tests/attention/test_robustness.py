"""No silent failures in attention (issue 13): every backend against a float64 numpy reference.

- float masks are refused (a PyTorch additive mask cast to bool would be inverted); bool and int masks work;
- rows with no finite logit (masked by `mask=`, `bias=-inf` or a score_mod returning -inf) give zeros and zero,
  finite gradients, and partially -inf rows are still right;
- NaN inputs propagate as NaN (the Pallas kernels used to zero NaN rows as if they were empty);
- zero lengths: q_len == 0 -> empty output, k_len == 0 -> zeros;
- integer q/k/v are refused.

Coverage is pairwise over (backend, way of masking / dtype / length), with tiny shapes; Pallas runs in interpret
mode with 8x8 blocks so that empty, partial and full blocks all occur.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.attention import attention, masks as M, score_mods as S
from maskjax.attention import pallas_gpu, pallas_tpu
from maskjax.attention.approx import approx_attention
from maskjax.attention.blocked import blocked_attention
from maskjax.attention.reference import reference_attention

BATCH, Q_LEN, K_LEN, HEADS, DIM = 2, 24, 20, 2, 8
BLOCK = 8
# 'pallas_gpu' calls the Triton kernel module directly (attention() picks the TPU kernels on CPU).
EXACT_BACKENDS = ("reference", "blocked", "pallas", "pallas_gpu", "auto")
FLOAT_MASK_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


# ---------------------------------------------------------------- independent reference (numpy, float64)

def np_attention(q, k, v, keep=None, bias=None, dout=None):
    """Softmax attention in float64 numpy with its hand-written backward (no maskjax code).

    q [B, Q, H, D], k/v [B, K, H, D]; keep bool broadcastable to [B, H, Q, K]; bias [B, H, Q, K] (may hold
    -inf). Rows with no finite logit give zeros. Returns out, or (out, dq, dk, dv, dbias) when dout is given.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    if keep is not None:
        s = np.where(np.broadcast_to(keep, s.shape), s, -np.inf)
    finite = np.isfinite(s)
    s0 = np.where(finite, s, 0.0)
    row_max = np.where(finite.any(-1, keepdims=True), np.where(finite, s0, -np.inf).max(-1, keepdims=True), 0.0)
    e = np.where(finite, np.exp(s0 - row_max), 0.0)
    den = e.sum(-1, keepdims=True)
    p = e / np.where(den > 0, den, 1.0)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    if dout is None:
        return out
    do = np.asarray(dout, np.float64)
    dv = np.einsum("bhqk,bqhd->bkhd", p, do)
    dp = np.einsum("bqhd,bkhd->bhqk", do, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", ds, k) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    return out, dq, dk, dv, ds


def _qkv(seed, q_len=Q_LEN, k_len=K_LEN, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(BATCH, q_len, HEADS, DIM))
    k = rng.normal(size=(BATCH, k_len, HEADS, DIM))
    v = rng.normal(size=(BATCH, k_len, HEADS, DIM))
    return tuple(jnp.asarray(x, jnp.float32).astype(dtype) for x in (q, k, v))


def _keep():
    """bool [B, H, Q, K]: random keys, plus fully masked rows (single rows, and the whole first query block
    of batch 1 so that the Pallas kernels see a query block without any key)."""
    keep = np.random.default_rng(5).random((BATCH, HEADS, Q_LEN, K_LEN)) < 0.6
    keep[0, :, 3] = False
    keep[0, 1, 17] = False
    keep[1, :, :BLOCK] = False
    return keep


def _call(backend, q, k, v, mask=None, bias=None, score_mod=None):
    """The backend under test; blocks of 8 so that tiles are empty, partial and full."""
    if backend == "pallas_gpu":
        return pallas_gpu.flash_attention_gpu(q, k, v, M.as_mask(mask), bias=bias, score_mod=score_mod,
                                              block_q=BLOCK, block_k=BLOCK, interpret=True)
    kwargs = {} if backend in ("reference", "auto", "approx") else dict(block_q=BLOCK, block_k=BLOCK)
    return attention(q, k, v, mask=mask, bias=bias, score_mod=score_mod, backend=backend, **kwargs)


def _out_and_grads(fn, args, cot):
    @jax.jit
    def run(args, cot):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cot.astype(out.dtype))

    return run(args, cot)


# ---------------------------------------------------------------- fault 1: float masks are refused

@pytest.mark.parametrize("backend, dtype", list(itertools.product(
    ("reference", "blocked", "pallas", "auto", "approx"), FLOAT_MASK_DTYPES)))
def test_float_mask_is_refused_on_every_backend(backend, dtype):
    q, k, v = _qkv(0)
    keep = np.tril(np.ones((Q_LEN, K_LEN), bool))
    float_mask = jnp.where(keep, 0.0, -jnp.inf).astype(dtype)  # PyTorch additive style: 0 = keep
    with pytest.raises(ValueError) as err:
        _call(backend, q, k, v, mask=float_mask)
    msg = str(err.value)
    assert str(jnp.dtype(dtype)) in msg and str((Q_LEN, K_LEN)) in msg, msg
    assert "bias=" in msg and "True = attend" in msg, msg


@pytest.mark.parametrize("make", [
    lambda m: M.dense(m), lambda m: M.Dense(m), lambda m: M.as_mask(m), lambda m: M.query_masks(m),
    lambda m: M.group_routing(np.zeros((1, 4), np.int32), allowed=m[0, :2, :2]),
    lambda m: reference_attention(*_qkv(0, 4, 4), m),
    lambda m: blocked_attention(*_qkv(0, 4, 4), m, block_q=BLOCK, block_k=BLOCK),
    lambda m: M.dense(m.astype(jnp.complex64)),
    lambda m: M.dense(np.asarray(m, np.float64).tolist()),
], ids=["dense", "Dense", "as_mask", "query_masks", "group_routing", "reference_attention", "blocked_attention",
        "complex", "python_list"])
def test_float_mask_is_refused_by_constructors_and_entry_points(make):
    mask = jnp.asarray(np.random.default_rng(0).random((2, 4, 4)) < 0.5, jnp.float32)
    with pytest.raises(ValueError, match="bias="):
        make(mask)


def test_traced_float_mask_is_refused():
    q, k, v = _qkv(0)
    mask = jnp.zeros((Q_LEN, K_LEN), jnp.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        jax.jit(lambda m: attention(q, k, v, mask=m, backend="blocked"))(mask)


# bool and each integer dtype on every exact backend (pairwise: the integer dtype rotates over the backends).
_INT_DTYPES = (np.int32, np.int8, np.uint8, np.int64, np.int32)
_MASK_CASES = [(b, np.bool_) for b in EXACT_BACKENDS] + list(zip(EXACT_BACKENDS, _INT_DTYPES))


@pytest.mark.parametrize("backend, mask_dtype", _MASK_CASES)
def test_bool_and_int_masks_match_numpy(backend, mask_dtype):
    q, k, v = _qkv(1)
    keep = _keep()
    if mask_dtype is np.bool_:
        mask = keep
    else:  # nonzero = attend, whatever the value
        mask = np.where(keep, np.random.default_rng(2).integers(1, 4, keep.shape), 0).astype(mask_dtype)
    out = jax.jit(lambda q, k, v, m: _call(backend, q, k, v, mask=m))(q, k, v, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, keep), atol=2e-5, rtol=2e-5)


def test_approx_int_key_padding_means_nonzero_attends():
    q, k, v = _qkv(3)
    keep = np.ones((BATCH, 1, 1, K_LEN), bool)
    keep[0, ..., 13:] = keep[1, ..., :4] = False
    as_int = np.where(keep, 7, 0).astype(np.int32)
    got = attention(q, k, v, mask=jnp.asarray(as_int), backend="approx", approx_mode="exact_fwd")
    want = attention(q, k, v, mask=jnp.asarray(keep), backend="approx", approx_mode="exact_fwd")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # exact_fwd computes the forward exactly: the numpy softmax is its reference.
    np.testing.assert_allclose(np.asarray(got), np_attention(q, k, v, keep), atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------- fault 2: rows with no finite logit

def _masking(way, keep, bias):
    """(mask, bias, score_mod) that exclude the keys keep == False in the given way."""
    if way == "mask":
        return jnp.asarray(keep), bias, None
    if way == "bias":
        return None, jnp.where(jnp.asarray(keep), bias, -jnp.inf), None
    mod = S.score_function(lambda s, b, h, qi, ki, keep: jnp.where(keep, s, -jnp.inf), jnp.asarray(keep),
                           axes=("bhqk",))
    return None, bias, mod


@pytest.mark.parametrize("backend, way", list(itertools.product(EXACT_BACKENDS, ("mask", "bias", "score_mod"))))
def test_rows_without_finite_logit_give_zeros_and_zero_gradients(backend, way):
    q, k, v = _qkv(4)
    keep = _keep()
    rng = np.random.default_rng(6)
    bias0 = jnp.asarray(rng.normal(size=keep.shape), jnp.float32)
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    mask, bias, mod = _masking(way, keep, bias0)

    out, (dq, dk, dv, dbias) = _out_and_grads(
        lambda q, k, v, b: _call(backend, q, k, v, mask=mask, bias=b, score_mod=mod), (q, k, v, bias), cot)
    want = np_attention(q, k, v, keep, bias0, dout=cot)

    dead = ~keep.any(-1)  # [B, H, Q]
    assert dead[0, :, 3].all() and dead[1, :, :BLOCK].all() and dead.sum() == 2 + 1 + 2 * BLOCK
    dead_bqh = dead.transpose(0, 2, 1)
    for name, got, ref in zip(("out", "dq", "dk", "dv", "dbias"), (out, dq, dk, dv, dbias), want):
        got = np.asarray(got)
        assert np.isfinite(got).all(), name
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4, err_msg=name)
    assert np.all(np.asarray(out)[dead_bqh] == 0)
    assert np.all(np.asarray(dq)[dead_bqh] == 0)
    assert np.all(np.asarray(dbias)[dead] == 0) and np.all(np.asarray(dbias)[~keep] == 0)


# ---------------------------------------------------------------- fault 3: NaN propagates

def _nan_run(backend, q, k, v):
    return np.asarray(jax.jit(lambda q, k, v: _call(backend, q, k, v, mask=M.causal()))(q, k, v))


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_nan_in_q_or_k_gives_nan_exactly_in_the_rows_that_use_it(backend):
    q, k, v = _qkv(7, Q_LEN, Q_LEN)
    q = q.at[0, 13, 1, 2].set(jnp.nan)  # row 13: its kv blocks are one FULL and one PARTIAL
    k = k.at[1, 5, 0, 0].set(jnp.nan)   # key 5: attended by rows >= 5 (causal), masked for rows 0..4
    want = np.zeros((BATCH, Q_LEN, HEADS), bool)
    want[0, 13, 1] = True
    want[1, 5:, 0] = True
    out = _nan_run(backend, q, k, v)
    np.testing.assert_array_equal(np.isnan(out).any(-1), want)
    assert np.isnan(out[want]).all()  # every feature of a NaN row


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_nan_in_v_reaches_every_row_that_attends_the_key(backend):
    q, k, v = _qkv(8, Q_LEN, Q_LEN)
    v = v.at[1, 5, 0, 3].set(jnp.nan)
    out = _nan_run(backend, q, k, v)
    assert np.isnan(out[1, 5:, 0, 3]).all()
    # Only feature 3 of head 0 in batch 1 may be touched (rows that mask key 5 may get 0 * NaN as well).
    untouched = np.ones(out.shape, bool)
    untouched[1, :, 0, 3] = False
    assert np.isfinite(out[untouched]).all()


# ---------------------------------------------------------------- fault 4: zero lengths

_ZERO_CASES = [
    ("reference", 0, 12, None), ("reference", 12, 0, "causal"), ("blocked", 0, 12, "causal"),
    ("blocked", 12, 0, "array"), ("blocked", 0, 0, None), ("pallas", 0, 12, "array"), ("pallas", 12, 0, None),
    ("pallas_gpu", 12, 0, "causal"), ("pallas_gpu", 0, 12, None), ("auto", 0, 12, "causal"),
    ("auto", 12, 0, "array"), ("approx", 0, 12, None), ("approx", 12, 0, None), ("approx", 0, 0, "causal"),
]


@pytest.mark.parametrize("backend, q_len, k_len, mask_kind", _ZERO_CASES)
def test_zero_lengths(backend, q_len, k_len, mask_kind):
    q, k, v = _qkv(9, q_len, k_len)
    mask = {None: None, "causal": M.causal(), "array": jnp.ones((q_len, k_len), bool)}[mask_kind]
    cot = jnp.ones(q.shape, jnp.float32)
    out, grads = _out_and_grads(lambda q, k, v: _call(backend, q, k, v, mask=mask), (q, k, v), cot)
    assert out.shape == (BATCH, q_len, HEADS, DIM) and out.dtype == q.dtype
    assert np.all(np.asarray(out) == 0)
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and np.all(np.asarray(g) == 0)


# ---------------------------------------------------------------- fault 5: non-floating q, k, v

_INT_QKV_CASES = [
    ("reference", jnp.int32), ("blocked", jnp.int8), ("pallas", jnp.uint8), ("auto", jnp.bool_),
    ("approx", jnp.int32), ("reference_attention", jnp.int8), ("blocked_attention", jnp.int32),
    ("flash_tpu", jnp.int32), ("flash_gpu", jnp.int8), ("approx_attention", jnp.uint8), ("auto", jnp.complex64),
]


@pytest.mark.parametrize("entry, dtype", _INT_QKV_CASES)
def test_non_floating_qkv_is_refused(entry, dtype):
    q, k, v = _qkv(10)
    v = v.astype(dtype)  # one bad input is enough; the message names all three dtypes
    calls = {
        "reference_attention": lambda: reference_attention(q, k, v),
        "blocked_attention": lambda: blocked_attention(q, k, v, block_q=BLOCK, block_k=BLOCK),
        "flash_tpu": lambda: pallas_tpu.flash_attention(q, k, v, block_q=BLOCK, block_k=BLOCK, interpret=True),
        "flash_gpu": lambda: pallas_gpu.flash_attention(q, k, v, block_q=BLOCK, block_k=BLOCK, interpret=True),
        "approx_attention": lambda: approx_attention(q, k, v),
    }
    run = calls.get(entry, lambda: _call(entry, q, k, v))
    with pytest.raises(ValueError) as err:
        run()
    msg = str(err.value)
    assert f"v={jnp.dtype(dtype)}" in msg and "q=float32" in msg and "k=float32" in msg, msg


# ---------------------------------------------------------------- found on the way

def test_blocked_concrete_per_head_mask_under_jit():
    """A concrete (not traced) jax.Array mask that needs key padding, closed over by a jitted function, used to
    crash the trace-time tile table (its padding was staged into a tracer)."""
    q, k, v = _qkv(11)
    keep = _keep()
    out = jax.jit(lambda q, k, v: _call("blocked", q, k, v, mask=jnp.asarray(keep)))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, keep), atol=2e-5, rtol=2e-5)
