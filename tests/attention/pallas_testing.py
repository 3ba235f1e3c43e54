"""Independent references for the Pallas kernel tests: dense attention and numpy block counting.

Nothing here imports the code under test: masks are given as dense numpy booleans built directly from their
definitions, attention is a plain softmax over [batch, heads, q_len, kv_len] logits.
"""

import jax
import jax.numpy as jnp
import numpy as np


def dense_attention(q, k, v, allowed, *, scale=None, score_fn=None):
    """Softmax attention in float32 with a dense boolean mask.

    q [B, Sq, H, D], k/v [B, Sk, Hkv, D]; allowed bool broadcastable to [B, H, Sq, Sk];
    score_fn(s [B, H, Sq, Sk]) -> s, applied before the mask. Rows with no allowed key -> zeros.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    k = jnp.repeat(k, heads // kv_heads, axis=2).astype(jnp.float32)
    v = jnp.repeat(v, heads // kv_heads, axis=2).astype(jnp.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k) * scale
    if score_fn is not None:
        s = score_fn(s)
    allowed = jnp.broadcast_to(jnp.asarray(allowed), s.shape)
    s = jnp.where(allowed, s, -jnp.inf)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    p = jnp.where(allowed, jnp.exp(s - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    w = p / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


def block_census(allowed, q_len, kv_len, block_q, block_k, batch, heads):
    """(non-empty blocks, partial blocks) summed over [batch, heads], from a dense bool mask.

    A block is non-empty if any real (query < q_len, key < kv_len) pair in it is allowed; it is partial if it is
    non-empty and some real query sees a disallowed or padding key in it. Padding queries are ignored.
    """
    allowed = np.broadcast_to(np.asarray(allowed, bool), (batch, heads, q_len, kv_len))
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    nonempty = partial = 0
    for b in range(batch):
        for h in range(heads):
            for i in range(nq):
                for j in range(nk):
                    rows = slice(i * block_q, min((i + 1) * block_q, q_len))
                    blk = allowed[b, h, rows, j * block_k:(j + 1) * block_k]
                    has_padding_keys = (j + 1) * block_k > kv_len
                    if blk.any():
                        nonempty += 1
                        partial += int(has_padding_keys or not blk.all())
    return nonempty, partial


def causal_dense(q_len, kv_len):
    return np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None]


def local_dense(q_len, kv_len, left, right):
    d = np.arange(kv_len)[None, :] - np.arange(q_len)[:, None]
    return (d >= -left) & (d <= right)


def segments_dense(q_seg, kv_seg):
    """q_seg [B, Sq], kv_seg [B, Sk] (non-negative) -> [B, 1, Sq, Sk]."""
    return (np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :])[:, None]
