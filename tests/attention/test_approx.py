"""Approximate-gradient attention: feature map, exactness against the dense approximate model, validation.

References live in `approx_refs.py` (dense numpy/XLA computations and jax.grad, never the code under test).
Error-vs-exact tests (analytic bounds, degrees, a 2-layer model, long sequences) are in test_approx_errors.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from maskjax.attention import approx, approx_features
from maskjax.attention.approx import approx_attention, approx_rank
from tests.attention.approx_refs import (MODES, approx_all_modes, assert_close, dense_kernel_attention, dense_softmax,
                                         explicit_features, regions, run_case, sphere_inputs, taylor)

# ----------------------------------------------------------------------------------------------- feature map


@pytest.mark.parametrize("d,g", [(3, 2), (4, 3), (3, 4), (2, 6)])
def test_features_reproduce_taylor_kernel(d, g):
    rng = np.random.default_rng(d * 10 + g)
    xy = rng.normal(size=(2, 6, d)) * 0.7
    fx, fy = jax.jit(approx_features.taylor_features, static_argnums=1)(jnp.asarray(xy, jnp.float32), g)
    assert fx.shape == (6, int(scipy.special.comb(d + g, g, exact=True)))
    np.testing.assert_allclose(np.asarray(fx @ fy.T), taylor(xy[0] @ xy[1].T, g), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(fx), np.asarray(jax.jit(explicit_features, static_argnums=1)(xy[0], g)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("one_shot", [True, False])
def test_feature_vjp_matches_autodiff_of_explicit_features(one_shot, monkeypatch):
    if not one_shot:  # force the per-coordinate loop used for large inputs
        monkeypatch.setattr(approx_features, "_ONE_SHOT_GATHER_LIMIT", 0)
    d, g = 3, 4
    x = jax.random.normal(jax.random.key(0), (3, 5, d))
    w = jax.random.normal(jax.random.key(1), (3, 5, math.comb(d + g, g)))
    got = jax.jit(jax.grad(lambda a: jnp.sum(approx_features.taylor_features(a, g) * w)))(x)
    want = jax.jit(jax.grad(lambda a: jnp.sum(explicit_features(a, g) * w)))(x)
    assert_close(got, want, 5e-5 * float(jnp.max(jnp.abs(want))), "feature VJP")


def test_feature_backward_has_no_scatter():
    x = jnp.ones((8, 6))
    hlo = jax.jit(jax.grad(lambda a: jnp.sum(approx_features.taylor_features(a, 2) ** 2))).lower(x).as_text()
    assert "scatter" not in hlo


def test_even_degrees_positive_odd_degrees_not():
    t = np.linspace(-12.0, 12.0, 4001)
    for g in (2, 4, 6):
        assert np.min(approx_features.taylor_exp(jnp.asarray(t), g)) > 0
    # e_3 has its real root near -1.596: logits of -2 (reachable at B = 2) give negative weights.
    value = float(approx_features.taylor_exp(jnp.asarray(-2.0), 3))
    assert value == pytest.approx(taylor(-2.0, 3)) and value < 0
    q = jnp.ones((1, 4, 1, 2))
    with pytest.raises(ValueError, match="degree must be an even int"):
        approx_attention(q, q, q, degree=3)


# ----------------------------------------------------------------------------------------------- exactness vs the approximate model

CASES = {
    "global": dict(),
    "causal_blocks": dict(causal=True, block_size=8),
    "causal_hybrid": dict(causal=True, window=11, block_size=8),
    "bidir_hybrid": dict(window=6, block_size=4),
    "padding_gqa": dict(kv_heads=1, padding=True),
    # Degree 4: lowrank / exact_fwd take the Kronecker backward at degree 3 instead of autodiff.
    "causal_hybrid_g4": dict(causal=True, window=11, block_size=8, degree=4),
    "global_g4_padding": dict(degree=4, padding=True),
    # Global path streamed over row chunks (block_size=8 < n; by default only beyond ~4096 rows).
    "global_streamed_padding_gqa": dict(block_size=8, padding=True, kv_heads=1),
    "global_streamed_g4": dict(block_size=8, degree=4),
}


@functools.lru_cache(maxsize=None)
def case_results(name):
    kw = dict(CASES[name])
    kv_heads, padding, degree = kw.pop("kv_heads", 2), kw.pop("padding", False), kw.pop("degree", 2)
    n = 29
    q, k, v, d_out = sphere_inputs(jax.random.key(0), 2, n, 2, 4, 2.0, kv_heads)
    key_valid = (jnp.arange(n)[None, :] < jnp.array([[n - 5], [n]])) if padding else None
    return run_case(kw, q, k, v, d_out, degree, key_valid)


@pytest.mark.parametrize("name", list(CASES))
def test_lowrank_equals_dense_taylor_model(name):
    ours, refs = case_results(name)
    for got, want, what in zip(ours["lowrank"], refs["taylor"], ("out", "dq", "dk", "dv")):
        assert_close(got, want, 5e-5, f"{name} {what}")


@pytest.mark.parametrize("name", list(CASES))
def test_paper_gradient_equals_dense_formula(name):
    ours, refs = case_results(name)
    for got, want, what in zip(ours["paper"], refs["paper"], ("out", "dq", "dk", "dv")):
        assert_close(got, want, 5e-5, f"{name} {what}")


@pytest.mark.parametrize("name", list(CASES))
def test_exact_fwd_has_exact_forward_and_lowrank_backward(name):
    ours, refs = case_results(name)
    assert_close(ours["exact_fwd"][0], refs["softmax"][0], 2e-5, f"{name} forward")
    for got, want, what in zip(ours["exact_fwd"][1:], refs["taylor"][1:], ("dq", "dk", "dv")):
        assert_close(got, want, 5e-5, f"{name} {what}")


@pytest.mark.parametrize("n, path", [(260, "blocked"), (40, "reference")])
def test_exact_fwd_uses_blocked_exact_forward_for_long_sequences(n, path, monkeypatch):
    """Above 256² scores the exact forward runs maskjax's blocked path, below it the dense reference: the calls
    are counted (at trace time, through the names approx.py uses), and the values checked against numpy."""
    calls = {"blocked": 0, "reference": 0}
    for name, attr in (("blocked", "blocked_attention"), ("reference", "reference_attention")):
        real = getattr(approx, attr)
        monkeypatch.setattr(approx, attr, lambda *a, _real=real, _name=name, **kw: calls.__setitem__(
            _name, calls[_name] + 1) or _real(*a, **kw))
    q, k, v, _ = sphere_inputs(jax.random.key(10), 2, n, 1, 4, 2.0)
    key_valid = jnp.arange(n)[None, :] < jnp.array([[n - 37], [n]])
    out = jax.jit(lambda a, b, c, m: approx_attention(a, b, c, m, scale=1.0, approx_mode="exact_fwd", causal=True))(
        q, k, v, key_valid[:, None, None, :])
    assert calls[path] >= 1 and calls[{"blocked": "reference", "reference": "blocked"}[path]] == 0, calls
    assert_close(out, dense_softmax(q, k, v, regions(n, True)[0], key_valid)[0], 2e-5, f"{path} exact forward")


def test_hybrid_does_not_depend_on_block_size():
    q, k, v, _ = sphere_inputs(jax.random.key(3), 1, 40, 1, 4, 2.0)
    outs = jax.jit(lambda a, b, c: [approx_attention(a, b, c, scale=1.0, causal=True, window=9, block_size=bs)
                                    for bs in (4, 7, 64)])(q, k, v)
    for o in outs[1:]:
        assert_close(o, outs[0], 1e-5, "hybrid vs block size")


def test_default_scale_and_dtype():
    q, k, v, _ = sphere_inputs(jax.random.key(4), 1, 16, 2, 8, 4.0)
    ref = dense_kernel_attention(q * 8 ** -0.25, k * 8 ** -0.25, v, 4, *regions(16))[0]
    out, out16 = jax.jit(lambda a, b, c: (approx_attention(a, b, c, degree=4), approx_attention(
        a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), c.astype(jnp.bfloat16), degree=4)))(q, k, v)
    assert_close(out, ref, 2e-5, "default scale 1/sqrt(d)")
    assert out16.dtype == jnp.bfloat16
    assert_close(out16.astype(jnp.float32), ref, 3e-2, "bfloat16 inputs")


@pytest.mark.parametrize("config", [(), (("block_size", 8),)], ids=["one_chunk", "streamed"])
def test_fully_masked_rows_give_zeros_and_zero_gradients(config):
    # Same shapes and configs as the "padding_gqa" / "global_streamed_padding_gqa" cases (shared programs).
    q, k, v, d_out = sphere_inputs(jax.random.key(9), 2, 29, 2, 4, 1.0, kv_heads=1)
    key_valid = jnp.array([[False], [True]]) & jnp.ones((1, 29), bool)  # batch 0 has no key at all
    ours = approx_all_modes(q, k, v, d_out, key_valid[:, None, None, :], g=2, config=config)
    for mode in MODES:
        for x in ours[mode]:
            assert bool(jnp.all(jnp.isfinite(x))) and float(jnp.max(jnp.abs(x[0]))) == 0.0, mode
        assert float(jnp.max(jnp.abs(ours[mode][0][1]))) > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(approx_mode="fast"), "approx_mode"),
    (dict(degree=0), "degree"),
    (dict(degree=2.0), "degree"),
    (dict(window=0), "window"),
    (dict(block_size=0), "block_size"),
    (dict(bias=jnp.zeros((1, 1, 4, 4))), "bias"),
    (dict(mask=jnp.ones((1, 1, 4, 4), bool)), "key-padding"),
    (dict(mask=jnp.ones((1, 1, 1, 4), jnp.float32)), "boolean"),
    (dict(scale=-1.0), "scale"),
])
def test_bad_arguments_raise(kwargs, match):
    q = jnp.ones((1, 4, 2, 3))
    with pytest.raises(ValueError, match=match):
        approx_attention(q, q, q, **kwargs)


def test_bad_shapes_raise():
    q = jnp.ones((1, 4, 2, 3))
    with pytest.raises(ValueError, match="incompatible shapes"):
        approx_attention(q, jnp.ones((1, 4, 2, 5)), jnp.ones((1, 4, 2, 5)))
    with pytest.raises(ValueError, match="q_len == k_len"):
        approx_attention(q, jnp.ones((1, 6, 2, 3)), jnp.ones((1, 6, 2, 3)), causal=True)


def test_rank():
    assert approx_rank(16, 2) == math.comb(18, 2) and approx_rank(16, 2, "paper") == math.comb(18, 2) * 17


@pytest.mark.parametrize("kw", [dict(approx_mode="paper", causal=True, block_size=8),
                                dict(approx_mode="lowrank", block_size=8)], ids=["paper_causal", "lowrank_streamed"])
def test_sharded_inputs_keep_their_sharding_without_collectives(kw):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    assert len(jax.devices()) >= 8, "tests/conftest.py provides 8 fake CPU devices"
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    spec = NamedSharding(mesh, PartitionSpec("data", None, "model", None))  # batch over data, heads over model
    q, k, v, d_out = sphere_inputs(jax.random.key(11), 4, 32, 8, 4, 1.0)
    fn = jax.jit(lambda a, b, c, g: jax.vjp(lambda x, y, z: approx_attention(x, y, z, **kw), a, b, c)[1](g))
    want = fn(q, k, v, d_out)
    sharded = [jax.device_put(x, spec) for x in (q, k, v, d_out)]
    got = fn(*sharded)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-5, "sharded vs single-device")
        assert a.sharding.spec == spec.spec
    hlo = fn.lower(*sharded).compile().as_text()
    assert not any(c in hlo for c in ("all-gather", "all-to-all", "all-reduce")), "heads/batch were regathered"
