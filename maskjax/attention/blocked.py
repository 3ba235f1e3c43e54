"""Block-sparse attention in plain XLA: only the non-empty (query block, key block) tiles are computed.

The mask's block map is turned into a list of non-empty tiles (pairs), partial tiles first. Pairs are
processed in chunks: the query / key / value blocks of a chunk are gathered, scores computed with one
batched matmul, the score modifier applied, the mask function evaluated only for PARTIAL tiles, and an
online softmax accumulated per query block with segment reductions. The backward pass (custom VJP)
recomputes the scores tile by tile from the saved log-sum-exp, so memory stays O(chunk) and the cost
follows the number of non-empty tiles. Works for static masks (pair lists known at trace time) and
traced ones (lists on device; a while loop stops after the last non-empty tile).

Example::

    out = blocked_attention(q, k, v, mask=window_2d(TokenGrid(64, 64, tile=(8, 8)), radius=(8, 8)),
                            block_q=128, block_k=128)
"""

from __future__ import annotations

import functools
from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from maskjax.attention import block_map as bmap
from maskjax.attention.checks import check_floating_qkv, has_zero_length, zero_length_output
from maskjax.attention.masks import Full, as_mask
from maskjax.attention.score_mods import ScoreMod, as_score_mod

# Per (batch, head) and chunk: the score tile stack has at most this many elements. Small chunks (8-16
# tiles of 128x128 / 64x64) keep the working set in cache: measured fastest on CPU.
_CHUNK_ELEMS = 1 << 17
# Largest number of partial-tile mask elements evaluated at trace time for the deduplicated table.
_TABLE_ELEMS = 1 << 26


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _static_phases(bm: bmap.BlockMap, chunk: int):
    """Pair lists for a static block map: (partial phase, full phase), each (q, k, kind, chunk, window):
    int arrays [Bm, Hm, n_chunks * chunk] padded with EMPTY pairs, the chunk size, and the largest span
    of query blocks inside one chunk (the accumulator window a chunk updates); None if empty."""
    kind = np.asarray(bm.kind)
    n_b, n_h, nq, nk = kind.shape
    flat = kind.reshape(n_b, n_h, nq * nk)
    phases = []
    for want in (bmap.PARTIAL, bmap.FULL):
        sel = flat == want
        counts = sel.sum(-1)
        width = int(counts.max())
        if width == 0:
            phases.append(None)
            continue
        c = min(chunk, width)
        n_chunks = _ceil_div(width, c)
        total = n_chunks * c
        order = np.argsort(~sel, axis=-1, kind="stable")[..., :total] if total <= nq * nk else None
        if order is None:
            order = np.argsort(~sel, axis=-1, kind="stable")
            order = np.concatenate([order, np.repeat(order[..., -1:], total - order.shape[-1], -1)], -1)
        j = np.arange(total)
        valid = j < counts[..., None]
        last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], -1)
        idx = np.where(valid, order, last)
        pq = (idx // nk).astype(np.int32)
        pk = (idx % nk).astype(np.int32)
        pkind = np.where(valid, want, bmap.EMPTY).astype(np.int8)
        per_chunk = pq.reshape(n_b, n_h, n_chunks, c)
        window = int((per_chunk[..., -1] - per_chunk[..., 0]).max()) + 1
        phases.append((pq, pk, pkind, c, window))
    return phases


def _partial_tile_table(mask_p, pq, pk, bq: int, bk: int, k_len: int, max_elems: int):
    """Evaluate a static mask on its partial tiles once (trace time) and deduplicate them.

    pq, pk: int [Bm, Hm, T] partial pairs. Returns (table bool [U, bq, bk], index int32 [Bm, Hm, T]) or
    None when the tiles would exceed max_elems elements."""
    n_b, n_h, t = pq.shape
    if n_b * n_h * t * bq * bk > max_elems:
        return None

    def tiles(mask_p, pq, pk):
        def one(b, h, pq_bh, pk_bh):
            sel = mask_p.select(b, h)

            def tile(i, j):
                q_idx = i * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]
                kv_idx = j * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]
                m = sel.slice_blocks(i * bq, bq, j * bk, bk).evaluate(b, h, q_idx, kv_idx)
                return m & (kv_idx < k_len)

            return jax.lax.map(lambda ij: tile(*ij), (pq_bh, pk_bh), batch_size=256)

        bs, hs = jnp.arange(n_b, dtype=jnp.int32), jnp.arange(n_h, dtype=jnp.int32)
        return jax.vmap(jax.vmap(one, in_axes=(None, 0, 0, 0)), in_axes=(0, None, 0, 0))(bs, hs, pq, pk)

    with jax.ensure_compile_time_eval():
        dense = np.asarray(jax.jit(tiles)(mask_p, jnp.asarray(pq), jnp.asarray(pk)))
    packed = np.packbits(dense.reshape(n_b * n_h * t, bq * bk), axis=1)
    uniq, inverse = np.unique(packed, axis=0, return_inverse=True)
    if uniq.shape[0] * bq * bk > max_elems // 4:
        return None
    table = np.unpackbits(uniq, axis=1, count=bq * bk).astype(bool).reshape(-1, bq, bk)
    return table, inverse.reshape(n_b, n_h, t).astype(np.int32)


def _leaf_axes(tree, axis: int):
    """vmap in_axes for a mask/score-mod pytree: map leaf axis `axis` (after earlier axes removed:
    pass 0 both times) if that leaf axis is not shared."""
    return jax.tree.map(lambda a: 0 if a.shape[axis] > 1 else None, tree)


def _bh_vmap(fn, trees_bh, other_bh, other_shared):
    """vmap fn over batch then head. trees_bh: pytrees whose leaves are [Bl, Hl, ...] (shared axes of
    size 1 are broadcast); other_bh: arrays [B, H, ...]; other_shared: passed unchanged."""

    def over_h(b, trees_b, other_b):
        axes_h = tuple(_leaf_axes(t, 0) for t in trees_b)
        squeezed = tuple(jax.tree.map(lambda a: a[0] if a.shape[0] == 1 else a, t) for t in trees_b)
        return jax.vmap(lambda h, ts, os: fn(b, h, ts, os, other_shared),
                        in_axes=(0, axes_h, 0))(jnp.arange(other_b[0].shape[0], dtype=jnp.int32),
                                                 squeezed, other_b)

    axes_b = tuple(_leaf_axes(t, 0) for t in trees_bh)
    squeezed_b = tuple(jax.tree.map(lambda a: a[0] if a.shape[0] == 1 else a, t) for t in trees_bh)
    n_b = other_bh[0].shape[0]
    return jax.vmap(over_h, in_axes=(0, axes_b, 0))(jnp.arange(n_b, dtype=jnp.int32), squeezed_b, other_bh)


def _split_float(tree):
    leaves, treedef = jax.tree.flatten(tree)
    is_f = [jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) for x in leaves]
    return leaves, treedef, is_f


class _Config:
    """Static configuration closed over by the custom VJP (hashable pieces only)."""

    def __init__(self, scale, bq, bk, q_len, k_len, nq, nk, phases_meta, traced_chunk):
        self.scale, self.bq, self.bk = scale, bq, bk
        self.q_len, self.k_len, self.nq, self.nk = q_len, k_len, nq, nk
        self.phases_meta = phases_meta  # tuple of (mask mode 'eval'|'table'|'none', chunk, dynamic)
        self.traced_chunk = traced_chunk
        self.table = None  # numpy bool [U, bq, bk]: distinct partial tiles (mode 'table')


def _tile_scores(cfg, q_bh, k_bh, pq, pk, b, h, mod_sel, mask_sel, pkind, tidx, mask_mode):
    """Scores [C, bq, bk] (masked entries -inf) of the pairs (pq, pk) for one (b, h); also returns
    the raw scores and a closure for the score-mod VJP."""
    bq, bk = cfg.bq, cfg.bk
    qb = q_bh[pq].astype(jnp.float32)
    kb = k_bh[pk].astype(jnp.float32)
    raw = jnp.einsum("cqd,ckd->cqk", qb, kb) * cfg.scale
    q_idx = pq[:, None, None] * bq + jnp.arange(bq, dtype=jnp.int32)[None, :, None]
    kv_idx = pk[:, None, None] * bk + jnp.arange(bk, dtype=jnp.int32)[None, None, :]

    def modify(mod_tree, s):
        def one(s_c, qs, ks, qi_c, ki_c):
            blk = mod_tree.slice_blocks(qs, bq, ks, bk)
            return blk.apply(s_c, b, h, qi_c, ki_c)

        return jax.vmap(one)(s, pq * bq, pk * bk, q_idx, kv_idx)

    s = raw if mod_sel is None else modify(mod_sel, raw)
    if mask_mode == "table":
        # Static partial tiles, evaluated once at trace time and deduplicated (padding keys included).
        allowed = jnp.asarray(cfg.table)[tidx] & (pkind != bmap.EMPTY)[:, None, None]
    elif mask_mode == "eval":
        def ev(qs, ks, qi_c, ki_c):
            return mask_sel.slice_blocks(qs, bq, ks, bk).evaluate(b, h, qi_c, ki_c)

        allowed = jax.vmap(ev)(pq * bq, pk * bk, q_idx, kv_idx)
        allowed = jnp.where((pkind == bmap.FULL)[:, None, None], True, allowed & (kv_idx < cfg.k_len))
        allowed = allowed & (pkind != bmap.EMPTY)[:, None, None]
    else:
        allowed = jnp.broadcast_to((pkind != bmap.EMPTY)[:, None, None], s.shape)
    s = jnp.where(allowed, s, -jnp.inf)
    return s, raw, modify


def _chunk_loop(meta, arrays, count, body, init):
    """Run body(pq, pk, pkind, tile_idx, carry) over chunks of the pair arrays [P]."""
    _, chunk, dynamic, _ = meta
    n_chunks = arrays[0].shape[0] // chunk

    def step(i, carry):
        return body(*(jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk) for a in arrays), carry)

    if n_chunks == 1:
        return step(0, init)
    if not dynamic:
        return jax.lax.fori_loop(0, n_chunks, step, init)
    limit = (count[0][0] + chunk - 1) // chunk

    def cond(state):
        return state[0] < limit

    def wbody(state):
        return (state[0] + 1, step(state[0], state[1]))

    return jax.lax.while_loop(cond, wbody, (jnp.int32(0), init))[1]


def _window(pq, nq: int, window: int):
    """Start of the accumulator window of a chunk (sorted q blocks) and the pairs' offsets in it."""
    if window >= nq:
        return jnp.int32(0), pq
    start = jnp.clip(pq[0], 0, nq - window)
    return start, pq - start


def _from_acc_space(cfg, counts, x):
    """Traced maps accumulate per query-block *rank* (the i-th non-empty q block), so that a chunk's
    rows are consecutive whatever the gaps; scatter the rows back to their q blocks."""
    if not any(meta[2] for meta in cfg.phases_meta):
        return x
    rows = counts[0][1]  # [nq]: q block of each rank, nq for unused ranks
    return jnp.zeros((x.shape[0] + 1,) + x.shape[1:], x.dtype).at[rows].set(x)[:-1]


def _forward_bh(cfg, b, h, trees, arrays, shared):
    """One (batch, head): returns out [nq, bq, D] (f32) and lse [nq, bq]."""
    mod_sel, mask_sel, phase_arrays, counts = trees
    q_bh, k_bh, v_bh = arrays
    nq, bq, d = q_bh.shape
    m0 = jnp.full((nq, bq), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((nq, bq), jnp.float32)
    a0 = jnp.zeros((nq, bq, d), jnp.float32)
    zero = jnp.int32(0)
    state = (m0, l0, a0, (zero, zero, zero))
    for meta, parr, cnt in zip(cfg.phases_meta, phase_arrays, counts):
        def body(pq, pk, pkind, tidx, acc_idx, carry, meta=meta):
            m, l, acc, (n_tiles, n_masked, n_slots) = carry
            live = jnp.sum(pkind != bmap.EMPTY).astype(jnp.int32)
            stats = (n_tiles + live, n_masked + (live if meta[0] != "none" else 0), n_slots + pkind.shape[0])
            s, _, _ = _tile_scores(cfg, q_bh, k_bh, pq, pk, b, h, mod_sel, mask_sel, pkind, tidx, meta[0])
            # Pairs are sorted by query block: the chunk only touches `window` consecutive q blocks, so
            # the online-softmax state is read and rescaled on that window, not on all of it.
            window = meta[3]
            start, loc = _window(acc_idx, nq, window)
            cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, window)
            m_w, l_w, acc_w = cut(m), cut(l), cut(acc)
            row_max = jax.ops.segment_max(s.max(-1), loc, window, indices_are_sorted=True)
            m_new = jnp.maximum(m_w, row_max)
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            alpha = jnp.exp(m_w - m_safe)
            p = jnp.exp(s - m_safe[loc][:, :, None])
            vb = v_bh[pk].astype(jnp.float32)
            l_w = l_w * alpha + jax.ops.segment_sum(p.sum(-1), loc, window, indices_are_sorted=True)
            pv = jnp.einsum("cqk,ckd->cqd", p, vb)
            acc_w = acc_w * alpha[..., None] + jax.ops.segment_sum(pv, loc, window, indices_are_sorted=True)
            put = lambda x, w: jax.lax.dynamic_update_slice_in_dim(x, w, start, 0)
            return (put(m, m_new), put(l, l_w), put(acc, acc_w), stats)

        state = _chunk_loop(meta, parr, cnt, body, state)
    m, l, acc, stats = state
    # Empty rows (no allowed key / no finite logit) have l == 0 exactly; a NaN row fails both `l > 0`
    # and `l == 0`, so testing `l == 0` keeps it NaN instead of passing it off as empty.
    empty = l == 0
    safe_l = jnp.where(empty, 1.0, l)
    out = acc / safe_l[..., None]
    lse = jnp.where(empty, 0.0, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(safe_l))
    if shared == "stats":
        return stats
    return _from_acc_space(cfg, counts, out), _from_acc_space(cfg, counts, lse)


def _backward_bh(cfg, b, h, trees, arrays, shared):
    """One (batch, head): dq [nq, bq, D], dk, dv [nk, bk, D], d(score-mod float leaves)."""
    mod_sel, mask_sel, phase_arrays, counts = trees
    q_bh, k_bh, v_bh, out, lse, dout = arrays
    nq, bq, d = q_bh.shape
    nk, bk = k_bh.shape[0], k_bh.shape[1]
    delta = jnp.sum(dout * out, axis=-1)  # [nq, bq]
    if mod_sel is not None:
        mod_leaves, mod_def, is_f = _split_float(mod_sel)
        dmod0 = [jnp.zeros_like(x, jnp.float32) for x, f in zip(mod_leaves, is_f) if f]
    else:
        dmod0 = []
    init = (jnp.zeros((nq, bq, d), jnp.float32), jnp.zeros((nk, bk, d), jnp.float32),
            jnp.zeros((nk, bk, d), jnp.float32), dmod0)
    state = init
    for meta, parr, cnt in zip(cfg.phases_meta, phase_arrays, counts):
        def body(pq, pk, pkind, tidx, acc_idx, carry, meta=meta):
            dq, dk, dv, dmod = carry
            s, raw, modify = _tile_scores(cfg, q_bh, k_bh, pq, pk, b, h, mod_sel, mask_sel, pkind, tidx, meta[0])
            p = jnp.exp(s - lse[pq][:, :, None])
            do_b = dout[pq]
            vb = v_bh[pk].astype(jnp.float32)
            qb = q_bh[pq].astype(jnp.float32)
            kb = k_bh[pk].astype(jnp.float32)
            dv = dv.at[pk].add(jnp.einsum("cqk,cqd->ckd", p, do_b))
            dp = jnp.einsum("cqd,ckd->cqk", do_b, vb)
            ds = p * (dp - delta[pq][:, :, None])
            if mod_sel is not None:
                float_leaves = [x for x, f in zip(mod_leaves, is_f) if f]

                def mod_of(fl, r):
                    it = iter(fl)
                    leaves = [next(it) if f else x for x, f in zip(mod_leaves, is_f)]
                    return modify(jax.tree.unflatten(mod_def, leaves), r)

                _, vjp = jax.vjp(mod_of, float_leaves, raw)
                dfl, ds = vjp(ds)
                dmod = [a + g.astype(jnp.float32) for a, g in zip(dmod, dfl)]
            ds = ds * cfg.scale
            window = meta[3]
            start, loc = _window(acc_idx, nq, window)
            dq_w = jax.lax.dynamic_slice_in_dim(dq, start, window) + jax.ops.segment_sum(
                jnp.einsum("cqk,ckd->cqd", ds, kb), loc, window, indices_are_sorted=True)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_w, start, 0)
            dk = dk.at[pk].add(jnp.einsum("cqk,cqd->ckd", ds, qb))
            return (dq, dk, dv, dmod)

        state = _chunk_loop(meta, parr, cnt, body, state)
    dq, dk, dv, dmod = state
    return _from_acc_space(cfg, counts, dq), dk, dv, dmod


def _make_attend(cfg):
    @jax.custom_vjp
    def attend(q, k, v, mod_p, mask_p, phase_arrays, counts):
        return _fwd(q, k, v, mod_p, mask_p, phase_arrays, counts)[0]

    def _fwd(q, k, v, mod_p, mask_p, phase_arrays, counts):
        fn = functools.partial(_forward_bh, cfg)
        out, lse = _bh_vmap(fn, (mod_p, mask_p, phase_arrays, counts), (q, k, v), None)
        return out, (q, k, v, mod_p, mask_p, phase_arrays, counts, out, lse)

    def fwd(q, k, v, mod_p, mask_p, phase_arrays, counts):
        out, res = _fwd(q, k, v, mod_p, mask_p, phase_arrays, counts)
        return out, res

    def bwd(res, dout):
        q, k, v, mod_p, mask_p, phase_arrays, counts, out, lse = res
        fn = functools.partial(_backward_bh, cfg)
        dq, dk, dv, dmod = _bh_vmap(fn, (mod_p, mask_p, phase_arrays, counts),
                                    (q, k, v, out, lse, dout.astype(jnp.float32)), None)
        dmod_tree = None
        if mod_p is not None:
            leaves, treedef, is_f = _split_float(mod_p)
            it = iter(dmod)
            cots = []
            for x, f in zip(leaves, is_f):
                if not f:
                    cots.append(None)
                    continue
                g = next(it)  # [B, H, *selected leaf shape]
                if x.shape[0] == 1:
                    g = g.sum(0, keepdims=True)
                if x.shape[1] == 1:
                    g = g.sum(1, keepdims=True)
                cots.append(g.reshape(x.shape).astype(x.dtype))
            dmod_tree = jax.tree.unflatten(treedef, cots)
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dmod_tree, None, None, None)

    attend.defvjp(fwd, bwd)
    return attend


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask=None,
    bias: Optional[jax.Array] = None,
    *,
    scale: Optional[float] = None,
    score_mod: Optional[ScoreMod] = None,
    block_q: int = 128,
    block_k: int = 128,
    block_map: Optional[bmap.BlockMap] = None,
    chunk_elems: int = _CHUNK_ELEMS,
    return_stats: bool = False,
    tile_table: bool = True,
):
    """Block-sparse attention (XLA), computing only non-empty tiles of the mask's block map.

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, k_len, kv_heads, head_dim].
      mask: None, a Mask, or a bool array broadcastable to [batch, heads, q_len, k_len].
      bias: additive logits broadcastable to [batch, heads, q_len, k_len] (differentiable).
      score_mod: a ScoreMod applied after the bias (differentiable w.r.t. its float leaves).
      block_q, block_k: tile sizes (clipped to the lengths); lengths are padded to multiples.
      block_map: optional precomputed ``mask.block_map(q_len, k_len, block_q, block_k, ...)`` (e.g. a
        static map for a mask whose arrays are traced).
      chunk_elems: tiles per chunk = chunk_elems // (block_q * block_k).
      tile_table: for a static mask, evaluate the partial tiles once at trace time, deduplicate them
        and gather them in the loop instead of evaluating the mask function per tile (falls back to
        per-tile evaluation when the tiles would be large, e.g. a big random static mask).
      return_stats: also return counters measured inside the forward loop, each int32 [batch, heads]:
        'tiles' (non-empty tiles whose scores were computed), 'masked_tiles' (tiles on which the mask
        function was evaluated), 'slots' (tile slots visited including padding).

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype; rows with no allowed key or no finite logit are zero
      with zero gradients; NaN inputs give NaN in the rows that use them. q_len == 0 gives an empty
      result, k_len == 0 zeros.
    """
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    check_floating_qkv("blocked_attention", q, k, v)
    batch, q_len, heads, dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != dim or heads % kv_heads:
        raise ValueError(f"blocked_attention: incompatible shapes q={q.shape}, k={k.shape}")
    for name, val in (("block_q", block_q), ("block_k", block_k), ("chunk_elems", chunk_elems)):
        if not isinstance(val, (int, np.integer)) or val <= 0:
            raise ValueError(f"blocked_attention: {name} must be a positive int, got {val!r}")
    mask_obj = as_mask(mask)
    mod = as_score_mod(score_mod, bias)
    scale = dim ** -0.5 if scale is None else float(scale)
    if has_zero_length(q, k):
        # No tiles at all (and block sizes would clip to 0): still check the mask and score-mod shapes.
        for obj in (mask_obj, mod):
            if obj is not None:
                obj.check(batch, heads, q_len, k_len)
        out = zero_length_output(q)
        if not return_stats:
            return out
        zeros = jnp.zeros((batch, heads), jnp.int32)
        return out, dict(tiles=zeros, masked_tiles=zeros, slots=zeros)
    bq, bk = min(block_q, q_len), min(block_k, k_len)
    nq, nk = _ceil_div(q_len, bq), _ceil_div(k_len, bk)
    q_pad, k_pad = nq * bq, nk * bk
    if mask_obj is None:
        mask_obj = Full()
    mask_obj.check(batch, heads, q_len, k_len)
    if mod is not None:
        mod.check(batch, heads, q_len, k_len)
    if block_map is None:
        block_map = mask_obj.block_map(q_len, k_len, bq, bk, batch=batch, heads=heads)
    elif (block_map.q_len, block_map.k_len, block_map.block_q, block_map.block_k) != (q_len, k_len, bq, bk):
        raise ValueError("blocked_attention: block_map is for (q_len, k_len, block_q, block_k)="
                         f"{(block_map.q_len, block_map.k_len, block_map.block_q, block_map.block_k)}, "
                         f"need {(q_len, k_len, bq, bk)}")
    chunk = max(1, chunk_elems // (bq * bk))

    table = None
    if mask_obj.is_static():
        # A concrete jax.Array mask inside jit would otherwise be padded by a staged jnp.pad into a tracer,
        # which the trace-time tile table (numpy) cannot read.
        with jax.ensure_compile_time_eval():
            mask_p = mask_obj.padded(q_pad, k_pad)
    else:
        mask_p = mask_obj.padded(q_pad, k_pad)
    if block_map.is_static:
        phases = _static_phases(block_map, chunk)
        metas, arrays, counts = [], [], []
        for mode, ph in zip(("eval", "none"), phases):
            if ph is None:
                continue
            pq, pk, pkind, c, window = ph
            tidx = np.zeros_like(pq)
            if mode == "eval" and tile_table and mask_obj.is_static():
                built = _partial_tile_table(mask_p, pq, pk, bq, bk, k_len, _TABLE_ELEMS)
                if built is not None:
                    table, tidx = built
                    mode = "table"
            metas.append((mode, c, False, window))
            arrays.append((jnp.asarray(pq), jnp.asarray(pk), jnp.asarray(pkind), jnp.asarray(tidx), jnp.asarray(pq)))
            counts.append(None)  # static phases need no count / rank rows
    else:
        pq, pk, pkind, count = block_map.pairs()
        c = min(chunk, nq * nk)
        total = _ceil_div(nq * nk, c) * c
        if total > nq * nk:
            extra = total - nq * nk
            pad = lambda a, val=None: jnp.concatenate(
                [a, jnp.broadcast_to(a[..., -1:] if val is None else jnp.asarray(val, a.dtype),
                                     a.shape[:-1] + (extra,))], -1)
            pq, pk, pkind = pad(pq), pad(pk), pad(pkind, bmap.EMPTY)
        new_row = jnp.concatenate([jnp.ones_like(pq[..., :1], bool), pq[..., 1:] != pq[..., :-1]], -1)
        rank = (jnp.cumsum(new_row, axis=-1) - 1).astype(jnp.int32)
        rows = jax.vmap(jax.vmap(lambda r, p: jnp.full((nq,), nq, jnp.int32).at[r].set(p)))(rank, pq)
        metas = [("eval", c, True, min(c, nq))]
        arrays = [(pq, pk, pkind, jnp.zeros_like(pq), rank)]
        counts = [(count[:, :, None], rows)]
    cfg = _Config(scale, bq, bk, q_len, k_len, nq, nk, tuple(metas), chunk)
    cfg.table = table

    def to_blocks(x, n_blocks, blk, length):
        x = jnp.pad(x, ((0, 0), (0, n_blocks * blk - length), (0, 0), (0, 0)))
        return jnp.transpose(x.reshape(batch, n_blocks, blk, x.shape[2], dim), (0, 3, 1, 2, 4))

    qb = to_blocks(q, nq, bq, q_len)
    kb = to_blocks(k, nk, bk, k_len)
    vb = to_blocks(v, nk, bk, k_len)
    if kv_heads != heads:
        kb = jnp.repeat(kb, heads // kv_heads, axis=1)
        vb = jnp.repeat(vb, heads // kv_heads, axis=1)
    # Phase arrays [Bm, Hm, P] behave like leaves with shared axes of size 1.
    arrays = tuple(tuple(a for a in arr) for arr in arrays)
    counts = tuple(counts)
    mod_p = None if mod is None else mod.padded(q_pad, k_pad)

    attend = _make_attend(cfg)
    out = attend(qb, kb, vb, mod_p, mask_p, arrays, counts)  # [B, H, nq, bq, D]
    out = jnp.transpose(out, (0, 2, 3, 1, 4)).reshape(batch, q_pad, heads, dim)[:, :q_len]
    out = out.astype(q.dtype)
    if not return_stats:
        return out
    tiles, masked, slots = _bh_vmap(functools.partial(_forward_bh, cfg), (mod_p, mask_p, arrays, counts),
                                    (qb, kb, vb), "stats")
    return out, dict(tiles=tiles, masked_tiles=masked, slots=slots)


__all__ = ["blocked_attention"]
