"""Dense XLA attention: the ground truth every other backend is tested against."""

from typing import Optional

import jax
import jax.numpy as jnp


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    scale: Optional[float] = None,
) -> jax.Array:
    """Softmax attention computed densely in float32.

    Args:
      q: [batch, q_len, heads, head_dim].
      k, v: [batch, k_len, kv_heads, head_dim]; heads must be a multiple of kv_heads (GQA/MQA).
      mask: boolean, broadcastable to [batch, heads, q_len, k_len]; True = may attend.
      bias: additive logits, broadcastable to [batch, heads, q_len, k_len].
      scale: logit scale, default 1/sqrt(head_dim).

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype. A query row with no allowed key gives zeros
      (and zero gradients), never NaN.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads != heads:
        k = jnp.repeat(k, heads // kv_heads, axis=2)
        v = jnp.repeat(v, heads // kv_heads, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        mask = jnp.broadcast_to(mask, logits.shape)
        logits = jnp.where(mask, logits, -jnp.inf)
        row_max = jnp.max(logits, axis=-1, keepdims=True)
        # Rows with no allowed key: subtract 0 instead of -inf so exp() gives exact zeros, not NaN.
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        weights = jnp.exp(logits - jax.lax.stop_gradient(row_max))
        denom = jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights / jnp.where(denom > 0, denom, 1.0)
    else:
        weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(jnp.float32))
    return out.astype(q.dtype)
