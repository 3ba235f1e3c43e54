"""Flash attention for GPUs in Pallas (Triton): forward and backward kernels with block skipping.

Triton Pallas has no scalar prefetch, so each program reads its row of the block lists (int32 tables, a block
of the table per program) and loops with `lax.fori_loop(0, count)` over the non-empty blocks only, loading
key/value (or query) blocks at the listed positions with `pl.ds`. Empty blocks are never loaded; FULL blocks
skip the mask function (`lax.cond` on the kind).

Kernels (layout [batch, seq, heads, head_dim], as in `maskjax.attention`):
  forward  grid (nq, B, H): loop over the q block's kv list  -> out, log-sum-exp
  dq       grid (nq, B, H): loop over the q block's kv list  -> dq, gradients of the score modifier's float leaves
  dk, dv   grid (nk, B, H): loop over the kv block's q list  -> per-query-head dk, dv (f32), summed over the
           heads sharing a kv head (GQA) in XLA afterwards

The backend is chosen by `jax.experimental.pallas.triton.CompilerParams(num_warps, num_stages)`. Triton needs
power-of-two block shapes: block_q, block_k, head_dim and every leaf block (its extra axes times bq/bk) must be
powers of two (>= 16 for the matrix dims). On CPU run with `interpret=True`. The lowering tests export these
kernels with `jax.export(..., platforms=['cuda'])`, which proves they lower to Triton custom calls, not that they
compile or run fast on a GPU.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from maskjax.attention import pallas_common as pc
from maskjax.attention.pallas_common import FULL, NN_DIMS, TN_DIMS, divide_index, select_index


def _compiler_params(st):
    head_dim = st.option("head_dim", 64)
    return pltriton.CompilerParams(num_warps=st.option("num_warps", 4 if head_dim <= 64 else 8),
                                   num_stages=st.option("num_stages", 2))


class _Sizes:
    def __init__(self, st, q, k, ops):
        self.batch, self.q_pad, self.heads, self.head_dim = q.shape
        self.kv_pad, self.kv_heads = k.shape[1], k.shape[2]
        self.group = self.heads // self.kv_heads
        self.nq, self.nk = self.q_pad // st.block_q, self.kv_pad // st.block_k
        self.list_b, self.list_h = ops.fwd_lists.count.shape[:2]
        self.w_kv = ops.fwd_lists.index.shape[-1]
        self.w_q = ops.bwd_lists.index.shape[-1]


def _split(refs, sizes):
    out, pos = [], 0
    for n in sizes:
        out.append(refs[pos:pos + n])
        pos += n
    assert pos == len(refs), (pos, len(refs))
    return out


def _table_specs(sz, lists, outer_of):
    """BlockSpecs of one program's row of the block lists; outer_of(*program ids) -> (b, h, outer block)."""

    def row(*ids):
        b, h, o = outer_of(*ids)
        return select_index(b, sz.list_b), select_index(h, sz.list_h), o, 0

    def scalar(*ids):
        b, h, o = outer_of(*ids)
        return select_index(b, sz.list_b), select_index(h, sz.list_h), o

    width = lists.index.shape[-1]
    return [pl.BlockSpec((None, None, None, width), row), pl.BlockSpec((None, None, None, width), row),
            pl.BlockSpec((None, None, None), scalar)]


def _leaf_specs(st, leaves, specs, locate, *, along):
    """Leaf BlockSpecs for a program that loops over kv blocks (along='kv': the kv axis is kept whole) or over
    q blocks (along='q'). locate(*program ids) -> (b, h, q block, kv block) of the fixed axis."""
    out = []
    for leaf, spec in zip(leaves, specs):
        block = spec.block_shape(leaf.shape, st.block_q, st.block_k, full_q=along == "q", full_kv=along == "kv")

        def index_map(*ids, _shape=leaf.shape, _spec=spec):
            b, h, i, j = locate(*ids)
            return _spec.block_index(_shape, b, h, i, j)

        out.append(pl.BlockSpec(block, index_map))
    return out


def _leaf_block(ref, spec, sl, *, along):
    """Load one leaf block from a ref that spans the looped axis."""
    if along == "kv":
        if not spec.kv:
            return ref[...]
        return ref[(slice(None),) * (spec.n_extra + 1) + (sl,)]
    if not spec.q:
        return ref[...]
    return ref[(slice(None),) * spec.n_extra + (sl, slice(None))]


def _count_increment(masked):
    """int32 [2]: (one more computed block, whether it evaluated the mask)."""
    return jnp.where(lax.broadcasted_iota(jnp.int32, (2,), 0) == 0, 1, int(masked))


def _count_spec(index_map):
    return pl.BlockSpec((None, None, None, 2), index_map)


def _check_gpu(q_shape, block_q, block_k, leaves=(), specs=()):
    def pow2(n):
        return n > 0 and (n & (n - 1)) == 0

    for name, n in (("block_q", block_q), ("block_k", block_k), ("head_dim", q_shape[-1])):
        if not pow2(n) or n < 16:
            raise ValueError(f"{name}: Triton needs a power of two >= 16, got {n}")
    for leaf, spec in zip(leaves, specs):
        size = 1
        for n in leaf.shape[2:2 + spec.n_extra]:
            size *= n
        if not pow2(size):
            raise ValueError(f"mask/score_mod leaf of shape {leaf.shape}: Triton needs power-of-two blocks; "
                             f"its extra axes have {size} elements")


# ---------------------------------------------------------------- forward

def _fwd_kernel(st: pc.Static, sz: _Sizes, *refs):
    n_score, n_mask = len(st.score_specs), len(st.mask_specs)
    (kv_list, kv_kind, kv_count), (q_ref, k_ref, v_ref), score_refs, mask_refs, outs = _split(
        refs, [3, 3, n_score, n_mask, 2 + int(st.count_blocks)])
    o_ref, lse_ref = outs[:2]
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q = q_ref[...]
    bq, d = st.block_q, sz.head_dim

    def body(j, carry):
        m, l, acc, c = carry
        kv = kv_list[j]
        sl = pl.ds(pl.multiple_of(kv * st.block_k, st.block_k), st.block_k)
        k, v = k_ref[sl, :], v_ref[sl, :]
        q_idx, kv_idx = pc.positions(st, i, kv)
        s = pc.raw_scores(st, q, k)
        s = pc.modified_scores(st, s, b, h, q_idx, kv_idx,
                               [_leaf_block(r, sp, sl, along="kv") for r, sp in zip(score_refs, st.score_specs)])

        def run(masked):
            ok = None
            if masked:
                blocks = [_leaf_block(r, sp, sl, along="kv") for r, sp in zip(mask_refs, st.mask_specs)]
                ok = pc.allowed(st, b, h, q_idx, kv_idx, blocks)
            return (*pc.online_softmax_step(s, ok, m, l, acc, v), c + _count_increment(masked))

        if not st.needs_mask:
            return run(False)
        return lax.cond(kv_kind[j] == FULL, lambda: run(False), lambda: run(True))

    init = (jnp.full((bq, 1), pc.MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, d), jnp.float32), jnp.zeros((2,), jnp.int32))
    m, l, acc, c = lax.fori_loop(0, kv_count[...], body, init)
    out, lse = pc.finalize(m, l, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]
    if st.count_blocks:
        outs[2][...] = c


def _forward(st: pc.Static, q, k, v, ops: pc.Operands):
    """q [B, Sq_pad, H, D], k/v [B, Sk_pad, H_kv, D] -> out [B, Sq_pad, H, D], lse [B, H, Sq_pad], counts."""
    sz = _Sizes(st, q, k, ops)
    bq, d = st.block_q, sz.head_dim
    in_specs = _table_specs(sz, ops.fwd_lists, lambda i, b, h: (b, h, i))
    in_specs += [pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((None, sz.kv_pad, None, d), lambda i, b, h: (b, 0, divide_index(h, sz.group), 0)),
                 pl.BlockSpec((None, sz.kv_pad, None, d), lambda i, b, h: (b, 0, divide_index(h, sz.group), 0))]
    locate = lambda i, b, h: (b, h, i, 0)
    in_specs += _leaf_specs(st, ops.score_leaves, st.score_specs, locate, along="kv")
    in_specs += _leaf_specs(st, ops.mask_leaves, st.mask_specs, locate, along="kv")
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((sz.batch, sz.heads, sz.q_pad), jnp.float32)]
    out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))]
    if st.count_blocks:
        out_shape.append(jax.ShapeDtypeStruct((sz.batch, sz.heads, sz.nq, 2), jnp.int32))
        out_specs.append(_count_spec(lambda i, b, h: (b, h, i, 0)))
    outs = pl.pallas_call(
        lambda *refs: _fwd_kernel(st, sz, *refs),
        grid=(sz.nq, sz.batch, sz.heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(st),
        interpret=st.interpret,
        name="maskjax_flash_fwd_triton",
    )(*ops.fwd_lists, q, k, v, *ops.score_leaves, *ops.mask_leaves)
    return outs[0], outs[1], (outs[2] if st.count_blocks else None)


# ---------------------------------------------------------------- backward: dq and score-modifier gradients

def _dq_kernel(st: pc.Static, sz: _Sizes, *refs):
    n_score, n_mask = len(st.score_specs), len(st.mask_specs)
    diff = st.diff_leaves
    kv_blocked = [st.score_specs[n].kv for n in diff]
    (kv_list, kv_kind, kv_count), (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), score_refs, mask_refs, \
        _zero_buffers, outs = _split(refs, [3, 6, n_score, n_mask, sum(kv_blocked),
                                            1 + len(diff) + int(st.count_blocks)])
    dq_ref = outs[0]
    grad_refs = outs[1:1 + len(diff)]
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

    def body(j, carry):
        dq, c, sums = carry
        kv = kv_list[j]
        sl = pl.ds(pl.multiple_of(kv * st.block_k, st.block_k), st.block_k)
        k, v = k_ref[sl, :], v_ref[sl, :]
        q_idx, kv_idx = pc.positions(st, i, kv)
        score_blocks = [_leaf_block(r, sp, sl, along="kv") for r, sp in zip(score_refs, st.score_specs)]

        def run(masked):
            mask_blocks = [_leaf_block(r, sp, sl, along="kv") for r, sp in zip(mask_refs, st.mask_specs)] \
                if masked else []
            _, ds, d_blocks = pc.backward_block(st, b, h, q_idx, kv_idx, q, k, v, do, lse, delta, score_blocks,
                                                mask_blocks, masked)
            return ds, tuple(g.astype(jnp.float32) for g in d_blocks), _count_increment(masked)

        if st.needs_mask:
            ds, d_blocks, inc = lax.cond(kv_kind[j] == FULL, lambda: run(False), lambda: run(True))
        else:
            ds, d_blocks, inc = run(False)
        dq = dq + lax.dot_general(ds.astype(k.dtype), k, NN_DIMS, preferred_element_type=jnp.float32)
        new_sums = []
        for r, g, blocked, total in zip(grad_refs, d_blocks, kv_blocked, sums):
            if blocked:
                r[(slice(None),) * (r.ndim - 1) + (sl,)] = g.reshape(r.shape[:-1] + (st.block_k,))
                new_sums.append(total)
            else:
                new_sums.append(total + g.reshape(total.shape))
        return dq, c + inc, tuple(new_sums)

    sums0 = tuple(jnp.zeros(() if blocked else r.shape, jnp.float32) for r, blocked in zip(grad_refs, kv_blocked))
    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros((2,), jnp.int32), sums0)
    dq, c, sums = lax.fori_loop(0, kv_count[...], body, init)
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)
    for r, blocked, total in zip(grad_refs, kv_blocked, sums):
        if not blocked:
            r[...] = total
    if st.count_blocks:
        outs[-1][...] = c


def _dq(st, sz, q, k, v, ops, do, lse, delta):
    bq, d = st.block_q, sz.head_dim
    in_specs = _table_specs(sz, ops.fwd_lists, lambda i, b, h: (b, h, i))
    q_spec = pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, sz.kv_pad, None, d), lambda i, b, h: (b, 0, divide_index(h, sz.group), 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    in_specs += [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    locate = lambda i, b, h: (b, h, i, 0)
    in_specs += _leaf_specs(st, ops.score_leaves, st.score_specs, locate, along="kv")
    in_specs += _leaf_specs(st, ops.mask_leaves, st.mask_specs, locate, along="kv")
    operands = [*ops.fwd_lists, q, k, v, do, lse, delta, *ops.score_leaves, *ops.mask_leaves]

    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [q_spec]
    aliases = {}
    for n in st.diff_leaves:
        spec, leaf = st.score_specs[n], ops.score_leaves[n]
        extra = leaf.shape[2:2 + spec.n_extra]
        qd, kd = (bq if spec.q else 1), (sz.kv_pad if spec.kv else 1)
        shape = (sz.batch, sz.heads, sz.nq) + extra + (qd, kd)
        block_spec = pl.BlockSpec((None, None, None) + extra + (qd, kd),
                                  lambda i, b, h, _n=len(extra): (b, h, i) + (0,) * (_n + 2))
        if spec.kv:
            # Key blocks the kernel never visits keep the zeros of this aliased input.
            in_specs.append(block_spec)
            operands.append(jnp.zeros(shape, jnp.float32))
            aliases[len(operands) - 1] = len(out_shape)
        out_shape.append(jax.ShapeDtypeStruct(shape, jnp.float32))
        out_specs.append(block_spec)
    if st.count_blocks:
        out_shape.append(jax.ShapeDtypeStruct((sz.batch, sz.heads, sz.nq, 2), jnp.int32))
        out_specs.append(_count_spec(lambda i, b, h: (b, h, i, 0)))
    outs = pl.pallas_call(
        lambda *refs: _dq_kernel(st, sz, *refs),
        grid=(sz.nq, sz.batch, sz.heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(st),
        interpret=st.interpret,
        name="maskjax_flash_dq_triton",
    )(*operands)
    outs = list(outs)
    return outs[0], outs[1:1 + len(st.diff_leaves)], (outs[-1] if st.count_blocks else None)


# ---------------------------------------------------------------- backward: dk, dv

def _dkv_kernel(st: pc.Static, sz: _Sizes, *refs):
    n_score, n_mask = len(st.score_specs), len(st.mask_specs)
    (q_list, q_kind, q_count), (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), score_refs, mask_refs, outs = \
        _split(refs, [3, 6, n_score, n_mask, 2 + int(st.count_blocks)])
    dk_ref, dv_ref = outs[:2]
    n, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]

    def body(j, carry):
        dk, dv, c = carry
        qi = q_list[j]
        sl = pl.ds(pl.multiple_of(qi * st.block_q, st.block_q), st.block_q)
        q, do = q_ref[sl, :], do_ref[sl, :]
        lse, delta = lse_ref[sl][:, None], delta_ref[sl][:, None]
        q_idx, kv_idx = pc.positions(st, qi, n)
        score_blocks = [_leaf_block(r, sp, sl, along="q") for r, sp in zip(score_refs, st.score_specs)]

        def run(masked):
            mask_blocks = [_leaf_block(r, sp, sl, along="q") for r, sp in zip(mask_refs, st.mask_specs)] \
                if masked else []
            p, ds, _ = pc.backward_block(st, b, h, q_idx, kv_idx, q, k, v, do, lse, delta, score_blocks,
                                         mask_blocks, masked)
            return p, ds, _count_increment(masked)

        if st.needs_mask:
            p, ds, inc = lax.cond(q_kind[j] == FULL, lambda: run(False), lambda: run(True))
        else:
            p, ds, inc = run(False)
        dv = dv + lax.dot_general(p.astype(do.dtype), do, TN_DIMS, preferred_element_type=jnp.float32)
        dk = dk + lax.dot_general(ds.astype(q.dtype), q, TN_DIMS, preferred_element_type=jnp.float32)
        return dk, dv, c + inc

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv, c = lax.fori_loop(0, q_count[...], body, (zeros, zeros, jnp.zeros((2,), jnp.int32)))
    dk_ref[...] = dk * st.scale
    dv_ref[...] = dv
    if st.count_blocks:
        outs[2][...] = c


def _dkv(st, sz, q, k, v, ops, do, lse, delta):
    bk, d = st.block_k, sz.head_dim
    in_specs = _table_specs(sz, ops.bwd_lists, lambda n, b, h: (b, h, n))
    q_spec = pl.BlockSpec((None, sz.q_pad, None, d), lambda n, b, h: (b, 0, h, 0))
    kv_spec = pl.BlockSpec((None, bk, None, d), lambda n, b, h: (b, n, divide_index(h, sz.group), 0))
    row_spec = pl.BlockSpec((None, None, sz.q_pad), lambda n, b, h: (b, h, 0))
    in_specs += [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    locate = lambda n, b, h: (b, h, 0, n)
    in_specs += _leaf_specs(st, ops.score_leaves, st.score_specs, locate, along="q")
    in_specs += _leaf_specs(st, ops.mask_leaves, st.mask_specs, locate, along="q")
    # Per query head; heads sharing a kv head are summed below.
    per_head = (sz.batch, sz.kv_pad, sz.heads, d)
    out_spec = pl.BlockSpec((None, bk, None, d), lambda n, b, h: (b, n, h, 0))
    out_shape = [jax.ShapeDtypeStruct(per_head, jnp.float32), jax.ShapeDtypeStruct(per_head, jnp.float32)]
    out_specs = [out_spec, out_spec]
    if st.count_blocks:
        out_shape.append(jax.ShapeDtypeStruct((sz.batch, sz.heads, sz.nk, 2), jnp.int32))
        out_specs.append(_count_spec(lambda n, b, h: (b, h, n, 0)))
    outs = pl.pallas_call(
        lambda *refs: _dkv_kernel(st, sz, *refs),
        grid=(sz.nk, sz.batch, sz.heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(st),
        interpret=st.interpret,
        name="maskjax_flash_dkv_triton",
    )(*ops.bwd_lists, q, k, v, do, lse, delta, *ops.score_leaves, *ops.mask_leaves)
    group_sum = lambda x: x.reshape(sz.batch, sz.kv_pad, sz.kv_heads, sz.group, d).sum(3).astype(k.dtype)
    return group_sum(outs[0]), group_sum(outs[1]), (outs[2] if st.count_blocks else None)


class _GPUImpl:
    """Backend hooks for `pallas_common.flash_core` (layout [batch, seq, heads, head_dim] throughout)."""

    @staticmethod
    def forward(st, q, k, v, ops):
        return _forward(st, q, k, v, ops)

    @staticmethod
    def backward(st, q, k, v, ops, out, lse, d_out):
        sz = _Sizes(st, q, k, ops)
        delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), d_out.astype(jnp.float32))
        d_out = d_out.astype(q.dtype)
        dq, grads, dq_counts = _dq(st, sz, q, k, v, ops, d_out, lse, delta)
        dk, dv, dkv_counts = _dkv(st, sz, q, k, v, ops, d_out, lse, delta)
        d_leaves = [pc.reduce_leaf_grad(g, ops.score_leaves[n].shape, st.score_specs[n], ops.score_leaves[n].dtype)
                    for n, g in zip(st.diff_leaves, grads)]
        return dq, dk, dv, d_leaves, (dq_counts, dkv_counts)


GPU_IMPL = _GPUImpl()


def _options(q, num_warps, num_stages):
    return (("num_warps", num_warps), ("num_stages", num_stages), ("head_dim", q.shape[-1]))


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask=None, score_mod=None, *,
                    scale: Optional[float] = None, block_q: int = 64, block_k: int = 64, interpret: Any = False,
                    num_warps: Optional[int] = None, num_stages: Optional[int] = None) -> jax.Array:
    """Masked flash attention on GPUs (Pallas Triton); differentiable (custom VJP, Pallas backward kernels).

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim], heads % kv_heads == 0;
        float32 or bfloat16 (all three equal). Lengths are zero-padded to block multiples; padded keys are masked.
      mask: `maskjax.attention.masks.Mask` or None. Evaluated in-kernel on PARTIAL blocks only.
      score_mod: `maskjax.attention.score_mods.ScoreMod` or None (a dense bias is `score_mods.bias(...)`);
        gradients flow to its floating-point leaves.
      scale: logit scale, default head_dim ** -0.5.
      block_q, block_k: powers of two >= 16 (head_dim too, when not interpreting).
      interpret: True to run on CPU.
      num_warps, num_stages: Triton compiler parameters (default 4 warps for head_dim <= 64 else 8; 2 stages).

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype. Rows with no allowed key give zeros and zero gradients.
    """
    if not interpret:
        _check_gpu(q.shape, block_q, block_k)
    return pc.run(GPU_IMPL, q, k, v, mask, score_mod, scale=scale, block_q=block_q, block_k=block_k,
                  interpret=interpret, options=_options(q, num_warps, num_stages))


def flash_attention_gpu(q: jax.Array, k: jax.Array, v: jax.Array, mask=None, *, bias: Optional[jax.Array] = None,
                        score_mod=None, scale: Optional[float] = None, block_q: int = 64, block_k: int = 64,
                        interpret: Any = False, num_warps: Optional[int] = None,
                        num_stages: Optional[int] = None) -> jax.Array:
    """`flash_attention` with a dense additive `bias` (broadcastable to [batch, heads, q_len, kv_len], applied
    before `score_mod`, differentiable)."""
    from maskjax.attention import score_mods
    return flash_attention(q, k, v, mask, score_mods.as_score_mod(score_mod, bias), scale=scale, block_q=block_q,
                           block_k=block_k, interpret=interpret, num_warps=num_warps, num_stages=num_stages)


def unsupported_reason(q_shape, k_shape, dtype, mask=None, score_mod=None, *, block_q: int = 64,
                       block_k: int = 64, interpret: bool = False) -> str:
    """'' if supported, else what is not (for error messages)."""
    if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
        return f"dtype {jnp.dtype(dtype)} (float32 / bfloat16 only)"
    if len(q_shape) != 4 or len(k_shape) != 4 or q_shape[2] % k_shape[2]:
        return f"shapes q={tuple(q_shape)}, k={tuple(k_shape)}"
    if interpret:
        return ""
    try:
        _check_gpu(q_shape, block_q, block_k)
        for obj in (mask, score_mod):
            if obj is not None:
                leaves = jax.tree_util.tree_leaves(obj)
                specs = [pc.LeafSpec(lay.n_extra, lay.q, lay.kv, False, False) for lay in obj.leaf_layouts()]
                _check_gpu(q_shape, block_q, block_k, leaves, specs)
    except ValueError as e:
        return str(e)
    bad = pc.unlowerable_primitives(q_shape, k_shape, mask, score_mod, block_q=block_q, block_k=block_k)
    if bad:
        return f"mask/score_mod use operations Triton cannot lower inside a kernel: {sorted(bad)}"
    return ""


def supports(q_shape, k_shape, dtype, mask=None, score_mod=None, *, block_q: int = 64, block_k: int = 64,
             interpret: bool = False) -> bool:
    """Whether `flash_attention` can run this case (see `unsupported_reason`)."""
    return not unsupported_reason(q_shape, k_shape, dtype, mask, score_mod, block_q=block_q, block_k=block_k,
                                  interpret=interpret)


def block_counts_gpu(q, k, v, mask=None, score_mod=None, *, scale=None, block_q=64, block_k=64,
                     interpret=True) -> dict:
    """Blocks computed by the GPU kernels {'fwd', 'dq', 'dkv'} (see `pallas_common.block_counts`)."""
    return pc.block_counts(GPU_IMPL, q, k, v, mask, score_mod, scale=scale, block_q=block_q, block_k=block_k,
                           interpret=interpret, options=_options(q, None, None))
