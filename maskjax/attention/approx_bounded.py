"""Bounded logits for approximate-gradient attention, and the metric that checks the bound.

The low-rank kernel of `maskjax.attention.approx` is accurate only while every logit t = scale·q·k stays in
[-B, B] with B small (1..3). `BoundedLogitScale` makes that hold by construction: q and k are L2-normalised over
head_dim and q is multiplied by a learnable per-head temperature tau = B·sigmoid(p) in (0, B), so
|t| = tau·|cos(q, k)| <= tau < B. Call attention with scale=1.0 on its outputs.

`max_abs_logit` reports the observed max |t| of one attention call (a per-layer training metric: when it
exceeds the B the approximation was sized for, the gradients are no longer trustworthy); `logit_norm_bound` is
the O(n d) Cauchy–Schwarz upper bound max|q|·max|k|·scale for sequences too long for the exact max.
"""

import math
from typing import Optional, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp


def _check_qk(q: jax.Array, k: jax.Array, where: str) -> None:
    chex.assert_rank([q, k], 4)
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"{where}: incompatible shapes q={q.shape}, k={k.shape}; expected "
                         "[batch, seq, heads, head_dim] with equal batch/head_dim and heads % kv_heads == 0")


def bound_logits(q: jax.Array, k: jax.Array, temperature: jax.Array, eps: float = 1e-3) -> Tuple[jax.Array, jax.Array]:
    """Normalise q and k over head_dim and scale q by `temperature`, so |q'·k'| <= temperature.

    Args:
      q: [batch, q_len, heads, head_dim]; k: [batch, k_len, kv_heads, head_dim].
      temperature: scalar or [heads] (per query head), > 0.
      eps: smoothing of the norm, x / sqrt(|x|^2 + eps^2): a zero vector stays zero with a finite gradient (a
        ViT's cls query is exactly zero at init), and |x'| < 1 keeps the bound.

    Returns:
      (q', k') of the same shapes; use them with scale=1.0.
    """
    _check_qk(q, k, "bound_logits")
    temperature = jnp.asarray(temperature, jnp.float32)
    if temperature.ndim not in (0, 1) or (temperature.ndim == 1 and temperature.shape[0] not in (1, q.shape[2])):
        raise ValueError(f"bound_logits: temperature must be a scalar or [heads={q.shape[2]}], "
                         f"got shape {temperature.shape}")
    qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
    q_unit = qf * jax.lax.rsqrt(jnp.sum(qf * qf, axis=-1, keepdims=True) + eps * eps)
    k_unit = kf * jax.lax.rsqrt(jnp.sum(kf * kf, axis=-1, keepdims=True) + eps * eps)
    temperature = temperature[:, None] if temperature.ndim == 1 else temperature
    return (q_unit * temperature).astype(q.dtype), k_unit.astype(k.dtype)


class BoundedLogitScale(nn.Module):
    """Learnable per-head temperature clamped smoothly into (0, bound): q, k -> (tau·q/|q|, k/|k|).

    Attributes:
      bound: B, the largest |logit| allowed (the approximation is sized for it; 1..3 is the useful range).
      init_temperature: starting tau, in (0, bound).
    Parameter 'temperature_logit' [heads] (logical axis 'heads'); tau = bound·sigmoid(temperature_logit).
    Returns (q', k'); attention must then use scale=1.0.
    """

    bound: float = 2.0
    init_temperature: float = 1.0

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array) -> Tuple[jax.Array, jax.Array]:
        if not self.bound > 0:
            raise ValueError(f"BoundedLogitScale: bound must be > 0, got {self.bound}")
        if not 0 < self.init_temperature < self.bound:
            raise ValueError(f"BoundedLogitScale: init_temperature must be in (0, bound={self.bound}), "
                             f"got {self.init_temperature}")
        _check_qk(q, k, "BoundedLogitScale")
        frac = self.init_temperature / self.bound
        init_logit = math.log(frac / (1.0 - frac))
        p = self.param("temperature_logit",
                       nn.with_logical_partitioning(nn.initializers.constant(init_logit), ("heads",)),
                       (q.shape[2],), jnp.float32)
        return bound_logits(q, k, self.bound * jax.nn.sigmoid(p))


def max_abs_logit(q: jax.Array, k: jax.Array, scale: Optional[float] = None, *, query_chunk: int = 1024) -> jax.Array:
    """Exact max over batch, heads and all (query, key) pairs of |scale·q·k| (no gradient).

    Args:
      q: [batch, q_len, heads, head_dim]; k: [batch, k_len, kv_heads, head_dim].
      scale: logit scale, default 1/sqrt(head_dim) (pass 1.0 after `bound_logits`).
      query_chunk: queries per step; memory O(batch·heads·query_chunk·k_len), time O(n² d).

    Returns:
      float32 scalar.
    """
    _check_qk(q, k, "max_abs_logit")
    if query_chunk < 1:
        raise ValueError(f"max_abs_logit: query_chunk must be >= 1, got {query_chunk}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k = jax.lax.stop_gradient(q).astype(jnp.float32), jax.lax.stop_gradient(k).astype(jnp.float32)
    if k.shape[2] != q.shape[2]:
        k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
    chunk = min(query_chunk, q.shape[1])
    steps = -(-q.shape[1] // chunk)
    q = jnp.pad(q, [(0, 0), (0, steps * chunk - q.shape[1]), (0, 0), (0, 0)])  # zero rows: logit 0, harmless
    q = jnp.moveaxis(q.reshape(q.shape[0], steps, chunk, q.shape[2], q.shape[3]), 1, 0)
    per_chunk = jax.lax.map(lambda qc: jnp.max(jnp.abs(jnp.einsum("bqhd,bkhd->bhqk", qc, k))), q)
    return jnp.max(per_chunk) * jnp.abs(scale)


def logit_norm_bound(q: jax.Array, k: jax.Array, scale: Optional[float] = None) -> jax.Array:
    """Cauchy–Schwarz upper bound on max |scale·q·k|: max over (batch, head) of max|q|·max|k|·|scale|, O(n d)."""
    _check_qk(q, k, "logit_norm_bound")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k = jax.lax.stop_gradient(q).astype(jnp.float32), jax.lax.stop_gradient(k).astype(jnp.float32)
    q_norm = jnp.max(jnp.linalg.norm(q, axis=-1), axis=1)  # [batch, heads]
    k_norm = jnp.max(jnp.linalg.norm(k, axis=-1), axis=1)  # [batch, kv_heads]
    k_norm = jnp.repeat(k_norm, q.shape[2] // k.shape[2], axis=1)
    return jnp.max(q_norm * k_norm) * jnp.abs(scale)
