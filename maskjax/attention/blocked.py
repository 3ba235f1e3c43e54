"""Block-sparse attention in plain XLA: only the non-empty (query block, key block) tiles are computed.

Two kinds of work, sharing one online softmax per query block:

* *Pieces* (static block maps): query blocks are taken in aligned groups of up to ``_PIECE_ROWS`` rows;
  the key blocks FULL in every row of a group are merged into runs and cut into pieces of at most
  ``_PIECE_ELEMS`` scores per (batch, head) (then powers of two, so no padding tile is computed). A piece
  is a rectangle of whole query blocks against a contiguous key range: plain slices of q / k / v (static
  when every piece of its shape starts at the same key), one matmul, row reductions, no mask and no
  gather. A group's remaining tiles, when they hold PARTIAL tiles in one narrow, mostly non-empty range
  (the diagonal of a causal mask), form one *masked* piece (the mask, or its trace-time table, applied to
  the whole rectangle); otherwise the group is split in halves. One loop per piece shape.
* *Pairs*: the PARTIAL tiles no masked piece covers, FULL tiles of small pieces, and every tile of a
  traced block map are processed as (q block, k block) pairs in chunks: the blocks of a chunk are
  gathered, scores computed with one batched matmul, the mask evaluated (or read from a trace-time table
  of the distinct partial tiles), and the online softmax accumulated per query block with segment
  reductions.

The backward pass (custom VJP) recomputes the scores piece by piece / tile by tile from the saved
log-sum-exp, so memory stays bounded and the cost follows the number of non-empty tiles. Matmuls contract
the minor dimension of their left operand (dK and dV of pieces are accumulated transposed, from q^T and
dO^T), the form XLA CPU hands to its fast matmul library; the scale is folded into q once. Works for
static masks (piece and pair lists known at trace time) and traced ones (pair lists on device; a while
loop stops after the last non-empty tile).

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
# FULL pieces: up to this many query rows (whole query blocks) per piece, at most _PIECE_ELEMS scores per
# (batch, head) and about _STEP_ELEMS scores per loop step over all (batch, head) (measured on CPU: large
# pieces amortise the loop step and let XLA split each matmul over the cores).
_PIECE_ROWS = 512
_PIECE_ELEMS = 1 << 20
_MIN_PIECE_ELEMS = 1 << 15  # smaller FULL pieces are computed as pairs, several tiles per loop step
_PAIR_T_ELEMS = 1 << 14  # pairs' backward accumulates dK / dV transposed for tiles of at least this size
_STEP_ELEMS = 1 << 22


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _static_phases(kind: np.ndarray, chunk: int, kinds=(bmap.PARTIAL, bmap.FULL)):
    """Pair lists for static block kinds [Bm, Hm, nq, nk], one phase per kind in ``kinds``, each
    (q, k, kind, chunk, window): int arrays [Bm, Hm, n_chunks * chunk] padded with EMPTY pairs, the chunk
    size, and the largest span of query blocks inside one chunk (the accumulator window a chunk updates);
    None if empty."""
    kind = np.asarray(kind)
    n_b, n_h, nq, nk = kind.shape
    flat = kind.reshape(n_b, n_h, nq * nk)
    phases = []
    for want in kinds:
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


def _runs(full: np.ndarray):
    """Runs of True along the last axis of a bool [M, nk]: (row, start, length) arrays, row-major."""
    m, nk = full.shape
    edge = np.zeros((m, nk + 2), np.int8)
    edge[:, 1:-1] = full
    d = np.diff(edge, axis=-1)
    row, start = np.nonzero(d == 1)
    end = np.nonzero(d == -1)[1]  # same row-major order: runs do not nest
    return row, start, end - start


def _split_runs(start, length, max_w: int):
    """Cut runs into pieces of max_w blocks, the remainder into powers of two (largest first), so that no
    padding tile is computed. Returns {w: (run index, first block)}."""
    out = {}
    n_rep = length // max_w
    run = np.repeat(np.arange(len(start)), n_rep)
    off = np.arange(len(run)) - np.repeat(np.cumsum(n_rep) - n_rep, n_rep)
    out[max_w] = (run, start[run] + off * max_w)
    rem_start, rem = start + n_rep * max_w, length % max_w
    for e in range(max_w.bit_length() - 1, -1, -1):
        w = 1 << e
        if w >= max_w:
            continue
        sel = np.nonzero(rem & w)[0]
        out[w] = (sel, rem_start[sel])
        rem_start = rem_start + np.where(rem & w, w, 0)
    return out


def _pieces(kind: np.ndarray, rows: int, max_w: int, squares: bool = True):
    """Static block kinds [Bm, Hm, nq, nk] as rectangular *pieces* of r query blocks x w consecutive key
    blocks. Query blocks are taken in aligned groups of ``rows``; in a group of r rows:

    * the key blocks FULL in every row ("common") form FULL pieces of r rows (runs cut by ``_split_runs``);
    * the group's other non-empty tiles, when some are PARTIAL and all lie in one range of key blocks
      holding no tile covered already, at most 2 r wide and at least half non-empty (the diagonal of a
      causal mask), form one *masked* piece (the mask is applied to the whole piece);
    * otherwise the group is split in two halves, down to single rows, whose PARTIAL tiles are left to the
      pairs.

    Returns (pieces, rest): pieces a list of (masked, r, w, pi, pj, valid, tiles, partial, padded,
    fixed_j): per kind of piece and (r, w), int32 [Bm, Hm, P] first query block, first key block,
    validity and counts of non-empty / PARTIAL tiles of each piece (query-major order), padded per (b, h)
    to the largest count with invalid pieces (repeating the last piece: nothing new is fetched); fixed_j:
    every piece starts at key block pj[..., 0] (the key slice is then static). rest: the block kinds with
    every tile covered by a piece set to EMPTY (only PARTIAL tiles remain)."""
    n_b, n_h, nq, nk = kind.shape
    kind = np.asarray(kind).reshape(n_b * n_h, nq, nk)
    rest = kind.copy()  # tiles not covered yet
    found = {}  # (masked, r, w) -> list of (bh, i, j, tiles, partial)
    add = lambda key, *cols: found.setdefault(key, []).append(cols)
    cols_nk = np.arange(nk)[None]

    def visit(i0, r):
        blk = rest[:, i0:i0 + r]  # a view: covering tiles writes through
        common = (blk == bmap.FULL).all(axis=1)  # [BH, nk]
        if common.any():
            blk[np.broadcast_to(common[:, None], blk.shape)] = bmap.EMPTY
            bh, start, length = _runs(common)
            for w, (run, j) in _split_runs(start, length, max_w).items():
                if len(run):
                    add((False, r, w), bh[run], np.full(len(run), i0), j, np.full(len(run), r * w),
                        np.zeros(len(run), np.int64))
        if r == 1:
            return
        left = blk != bmap.EMPTY
        cols = left.any(axis=1)
        if squares:
            has = (blk == bmap.PARTIAL).any((1, 2))
            c0 = np.argmax(cols, -1)
            c1 = nk - np.argmax(cols[:, ::-1], -1)
            width = np.where(has, c1 - c0, 0)
            span = (cols_nk >= c0[:, None]) & (cols_nk < c1[:, None])
            filled = left.sum((1, 2))
            # A masked piece computes every tile of its rectangle: none may be covered already.
            covered = ((kind[:, i0:i0 + r] != bmap.EMPTY) & ~left & span[:, None]).any((1, 2))
            ok = has & ~covered & (width <= 2 * r) & (2 * filled >= r * np.maximum(width, 1))
            for b_ in np.nonzero(ok)[0]:
                seg = blk[b_, :, c0[b_]:c1[b_]]
                add((True, r, int(width[b_])), np.array([b_]), np.array([i0]), c0[b_:b_ + 1],
                    np.array([int((seg != bmap.EMPTY).sum())]), np.array([int((seg == bmap.PARTIAL).sum())]))
                seg[...] = bmap.EMPTY
        if (blk != bmap.EMPTY).any():
            visit(i0, r // 2)
            visit(i0 + r // 2, r - r // 2)

    for i0 in range(0, nq, rows):
        visit(i0, min(rows, nq - i0))
    out = []
    for key in sorted(found, key=lambda k: (k[0], -k[1] * k[2], -k[1])):
        masked, r, w = key
        bh, pi, pj, tiles, partial = (np.concatenate(x) for x in zip(*found[key]))
        order = np.lexsort((pj, pi, bh))
        bh, pi, pj, tiles, partial = bh[order], pi[order], pj[order], tiles[order], partial[order]
        counts = np.bincount(bh, minlength=n_b * n_h)
        width = int(counts.max())
        rank = np.arange(len(bh)) - (np.cumsum(counts) - counts)[bh]
        arrs = [np.zeros((n_b * n_h, width), np.int32) for _ in range(5)]
        for arr, val in zip(arrs, (pi, pj, np.ones_like(pi), tiles, partial)):
            arr[bh, rank] = val
        last = np.maximum(counts - 1, 0)[:, None]
        pad = np.arange(width)[None, :] > last
        for arr in arrs[:2]:
            arr[...] = np.where(pad, np.take_along_axis(arr, last, 1), arr)
        shape = (n_b, n_h, width)
        ai, aj, valid, tiles, partial = (a.reshape(shape) for a in arrs)
        out.append((masked, r, w, ai, aj, valid, tiles, partial, bool(counts.min() < width),
                    bool(np.all(aj == aj.flat[0]))))
    return out, rest.reshape(n_b, n_h, nq, nk)


def _tile_table(mask_p, q0, k0, hq: int, wk: int, k_len: int, max_elems: int):
    """Evaluate a static mask once (trace time) on the rectangles [q0, q0 + hq) x [k0, k0 + wk) (partial
    tiles, masked pieces) and deduplicate them.

    q0, k0: int [Bm, Hm, T] element offsets. Returns (table bool [U, hq, wk], index int32 [Bm, Hm, T]) or
    None when the rectangles would exceed max_elems elements."""
    n_b, n_h, t = q0.shape
    if n_b * n_h * t * hq * wk > max_elems:
        return None

    def tiles(mask_p, q0, k0):
        def one(b, h, q0_bh, k0_bh):
            sel = mask_p.select(b, h)

            def tile(qs, ks):
                q_idx = qs + jnp.arange(hq, dtype=jnp.int32)[:, None]
                kv_idx = ks + jnp.arange(wk, dtype=jnp.int32)[None, :]
                m = sel.slice_blocks(qs, hq, ks, wk).evaluate(b, h, q_idx, kv_idx)
                return m & (kv_idx < k_len)

            return jax.lax.map(lambda ij: tile(*ij), (q0_bh, k0_bh), batch_size=256)

        bs, hs = jnp.arange(n_b, dtype=jnp.int32), jnp.arange(n_h, dtype=jnp.int32)
        return jax.vmap(jax.vmap(one, in_axes=(None, 0, 0, 0)), in_axes=(0, None, 0, 0))(bs, hs, q0, k0)

    with jax.ensure_compile_time_eval():
        dense = np.asarray(jax.jit(tiles)(mask_p, jnp.asarray(q0, jnp.int32), jnp.asarray(k0, jnp.int32)))
    packed = np.packbits(dense.reshape(n_b * n_h * t, hq * wk), axis=1)
    uniq, inverse = np.unique(packed, axis=0, return_inverse=True)
    if uniq.shape[0] * hq * wk > max_elems // 4:
        return None
    table = np.unpackbits(uniq, axis=1, count=hq * wk).astype(bool).reshape(-1, hq, wk)
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
        # tuple per phase: pairs (mask mode 'eval'|'table'|'none', chunk, dynamic, window) or pieces
        # ('piece', (query blocks, key blocks), padded, fixed first key block or None, mask mode None (FULL)
        # | 'eval' | 'table')
        self.phases_meta = phases_meta
        self.traced_chunk = traced_chunk
        self.tables = None  # per phase: numpy bool [U, rows, keys] distinct masked tiles / pieces (mode 'table')


def _tile_scores(cfg, qs_bh, k_bh, pq, pk, b, h, mod_sel, mask_sel, pkind, tidx, mask_mode, table=None):
    """Scores [C, bq, bk] (masked entries -inf) of the pairs (pq, pk) for one (b, h), from the scaled
    queries qs_bh; also returns the raw scores and a closure for the score-mod VJP."""
    bq, bk = cfg.bq, cfg.bk
    qb = qs_bh[pq]
    kb = k_bh[pk].astype(jnp.float32)
    raw = jnp.einsum("cqd,ckd->cqk", qb, kb)
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
        allowed = jnp.asarray(table)[tidx] & (pkind != bmap.EMPTY)[:, None, None]
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


def _piece_scores(cfg, meta, qs_bh, k_flat, i, j, tidx, b, h, mod_sel, mask_sel, table):
    """Scores [r * bq, w * bk] of query blocks [i, i + r) against key blocks [j, j + w) for one (b, h),
    masked (-inf) for a masked piece; also the raw scores, the score-mod closure (None without a score
    mod), the query rows [r * bq, D] and the keys [w * bk, D]."""
    (r, w), mode = meta[1], meta[4]
    bq, bk = cfg.bq, cfg.bk
    qi = _rows(qs_bh, i, r)
    kj = _keys(k_flat, j, w * bk, bk)
    raw = jax.lax.dot_general(qi, kj, (((1,), (1,)), ((), ())))  # contracts the minor dim of both
    q_idx = lambda: i * bq + jnp.arange(r * bq, dtype=jnp.int32)[:, None]
    kv_idx = lambda: j * bk + jnp.arange(w * bk, dtype=jnp.int32)[None, :]
    modify = None
    s = raw
    if mod_sel is not None:
        def modify(mod_tree, s):
            return mod_tree.slice_blocks(i * bq, r * bq, j * bk, w * bk).apply(s, b, h, q_idx(), kv_idx())

        s = modify(mod_sel, raw)
    if mode == "table":
        s = jnp.where(jax.lax.dynamic_index_in_dim(jnp.asarray(table), tidx, 0, keepdims=False), s, -jnp.inf)
    elif mode == "eval":
        allowed = mask_sel.slice_blocks(i * bq, r * bq, j * bk, w * bk).evaluate(b, h, q_idx(), kv_idx())
        s = jnp.where(allowed & (kv_idx() < cfg.k_len), s, -jnp.inf)
    return s, raw, modify, qi, kj


def _rows(x, i, r: int):
    """Blocks [i, i + r) of x [nq, bq, ...] as [r * bq, ...]."""
    return jax.lax.dynamic_slice_in_dim(x, i, r, 0).reshape((r * x.shape[1],) + x.shape[2:])


def _put_rows(x, y, i, r: int):
    return jax.lax.dynamic_update_slice_in_dim(x, y.reshape((r,) + x.shape[1:]), i, 0)


def _keys(x, j, size: int, bk: int, axis: int = 0):
    """size keys from key block j of x (keys on ``axis``); a static j is sliced statically (no copy when
    it is all of x), a traced one dynamically. Always float32."""
    if isinstance(j, int):
        out = jax.lax.slice_in_dim(x, j * bk, j * bk + size, axis=axis) if size < x.shape[axis] else x
    else:
        out = jax.lax.dynamic_slice_in_dim(x, j * bk, size, axis)
    return out.astype(jnp.float32)


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


def _piece_loop(meta, arrays, body, init):
    """Run body(i, j, valid, tiles, partial, table_idx, carry) over the pieces (int32 arrays [P]) of one
    shape; j is a Python int when every piece starts at the same key block."""
    n = arrays[0].shape[0]
    fixed_j = meta[3]

    def step(t, carry):
        i, j, *rest = (jax.lax.dynamic_index_in_dim(a, t, 0, keepdims=False) for a in arrays)
        return body(i, fixed_j if fixed_j is not None else j, *rest, carry)

    if n == 1:
        return step(0, init)
    return jax.lax.fori_loop(0, n, step, init)


def _window(pq, nq: int, window: int):
    """Start of the accumulator window of a chunk (sorted q blocks) and the pairs' offsets in it."""
    if window >= nq:
        return jnp.int32(0), pq
    start = jnp.clip(pq[0], 0, nq - window)
    return start, pq - start


def _from_acc_space(cfg, counts, x):
    """Traced maps accumulate per query-block *rank* (the i-th non-empty q block), so that a chunk's
    rows are consecutive whatever the gaps; scatter the rows back to their q blocks."""
    if not any(meta[2] for meta in cfg.phases_meta if meta[0] != "piece"):
        return x
    rows = counts[0][1]  # [nq]: q block of each rank, nq for unused ranks
    return jnp.zeros((x.shape[0] + 1,) + x.shape[1:], x.dtype).at[rows].set(x)[:-1]


def _forward_bh(cfg, b, h, trees, arrays, shared):
    """One (batch, head): returns out [nq, bq, D] (f32) and lse [nq, bq]."""
    mod_sel, mask_sel, phase_arrays, counts = trees
    q_bh, k_bh, v_bh = arrays
    nq, bq, d = q_bh.shape
    nk, bk = k_bh.shape[0], k_bh.shape[1]
    qs_bh = q_bh.astype(jnp.float32) * cfg.scale
    k_flat, v_flat = k_bh.reshape(nk * bk, d), v_bh.reshape(nk * bk, d)
    m0 = jnp.full((nq, bq), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((nq, bq), jnp.float32)
    a0 = jnp.zeros((nq, bq, d), jnp.float32)
    zero = jnp.int32(0)
    state = (m0, l0, a0, (zero, zero, zero))
    for k, (meta, parr, cnt) in enumerate(zip(cfg.phases_meta, phase_arrays, counts)):
        if meta[0] == "piece":
            (r, w), padded = meta[1], meta[2]

            def pbody(i, j, valid, n_t, n_p, tidx, carry, meta=meta, r=r, w=w, padded=padded, k=k):
                m, l, acc, (n_tiles, n_masked, n_slots) = carry
                stats = (n_tiles + n_t * valid, n_masked + n_p * valid, n_slots + r * w)
                s, _, _, _, _ = _piece_scores(cfg, meta, qs_bh, k_flat, i, j, tidx, b, h, mod_sel, mask_sel,
                                              cfg.tables[k])
                m_i, l_i, acc_i = _rows(m, i, r), _rows(l, i, r), _rows(acc, i, r)
                row_max = s.max(-1)
                if padded:
                    row_max = jnp.where(valid != 0, row_max, -jnp.inf)
                m_new = jnp.maximum(m_i, row_max)
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                alpha = jnp.exp(m_i - m_safe)
                p = jnp.exp(s - m_safe[:, None])
                if padded:
                    p = jnp.where(valid != 0, p, 0.0)
                vj = _keys(v_flat, j, w * bk, bk)
                l_i = l_i * alpha + p.sum(-1)
                acc_i = acc_i * alpha[:, None] + jax.lax.dot_general(p, vj, (((1,), (0,)), ((), ())))
                return (_put_rows(m, m_new, i, r), _put_rows(l, l_i, i, r), _put_rows(acc, acc_i, i, r), stats)

            state = _piece_loop(meta, parr, pbody, state)
            continue

        def body(pq, pk, pkind, tidx, acc_idx, carry, meta=meta, k=k):
            m, l, acc, (n_tiles, n_masked, n_slots) = carry
            live = jnp.sum(pkind != bmap.EMPTY).astype(jnp.int32)
            stats = (n_tiles + live, n_masked + (live if meta[0] != "none" else 0), n_slots + pkind.shape[0])
            s, _, _ = _tile_scores(cfg, qs_bh, k_bh, pq, pk, b, h, mod_sel, mask_sel, pkind, tidx, meta[0],
                                   cfg.tables[k])
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
    """One (batch, head): dq [nq, bq, D], dk, dv [nk, bk, D], d(score-mod float leaves).

    Pieces (and pairs of tiles of at least _PAIR_T_ELEMS) accumulate dK and dV transposed ([.., D, keys],
    from q^T and dO^T) so that every matmul contracts the minor dimension of its left operand; the scale
    is folded into q (dq is scaled once at the end)."""
    mod_sel, mask_sel, phase_arrays, counts = trees
    q_bh, k_bh, v_bh, out, lse, dout = arrays
    nq, bq, d = q_bh.shape
    nk, bk = k_bh.shape[0], k_bh.shape[1]
    qs_bh = q_bh.astype(jnp.float32) * cfg.scale
    qs_t = jnp.swapaxes(qs_bh, 1, 2)  # [nq, D, bq]
    dout_t = jnp.swapaxes(dout, 1, 2)
    qs_tf, dout_tf = qs_bh.reshape(nq * bq, d).T, dout.reshape(nq * bq, d).T  # [D, queries]
    k_flat, v_flat = k_bh.reshape(nk * bk, d), v_bh.reshape(nk * bk, d)
    delta = jnp.sum(dout * out, axis=-1)  # [nq, bq]
    if mod_sel is not None:
        mod_leaves, mod_def, is_f = _split_float(mod_sel)
        dmod0 = [jnp.zeros_like(x, jnp.float32) for x, f in zip(mod_leaves, is_f) if f]
        float_leaves = [x for x, f in zip(mod_leaves, is_f) if f]

        def mod_vjp(modify, raw, ds):
            def mod_of(fl, r):
                it = iter(fl)
                leaves = [next(it) if f else x for x, f in zip(mod_leaves, is_f)]
                return modify(jax.tree.unflatten(mod_def, leaves), r)

            _, vjp = jax.vjp(mod_of, float_leaves, raw)
            return vjp(ds)
    else:
        dmod0 = []
    has_pairs = any(meta[0] != "piece" for meta in cfg.phases_meta)
    has_pieces = any(meta[0] == "piece" for meta in cfg.phases_meta)
    # Pairs accumulate dK / dV per key block, transposed ([nk, D, bk]) for tiles of 128 x 128 and more
    # (the fast matmul form); for smaller tiles the plain form ([nk, bk, D]) measured faster on CPU.
    pair_t = bq * bk >= _PAIR_T_ELEMS
    zeros_t = jnp.zeros(((nk, d, bk) if pair_t else (nk, bk, d)) if has_pairs else (0,), jnp.float32)
    zeros_f = jnp.zeros((d, nk * bk) if has_pieces else (0,), jnp.float32)
    # (dq, dk^T / dv^T per key block (pairs), dk^T / dv^T over all keys (pieces), d score-mod)
    state = (jnp.zeros((nq, bq, d), jnp.float32), zeros_t, zeros_t, zeros_f, zeros_f, dmod0)
    nn = (((1,), (0,)), ((), ()))  # [m, c] x [c, n]
    nt = (((1,), (1,)), ((), ()))  # [m, c] x [n, c]
    for k, (meta, parr, cnt) in enumerate(zip(cfg.phases_meta, phase_arrays, counts)):
        if meta[0] == "piece":
            (r, w), padded = meta[1], meta[2]

            def pbody(i, j, valid, n_t, n_p, tidx, carry, meta=meta, r=r, w=w, padded=padded, k=k):
                dq, dk_t, dv_t, dk_f, dv_f, dmod = carry
                s, raw, modify, qi, kj = _piece_scores(cfg, meta, qs_bh, k_flat, i, j, tidx, b, h, mod_sel,
                                                       mask_sel, cfg.tables[k])
                p = jnp.exp(s - _rows(lse, i, r)[:, None])
                if padded:
                    p = jnp.where(valid != 0, p, 0.0)
                do_i = _rows(dout, i, r)
                # [D, r * bq]: the blocks' columns side by side
                do_t = jax.lax.dynamic_slice_in_dim(dout_tf, i * bq, r * bq, 1)
                q_t = jax.lax.dynamic_slice_in_dim(qs_tf, i * bq, r * bq, 1)
                vj = _keys(v_flat, j, w * bk, bk)

                def cols(x, y):
                    if isinstance(j, int) and w * bk == x.shape[1]:
                        return x + y
                    return jax.lax.dynamic_update_slice_in_dim(x, _keys(x, j, w * bk, bk, 1) + y, j * bk, 1)

                dv_f = cols(dv_f, jax.lax.dot_general(do_t, p, nn))  # [D, w * bk]
                dp = jax.lax.dot_general(do_i, vj, nt)
                ds = p * (dp - _rows(delta, i, r)[:, None])
                if mod_sel is not None:
                    dfl, ds = mod_vjp(modify, raw, ds)
                    dmod = [a + g.astype(jnp.float32) for a, g in zip(dmod, dfl)]
                dq = _put_rows(dq, _rows(dq, i, r) + jax.lax.dot_general(ds, kj, nn), i, r)
                dk_f = cols(dk_f, jax.lax.dot_general(q_t, ds, nn))
                return (dq, dk_t, dv_t, dk_f, dv_f, dmod)

            state = _piece_loop(meta, parr, pbody, state)
            continue

        def body(pq, pk, pkind, tidx, acc_idx, carry, meta=meta, k=k):
            dq, dk_t, dv_t, dk_f, dv_f, dmod = carry
            s, raw, modify = _tile_scores(cfg, qs_bh, k_bh, pq, pk, b, h, mod_sel, mask_sel, pkind, tidx,
                                          meta[0], cfg.tables[k])
            p = jnp.exp(s - lse[pq][:, :, None])
            do_b = dout[pq]
            vb = v_bh[pk].astype(jnp.float32)
            kb = k_bh[pk].astype(jnp.float32)
            if pair_t:
                dv_t = dv_t.at[pk].add(jnp.einsum("cdq,cqk->cdk", dout_t[pq], p))
            else:
                dv_t = dv_t.at[pk].add(jnp.einsum("cqk,cqd->ckd", p, do_b))
            dp = jnp.einsum("cqd,ckd->cqk", do_b, vb)
            ds = p * (dp - delta[pq][:, :, None])
            if mod_sel is not None:
                dfl, ds = mod_vjp(modify, raw, ds)
                dmod = [a + g.astype(jnp.float32) for a, g in zip(dmod, dfl)]
            window = meta[3]
            start, loc = _window(acc_idx, nq, window)
            dq_w = jax.lax.dynamic_slice_in_dim(dq, start, window) + jax.ops.segment_sum(
                jnp.einsum("cqk,ckd->cqd", ds, kb), loc, window, indices_are_sorted=True)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_w, start, 0)
            if pair_t:
                dk_t = dk_t.at[pk].add(jnp.einsum("cdq,cqk->cdk", qs_t[pq], ds))
            else:
                dk_t = dk_t.at[pk].add(jnp.einsum("cqk,cqd->ckd", ds, qs_bh[pq]))
            return (dq, dk_t, dv_t, dk_f, dv_f, dmod)

        state = _chunk_loop(meta, parr, cnt, body, state)
    dq, dk_t, dv_t, dk_f, dv_f, dmod = state
    dk = jnp.zeros((nk, bk, d), jnp.float32)
    dv = dk
    if has_pairs:
        dk, dv = (dk + jnp.swapaxes(dk_t, 1, 2), dv + jnp.swapaxes(dv_t, 1, 2)) if pair_t else (dk + dk_t, dv + dv_t)
    if has_pieces:
        dk, dv = dk + dk_f.T.reshape(nk, bk, d), dv + dv_f.T.reshape(nk, bk, d)
    return _from_acc_space(cfg, counts, dq * cfg.scale), dk, dv, dmod


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
    chunk_elems: Optional[int] = None,
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
      chunk_elems: pairs per chunk = chunk_elems // (block_q * block_k) (default 2**17 // ...); given
        explicitly it also bounds the scores of a piece per (batch, head) and makes pieces one query block
        high (default: up to 512 query rows, 2**20 scores, about 2**22 scores per loop step over all
        (batch, head)).
      tile_table: for a static mask, evaluate the partial tiles once at trace time, deduplicate them
        and gather them in the loop instead of evaluating the mask function per tile (falls back to
        per-tile evaluation when the tiles would be large, e.g. a big random static mask).
      return_stats: also return counters measured inside the forward loop, each int32 [batch, heads]:
        'tiles' (non-empty tiles whose scores were computed), 'masked_tiles' (PARTIAL tiles computed under
        the mask; a masked piece also applies it to the FULL / EMPTY tiles of its rectangle), 'slots' (tile
        slots visited including padding and the EMPTY tiles of masked pieces).

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
        if name == "chunk_elems" and val is None:
            continue
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
    chunk = max(1, (_CHUNK_ELEMS if chunk_elems is None else chunk_elems) // (bq * bk))

    if mask_obj.is_static():
        # A concrete jax.Array mask inside jit would otherwise be padded by a staged jnp.pad into a tracer,
        # which the trace-time tile table (numpy) cannot read.
        with jax.ensure_compile_time_eval():
            mask_p = mask_obj.padded(q_pad, k_pad)
    else:
        mask_p = mask_obj.padded(q_pad, k_pad)
    tables = []
    if block_map.is_static:
        if chunk_elems is None:
            # Pieces of up to _PIECE_ROWS query rows, sized so that one loop step over all (batch, head)
            # handles about _STEP_ELEMS scores (at most _PIECE_ELEMS per head).
            per_bh = min(_PIECE_ELEMS, max(1, _STEP_ELEMS // (batch * heads)))
            rows = max(1, min(_PIECE_ROWS // bq, per_bh // (bq * bk)))
        else:
            rows, per_bh = 1, chunk_elems
        max_w = max(1, per_bh // (rows * bq * bk))
        pieces, rest = _pieces(np.asarray(block_map.kind), rows, max_w)
        # FULL pieces smaller than _MIN_PIECE_ELEMS go back to the pairs (many of them per loop step).
        kept = []
        for pc in pieces:
            masked, r, w, pi, pj, valid = pc[:6]
            if masked or chunk_elems is not None or r * bq * w * bk >= _MIN_PIECE_ELEMS:
                kept.append(pc)
                continue
            for (b_, h_, t_) in zip(*np.nonzero(valid)):
                i_, j_ = pi[b_, h_, t_], pj[b_, h_, t_]
                rest[b_, h_, i_:i_ + r, j_:j_ + w] = bmap.FULL
        pieces = kept
        # The PARTIAL tiles no masked piece covers (mask evaluated or read from the tile table) and the
        # FULL tiles of no piece, as pairs.
        metas, arrays, counts = [], [], []
        for want, ph in zip((bmap.PARTIAL, bmap.FULL), _static_phases(rest, chunk)):
            if ph is None:
                continue
            pq, pk, pkind, c, window = ph
            mode, tidx, table = ("eval" if want == bmap.PARTIAL else "none"), np.zeros_like(pq), None
            if want == bmap.PARTIAL and tile_table and mask_obj.is_static():
                built = _tile_table(mask_p, pq * bq, pk * bk, bq, bk, k_len, _TABLE_ELEMS)
                if built is not None:
                    (table, tidx), mode = built, "table"
            metas.append((mode, c, False, window))
            arrays.append((jnp.asarray(pq), jnp.asarray(pk), jnp.asarray(pkind), jnp.asarray(tidx), jnp.asarray(pq)))
            counts.append(None)  # static phases need no count / rank rows
            tables.append(table)
        for masked, r, w, pi, pj, valid, n_t, n_p, padded, fixed in pieces:
            mode, tidx, table = None, np.zeros_like(pi), None
            if masked:
                mode = "eval"
                if tile_table and mask_obj.is_static():
                    built = _tile_table(mask_p, pi * bq, pj * bk, r * bq, w * bk, k_len, _TABLE_ELEMS)
                    if built is not None:
                        (table, tidx), mode = built, "table"
            metas.append(("piece", (r, w), padded, int(pj.flat[0]) if fixed else None, mode))
            arrays.append(tuple(jnp.asarray(a) for a in (pi, pj, valid, n_t, n_p, tidx)))
            counts.append(None)
            tables.append(table)
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
        tables = [None]
        arrays = [(pq, pk, pkind, jnp.zeros_like(pq), rank)]
        counts = [(count[:, :, None], rows)]
    cfg = _Config(scale, bq, bk, q_len, k_len, nq, nk, tuple(metas), chunk)
    cfg.tables = tuple(tables)

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
