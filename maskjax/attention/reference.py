"""Dense XLA attention: the ground truth every other backend is tested against."""

from typing import Optional

import jax
import jax.numpy as jnp

from maskjax.attention.checks import check_floating_qkv
from maskjax.attention.masks import Dense, as_mask
from maskjax.attention.score_mods import ScoreMod, as_score_mod


def _apply_score_mod(mod: ScoreMod, logits: jax.Array) -> jax.Array:
    """Apply a score modifier to dense logits [B, H, Q, K] (per (b, h) on the full range)."""
    batch, heads, q_len, k_len = logits.shape
    q_idx = jnp.arange(q_len, dtype=jnp.int32)[:, None]
    kv_idx = jnp.arange(k_len, dtype=jnp.int32)[None, :]

    def one(b, h, s):
        return mod.select(b, h).apply(s, b, h, q_idx, kv_idx)

    f = jax.vmap(jax.vmap(one, in_axes=(None, 0, 0)), in_axes=(0, None, 0))
    return f(jnp.arange(batch, dtype=jnp.int32), jnp.arange(heads, dtype=jnp.int32), logits)


def attention_weights(
    q: jax.Array,
    k: jax.Array,
    mask=None,
    bias: Optional[jax.Array] = None,
    *,
    scale: Optional[float] = None,
    score_mod: Optional[ScoreMod] = None,
) -> jax.Array:
    """The softmax attention weights float32 [batch, heads, q_len, k_len] of :func:`reference_attention`
    (same arguments; k may have fewer heads, GQA). Rows with no allowed key or no finite logit are all
    zeros."""
    batch, q_len, heads, _ = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    if kv_heads != heads:
        k = jnp.repeat(k, heads // kv_heads, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    mod = as_score_mod(score_mod, None)
    if bias is not None:
        logits = logits + jnp.asarray(bias).astype(jnp.float32)
    if mod is not None:
        mod.check(batch, heads, q_len, k_len)
        logits = _apply_score_mod(mod, logits)
    mask = as_mask(mask)
    if mask is not None:
        if isinstance(mask, Dense):
            dense = mask.arrays[0]
        else:
            mask.check(batch, heads, q_len, k_len)
            dense = mask.materialize(q_len, k_len, batch=batch, heads=heads, as_jax=True)
        mask = jnp.broadcast_to(dense, logits.shape)
        logits = jnp.where(mask, logits, -jnp.inf)
    if k_len == 0:
        return jnp.zeros(logits.shape, jnp.float32)  # no key: every row is fully masked
    # Not jax.nn.softmax: a row whose logits are all -inf (mask, bias=-inf or a score_mod) must give zeros,
    # not NaN. Such rows subtract 0 instead of -inf so exp() gives exact zeros; a NaN logit still makes
    # the row NaN (the max keeps it and exp(NaN) = NaN), so bad inputs are not hidden.
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits - jax.lax.stop_gradient(row_max))
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(denom == 0, 1.0, denom)


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask=None,
    bias: Optional[jax.Array] = None,
    *,
    scale: Optional[float] = None,
    score_mod: Optional[ScoreMod] = None,
) -> jax.Array:
    """Softmax attention computed densely in float32.

    Args:
      q: [batch, q_len, heads, head_dim].
      k, v: [batch, k_len, kv_heads, head_dim]; heads must be a multiple of kv_heads (GQA/MQA).
      mask: None, a ``Mask`` (masks.py) or a bool array broadcastable to [batch, heads, q_len, k_len];
        True = may attend (integer: nonzero = attend; floating-point arrays are refused, use ``bias``).
      bias: additive logits, broadcastable to [batch, heads, q_len, k_len].
      scale: logit scale, default 1/sqrt(head_dim).
      score_mod: a ``ScoreMod`` applied to ``scale * q.k + bias`` before masking.

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype. A query row with no allowed key or no finite logit
      gives zeros (and zero gradients), never NaN; NaN inputs give NaN in the rows that use them.
      q_len == 0 gives an empty result, k_len == 0 zeros.
    """
    check_floating_qkv("reference_attention", q, k, v)
    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads != heads:
        v = jnp.repeat(v, heads // kv_heads, axis=2)
    weights = attention_weights(q, k, mask, bias, scale=scale, score_mod=score_mod)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(jnp.float32))
    return out.astype(q.dtype)
