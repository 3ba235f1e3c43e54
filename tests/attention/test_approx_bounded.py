"""Bounded-logit module and the max-|logit| metric, against numpy brute force."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.attention.approx_bounded import BoundedLogitScale, bound_logits, logit_norm_bound, max_abs_logit


def brute_force_max_logit(q, k, scale):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
    return np.max(np.abs(np.einsum("bqhd,bkhd->bhqk", q, k))) * scale


@pytest.mark.parametrize("q_len,chunk", [(13, 4), (8, 1024)])
def test_max_abs_logit_matches_brute_force(q_len, chunk):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, q_len, 4, 8)).astype(np.float32) * 3
    k = rng.normal(size=(2, 11, 2, 8)).astype(np.float32)  # GQA: 2 kv heads for 4 query heads
    got = float(max_abs_logit(jnp.asarray(q), jnp.asarray(k), query_chunk=chunk))
    assert got == pytest.approx(brute_force_max_logit(q, k, 8 ** -0.5), rel=1e-5)
    assert float(max_abs_logit(jnp.asarray(q), jnp.asarray(k), 0.5)) == pytest.approx(
        brute_force_max_logit(q, k, 0.5), rel=1e-5)
    # The O(n d) Cauchy–Schwarz bound is an upper bound, equal to max|q|·max|k|·scale per (batch, head).
    bound = float(logit_norm_bound(jnp.asarray(q), jnp.asarray(k)))
    kr = np.repeat(k, 2, axis=2)
    want = np.max(np.linalg.norm(q, axis=-1).max(1) * np.linalg.norm(kr, axis=-1).max(1)) * 8 ** -0.5
    assert bound == pytest.approx(want, rel=1e-5) and bound >= got


def test_bound_logits_bounds_every_logit():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 9, 3, 5)) * 10, jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 7, 3, 5)) * 10, jnp.float32)
    temperature = jnp.array([0.5, 1.0, 2.5])
    qb, kb = bound_logits(q, k, temperature)
    logits = np.einsum("bqhd,bkhd->bhqk", np.asarray(qb), np.asarray(kb))
    cos = np.einsum("bqhd,bkhd->bhqk", q / np.linalg.norm(q, axis=-1, keepdims=True),
                    k / np.linalg.norm(k, axis=-1, keepdims=True))
    np.testing.assert_allclose(logits, cos * np.asarray(temperature)[None, :, None, None], rtol=1e-4, atol=1e-5)
    assert np.all(np.abs(logits).max(axis=(0, 2, 3)) <= np.asarray(temperature) + 1e-5)


def test_bounded_logit_scale_module():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, q, k):
            return BoundedLogitScale(bound=2.0, init_temperature=0.5)(q, k)

    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, 6, 2, 4)) * 5, jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 6, 2, 4)) * 5, jnp.float32)
    variables = Block().init(jax.random.key(0), q, k)
    p = variables["params"]["BoundedLogitScale_0"]["temperature_logit"]
    assert p.value.shape == (2,) and p.names == ("heads",)  # logically partitioned over heads
    np.testing.assert_allclose(2.0 / (1.0 + np.exp(-np.asarray(p.value))), 0.5, rtol=1e-5)
    qb, kb = Block().apply(variables, q, k)
    assert float(max_abs_logit(qb, kb, 1.0)) <= 0.5 + 1e-5

    # The temperature is learnable and stays inside (0, bound) whatever the parameter becomes.
    def loss(params):
        a, b = Block().apply({"params": params}, q, k)
        return jnp.sum(jnp.einsum("bqhd,bkhd->bhqk", a, b))

    grads = jax.grad(loss)(variables["params"])
    assert float(jnp.sum(jnp.abs(grads["BoundedLogitScale_0"]["temperature_logit"].value))) > 0
    huge = jax.tree.map(lambda x: x * 0 + 50.0, variables["params"])
    qb, kb = Block().apply({"params": huge}, q, k)
    assert float(max_abs_logit(qb, kb, 1.0)) <= 2.0 + 1e-5


def test_bounded_logit_arguments_validated():
    q = jnp.ones((1, 3, 2, 4))
    with pytest.raises(ValueError, match="init_temperature"):
        BoundedLogitScale(bound=1.0, init_temperature=1.0).init(jax.random.key(0), q, q)
    with pytest.raises(ValueError, match="bound"):
        BoundedLogitScale(bound=-1.0, init_temperature=0.5).init(jax.random.key(0), q, q)
    with pytest.raises(ValueError, match="temperature"):
        bound_logits(q, q, jnp.ones((3,)))
    with pytest.raises(ValueError, match="query_chunk"):
        max_abs_logit(q, q, query_chunk=0)
    with pytest.raises(ValueError, match="incompatible shapes"):
        max_abs_logit(q, jnp.ones((1, 3, 2, 5)))
    assert math.isfinite(float(logit_norm_bound(q, q)))


def test_bound_logits_has_finite_gradients_at_a_zero_query():
    # A ViT's cls token and its LayerNorm are zero at init, so its query is exactly zero.
    q = jnp.zeros((1, 3, 2, 4)).at[:, 1:].set(1.0)
    k = jnp.ones((1, 3, 2, 4))
    grads = jax.grad(lambda q, k: jnp.sum(bound_logits(q, k, 2.0)[0] * k), argnums=(0, 1))(q, k)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    q_unit, _ = bound_logits(q, k, 2.0)
    np.testing.assert_allclose(q_unit[:, 1:], 2.0 * np.ones((1, 2, 2, 4)) / 2.0, rtol=1e-5)  # |(1,1,1,1)| = 2
