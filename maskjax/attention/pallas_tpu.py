"""Flash attention for TPU in Pallas (Mosaic): forward and backward kernels with block skipping.

Block skipping: the mask's block map gives, per query block, the list of non-empty key blocks and their kind,
and per key block the list of non-empty query blocks (dK/dV pass). These int32 tables are scalar-prefetched into
SMEM (`pltpu.PrefetchScalarGridSpec`); the innermost grid axis walks a list and the BlockSpec index maps read it,
so only non-empty blocks are DMA'd. Grid steps past a row's count repeat the previous block index (no DMA) and
do no math. FULL blocks skip the mask function (`pl.when` on the kind).

Kernels (inside, layout [batch, heads, seq, head_dim]):
  forward  grid (B, H, nq, W_kv)        -> out, log-sum-exp
  dq       grid (B, H, nq, W_kv)        -> dq, gradients of the score modifier's float leaves
  dk, dv   grid (B, H_kv, nk, G * W_q)  -> dk, dv; the G query heads sharing a kv head are summed in-kernel

On CPU run with `interpret=True` (or `interpret=pltpu.InterpretParams()`). The lowering tests export these
kernels with `jax.export(..., platforms=['tpu'])`: that proves they lower to Mosaic custom calls, not that they
compile or run fast on a TPU.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from maskjax.attention import pallas_common as pc
from maskjax.attention.pallas_common import FULL, NN_DIMS, TN_DIMS, divide_index, select_index


def _mod(a, n):
    return 0 * a if n == 1 else jax.lax.rem(a, jnp.int32(n))


def _compiler_params(st, semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics,
                                vmem_limit_bytes=st.option("vmem_limit_bytes"))


class _Sizes:
    """Static sizes of one call (q [B, H, Sq_pad, D], k [B, H_kv, Sk_pad, D])."""

    def __init__(self, st, q, k, ops):
        self.batch, self.heads, self.q_pad, self.head_dim = q.shape
        self.kv_heads, self.kv_pad = k.shape[1], k.shape[2]
        self.group = self.heads // self.kv_heads
        self.nq, self.nk = self.q_pad // st.block_q, self.kv_pad // st.block_k
        self.list_b, self.list_h = ops.fwd_lists.count.shape[:2]
        self.w_kv = ops.fwd_lists.index.shape[-1]
        self.w_q = ops.bwd_lists.index.shape[-1]


def _leaf_in_specs(st, leaves, specs, locate):
    """BlockSpecs of kernel leaves; locate(*grid ids, *tables) -> (b, h, q block, kv block)."""
    out = []
    for leaf, spec in zip(leaves, specs):
        shape = leaf.shape

        def index_map(*args, _shape=shape, _spec=spec):
            return _spec.block_index(_shape, *locate(*args))

        out.append(pl.BlockSpec(spec.block_shape(shape, st.block_q, st.block_k), index_map))
    return out


def _split(refs, sizes):
    out, pos = [], 0
    for n in sizes:
        out.append(refs[pos:pos + n])
        pos += n
    assert pos == len(refs), (pos, len(refs))
    return out


def _values(refs):
    return [r[...] for r in refs]


def _count_spec(index_map):
    return pl.BlockSpec((None, None, None, 1, 2), index_map)


def _count_increment(masked):
    """[1, 2] int32: (one more computed block, whether it evaluated the mask)."""
    return jnp.where(jax.lax.broadcasted_iota(jnp.int32, (1, 2), 1) == 0, 1, int(masked))


# ---------------------------------------------------------------- forward

def _fwd_kernel(st: pc.Static, sz: _Sizes, *refs):
    n_score, n_mask = len(st.score_specs), len(st.mask_specs)
    (kv_list, kv_kind, kv_count), (q_ref, k_ref, v_ref), score_refs, mask_refs, outs, (m_scr, l_scr, acc_scr) = \
        _split(refs, [3, 3, n_score, n_mask, 2 + int(st.count_blocks), 3])
    o_ref, lse_ref = outs[:2]
    count_ref = outs[2] if st.count_blocks else None
    b, h, i, j = (pl.program_id(a) for a in range(4))
    lb, lh = select_index(b, sz.list_b), select_index(h, sz.list_h)
    count = kv_count[lb, lh, i]
    kv = kv_list[lb, lh, i, j]
    kind = kv_kind[lb, lh, i, j]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full_like(m_scr, pc.MASK_VALUE)
        l_scr[...] = jnp.zeros_like(l_scr)
        acc_scr[...] = jnp.zeros_like(acc_scr)
        if count_ref is not None:
            count_ref[...] = jnp.zeros_like(count_ref)

    def compute(masked):
        q_idx, kv_idx = pc.positions(st, i, kv)
        s = pc.raw_scores(st, q_ref[...], k_ref[...])
        s = pc.modified_scores(st, s, b, h, q_idx, kv_idx, _values(score_refs))
        ok = pc.allowed(st, b, h, q_idx, kv_idx, _values(mask_refs)) if masked else None
        m, l, acc = pc.online_softmax_step(s, ok, m_scr[...], l_scr[...], acc_scr[...], v_ref[...])
        m_scr[...], l_scr[...], acc_scr[...] = m, l, acc
        if count_ref is not None:
            count_ref[...] += _count_increment(masked)

    pl.when((j < count) & (kind == FULL))(lambda: compute(False))
    if st.needs_mask:
        pl.when((j < count) & (kind != FULL))(lambda: compute(True))

    @pl.when(j == sz.w_kv - 1)
    def _finalize():
        out, lse = pc.finalize(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _forward(st: pc.Static, q, k, v, ops: pc.Operands):
    """q [B, H, Sq_pad, D], k/v [B, H_kv, Sk_pad, D] -> out [B, H, Sq_pad, D], lse [B, H, Sq_pad, 1], counts."""
    sz = _Sizes(st, q, k, ops)
    bq, bk, d = st.block_q, st.block_k, sz.head_dim

    def kv_at(b, h, i, j, kv_list, kv_kind, kv_count):
        return kv_list[select_index(b, sz.list_b), select_index(h, sz.list_h), i, j]

    def locate(b, h, i, j, *tables):
        return b, h, i, kv_at(b, h, i, j, *tables)

    q_spec = pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda b, h, i, j, *t: (b, divide_index(h, sz.group), kv_at(b, h, i, j, *t), 0))
    in_specs = [q_spec, kv_spec, kv_spec]
    in_specs += _leaf_in_specs(st, ops.score_leaves, st.score_specs, locate)
    in_specs += _leaf_in_specs(st, ops.mask_leaves, st.mask_specs, locate)

    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((sz.batch, sz.heads, sz.q_pad, 1), jnp.float32)]
    out_specs = [q_spec, pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, *_: (b, h, i, 0))]
    if st.count_blocks:
        out_shape.append(jax.ShapeDtypeStruct((sz.batch, sz.heads, sz.nq, 1, 2), jnp.int32))
        out_specs.append(_count_spec(lambda b, h, i, j, *_: (b, h, i, 0, 0)))

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(sz.batch, sz.heads, sz.nq, sz.w_kv),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
    )
    outs = pl.pallas_call(
        lambda *refs: _fwd_kernel(st, sz, *refs),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=_compiler_params(st, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=st.interpret,
        name="maskjax_flash_fwd",
    )(*ops.fwd_lists, q, k, v, *ops.score_leaves, *ops.mask_leaves)
    return outs[0], outs[1], (outs[2] if st.count_blocks else None)


# ---------------------------------------------------------------- backward: dq and score-modifier gradients

def _kv_blocked_diff(st):
    return [n for n in st.diff_leaves if st.score_specs[n].kv]


def _dq_kernel(st: pc.Static, sz: _Sizes, *refs):
    n_score, n_mask = len(st.score_specs), len(st.mask_specs)
    diff = st.diff_leaves
    n_zero = len(_kv_blocked_diff(st))
    (kv_list, kv_kind, kv_count), (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), score_refs, mask_refs, \
        _zero_buffers, outs, (dq_scr,) = _split(
            refs, [3, 6, n_score, n_mask, n_zero, 1 + len(diff) + int(st.count_blocks), 1])
    dq_ref = outs[0]
    grad_refs = outs[1:1 + len(diff)]
    count_ref = outs[-1] if st.count_blocks else None
    b, h, i, j = (pl.program_id(a) for a in range(4))
    lb, lh = select_index(b, sz.list_b), select_index(h, sz.list_h)
    count = kv_count[lb, lh, i]
    kv = kv_list[lb, lh, i, j]
    kind = kv_kind[lb, lh, i, j]
    kv_blocked = [st.score_specs[n].kv for n in diff]

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros_like(dq_scr)
        if count_ref is not None:
            count_ref[...] = jnp.zeros_like(count_ref)
        for r, blocked in zip(grad_refs, kv_blocked):
            if not blocked:
                r[...] = jnp.zeros_like(r)

    if any(kv_blocked):
        # A row without blocks still maps (and writes back) one gradient block: make it zeros.
        @pl.when((j == 0) & (count == 0))
        def _zero_row():
            for r, blocked in zip(grad_refs, kv_blocked):
                if blocked:
                    r[...] = jnp.zeros_like(r)

    def compute(masked):
        q_idx, kv_idx = pc.positions(st, i, kv)
        k_blk = k_ref[...]
        _, ds, d_blocks = pc.backward_block(
            st, b, h, q_idx, kv_idx, q_ref[...], k_blk, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
            _values(score_refs), _values(mask_refs), masked)
        dq_scr[...] += jax.lax.dot_general(ds.astype(k_blk.dtype), k_blk, NN_DIMS, preferred_element_type=jnp.float32)
        for r, g, blocked in zip(grad_refs, d_blocks, kv_blocked):
            g = g.reshape(r.shape).astype(r.dtype)
            if blocked:
                r[...] = g
            else:
                r[...] += g
        if count_ref is not None:
            count_ref[...] += _count_increment(masked)

    pl.when((j < count) & (kind == FULL))(lambda: compute(False))
    if st.needs_mask:
        pl.when((j < count) & (kind != FULL))(lambda: compute(True))

    @pl.when(j == sz.w_kv - 1)
    def _finalize():
        dq_ref[...] = (dq_scr[...] * st.scale).astype(dq_ref.dtype)


def _dq(st, sz, q, k, v, ops, do, lse, delta):
    bq, bk, d = st.block_q, st.block_k, sz.head_dim

    def kv_at(b, h, i, j, kv_list, kv_kind, kv_count):
        return kv_list[select_index(b, sz.list_b), select_index(h, sz.list_h), i, j]

    def locate(b, h, i, j, *tables):
        return b, h, i, kv_at(b, h, i, j, *tables)

    q_spec = pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda b, h, i, j, *t: (b, divide_index(h, sz.group), kv_at(b, h, i, j, *t), 0))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, *_: (b, h, i, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    in_specs += _leaf_in_specs(st, ops.score_leaves, st.score_specs, locate)
    in_specs += _leaf_in_specs(st, ops.mask_leaves, st.mask_specs, locate)
    operands = [q, k, v, do, lse, delta, *ops.score_leaves, *ops.mask_leaves]

    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [q_spec]
    aliases = {}
    for n in st.diff_leaves:
        spec, leaf = st.score_specs[n], ops.score_leaves[n]
        extra = leaf.shape[2:2 + spec.n_extra]
        qd = bq if spec.q else 1
        shape = (sz.batch, sz.heads, sz.nq) + extra + (qd, sz.kv_pad if spec.kv else 1)
        block = (None, None, None) + extra + (qd, bk if spec.kv else 1)

        def index_map(b, h, i, j, *t, _spec=spec, _n_extra=len(extra)):
            return (b, h, i) + (0,) * _n_extra + (0, kv_at(b, h, i, j, *t) if _spec.kv else 0)

        if spec.kv:
            # Key blocks the kernel never visits keep the zeros of this aliased input.
            in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
            operands.append(jnp.zeros(shape, jnp.float32))
            aliases[3 + len(operands) - 1] = len(out_shape)
        out_shape.append(jax.ShapeDtypeStruct(shape, jnp.float32))
        out_specs.append(pl.BlockSpec(block, index_map))
    if st.count_blocks:
        out_shape.append(jax.ShapeDtypeStruct((sz.batch, sz.heads, sz.nq, 1, 2), jnp.int32))
        out_specs.append(_count_spec(lambda b, h, i, j, *_: (b, h, i, 0, 0)))

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(sz.batch, sz.heads, sz.nq, sz.w_kv),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
    )
    outs = pl.pallas_call(
        lambda *refs: _dq_kernel(st, sz, *refs),
        grid_spec=grid_spec,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(st, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=st.interpret,
        name="maskjax_flash_dq",
    )(*ops.fwd_lists, *operands)
    outs = list(outs)
    dq = outs[0]
    grads = outs[1:1 + len(st.diff_leaves)]
    counts = outs[-1] if st.count_blocks else None
    return dq, grads, counts


# ---------------------------------------------------------------- backward: dk, dv

def _dkv_kernel(st: pc.Static, sz: _Sizes, *refs):
    n_score, n_mask = len(st.score_specs), len(st.mask_specs)
    (q_list, q_kind, q_count), (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), score_refs, mask_refs, outs, \
        (dk_scr, dv_scr) = _split(refs, [3, 6, n_score, n_mask, 2 + int(st.count_blocks), 2])
    dk_ref, dv_ref = outs[:2]
    count_ref = outs[2] if st.count_blocks else None
    b, hk, n, t = (pl.program_id(a) for a in range(4))
    jj = _mod(t, sz.w_q)
    h = hk * sz.group + divide_index(t, sz.w_q)
    lb, lh = select_index(b, sz.list_b), select_index(h, sz.list_h)
    count = q_count[lb, lh, n]
    qi = q_list[lb, lh, n, jj]
    kind = q_kind[lb, lh, n, jj]

    @pl.when(t == 0)
    def _init():
        dk_scr[...] = jnp.zeros_like(dk_scr)
        dv_scr[...] = jnp.zeros_like(dv_scr)
        if count_ref is not None:
            count_ref[...] = jnp.zeros_like(count_ref)

    def compute(masked):
        q_idx, kv_idx = pc.positions(st, qi, n)
        q_blk, do_blk = q_ref[...], do_ref[...]
        p, ds, _ = pc.backward_block(
            st, b, h, q_idx, kv_idx, q_blk, k_ref[...], v_ref[...], do_blk, lse_ref[...], delta_ref[...],
            _values(score_refs), _values(mask_refs), masked)
        dv_scr[...] += jax.lax.dot_general(p.astype(do_blk.dtype), do_blk, TN_DIMS, preferred_element_type=jnp.float32)
        dk_scr[...] += jax.lax.dot_general(ds.astype(q_blk.dtype), q_blk, TN_DIMS, preferred_element_type=jnp.float32)
        if count_ref is not None:
            count_ref[...] += _count_increment(masked)

    pl.when((jj < count) & (kind == FULL))(lambda: compute(False))
    if st.needs_mask:
        pl.when((jj < count) & (kind != FULL))(lambda: compute(True))

    @pl.when(t == sz.group * sz.w_q - 1)
    def _finalize():
        dk_ref[...] = (dk_scr[...] * st.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dkv(st, sz, q, k, v, ops, do, lse, delta):
    bq, bk, d = st.block_q, st.block_k, sz.head_dim

    def head(hk, t):
        return hk * sz.group + divide_index(t, sz.w_q)

    def q_at(b, hk, n, t, q_list, q_kind, q_count):
        return q_list[select_index(b, sz.list_b), select_index(head(hk, t), sz.list_h), n, _mod(t, sz.w_q)]

    def locate(b, hk, n, t, *tables):
        return b, head(hk, t), q_at(b, hk, n, t, *tables), n

    q_spec = pl.BlockSpec((None, None, bq, d), lambda b, hk, n, t, *tb: (b, head(hk, t), q_at(b, hk, n, t, *tb), 0))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, hk, n, t, *tb: (b, head(hk, t), q_at(b, hk, n, t, *tb), 0))
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b, hk, n, t, *_: (b, hk, n, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    in_specs += _leaf_in_specs(st, ops.score_leaves, st.score_specs, locate)
    in_specs += _leaf_in_specs(st, ops.mask_leaves, st.mask_specs, locate)

    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    out_specs = [kv_spec, kv_spec]
    if st.count_blocks:
        out_shape.append(jax.ShapeDtypeStruct((sz.batch, sz.kv_heads, sz.nk, 1, 2), jnp.int32))
        out_specs.append(_count_spec(lambda b, hk, n, t, *_: (b, hk, n, 0, 0)))

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(sz.batch, sz.kv_heads, sz.nk, sz.group * sz.w_q),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
    )
    outs = pl.pallas_call(
        lambda *refs: _dkv_kernel(st, sz, *refs),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=_compiler_params(st, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=st.interpret,
        name="maskjax_flash_dkv",
    )(*ops.bwd_lists, q, k, v, do, lse, delta, *ops.score_leaves, *ops.mask_leaves)
    return outs[0], outs[1], (outs[2] if st.count_blocks else None)


def _to_bhsd(x):
    return jnp.swapaxes(x, 1, 2)


class _TPUImpl:
    """Backend hooks for `pallas_common.flash_core`: [batch, seq, heads, d] outside, [batch, heads, seq, d] inside."""

    @staticmethod
    def forward(st, q, k, v, ops):
        out, lse, counts = _forward(st, _to_bhsd(q), _to_bhsd(k), _to_bhsd(v), ops)
        return _to_bhsd(out), lse, counts

    @staticmethod
    def backward(st, q, k, v, ops, out, lse, d_out):
        q, k, v, out, d_out = (_to_bhsd(x) for x in (q, k, v, out, d_out))
        sz = _Sizes(st, q, k, ops)
        delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1, keepdims=True)
        d_out = d_out.astype(q.dtype)
        dq, grads, dq_counts = _dq(st, sz, q, k, v, ops, d_out, lse, delta)
        dk, dv, dkv_counts = _dkv(st, sz, q, k, v, ops, d_out, lse, delta)
        d_leaves = [pc.reduce_leaf_grad(g, ops.score_leaves[n].shape, st.score_specs[n], ops.score_leaves[n].dtype)
                    for n, g in zip(st.diff_leaves, grads)]
        return _to_bhsd(dq), _to_bhsd(dk), _to_bhsd(dv), d_leaves, (dq_counts, dkv_counts)


TPU_IMPL = _TPUImpl()


def _check_tpu_blocks(q_shape, k_shape, block_q, block_k, interpret):
    if interpret:
        return
    nq, nk = -(-q_shape[1] // block_q), -(-k_shape[1] // block_k)
    if block_q % 8 and nq > 1:
        raise ValueError(f"block_q: TPU blocks need block_q % 8 == 0 (or a single q block), got {block_q}")
    if block_k % 128 and nk > 1:
        raise ValueError(f"block_k: TPU blocks need block_k % 128 == 0 (or a single kv block), got {block_k}")


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask=None, score_mod=None, *,
                    scale: Optional[float] = None, block_q: int = 128, block_k: int = 128,
                    interpret: Any = False, vmem_limit_bytes: Optional[int] = None) -> jax.Array:
    """Masked flash attention on TPU (Pallas Mosaic); differentiable (custom VJP, Pallas backward kernels).

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim], heads % kv_heads == 0;
        float32 or bfloat16 (all three equal). Lengths are zero-padded to block multiples; padded keys are masked.
      mask: `maskjax.attention.masks.Mask` or None (no mask). Evaluated in-kernel on PARTIAL blocks only.
      score_mod: `maskjax.attention.score_mods.ScoreMod` or None (a dense bias is `score_mods.bias(...)`),
        applied to scale * q k^T before the mask; gradients flow to its floating-point leaves.
      scale: logit scale, default head_dim ** -0.5.
      block_q, block_k: block sizes. On a TPU: block_q % 8 == 0 and block_k % 128 == 0 (or a single block).
      interpret: True or `pltpu.InterpretParams()` to run on CPU.
      vmem_limit_bytes: optional Mosaic VMEM limit.

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype. Rows with no allowed key give zeros and zero gradients.
    """
    _check_tpu_blocks(q.shape, k.shape, block_q, block_k, interpret)
    return pc.run(TPU_IMPL, q, k, v, mask, score_mod, scale=scale, block_q=block_q, block_k=block_k,
                  interpret=interpret, options=(("vmem_limit_bytes", vmem_limit_bytes),))


def flash_attention_tpu(q: jax.Array, k: jax.Array, v: jax.Array, mask=None, *, bias: Optional[jax.Array] = None,
                        score_mod=None, scale: Optional[float] = None, block_q: int = 128, block_k: int = 128,
                        interpret: Any = False, vmem_limit_bytes: Optional[int] = None) -> jax.Array:
    """`flash_attention` with a dense additive `bias` (broadcastable to [batch, heads, q_len, kv_len], applied
    before `score_mod`, differentiable)."""
    from maskjax.attention import score_mods
    return flash_attention(q, k, v, mask, score_mods.as_score_mod(score_mod, bias), scale=scale,
                           block_q=block_q, block_k=block_k, interpret=interpret, vmem_limit_bytes=vmem_limit_bytes)


def supports(q_shape, k_shape, dtype, mask=None, score_mod=None, *, block_q: int = 128, block_k: int = 128,
             interpret: bool = False) -> bool:
    """Whether `flash_attention` can run this case (in interpret mode anything jnp-expressible runs; on a TPU
    the in-kernel mask / score functions must avoid gathers, dynamic slices, sorts and scans)."""
    return not unsupported_reason(q_shape, k_shape, dtype, mask, score_mod, block_q=block_q, block_k=block_k,
                                  interpret=interpret)


def unsupported_reason(q_shape, k_shape, dtype, mask=None, score_mod=None, *, block_q: int = 128,
                       block_k: int = 128, interpret: bool = False) -> str:
    """'' if supported, else what is not (for error messages)."""
    if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
        return f"dtype {jnp.dtype(dtype)} (float32 / bfloat16 only)"
    if len(q_shape) != 4 or len(k_shape) != 4 or q_shape[2] % k_shape[2]:
        return f"shapes q={tuple(q_shape)}, k={tuple(k_shape)}"
    if interpret:
        return ""
    try:
        _check_tpu_blocks(q_shape, k_shape, block_q, block_k, interpret)
    except ValueError as e:
        return str(e)
    bad = pc.unlowerable_primitives(q_shape, k_shape, mask, score_mod, block_q=block_q, block_k=block_k)
    if bad:
        return f"mask/score_mod use operations Mosaic cannot lower inside a kernel: {sorted(bad)}"
    return ""


def block_counts_tpu(q, k, v, mask=None, score_mod=None, *, scale=None, block_q=128, block_k=128,
                     interpret=True) -> dict:
    """Blocks computed by the TPU kernels {'fwd', 'dq', 'dkv'} (see `pallas_common.block_counts`)."""
    return pc.block_counts(TPU_IMPL, q, k, v, mask, score_mod, scale=scale, block_q=block_q, block_k=block_k,
                           interpret=interpret, options=(("vmem_limit_bytes", None),))
