"""The single attention entry point used by every model."""

from typing import Optional

import chex
import jax

from maskjax.attention.reference import reference_attention


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    scale: Optional[float] = None,
) -> jax.Array:
    """Masked softmax attention.

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, k_len, kv_heads, head_dim].
      mask: boolean (True = attend), broadcastable to [batch, heads, q_len, k_len].
      bias: additive logits, broadcastable to [batch, heads, q_len, k_len].
      scale: logit scale, default 1/sqrt(head_dim).

    Returns:
      [batch, q_len, heads, head_dim].
    """
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"attention: incompatible shapes q={q.shape}, k={k.shape}; expected "
            "[batch, seq, heads, head_dim] with equal batch and head_dim and heads % kv_heads == 0")
    return reference_attention(q, k, v, mask, bias, scale=scale)
