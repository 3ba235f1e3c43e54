"""Input checks shared by the attention entry points (so every backend refuses the same inputs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_floating_qkv(fn: str, q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """Refuse non-floating q/k/v: softmax of integer (or complex) scores has no meaning, and the dense
    paths would otherwise hand back a silently truncated integer result."""
    dtypes = [jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype for x in (q, k, v)]
    if not all(jnp.issubdtype(d, jnp.floating) for d in dtypes):
        raise ValueError(f"{fn}: q, k, v must be real floating point (float32, bfloat16, float16), got "
                         f"q={dtypes[0]}, k={dtypes[1]}, v={dtypes[2]}; cast them, e.g. q.astype(jnp.float32)")


def has_zero_length(q: jax.Array, k: jax.Array) -> bool:
    """Whether there is nothing to compute: q_len == 0 (empty output) or k_len == 0 (every row masked)."""
    return q.shape[1] == 0 or k.shape[1] == 0


def zero_length_output(q: jax.Array) -> jax.Array:
    """The result for a zero length: [batch, q_len, heads, head_dim] zeros in q's dtype (rows with no key
    are fully masked rows, which give zeros and zero gradients in every backend)."""
    return jnp.zeros(q.shape, q.dtype)


__all__ = ["check_floating_qkv", "has_zero_length", "zero_length_output"]
