"""TPU attention through JAX's splash attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`).

This is what ``attention(backend='auto')`` runs on a TPU: maskjax's own Pallas kernels have only run in interpret
mode, splash attention is JAX's production TPU kernel. The maskjax mask is translated into splash's two inputs:

* the *static* mask, per head (``MultiHeadMask``), built from the children of a top-level ``And`` (or the mask
  itself): ``full()``, ``causal(offset)`` and ``local_1d(left, right)`` fold into one band and become
  ``FullMask`` / ``CausalMask`` / ``LocalMask`` (evaluated inside the kernel); a lone static ``dense`` array
  becomes ``NumpyMask``; any other static mask that does not vary along the batch (window_2d, per_head, ``|``,
  ``~``, ...) becomes a splash mask evaluated block by block from maskjax's own block map (only partial blocks
  are materialised, as splash stores them anyway);
* the *segment ids* (``SegmentIds``: per example, static or traced): ``segment_ids(...)`` and ``lengths(...)``
  children of the top-level ``And``; padding (negative ids, positions past a length) gets ids that match
  nothing (queries -1, keys -2).

Everything else is refused with a reason (``unsupported_reason``) and ``auto`` falls back to ``blocked``: traced
masks other than segment ids / lengths, masks that vary along the batch, query masks, bias / score_mod, dtypes
other than float32 / bfloat16, lengths not divisible by the block sizes (multiples of 128).

Rows with no allowed key: splash leaves them undefined (mean of V, or 0/0). maskjax gives zeros and zero
gradients: every call passes an attention *sink* of logit ``EMPTY_ROW_SINK`` (-1e30) per head. A sink adds
``exp(sink - m)`` to a row's softmax denominator; for a row with any allowed key that term underflows to exactly
0 (its logits are far above -1e30), so the result is unchanged; for a row with no allowed key all of the weight
goes to the sink, which carries no value: the output is exactly 0, the log-sum-exp is the sink, and the backward
pass gets p = exp(mask_value - sink) = 0, so zero gradients. No extra pass over the mask is needed, and this
holds for data-dependent (traced) segment ids too. (Rows whose every logit is below -1e30 would also read as
empty; finite inputs without a bias cannot produce such logits.)

Other details: the logit scale is applied to q before the kernel (splash does not scale); a head_dim that is not
a multiple of 128 is zero-padded to one (exact: the zero columns add nothing to q.k and give zero output columns
that are sliced off), since splash is tested with head_dim 128 / 256; the batch is a ``jax.vmap`` of the
single-device kernel; GQA / MQA use splash's MHA path with fewer kv heads. Kernels (and their mask tables) are
cached per (mask, shapes, blocks, head shards). On CPU pass ``interpret=True``.

Under a mesh of more than one device (the mesh in context, ``jax.sharding.get_abstract_mesh()``) the kernel runs
inside ``jax.shard_map`` (``sharded.py``): q, k, v and the segment ids split over the batch on the mesh axes 'data'
/ 'fsdp', over heads on 'model' when it divides heads and kv_heads; the mask tables are built for that many head
shards and split with the heads (``kernel.manual_sharding_spec``), the sinks too. The sink handles empty rows per
shard exactly as on one device.
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from maskjax.attention import masks as M
from maskjax.attention import sharded
from maskjax.attention.block_map import EMPTY, FULL

# Logit of the per-head attention sink that makes rows with no allowed key give exactly zero (see module doc).
EMPTY_ROW_SINK = -1e30
# Segment ids given to padding: they match no key (queries) / no query (keys).
_PAD_Q_ID, _PAD_KV_ID = -1, -2
_LANES = 128
DEFAULT_BLOCK = 128   # splash's own default (BlockSizes.get_default())


class SplashPlan(NamedTuple):
    """How a maskjax mask maps onto splash: the static part and the segment-id part."""

    static: tuple           # hashable description of the static mask (see _static_description)
    static_mask: Optional[M.Mask]   # the maskjax static mask (None: full)
    segments: Optional[M.Mask]      # SegmentIds node or None
    lengths: Optional[M.Mask]       # Lengths node or None


def _contains(mask: M.Mask, cls) -> bool:
    if isinstance(mask, cls):
        return True
    return any(_contains(c, cls) for c in mask.children)


def _fold_band(nodes, q_len: int, k_len: int):
    """Fold full / causal / local_1d nodes (an AND) into one band ``i - left <= j <= i + right`` (None: open)."""
    left = right = None

    def tighter(a, b):
        return b if a is None else (a if b is None else min(a, b))

    for n in nodes:
        if isinstance(n, M.Causal):
            right = tighter(right, n.offset)
        elif isinstance(n, M.Local1D):
            left, right = tighter(left, n.left), tighter(right, n.right)
    # Bounds that exclude nothing on this shape are dropped (local_1d(left=10**9) is no constraint).
    if left is not None and left >= q_len - 1:
        left = None
    if right is not None and right >= k_len - 1:
        right = None
    return left, right


def plan(mask: Optional[M.Mask], q_len: int, k_len: int, batch: int, heads: int) -> SplashPlan:
    """Split ``mask`` into splash's static mask and segment ids; raises ValueError(reason) when it cannot."""
    if mask is None:
        return SplashPlan(("band", None, None), None, None, None)
    if _contains(mask, M.QueryMasks):
        raise ValueError("query_masks are not mapped onto splash masks")
    children = list(mask.children) if type(mask) is M.And else [mask]
    segments = [c for c in children if isinstance(c, M.SegmentIds)]
    lens = [c for c in children if isinstance(c, M.Lengths)]
    static = [c for c in children if not isinstance(c, (M.SegmentIds, M.Lengths))]
    if len(segments) > 1 or len(lens) > 1:
        raise ValueError("more than one segment_ids / lengths in the mask (splash takes one set of segment ids)")
    if segments and lens and not segments[0].negative_is_padding:
        raise ValueError("segment_ids(negative_is_padding=False) together with lengths (no id is free for padding)")
    for c in static:
        if not c.is_static():
            raise ValueError(f"traced {type(c).__name__} mask (splash masks are static; only segment ids and "
                             "lengths may be traced)")
        if c.depends_on()[0]:
            raise ValueError(f"{type(c).__name__} mask varies along the batch (splash masks are per head only; "
                             "per-example data must be segment ids or lengths)")
    band_nodes = [c for c in static if isinstance(c, (M.Full, M.Causal, M.Local1D))]
    others = [c for c in static if not isinstance(c, (M.Full, M.Causal, M.Local1D))]
    seg = segments[0] if segments else None
    ln = lens[0] if lens else None
    if not others:
        left, right = _fold_band(band_nodes, q_len, k_len)
        return SplashPlan(("band", left, right), None, seg, ln)
    static_mask = others[0] if len(static) == 1 else M.And(*static)
    kind = "numpy" if isinstance(static_mask, M.Dense) else "lazy"
    return SplashPlan((kind,), static_mask, seg, ln)


def unsupported_reason(q_shape, k_shape, dtypes, mask: Optional[M.Mask], score_mod=None, *,
                       block_q: Optional[int] = None, block_k: Optional[int] = None) -> str:
    """'' when splash attention can run this case, else why not (``auto`` then uses ``blocked``)."""
    batch, q_len, heads, head_dim = q_shape
    k_len, kv_heads = k_shape[1], k_shape[2]
    dtypes = tuple(jnp.dtype(d) for d in dtypes)
    if score_mod is not None:
        return "bias / score_mod (splash only supports a plain mask)"
    if not all(d == dtypes[0] for d in dtypes) or dtypes[0] not in (jnp.float32, jnp.bfloat16):
        return f"dtypes {[str(d) for d in dtypes]} (float32 or bfloat16, all equal)"
    if heads % kv_heads:
        return f"heads={heads} not a multiple of kv_heads={kv_heads}"
    bq, bk = block_q or DEFAULT_BLOCK, block_k or DEFAULT_BLOCK
    if bq % _LANES or bk % _LANES:
        return f"block sizes ({bq}, {bk}) must be multiples of {_LANES}"
    if q_len == 0 or k_len == 0 or q_len % bq or k_len % bk:
        return f"lengths q_len={q_len}, k_len={k_len} are not positive multiples of the blocks ({bq}, {bk})"
    try:
        plan(mask, q_len, k_len, batch, heads)
        if mask is not None:
            mask.check(batch, heads, q_len, k_len)
    except ValueError as err:
        return str(err)
    return ""


# ---------------------------------------------------------------- static masks in splash's language

class _BlockwiseMask(sm.Mask):
    """A static maskjax mask for one head, seen by splash as a lazily evaluated [q_len, k_len] mask.

    Blocks aligned with (block_q, block_k) are answered from maskjax's block map: EMPTY and FULL without any
    evaluation, PARTIAL ones by evaluating the mask function on that block (cached). Never n x n at once.
    """

    def __init__(self, mask: M.Mask, head: int, shape: tuple, heads: int, block_q: int, block_k: int):
        self.mask, self.head, self._shape = mask, head, tuple(shape)
        self.block_q, self.block_k, self.heads = block_q, block_k, heads
        self._kind = None
        self._blocks = {}

    @property
    def shape(self) -> tuple:
        return self._shape

    def _kinds(self):
        if self._kind is None:
            q_len, k_len = self._shape
            bm = self.mask.block_map(q_len, k_len, self.block_q, self.block_k, batch=1, heads=self.heads)
            self._kind = bm.kind[0, self.head if bm.kind.shape[1] > 1 else 0]
        return self._kind

    def _evaluate(self, q0: int, nq: int, k0: int, nk: int) -> np.ndarray:
        with jax.ensure_compile_time_eval():
            return np.asarray(_eval_rect(self.mask, jnp.int32(self.head), jnp.int32(q0), jnp.int32(k0), nq, nk))

    def __getitem__(self, idx) -> np.ndarray:
        if len(idx) != 2 or not all(isinstance(s, slice) and s.step in (None, 1) for s in idx):
            raise NotImplementedError(f"unsupported slice {idx}")
        (q0, q1, _), (k0, k1, _) = (s.indices(n) for s, n in zip(idx, self._shape))
        nq, nk = q1 - q0, k1 - k0
        if nq == self.block_q and nk == self.block_k and q0 % nq == 0 and k0 % nk == 0:
            i, j = q0 // nq, k0 // nk
            kind = self._kinds()[i, j]
            if kind == EMPTY:
                return np.zeros((nq, nk), np.bool_)
            if kind == FULL:
                return np.ones((nq, nk), np.bool_)
            if (i, j) not in self._blocks:
                self._blocks[(i, j)] = self._evaluate(q0, nq, k0, nk)
            return self._blocks[(i, j)]
        return self._evaluate(q0, nq, k0, nk)

    def _key(self):
        return (self.mask.cache_key(), self.head if self.mask.depends_on()[1] else None, self._shape,
                self.block_q, self.block_k)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BlockwiseMask) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


@functools.partial(jax.jit, static_argnums=(4, 5))
def _eval_rect(mask: M.Mask, head, q0, k0, nq: int, nk: int) -> jax.Array:
    """bool [nq, nk] of a static, batch-invariant mask for one head at rows q0.., keys k0.."""
    sel = mask.select(0, head).slice_blocks(q0, nq, k0, nk)
    q_idx = q0 + jnp.arange(nq, dtype=jnp.int32)[:, None]
    kv_idx = k0 + jnp.arange(nk, dtype=jnp.int32)[None, :]
    return sel.evaluate(jnp.int32(0), head, q_idx, kv_idx)


def _splash_masks(p: SplashPlan, heads: int, q_len: int, k_len: int, block_q: int, block_k: int) -> list:
    """One splash mask per head (the same object where heads share a mask, so splash deduplicates it)."""
    shape = (q_len, k_len)
    kind = p.static[0]
    if kind == "band":
        _, left, right = p.static
        if left is None and right is None:
            one = sm.FullMask(shape)
        elif left is None:
            one = sm.CausalMask(shape, offset=right)
        else:
            one = sm.LocalMask(shape, (left, right), offset=0)
        return [one] * heads
    m = p.static_mask
    if kind == "numpy":
        arr = np.asarray(m.arrays[0], np.bool_)[0]          # [Hl, Ql, Kl]
        arr = np.broadcast_to(arr, (arr.shape[0], q_len, k_len))
        per = [sm.NumpyMask(np.ascontiguousarray(a)) for a in arr]
        return per * heads if len(per) == 1 else per
    if m.depends_on()[1]:
        return [_BlockwiseMask(m, h, shape, heads, block_q, block_k) for h in range(heads)]
    return [_BlockwiseMask(m, 0, shape, heads, block_q, block_k)] * heads


_KERNELS: "collections.OrderedDict" = collections.OrderedDict()
_KERNELS_SIZE = 32


def _static_key(p: SplashPlan):
    return p.static if p.static_mask is None else (p.static, p.static_mask.cache_key())


def make_kernel(p: SplashPlan, heads: int, q_len: int, k_len: int, block_q: int, block_k: int,
                interpret: bool, head_shards: int = 1):
    """The (cached) splash MHA kernel for this static mask and shape; with ``head_shards`` > 1 its mask tables are
    laid out to be split over heads (``kernel.manual_sharding_spec``) inside a shard_map."""
    key = (_static_key(p), heads, q_len, k_len, block_q, block_k, bool(interpret), head_shards)
    hit = _KERNELS.get(key)
    if hit is not None:
        _KERNELS.move_to_end(key)
        return hit
    blocks = sk.BlockSizes(block_q=block_q, block_kv=block_k, block_kv_compute=block_k,
                           block_q_dkv=block_q, block_kv_dkv=block_k, block_kv_dkv_compute=block_k,
                           block_q_dq=block_q, block_kv_dq=block_k)
    multi = sm.MultiHeadMask(tuple(_splash_masks(p, heads, q_len, k_len, block_q, block_k)))
    with jax.ensure_compile_time_eval():
        kernel = sk.make_splash_mha(multi, block_sizes=blocks, interpret=bool(interpret), head_shards=head_shards,
                                    q_seq_shards=1)
    # Mask tables as numpy: a cached kernel must not carry the device or mesh it was first built under.
    kernel = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, kernel)
    _KERNELS[key] = kernel
    if len(_KERNELS) > _KERNELS_SIZE:
        _KERNELS.popitem(last=False)
    return kernel


def _segment_arrays(p: SplashPlan, batch: int, q_len: int, k_len: int):
    """(q ids int32 [batch, q_len], kv ids int32 [batch, k_len]) or None when the mask has no segment part."""
    if p.segments is None and p.lengths is None:
        return None
    q_ids = jnp.zeros((batch, q_len), jnp.int32)
    kv_ids = jnp.zeros((batch, k_len), jnp.int32)
    q_pad = jnp.zeros((batch, q_len), jnp.bool_)
    kv_pad = jnp.zeros((batch, k_len), jnp.bool_)
    if p.segments is not None:
        q_arr, k_arr = p.segments.arrays
        q_ids = jnp.broadcast_to(jnp.asarray(q_arr, jnp.int32).reshape(q_arr.shape[0], q_len), (batch, q_len))
        kv_ids = jnp.broadcast_to(jnp.asarray(k_arr, jnp.int32).reshape(k_arr.shape[0], k_len), (batch, k_len))
        if p.segments.negative_is_padding:
            q_pad, kv_pad = q_ids < 0, kv_ids < 0
    if p.lengths is not None:
        arrays = list(p.lengths.arrays)
        if p.lengths.has_q:
            n = jnp.asarray(arrays.pop(0), jnp.int32).reshape(-1, 1)
            q_pad = q_pad | (jnp.arange(q_len, dtype=jnp.int32)[None, :] >= n)
        if p.lengths.has_kv:
            n = jnp.asarray(arrays.pop(0), jnp.int32).reshape(-1, 1)
            kv_pad = kv_pad | (jnp.arange(k_len, dtype=jnp.int32)[None, :] >= n)
    return sk.SegmentIds(jnp.where(q_pad, _PAD_Q_ID, q_ids), jnp.where(kv_pad, _PAD_KV_ID, kv_ids))


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[M.Mask] = None, *,
                     scale: Optional[float] = None, block_q: Optional[int] = None, block_k: Optional[int] = None,
                     interpret: bool = False) -> jax.Array:
    """Masked attention with JAX's splash kernel; differentiable (splash's custom VJP).

    Under a mesh of more than one device (``jax.sharding.get_abstract_mesh()``, e.g. from ``jax.set_mesh``) the
    kernel runs inside ``jax.shard_map``: batch split over the mesh's 'data' / 'fsdp' axes, heads over 'model'
    when it divides heads and kv_heads (``sharded.py`` has the rule); XLA cannot partition the kernel itself.

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, k_len, kv_heads, head_dim]; float32 or bfloat16.
      mask: a ``maskjax.attention.masks.Mask`` or None (see the module docstring for what maps).
      scale: logit scale, default head_dim ** -0.5.
      block_q, block_k: splash block sizes (multiples of 128 dividing the lengths; default 128).
      interpret: run the kernels in Pallas interpret mode (CPU).

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype; rows with no allowed key are zeros with zero gradients.
    Raises:
      ValueError: if splash cannot run this case (the message says why), also when the batch does not divide
        over the mesh's batch axes.
    """
    batch, q_len, heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    reason = unsupported_reason(q.shape, k.shape, (q.dtype, k.dtype, v.dtype), mask, block_q=block_q,
                                block_k=block_k)
    split, why = sharded.mesh_split(None, batch, heads, kv_heads)
    if reason or why:
        raise ValueError(f"attention: backend='splash' cannot run this case: {reason or why}")
    bq, bk = block_q or DEFAULT_BLOCK, block_k or DEFAULT_BLOCK
    p = plan(mask, q_len, k_len, batch, heads)
    head_shards = 1 if split is None else split.head_shards
    kernel = make_kernel(p, heads, q_len, k_len, bq, bk, interpret, head_shards)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    sinks = jnp.full((heads,), EMPTY_ROW_SINK, jnp.float32)
    seg = _segment_arrays(p, batch, q_len, k_len)     # per example: split with the batch under a mesh
    args = (kernel, sinks, q, k, v) + (() if seg is None else (seg,))
    if split is None:
        return _splash_local(*args, scale=scale)
    # The mask tables split over heads like q (splash lays them out for head_shards); only the spec is used, on a
    # plain copy of the mesh (shard_shape does not take meshes with manual axes).
    plain = jax.sharding.AbstractMesh(split.mesh.axis_sizes, split.mesh.axis_names)
    kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(plain, P(split.heads_axis, None)))
    qkv = split.qkv_spec()
    in_specs = (kernel_spec, P(split.heads_axis), qkv, qkv, qkv)
    if seg is not None:
        in_specs += (sk.SegmentIds(split.batch_spec(2), split.batch_spec(2)),)
    body = functools.partial(_splash_local, scale=scale)
    return split.shard_map(body, in_specs=in_specs, out_specs=qkv)(*args)


def _splash_local(kernel, sinks, q, k, v, seg=None, *, scale: float) -> jax.Array:
    """splash on one device's block: q [b, q_len, h, d], k / v [b, k_len, kv_h, d], sinks [h], seg per example."""
    head_dim = q.shape[-1]
    q = (q.astype(jnp.float32) * scale).astype(v.dtype)
    pad = -head_dim % _LANES
    qt, kt, vt = (jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, 0), (0, pad))) for x in (q, k, v))
    if seg is None:
        out = jax.vmap(lambda a, b, c: kernel(a, b, c, sinks=sinks))(qt, kt, vt)
    else:
        out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=s, sinks=sinks))(qt, kt, vt, seg)
    return jnp.swapaxes(out[..., :head_dim], 1, 2)


def nonempty_block_counts(q_shape, k_shape, mask: Optional[M.Mask], *, block_q: int = DEFAULT_BLOCK,
                          block_k: int = DEFAULT_BLOCK) -> dict:
    """Blocks splash computes, summed over batch and heads: {'fwd', 'dq', 'dkv'} from the non-zero entries of its
    MaskInfo.block_mask (segment ids do not reduce them: splash skips blocks by its static mask only)."""
    batch, q_len, heads, _ = q_shape
    k_len = k_shape[1]
    p = plan(mask, q_len, k_len, batch, heads)
    kernel = make_kernel(p, heads, q_len, k_len, block_q, block_k, True)
    out = {}
    for name, info in (("fwd", kernel.fwd_mask_info), ("dq", kernel.dq_mask_info), ("dkv", kernel.dkv_mask_info)):
        bm = np.asarray(info.block_mask)
        per_head = (bm > 0).reshape(bm.shape[0], -1).sum(-1)
        total = int(per_head.sum()) * (heads if bm.shape[0] == 1 else 1)
        out[name] = total * batch
    return out


__all__ = ["EMPTY_ROW_SINK", "DEFAULT_BLOCK", "SplashPlan", "plan", "unsupported_reason", "make_kernel",
           "splash_attention", "nonempty_block_counts"]
