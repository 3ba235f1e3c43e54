"""Shared pieces of the Pallas flash-attention kernels (TPU Mosaic in `pallas_tpu`, GPU Triton in `pallas_gpu`).

The kernels consume the mask language of `maskjax.attention.masks` / `score_mods` through its kernel protocol
(see those modules): every array leaf of a mask or score modifier is stored as `[Bl, Hl, *extra, Ql, Kl]` with a
`LeafLayout` saying whether the last two axes run over query / key positions. A kernel fetches, for grid cell
(batch b, head h, q block i, kv block j), the leaf block `[*extra, block_q or 1, block_k or 1]`, rebuilds the
object with `jax.tree.unflatten` and calls `mask.evaluate(b, h, q_idx, kv_idx)` /
`score_mod.apply(s, b, h, q_idx, kv_idx)` with absolute positions q_idx int32 [bq, 1], kv_idx int32 [1, bk].

Block skipping uses the mask's `BlockMap` (block_map.py): per query block the list of non-empty key blocks with
their kind (PARTIAL / FULL) and count, and per key block the list of non-empty query blocks (dK/dV pass).
Empty blocks are never loaded nor computed; FULL blocks skip the mask function.

Math (all in float32): s = score_mod(scale * q k^T) (the dense `bias` is the first modifier), masked entries
excluded, online softmax. Query rows with no allowed key (or only -inf scores) give zero output and zero
gradients: the running max starts at a finite MASK_VALUE, masked probabilities are zeroed explicitly, and such
rows store lse = EMPTY_ROW_LSE so that exp(s - lse) == 0 in the backward pass. NaN scores propagate (a NaN row
is not mistaken for an empty one). Zero lengths return zeros without launching a kernel.

Gradients: dq, dk, dv, and every floating-point leaf of the score modifier (through `jax.vjp` of
`score_mod.apply` inside the dq kernel). Leaf gradients are written per (batch, head, q block) and reduced in
XLA; key-blocked leaves (e.g. a dense bias) get their gradient blocks written only where a block was computed,
into a zero-initialised buffer aliased to the output.

Shapes follow `maskjax.attention`: q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from maskjax.attention.checks import check_floating_qkv

EMPTY, PARTIAL, FULL = 0, 1, 2
TN_DIMS = (((0,), (0,)), ((), ()))  # lax.dot_general dimension numbers of a.T @ b
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b


def select_index(index, size):
    """Index into a dimension that is either shared (size 1) or full."""
    return index if size > 1 else 0


def divide_index(a, n):
    # lax.div (truncating) on non-negative ids: jnp's floor division lowers through `sign`, which needs a TPU.
    return a if n == 1 else jax.lax.div(a, jnp.int32(n))


# Finite stand-ins for -inf/+inf: exp(MASK_VALUE - m) underflows to 0 without inf - inf = NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Log-sum-exp stored for rows with no allowed key, so exp(s - lse) == 0 in the backward pass.
EMPTY_ROW_LSE = 0.7 * float(np.finfo(np.float32).max)

# Primitives that do not lower inside Pallas TPU / Triton kernels (used by `supports`).
UNLOWERABLE_PRIMITIVES = frozenset({
    "gather", "scatter", "scatter-add", "scatter_add", "scatter-mul", "scatter_mul", "scatter-min",
    "scatter_min", "scatter-max", "scatter_max", "dynamic_slice", "dynamic_update_slice", "sort",
    "argsort", "cumsum", "cumprod", "cummax", "cummin", "top_k", "fft", "custom_linear_solve",
    "pure_callback", "io_callback", "debug_callback",
})


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """Static description of one kernel leaf [Bl, Hl, *extra, Ql, Kl] (after padding)."""

    n_extra: int
    q: bool            # Ql runs over query positions (blocked along q)
    kv: bool           # Kl runs over key positions (blocked along kv)
    was_bool: bool     # stored as int32 in the kernel, handed back as bool
    diff: bool         # floating-point score-modifier leaf: gets a gradient

    def block_shape(self, shape, block_q, block_k, *, full_q=False, full_kv=False):
        """Kernel block (batch/head squeezed): (None, None, *extra, bq|1, bk|1); full_* keeps that axis whole."""
        q = (shape[-2] if full_q else block_q) if self.q else 1
        kv = (shape[-1] if full_kv else block_k) if self.kv else 1
        return (None, None) + tuple(shape[2:2 + self.n_extra]) + (q, kv)

    def block_index(self, shape, b, h, i, j):
        return ((b if shape[0] > 1 else 0), (h if shape[1] > 1 else 0)) + (0,) * self.n_extra + (
            (i if self.q else 0), (j if self.kv else 0))


@dataclasses.dataclass(frozen=True)
class Static:
    """Hashable, trace-time configuration shared by the custom VJP and the kernels."""

    impl: Any                      # backend hooks: .forward / .backward
    mask_treedef: Any              # None: no mask object (only padding may mask)
    mask_specs: tuple
    score_treedef: Any             # None: no score modifier
    score_specs: tuple
    scale: float
    block_q: int
    block_k: int
    q_len: int                     # unpadded lengths
    kv_len: int
    interpret: Any
    count_blocks: bool
    options: tuple                 # backend options, e.g. (("num_warps", 4), ("num_stages", 2))

    def option(self, name, default=None):
        value = dict(self.options).get(name)
        return default if value is None else value

    @property
    def kv_padded(self) -> bool:
        return self.kv_len % self.block_k != 0

    @property
    def needs_mask(self) -> bool:
        """Whether PARTIAL blocks can exist at all."""
        return self.mask_treedef is not None or self.kv_padded

    @property
    def diff_leaves(self) -> tuple:
        return tuple(n for n, s in enumerate(self.score_specs) if s.diff)


class BlockLists(NamedTuple):
    """Scalar tables: per outer block the non-empty inner blocks (index, kind) and their count."""

    index: jax.Array   # int32 [Bm, Hm, n_outer, width]
    kind: jax.Array    # int32 [Bm, Hm, n_outer, width]
    count: jax.Array   # int32 [Bm, Hm, n_outer]


class Operands(NamedTuple):
    """Kernel operands besides q, k, v."""

    score_leaves: tuple    # differentiable (float) or not; padded, [Bl, Hl, *extra, Ql, Kl]
    mask_leaves: tuple     # never differentiated
    fwd_lists: BlockLists  # per q block: kv blocks
    bwd_lists: BlockLists  # per kv block: q blocks


# ---------------------------------------------------------------- in-kernel math (shared by both backends)

def positions(st: Static, q_block, kv_block):
    """Absolute positions: q_idx int32 [block_q, 1], kv_idx int32 [1, block_k]."""
    q_idx = q_block * st.block_q + jax.lax.broadcasted_iota(jnp.int32, (st.block_q, 1), 0)
    kv_idx = kv_block * st.block_k + jax.lax.broadcasted_iota(jnp.int32, (1, st.block_k), 1)
    return q_idx, kv_idx


def _as_block(value, spec: LeafSpec):
    return value != 0 if spec.was_bool else value


def allowed(st: Static, b, h, q_idx, kv_idx, mask_blocks):
    """Boolean [block_q, block_k] of a PARTIAL block: the mask function and the key padding."""
    shape = (st.block_q, st.block_k)
    ok = None
    if st.kv_padded:
        ok = jnp.broadcast_to(kv_idx < st.kv_len, shape)
    if st.mask_treedef is not None:
        blocks = [_as_block(v, s) for v, s in zip(mask_blocks, st.mask_specs)]
        m = jax.tree_util.tree_unflatten(st.mask_treedef, blocks).evaluate(b, h, q_idx, kv_idx)
        m = jnp.broadcast_to(m, shape)
        ok = m if ok is None else (ok & m)
    if ok is None:
        ok = jnp.ones(shape, jnp.bool_)
    return ok


def raw_scores(st: Static, q, k):
    """scale * q k^T in float32, [block_q, block_k]."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return s * st.scale


def modified_scores(st: Static, s, b, h, q_idx, kv_idx, score_blocks):
    if st.score_treedef is None:
        return s
    blocks = [_as_block(v, spec) for v, spec in zip(score_blocks, st.score_specs)]
    mod = jax.tree_util.tree_unflatten(st.score_treedef, blocks)
    return jnp.asarray(mod.apply(s, b, h, q_idx, kv_idx), jnp.float32)


def scores_vjp(st: Static, s, b, h, q_idx, kv_idx, score_blocks):
    """Modified scores and vjp(ds) -> (ds_raw, gradients of the differentiable score blocks)."""
    diff = st.diff_leaves
    if st.score_treedef is None:
        return s, lambda ds: (ds, ())
    if not diff:
        out, vjp_s = jax.vjp(lambda s_: modified_scores(st, s_, b, h, q_idx, kv_idx, score_blocks), s)
        return out, lambda ds: (vjp_s(ds)[0], ())

    def f(s_, diff_blocks):
        blocks = list(score_blocks)
        for n, blk in zip(diff, diff_blocks):
            blocks[n] = blk
        return modified_scores(st, s_, b, h, q_idx, kv_idx, blocks)

    diff_blocks = tuple(score_blocks[n].astype(jnp.float32) for n in diff)
    out, vjp = jax.vjp(f, s, diff_blocks)
    return out, vjp


def online_softmax_step(s, ok, m_prev, l_prev, acc_prev, v):
    """One flash-attention update. s [bq,bk] f32; ok bool [bq,bk] or None (FULL block); m,l [bq,1]; acc [bq,D]."""
    if ok is not None:
        s = jnp.where(ok, s, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    if ok is not None:
        # Rows with nothing allowed so far would otherwise get exp(0) = 1 weights.
        p = jnp.where(ok, p, 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return m_new, l_new, alpha * acc_prev + pv


def finalize(m, l, acc):
    """Output (zeros for rows with no allowed key or no finite logit) and log-sum-exp (EMPTY_ROW_LSE for
    those rows).

    Such rows have l == 0 exactly (every probability was zeroed or underflowed). The test is `l == 0`, not
    `l > 0`: a NaN score makes l NaN, which fails both, so a NaN row stays NaN instead of being zeroed.
    """
    empty = l == 0.0
    safe_l = jnp.where(empty, 1.0, l)
    out = jnp.where(empty, 0.0, acc / safe_l)
    lse = jnp.where(empty, EMPTY_ROW_LSE, m + jnp.log(safe_l))
    return out, lse


def backward_block(st, b, h, q_idx, kv_idx, q, k, v, do, lse, delta, score_blocks, mask_blocks, masked):
    """Backward math of one block. lse, delta: [bq, 1].

    Returns (p [bq,bk] f32, ds_raw [bq,bk] f32 = dL/d(scale*qk), gradients of the differentiable score blocks).
    """
    s_raw = raw_scores(st, q, k)
    s, vjp = scores_vjp(st, s_raw, b, h, q_idx, kv_idx, score_blocks)
    p = jnp.exp(s - lse)
    if masked:
        p = jnp.where(allowed(st, b, h, q_idx, kv_idx, mask_blocks), p, 0.0)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta)
    ds_raw, d_blocks = vjp(ds)
    return p, ds_raw, tuple(d_blocks)


def reduce_leaf_grad(g, leaf_shape, spec: LeafSpec, dtype):
    """Per-(batch, head, q block) gradient [B, H, nq, *extra, qd, Kl] -> leaf gradient [Bl, Hl, *extra, Ql, Kl]."""
    if spec.q:
        nq_axis = 2
        g = jnp.moveaxis(g, nq_axis, -3)      # [B, H, *extra, nq, bq, Kl]
        g = g.reshape(g.shape[:-3] + (g.shape[-3] * g.shape[-2], g.shape[-1]))
    else:
        g = jnp.sum(g, axis=2)
    axes = tuple(a for a in (0, 1) if leaf_shape[a] == 1)
    if axes:
        g = jnp.sum(g, axis=axes, keepdims=True)
    return g.astype(dtype)


# ---------------------------------------------------------------- wrapper: validation, padding, custom VJP

def _pad_axis(x, axis, size):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _check_qkv(q, k, v, block_q, block_k):
    chex.assert_rank([q, k, v], 4)
    batch, _, heads, head_dim = q.shape
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {k.shape}, got {v.shape}")
    if k.shape[0] != batch or k.shape[3] != head_dim or heads % k.shape[2]:
        raise ValueError(f"q/k: incompatible shapes q={q.shape}, k={k.shape}; expected [batch, seq, heads, head_dim] "
                         "with equal batch and head_dim and heads % kv_heads == 0")
    check_floating_qkv("flash_attention", q, k, v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"{name}: dtype must be float32 or bfloat16, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(blk, (int, np.integer)) or isinstance(blk, bool) or blk <= 0:
            raise ValueError(f"{name}: must be a positive int, got {blk!r}")


def _leaves_of(obj, q_pad, kv_pad, *, score):
    """Padded leaves (bool/int -> int32), their LeafSpecs and the treedef of a Mask / ScoreMod (or None)."""
    if obj is None:
        return (), (), None
    padded = obj.padded(q_pad, kv_pad)
    leaves, treedef = jax.tree_util.tree_flatten(padded)
    layouts = padded.leaf_layouts()
    out, specs = [], []
    for leaf, lay in zip(leaves, layouts):
        leaf = jnp.asarray(leaf)
        was_bool = leaf.dtype == jnp.bool_
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        if not floating:
            leaf = leaf.astype(jnp.int32)   # i1 / narrow ints tile poorly in TPU VMEM
        specs.append(LeafSpec(int(lay.n_extra), bool(lay.q), bool(lay.kv), bool(was_bool), bool(score and floating)))
        out.append(leaf)
    return tuple(out), tuple(specs), treedef


def _lists(index, kind, count):
    return BlockLists(jnp.asarray(index, jnp.int32), jnp.asarray(kind, jnp.int32), jnp.asarray(count, jnp.int32))


def prepare(q, k, v, mask, score_mod, *, block_q, block_k):
    """Validate and pad. Returns (q, k, v padded along seq, Operands, mask_specs, mask_treedef, score_specs,
    score_treedef)."""
    _check_qkv(q, k, v, block_q, block_k)
    batch, q_len, heads, _ = q.shape
    kv_len = k.shape[1]
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    q_pad, kv_pad = nq * block_q, nk * block_k

    if mask is not None:
        if not (hasattr(mask, "block_map") and hasattr(mask, "evaluate")):
            raise ValueError(f"mask: expected a maskjax.attention.masks.Mask or None, got {type(mask).__name__}")
        bm = mask.block_map(q_len, kv_len, block_q, block_k, batch=batch, heads=heads)
    else:
        from maskjax.attention.masks import full
        bm = full().block_map(q_len, kv_len, block_q, block_k, batch=batch, heads=heads)
    if score_mod is not None and not hasattr(score_mod, "apply"):
        raise ValueError(f"score_mod: expected a maskjax.attention.score_mods.ScoreMod or None, "
                         f"got {type(score_mod).__name__}")
    if score_mod is not None:
        score_mod.check(batch, heads, q_len, kv_len)
    fwd_lists = _lists(bm.kv_indices, bm.kv_kinds, bm.kv_counts)
    bwd_lists = _lists(bm.q_indices, bm.q_kinds, bm.q_counts)
    expected = (nq, nk)
    if tuple(np.shape(bm.kind))[2:] != expected:
        raise ValueError(f"mask: block map has {np.shape(bm.kind)[2:]} blocks, expected {expected}")

    mask_leaves, mask_specs, mask_treedef = _leaves_of(mask, q_pad, kv_pad, score=False)
    score_leaves, score_specs, score_treedef = _leaves_of(score_mod, q_pad, kv_pad, score=True)
    q = _pad_axis(q, 1, q_pad)
    k = _pad_axis(k, 1, kv_pad)
    v = _pad_axis(v, 1, kv_pad)
    ops = Operands(score_leaves, mask_leaves, fwd_lists, bwd_lists)
    return q, k, v, ops, (mask_specs, mask_treedef, score_specs, score_treedef)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash_core(st: Static, q, k, v, score_leaves, mask_leaves, fwd_lists, bwd_lists):
    ops = Operands(score_leaves, mask_leaves, fwd_lists, bwd_lists)
    out, _, _ = st.impl.forward(st, q, k, v, ops)
    return out


def _flash_core_fwd(st, q, k, v, score_leaves, mask_leaves, fwd_lists, bwd_lists):
    # symbolic_zeros: leaves arrive as CustomVJPPrimal(value, perturbed). Score leaves nobody differentiates
    # (e.g. a constant bias) get no gradient kernel outputs; the flags travel in the residuals' tree structure
    # (() = wanted, None = not) because residual leaves must be arrays.
    wanted = tuple(() if x.perturbed else None for x in score_leaves)
    q, k, v, score_leaves, mask_leaves, fwd_lists, bwd_lists = jax.tree_util.tree_map(
        lambda x: x.value, (q, k, v, score_leaves, mask_leaves, fwd_lists, bwd_lists))
    ops = Operands(score_leaves, mask_leaves, fwd_lists, bwd_lists)
    out, lse, _ = st.impl.forward(st, q, k, v, ops)
    return out, (q, k, v, ops, out, lse, wanted)


def _flash_core_bwd(st, res, d_out):
    q, k, v, ops, out, lse, wanted = res
    if isinstance(d_out, jax.custom_derivatives.SymbolicZero):
        return None, None, None, None, None, None, None
    specs = tuple(dataclasses.replace(spec, diff=spec.diff and wanted[n] is not None)
                  for n, spec in enumerate(st.score_specs))
    st = dataclasses.replace(st, score_specs=specs)
    dq, dk, dv, d_leaves, _ = st.impl.backward(st, q, k, v, ops, out, lse, d_out)
    d_score = [None] * len(ops.score_leaves)
    for n, g in zip(st.diff_leaves, d_leaves):
        d_score[n] = g
    return dq, dk, dv, tuple(d_score), None, None, None


flash_core.defvjp(_flash_core_fwd, _flash_core_bwd, symbolic_zeros=True)


def make_static(impl, q, k, meta, *, scale, block_q, block_k, interpret, count_blocks=False, options=()):
    mask_specs, mask_treedef, score_specs, score_treedef = meta
    if scale is None:
        scale = float(q.shape[-1]) ** -0.5
    return Static(impl=impl, mask_treedef=mask_treedef, mask_specs=mask_specs, score_treedef=score_treedef,
                  score_specs=score_specs, scale=float(scale), block_q=int(block_q), block_k=int(block_k),
                  q_len=q.shape[1], kv_len=k.shape[1], interpret=interpret, count_blocks=count_blocks,
                  options=tuple(options))


def run(impl, q, k, v, mask, score_mod, *, scale, block_q, block_k, interpret, options=()):
    """Shared public path: validate, pad, run the custom-VJP kernels, slice."""
    q_len = q.shape[1]
    _check_qkv(q, k, v, block_q, block_k)
    if q_len == 0 or k.shape[1] == 0:
        # A zero-size grid has nothing to compute: no key means every row is fully masked (zeros), no query
        # an empty result. Returned without launching the kernels.
        return jnp.zeros(q.shape, q.dtype)
    qp, kp, vp, ops, meta = prepare(q, k, v, mask, score_mod, block_q=block_q, block_k=block_k)
    st = make_static(impl, q, k, meta, scale=scale, block_q=block_q, block_k=block_k, interpret=interpret,
                     options=options)
    out = flash_core(st, qp, kp, vp, *ops)
    return out[:, :q_len]


def block_counts(impl, q, k, v, mask, score_mod=None, *, scale=None, block_q, block_k, interpret=True,
                 options=()) -> dict:
    """Blocks the kernels actually computed, summed over batch and heads:
    {'fwd', 'dq', 'dkv'}: blocks whose math ran; {'fwd_masked', 'dq_masked', 'dkv_masked'}: those of them that
    evaluated the mask function (PARTIAL blocks).

    Each kernel increments counters inside the branch that does a block's math, so empty blocks and grid steps
    past a row's block count are not counted. For tests (interpret mode).
    """
    qp, kp, vp, ops, meta = prepare(q, k, v, mask, score_mod, block_q=block_q, block_k=block_k)
    st = make_static(impl, q, k, meta, scale=scale, block_q=block_q, block_k=block_k, interpret=interpret,
                     count_blocks=True, options=options)
    forward = jax.jit(impl.forward, static_argnums=0)
    backward = jax.jit(impl.backward, static_argnums=0)
    out, lse, fwd_count = forward(st, qp, kp, vp, ops)
    *_, (dq_count, dkv_count) = backward(st, qp, kp, vp, ops, out, lse, jnp.ones_like(out))
    out = {}
    for name, c in (("fwd", fwd_count), ("dq", dq_count), ("dkv", dkv_count)):
        c = np.asarray(c).reshape(-1, 2)
        out[name], out[name + "_masked"] = int(c[:, 0].sum()), int(c[:, 1].sum())
    return out


def unlowerable_primitives(q_shape, k_shape, mask, score_mod, *, block_q, block_k) -> set:
    """Names of primitives in the in-kernel mask / score functions that Pallas kernels cannot lower."""
    batch, q_len, heads, _ = q_shape
    kv_len = k_shape[1]
    nq, nk = -(-q_len // block_q), -(-kv_len // block_k)
    found = set()

    def block_avals(obj):
        padded = obj.padded(nq * block_q, nk * block_k)
        leaves, treedef = jax.tree_util.tree_flatten(padded)
        avals = []
        for leaf, lay in zip(leaves, padded.leaf_layouts()):
            shape = tuple(np.shape(leaf))[2:2 + lay.n_extra] + (block_q if lay.q else 1, block_k if lay.kv else 1)
            dtype = jnp.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype
            avals.append(jax.ShapeDtypeStruct(shape, dtype))
        return treedef, avals

    def scan(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in UNLOWERABLE_PRIMITIVES:
                found.add(eqn.primitive.name)
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    if hasattr(sub, "eqns"):
                        scan(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        scan(sub.jaxpr)

    idx = (jax.ShapeDtypeStruct((), jnp.int32),) * 2 + (jax.ShapeDtypeStruct((block_q, 1), jnp.int32),
                                                         jax.ShapeDtypeStruct((1, block_k), jnp.int32))
    if mask is not None:
        treedef, avals = block_avals(mask)
        fn = lambda b, h, qi, ki, *blocks: jax.tree_util.tree_unflatten(treedef, blocks).evaluate(b, h, qi, ki)
        scan(jax.make_jaxpr(fn)(*idx, *avals).jaxpr)
    if score_mod is not None:
        treedef, avals = block_avals(score_mod)
        s = jax.ShapeDtypeStruct((block_q, block_k), jnp.float32)

        def g(s_, b, h, qi, ki, *blocks):
            return jax.tree_util.tree_unflatten(treedef, blocks).apply(s_, b, h, qi, ki)

        def g_vjp(s_, b, h, qi, ki, *blocks):
            return jax.vjp(lambda x: g(x, b, h, qi, ki, *blocks), s_)[1](jnp.ones((block_q, block_k)))

        scan(jax.make_jaxpr(g)(s, *idx, *avals).jaxpr)
        scan(jax.make_jaxpr(g_vjp)(s, *idx, *avals).jaxpr)
    return found
