"""Pallas flash-attention kernels (TPU Mosaic and GPU Triton variants, interpret mode on CPU) against an
independent dense softmax reference: outputs and gradients w.r.t. q, k, v and score-modifier parameters.

Shapes are tiny and blocks are 16 so that every case has several blocks (empty, partial and full) while the
interpreter stays fast; every kernel call is jitted (interpret mode is slow when run eagerly).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.attention import masks as M
from maskjax.attention import pallas_gpu, pallas_tpu
from maskjax.attention import score_mods as S
from tests.attention.pallas_testing import causal_dense, dense_attention, local_dense, segments_dense

BACKENDS = {"tpu": pallas_tpu.flash_attention, "gpu": pallas_gpu.flash_attention}
BLOCK = 16


def _qkv(key, batch, q_len, kv_len, heads, kv_heads, head_dim=16, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(key), 3)
    q = jax.random.normal(kq, (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v


def _case(name):
    """(batch, q_len, kv_len, heads, kv_heads, mask object, dense allowed [B|1, H|1, Sq, Sk])."""
    rng = np.random.RandomState(0)
    if name == "full":
        return 1, 32, 32, 2, 2, None, np.ones((1, 1, 32, 32), bool)
    if name == "causal_odd_lengths":
        return 1, 37, 37, 2, 2, M.causal(), causal_dense(37, 37)[None, None]
    if name == "local_window_cross":
        return 1, 29, 45, 2, 1, M.local_1d(left=5, right=3), local_dense(29, 45, 5, 3)[None, None]
    if name == "segments_gqa":
        q_seg = np.stack([np.repeat([0, 1, 2], [10, 14, 8]), np.repeat([0, 1], [20, 12])])
        return 2, 32, 32, 4, 2, M.segment_ids(q_seg), segments_dense(q_seg, q_seg)
    if name == "random_dense_mqa":
        dense = rng.rand(2, 2, 24, 40) < 0.3
        return 2, 24, 40, 2, 1, M.dense(dense), dense
    if name == "empty_rows":
        dense = rng.rand(1, 2, 40, 33) < 0.5
        dense[:, :, :BLOCK] = False          # a whole query block without any key
        dense[:, 1, 20] = False              # single empty rows inside partial blocks
        dense[:, 0, 35] = False
        return 1, 40, 33, 2, 2, M.dense(dense), dense
    raise KeyError(name)


# Pairwise coverage (mask kind x backend): every kind runs on at least one backend, the layout-sensitive ones
# (GQA head grouping differs between the backends; fully masked rows) on both. The TPU kernel also runs
# `empty_rows` with GQA and a bias gradient under the strict TPU interpreter below, the GPU kernel
# `random_dense_mqa` traced.
CASES = [("full", "gpu"), ("causal_odd_lengths", "tpu"), ("local_window_cross", "gpu"),
         ("local_window_cross", "tpu"), ("segments_gqa", "tpu"), ("segments_gqa", "gpu"),
         ("random_dense_mqa", "tpu"), ("empty_rows", "tpu"), ("empty_rows", "gpu")]


def _loss_weights(shape):
    # A fixed, non-uniform cotangent so every output element matters to the gradient.
    return jnp.cos(jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape))


def _value_and_grads(fn, q, k, v):
    w = _loss_weights(q.shape)

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

    out = jax.jit(fn)(q, k, v)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    return out, grads


@pytest.mark.parametrize("case,backend", CASES)
def test_outputs_and_gradients_match_dense_reference(case, backend):
    batch, q_len, kv_len, heads, kv_heads, mask, dense = _case(case)
    q, k, v = _qkv(1, batch, q_len, kv_len, heads, kv_heads)
    kernel = functools.partial(BACKENDS[backend], mask=mask, score_mod=None, block_q=BLOCK, block_k=BLOCK,
                               interpret=True)
    out, grads = _value_and_grads(kernel, q, k, v)
    ref_out, ref_grads = _value_and_grads(lambda q, k, v: dense_attention(q, k, v, dense), q, k, v)

    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert not np.isnan(np.asarray(g)).any(), name
        np.testing.assert_allclose(g, rg, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")

    # Query rows that may attend nowhere: exactly zero output and zero dq (no NaN, no mean of values).
    empty = ~np.broadcast_to(dense, (batch, heads, q_len, kv_len)).any(-1)     # [B, H, Sq]
    if empty.any():
        b, h, i = np.nonzero(empty)
        assert np.all(np.asarray(out)[b, i, h] == 0.0)
        assert np.all(np.asarray(grads[0])[b, i, h] == 0.0)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_bfloat16_within_tolerance(backend):
    batch, q_len, kv_len, heads, kv_heads, mask, dense = _case("empty_rows")
    q, k, v = _qkv(2, batch, q_len, kv_len, heads, kv_heads, dtype=jnp.bfloat16)
    kernel = functools.partial(BACKENDS[backend], mask=mask, score_mod=None, block_q=BLOCK, block_k=BLOCK,
                               interpret=True)
    out, grads = _value_and_grads(kernel, q, k, v)
    # Reference in float32 on the same (bf16-rounded) inputs.
    ref_out, ref_grads = _value_and_grads(lambda q, k, v: dense_attention(q, k, v, dense),
                                          *(x.astype(jnp.float32) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=3e-2, rtol=3e-2)
    for name, g, rg in zip("qkv", grads, ref_grads):
        g = np.asarray(g, np.float32)
        assert np.isfinite(g).all(), name
        scale = float(np.abs(rg).max())
        np.testing.assert_allclose(g, rg, atol=4e-2 * scale, err_msg=f"d{name}")
    empty = ~dense.any(-1)
    b, h, i = np.nonzero(empty)
    assert np.all(np.asarray(out, np.float32)[b, i, h] == 0.0)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_score_modifier_parameter_gradients(backend):
    """Gradients w.r.t. the parameters of chained score modifiers covering every leaf layout: a dense bias
    (blocked along q and kv), per-query temperatures (q only), a per-key bias (kv only), ALiBi slopes (per head)
    and a soft cap (scalar); causal mask with an odd length (padded keys)."""
    batch, q_len, kv_len, heads = 2, 30, 30, 2
    q, k, v = _qkv(3, batch, q_len, kv_len, heads, heads)
    keys = jax.random.split(jax.random.key(4), 3)
    bias = 0.5 * jax.random.normal(keys[0], (1, heads, q_len, kv_len))
    temps = 1.0 + 0.3 * jax.random.normal(keys[1], (batch, q_len))
    key_bias = 0.5 * jax.random.normal(keys[2], (kv_len,))
    slopes = jnp.array([0.3, 0.05], jnp.float32)
    cap = jnp.float32(2.5)
    dense = causal_dense(q_len, kv_len)[None, None]
    dist = jnp.abs(jnp.arange(q_len)[:, None] - jnp.arange(kv_len)[None, :]).astype(jnp.float32)

    def kernel(q, k, v, bias, temps, key_bias, slopes, cap):
        mod = (S.bias(bias) + S.score_function(lambda s, b, h, qi, ki, t: s * t, temps, axes=("bq",))
               + S.score_function(lambda s, b, h, qi, ki, kb: s + kb, key_bias, axes=("k",))
               + S.alibi(slopes) + S.soft_cap(cap))
        return BACKENDS[backend](q, k, v, M.causal(), mod, block_q=BLOCK, block_k=BLOCK, interpret=True)

    def reference(q, k, v, bias, temps, key_bias, slopes, cap):
        def score_fn(s):
            s = (s + bias) * temps[:, None, :, None] + key_bias
            s = s - slopes[None, :, None, None] * dist
            return cap * jnp.tanh(s / cap)
        return dense_attention(q, k, v, dense, score_fn=score_fn)

    w = _loss_weights(q.shape)
    args = (q, k, v, bias, temps, key_bias, slopes, cap)
    names = ["q", "k", "v", "bias", "temps", "key_bias", "slopes", "cap"]
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=tuple(range(len(args)))))(*args)
    np.testing.assert_allclose(jax.jit(kernel)(*args), reference(*args), atol=2e-5, rtol=1e-5)
    for name, g, rg in zip(names, grad(kernel), grad(reference)):
        assert np.shape(g) == np.shape(rg), name
        np.testing.assert_allclose(g, rg, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_traced_mask_uses_device_block_map(backend):
    """Mask data traced under jit (block map computed on device, full-width grid) gives the same result."""
    batch, q_len, kv_len, heads, kv_heads, _, dense = _case("random_dense_mqa")
    q, k, v = _qkv(5, batch, q_len, kv_len, heads, kv_heads)

    @jax.jit
    def run(q, k, v, dense):
        return BACKENDS[backend](q, k, v, M.dense(dense), None, block_q=BLOCK, block_k=BLOCK, interpret=True)

    np.testing.assert_allclose(run(q, k, v, jnp.asarray(dense)), dense_attention(q, k, v, dense), atol=2e-5)


@pytest.mark.slow
def test_tpu_kernel_under_strict_tpu_interpreter():
    """`pltpu.InterpretParams` simulates TPU memory spaces, DMAs and two cores sharing the "parallel" grid axes,
    fills uninitialised buffers with NaN and raises on out-of-bounds reads: output blocks the kernel maps but
    never writes (empty query blocks, unvisited bias-gradient blocks) would show up as NaN here."""
    from jax.experimental.pallas import tpu as pltpu
    batch, q_len, kv_len, heads, kv_heads, mask, dense = _case("empty_rows")
    kv_heads = 1                                                    # GQA: two query heads per kv head
    q, k, v = _qkv(6, batch, q_len, kv_len, heads, kv_heads)
    bias = jax.random.normal(jax.random.key(7), (1, heads, q_len, kv_len))
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)

    def kernel(q, k, v, bias):
        return pallas_tpu.flash_attention(q, k, v, mask, S.bias(bias), block_q=BLOCK, block_k=BLOCK,
                                          interpret=params)

    def reference(q, k, v, bias):
        return dense_attention(q, k, v, dense, score_fn=lambda s: s + bias)

    w = _loss_weights(q.shape)
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    np.testing.assert_allclose(jax.jit(kernel)(q, k, v, bias), reference(q, k, v, bias), atol=2e-5)
    for name, g, rg in zip(["q", "k", "v", "bias"], grad(kernel), grad(reference)):
        np.testing.assert_allclose(g, rg, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")
    try:   # the race detector's result lives in a private module
        from jax._src.pallas.mosaic.interpret.interpret_pallas_call import races
    except ImportError:
        return
    assert not races.races_found


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_bad_inputs_raise_value_error(backend):
    fn = BACKENDS[backend]
    q, k, v = _qkv(0, 1, 16, 16, 2, 2)
    with pytest.raises(ValueError, match="dtype"):
        fn(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16), None, None, block_q=16,
           block_k=16, interpret=True)
    with pytest.raises(ValueError, match="block_q"):
        fn(q, k, v, None, None, block_q=0, block_k=16, interpret=True)
    with pytest.raises(ValueError, match="heads"):
        fn(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), None, None, block_q=16, block_k=16,
           interpret=True)
    with pytest.raises(ValueError, match="mask"):
        fn(q, k, v, np.ones((16, 16), bool), None, block_q=16, block_k=16, interpret=True)


def test_hardware_block_rules_are_checked_before_compute():
    q, k, v = _qkv(0, 1, 256, 256, 2, 2)
    with pytest.raises(ValueError, match="block_k"):
        pallas_tpu.flash_attention(q, k, v, None, None, block_q=128, block_k=64)
    with pytest.raises(ValueError, match="block_q"):
        pallas_gpu.flash_attention(q, k, v, None, None, block_q=48, block_k=64)
    assert pallas_tpu.supports(q.shape, k.shape, q.dtype, M.causal(), None)
    assert pallas_gpu.supports(q.shape, k.shape, q.dtype, M.causal(), S.alibi(np.ones(2, np.float32)))
    gather_mod = S.relative_position_1d(np.zeros((2, 1), np.float32))   # R = 0: power-of-two table
    assert not pallas_tpu.supports(q.shape, k.shape, q.dtype, None, gather_mod)
    assert "gather" in pallas_gpu.unsupported_reason(q.shape, k.shape, q.dtype, None, gather_mod)
    assert pallas_tpu.supports(q.shape, k.shape, q.dtype, None, gather_mod, interpret=True)
