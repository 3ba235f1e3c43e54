"""GPU attention through cuDNN flash attention (``jax.nn.dot_product_attention(implementation='cudnn')``).

This is what ``attention(backend='auto')`` runs on a GPU when cuDNN supports the case (maskjax's own Triton
kernels have not run on hardware yet). What maps, from the children of a top-level ``And`` (or the mask itself):

* ``full()`` / no mask;
* ``causal()`` (offset 0) and ``local_1d(left=L, right=0)`` or ``causal() & local_1d(left=L)`` (cuDNN's sliding
  window is left-only and causal), self-attention shapes (q_len == k_len) only, since cuDNN's causal alignment
  for q_len != k_len is not documented in JAX;
* ``lengths(q_lengths, kv_lengths)`` (static or traced) -> ``query_seq_lengths`` / ``key_value_seq_lengths``.

Anything else (segment ids, dense arrays, 2-D windows, bias, score_mod, ...) is refused with a reason and
``auto`` uses ``blocked``. cuDNN also needs float16 / bfloat16 q, k, v of one dtype and head_dim a multiple of 8,
at most 128 (256 on Hopper and later; 128 is assumed since the device is not known when choosing).

Rows with no allowed key (padded queries, kv_lengths == 0, a window past the last real key): cuDNN's value there
is not specified by JAX (its XLA path returns mean(V)). maskjax computes those rows exactly from the band and the
lengths (O(batch * q_len)), returns zeros there, and stops gradients through them; the keys past each example's
kv length get zero gradients as well (every row masks them), whatever the kernel writes.

Under a mesh of more than one device (the mesh in context, ``jax.sharding.get_abstract_mesh()``) the call and the
row zeroing run inside ``jax.shard_map`` (``sharded.py``): q, k, v and the lengths split over the batch on the mesh
axes 'data' / 'fsdp', over heads on 'model' when it divides heads and kv_heads. (JAX's cuDNN call has its own
custom partitioning over batch and heads; the shard_map makes the split explicit and the same as splash's, and
reshards operands that are split along the sequence, which that partitioning refuses.)
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from maskjax.attention import masks as M
from maskjax.attention import sharded

MAX_HEAD_DIM = 128


class CudnnPlan(NamedTuple):
    """The cuDNN call for a mask: causal flag, left window (None: none) and the Lengths node (or None)."""

    causal: bool
    left: Optional[int]
    lengths: Optional[M.Mask]


def plan(mask: Optional[M.Mask], q_len: int, k_len: int) -> CudnnPlan:
    """Map ``mask`` onto cuDNN's mask options; raises ValueError(reason) when it cannot."""
    if mask is None:
        return CudnnPlan(False, None, None)
    children = list(mask.children) if type(mask) is M.And else [mask]
    lens = [c for c in children if isinstance(c, M.Lengths)]
    band = [c for c in children if isinstance(c, (M.Full, M.Causal, M.Local1D))]
    other = [c for c in children if not isinstance(c, (M.Full, M.Causal, M.Local1D, M.Lengths))]
    if other:
        raise ValueError(f"{type(other[0]).__name__} mask (cuDNN takes causal, a left window and lengths only)")
    if len(lens) > 1:
        raise ValueError("more than one lengths(...) in the mask")
    left = right = None
    for n in band:
        if isinstance(n, M.Causal):
            right = n.offset if right is None else min(right, n.offset)
        elif isinstance(n, M.Local1D):
            if n.left is not None:
                left = n.left if left is None else min(left, n.left)
            if n.right is not None:
                right = n.right if right is None else min(right, n.right)
    if left is not None and left >= q_len - 1:
        left = None
    if right is not None and right >= k_len - 1:
        right = None
    if right is not None and right != 0:
        raise ValueError(f"a causal offset / right window of {right} (cuDNN: causal with offset 0 only)")
    if left is not None and right is None:
        raise ValueError("a left window without causal masking (cuDNN's sliding window is causal)")
    if right == 0 and q_len != k_len:
        raise ValueError(f"causal masking with q_len={q_len} != k_len={k_len}")
    return CudnnPlan(right == 0, left, lens[0] if lens else None)


def unsupported_reason(q_shape, k_shape, dtypes, mask: Optional[M.Mask], score_mod=None) -> str:
    """'' when cuDNN flash attention can run this case, else why not (``auto`` then uses ``blocked``)."""
    batch, q_len, heads, head_dim = q_shape
    k_len, kv_heads = k_shape[1], k_shape[2]
    dtypes = tuple(jnp.dtype(d) for d in dtypes)
    if score_mod is not None:
        return "bias / score_mod"
    if not all(d == dtypes[0] for d in dtypes) or dtypes[0] not in (jnp.float16, jnp.bfloat16):
        return f"dtypes {[str(d) for d in dtypes]} (cuDNN: float16 or bfloat16, all equal)"
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return f"head_dim={head_dim} (cuDNN: a multiple of 8, at most {MAX_HEAD_DIM})"
    if heads % kv_heads:
        return f"heads={heads} not a multiple of kv_heads={kv_heads}"
    if q_len == 0 or k_len == 0:
        return "a zero length"
    try:
        plan(mask, q_len, k_len)
        if mask is not None:
            mask.check(batch, heads, q_len, k_len)
    except ValueError as err:
        return str(err)
    return ""


def _lengths(p: CudnnPlan, batch: int):
    """(q lengths, kv lengths) int32 [batch] or None each."""
    if p.lengths is None:
        return None, None
    arrays = list(p.lengths.arrays)
    out = []
    for has in (p.lengths.has_q, p.lengths.has_kv):
        if has:
            a = jnp.asarray(arrays.pop(0), jnp.int32).reshape(-1)
            out.append(jnp.broadcast_to(a, (batch,)))
        else:
            out.append(None)
    return tuple(out)


def row_and_key_ok(p: CudnnPlan, batch: int, q_len: int, k_len: int):
    """(rows with at least one allowed key bool [batch, q_len], keys some row may see bool [batch, k_len])."""
    return _row_and_key_ok(p, *_lengths(p, batch), batch, q_len, k_len)


def _row_and_key_ok(p: CudnnPlan, q_lens, kv_lens, batch: int, q_len: int, k_len: int):
    i = jnp.arange(q_len, dtype=jnp.int32)[None, :]
    j = jnp.arange(k_len, dtype=jnp.int32)[None, :]
    n_kv = jnp.full((batch, 1), k_len, jnp.int32) if kv_lens is None else jnp.minimum(kv_lens[:, None], k_len)
    lo = jnp.zeros_like(i) if p.left is None else jnp.maximum(i - p.left, 0)
    hi = n_kv - 1 if not p.causal else jnp.minimum(n_kv - 1, i)
    rows = lo <= hi
    if q_lens is not None:
        rows = rows & (i < q_lens[:, None])
    keys = j < n_kv
    return jnp.broadcast_to(rows, (batch, q_len)), jnp.broadcast_to(keys, (batch, k_len))


def _grad_only_where(x: jax.Array, keep: jax.Array) -> jax.Array:
    """x unchanged; its gradient is zeroed on positions [batch, seq] where keep is False."""
    keep = keep[:, :, None, None]
    return jnp.where(keep, x, jax.lax.stop_gradient(x))


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[M.Mask] = None, *,
                    scale: Optional[float] = None, implementation: str = "cudnn") -> jax.Array:
    """Masked attention with cuDNN flash attention; differentiable.

    Under a mesh of more than one device (``jax.sharding.get_abstract_mesh()``, e.g. from ``jax.set_mesh``) the
    call runs inside ``jax.shard_map``: batch (and the lengths) split over the mesh's 'data' / 'fsdp' axes, heads
    over 'model' when it divides heads and kv_heads (``sharded.py`` has the rule).

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, k_len, kv_heads, head_dim]; float16 or bfloat16.
      mask: None or a mask that maps (see the module docstring).
      scale: logit scale, default head_dim ** -0.5.
      implementation: passed to ``jax.nn.dot_product_attention``; 'xla' runs the same call without cuDNN (tests).

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype; rows with no allowed key are zeros with zero gradients.
    Raises:
      ValueError: if cuDNN cannot run this case (the message says why), also when the batch does not divide
        over the mesh's batch axes.
    """
    batch, q_len, heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    reason = unsupported_reason(q.shape, k.shape, (q.dtype, k.dtype, v.dtype), mask)
    if implementation == "xla" and reason.startswith("dtypes") and q.dtype == k.dtype == v.dtype:
        reason = ""   # the XLA stand-in used by the CPU tests also takes float32
    split, why = sharded.mesh_split(None, batch, heads, kv_heads)
    if reason or why:
        raise ValueError(f"attention: backend='cudnn' cannot run this case: {reason or why}")
    p = plan(mask, q_len, k_len)
    q_lens, kv_lens = _lengths(p, batch)      # per example: split with the batch under a mesh
    body = functools.partial(_cudnn_local, p=p, scale=scale, implementation=implementation)
    if split is None:
        return body(q, k, v, q_lens, kv_lens)
    qkv, lens = split.qkv_spec(), split.batch_spec(1)
    in_specs = (qkv, qkv, qkv, None if q_lens is None else lens, None if kv_lens is None else lens)
    return split.shard_map(body, in_specs=in_specs, out_specs=qkv)(q, k, v, q_lens, kv_lens)


def _cudnn_local(q, k, v, q_lens, kv_lens, *, p: CudnnPlan, scale, implementation: str) -> jax.Array:
    """The cuDNN call on one device's block, with its rows without keys zeroed (lengths [b] or None)."""
    batch, q_len = q.shape[:2]
    rows, keys = _row_and_key_ok(p, q_lens, kv_lens, batch, q_len, k.shape[1])
    q = _grad_only_where(q, rows)
    k, v = _grad_only_where(k, keys), _grad_only_where(v, keys)
    out = jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=p.causal, query_seq_lengths=q_lens, key_value_seq_lengths=kv_lens,
        local_window_size=None if p.left is None else (p.left, 0), implementation=implementation)
    return jnp.where(rows[:, :, None, None], out, jnp.zeros((), out.dtype))


__all__ = ["MAX_HEAD_DIM", "CudnnPlan", "plan", "unsupported_reason", "row_and_key_ok", "cudnn_attention"]
