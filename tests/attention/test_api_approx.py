"""attention(..., backend='approx'): the entry point maps masks onto the low-rank kernel and refuses the rest."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.attention import attention, causal, local_1d, reference_attention


def qkv(n=40, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    # unit-norm rows: |q·k| <= 1 with scale 1, the regime the degree-2 kernel is sized for
    q, k, v = (jax.random.normal(kk, (2, n, 4, 8)) for kk in keys)
    return q / jnp.linalg.norm(q, axis=-1, keepdims=True), k / jnp.linalg.norm(k, axis=-1, keepdims=True), v


def np_attention(q, k, v, allowed):
    s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, np.asarray(v, np.float64))


@pytest.mark.parametrize("kind", ["none", "causal", "key_padding"])
def test_approx_backend_is_close_to_exact_softmax_at_bounded_logits(kind):
    q, k, v = qkv()
    n = q.shape[1]
    allowed = np.ones((2, 1, n, n), bool)
    mask = None
    if kind == "causal":
        mask, allowed = causal(), np.tril(np.ones((n, n), bool))[None, None]
    elif kind == "key_padding":
        mask = np.ones((2, 1, 1, n), bool)
        mask[1, ..., 30:] = False
        allowed = np.broadcast_to(mask, (2, 1, n, n))
    got = attention(q, k, v, mask=mask, scale=1.0, backend="approx", approx_degree=4)
    want = np_attention(q, k, v, allowed)
    # degree-4 Taylor of exp on [-1, 1]: relative kernel error <= e * 1/5! ~ 2.3e-2 (far below in practice)
    np.testing.assert_allclose(got, want, atol=2e-3)
    exact = reference_attention(q, k, v, mask, scale=1.0)
    np.testing.assert_allclose(exact, want, atol=1e-5)


def test_approx_gradient_modes_follow_jax_grad_of_exact_attention():
    q, k, v = qkv(seed=1)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    want = jax.grad(loss(lambda q, k, v: reference_attention(q, k, v, scale=1.0)), argnums=(0, 1, 2))(q, k, v)
    for mode in ("lowrank", "exact_fwd", "paper"):
        got = jax.grad(loss(lambda q, k, v: attention(q, k, v, scale=1.0, backend="approx", approx_mode=mode,
                                                      approx_degree=4)), argnums=(0, 1, 2))(q, k, v)
        for g, w in zip(got, want):
            cos = float(jnp.vdot(g, w) / jnp.linalg.norm(g) / jnp.linalg.norm(w))
            assert cos > 0.999, (mode, cos)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask=local_1d(left=3)), "got Local1D"),
    (dict(bias=jnp.zeros((1, 1, 40, 40))), "bias is not supported"),
    (dict(approx_mode="sketch"), "approx_mode must be one of"),
    (dict(approx_degree=3), "degree must be an even int"),
    (dict(mask=np.ones((2, 1, 40, 40), bool)), "not a key-padding mask"),
])
def test_approx_backend_rejects_what_the_kernel_cannot_do(kwargs, message):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=re.escape(message)):
        attention(q, k, v, backend="approx", **kwargs)
