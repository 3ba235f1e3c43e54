"""On-device Hungarian matching (linear assignment) for set prediction, jit- and vmap-able.

Algorithm: shortest augmenting paths with dual potentials (Jonker-Volgenant; the O(k^2 l) "e-maxx" form for a
k x l problem, k <= l). The smaller side is augmented one row at a time by a Dijkstra search over the larger
side, so a [50, 10] or [100, 20] query-by-target matrix needs at most 10 or 20 searches, each step of which is a
few vector operations over the 50 or 100 queries; the whole path is flipped at once from per-column bitmasks of
the rows on it, with no backtracking loop. A greedy start (a row takes its cheapest column when no lower row
takes it too; dual-feasible, so optimality is kept) leaves only the clashing rows to search: on uniform random
costs about 2 search steps per 50x10 matrix and 4 per 100x20 one.

Speed on CPU, where a jitted loop pays per operation rather than per element: the batch is the minor (last)
axis of the solver's arrays, so every reduction runs over a major axis, vectorised over the batch; the costs are
copied into that layout once (the output of a cond, which XLA cannot fuse into the many consumers that would
each re-transpose them). `jax.vmap` of `linear_sum_assignment` / `match_padded` does not batch the loop
operation by operation: a custom vmap rule calls the batched solver, whose one loop runs until the matrix that
needs the most search steps is done.

Shapes: n queries (rows), m targets (columns), B batch. Costs are floating; the work is done in float32 (float64
when the input is float64 and `jax_enable_x64` is on).

Non-finite costs (scipy raises on NaN and -inf, and on +inf when no assignment avoids it; inside jit nothing can
raise, so instead):
  * +inf, NaN and entries >= LARGE (1e30 in float32, 1e250 in float64) count as "forbidden": they are replaced by
    BIG = hi + (k + 1) * gap, where [lo, hi] is the range of the other entries (of the valid targets), gap =
    max(hi - lo, 1e-3 * max(|lo|, |hi|)) (1 when that is 0) and k = min(n, m). BIG exceeds the cost difference
    of any two assignments of ordinary entries, so the result uses as few forbidden entries as possible, and
    among those it has the least ordinary cost. With no forbidden entry in the optimum it equals scipy's.
  * -inf and entries <= -LARGE mirror this: replaced by lo - (k + 1) * gap, i.e. used as often as possible.
  When both kinds occur, each counts with its stand-in's weight.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching, lax

_LARGE = {np.dtype(np.float32): 1e30, np.dtype(np.float64): 1e250}
_BITS = 32  # rows per word of the path bitmasks


class PaddedMatch(NamedTuple):
    """The assignment restricted to valid targets, shaped for a set-prediction loss."""
    query_for_target: jax.Array  # int32 [m]: the query matched to each target; -1 for invalid targets.
    matched_query: jax.Array  # bool [n]: True for queries matched to a valid target.


def _check_cost(cost: jax.Array, name: str, ndim: int) -> None:
    shape, dtype = getattr(cost, "shape", None), getattr(cost, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{name}: expected an array, got {type(cost).__name__}")
    if len(shape) != ndim:
        want = "[n, m]" if ndim == 2 else "[B, n, m]"
        raise ValueError(f"{name}: expected a {ndim}-D cost matrix {want}, got shape {tuple(shape)}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating dtype, got {dtype} (shape {tuple(shape)}); cast it first")


def _check_valid(valid: jax.Array, name: str, shape: tuple[int, ...]) -> None:
    vshape, dtype = getattr(valid, "shape", None), getattr(valid, "dtype", None)
    if vshape is None or tuple(vshape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} to match the cost's targets, got "
                         f"{None if vshape is None else tuple(vshape)}")
    if dtype != jnp.bool_:
        # An int or float mask might mean anything (0/1, lengths, additive): refuse rather than guess.
        raise TypeError(f"{name}: expected dtype bool, got {dtype}")


def _work_dtype(dtype) -> np.dtype:
    if dtype == jnp.float64 and jax.config.jax_enable_x64:
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _reduce(x: jax.Array, axis: int, op) -> jax.Array:
    """op-reduction (jnp.minimum / jnp.maximum) over one axis, first folded to <= 32 by elementwise op of its
    halves: XLA:CPU then reduces in one vectorised pass instead of a slow two-stage (reduce-window) one."""
    while x.shape[axis] > 32:
        h = -(-x.shape[axis] // 2)
        lo, hi = lax.slice_in_dim(x, 0, h, axis=axis), lax.slice_in_dim(x, h, x.shape[axis], axis=axis)
        if hi.shape[axis] < h:  # odd: repeat an element, which changes no minimum or maximum
            hi = jnp.concatenate([hi, lax.slice_in_dim(lo, 0, 1, axis=axis)], axis)
        x = op(lo, hi)
    return (jnp.min if op is jnp.minimum else jnp.max)(x, axis=axis)


def _sanitize(cost: jax.Array, row_valid: jax.Array) -> jax.Array:
    """cost [r, c, B] with +inf / NaN / >= LARGE entries replaced by BIG and <= -LARGE ones by SMALL (module
    docstring), and the invalid rows (row_valid bool [r, B] False) zeroed."""
    r, c, _ = cost.shape
    large = _LARGE[cost.dtype]
    ordinary = (jnp.abs(cost) < large) & row_valid[:, None]  # False for NaN too
    lo = _reduce(_reduce(jnp.where(ordinary, cost, jnp.inf), 1, jnp.minimum), 0, jnp.minimum)
    hi = _reduce(_reduce(jnp.where(ordinary, cost, -jnp.inf), 1, jnp.maximum), 0, jnp.maximum)
    some = lo <= hi  # False when no valid row has an ordinary entry
    lo, hi = jnp.where(some, lo, 0.0), jnp.where(some, hi, 0.0)
    gap = jnp.maximum(hi - lo, 1e-3 * jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
    gap = jnp.where(gap > 0, gap, 1.0) * (min(r, c) + 1)
    out = jnp.where(jnp.isnan(cost) | (cost >= large), hi + gap, jnp.where(cost <= -large, lo - gap, cost))
    return jnp.where(row_valid[:, None], out, 0.0).astype(cost.dtype)


def _batch_minor(view: jax.Array, row_valid: jax.Array, ordinary: jax.Array) -> jax.Array:
    """The costs [r, c, B] with the batch last, copied once from `view` (a transposed view of the caller's
    [B, n, m]) and sanitized unless `ordinary` (bool []: no valid entry is non-finite or huge).

    The copy is the output of a cond, which XLA cannot fuse into its consumers: otherwise it re-transposes the
    costs in every fusion that reads them, and on CPU each transposing pass costs as much as the greedy start.
    """
    if view.size == 0:
        return view
    return lax.cond(ordinary, lambda v: v, lambda v: _sanitize(v, row_valid), view)


def _all_ordinary(cost: jax.Array, target_valid: jax.Array | None = None) -> jax.Array:
    """bool []: every entry of cost [B, n, m] (of the valid targets, target_valid bool [B, m]) is finite and
    within +-LARGE. Sums of |cost| in the caller's layout: NaN and inf propagate; a sum >= LARGE only costs the
    slow path. The mask is applied to the per-target sums, not to the costs: a masked copy is another pass."""
    if target_valid is None:
        return jnp.sum(jnp.abs(cost)) < _LARGE[cost.dtype]
    per_target = jnp.sum(jnp.abs(cost), axis=1)  # [B, m]
    return jnp.sum(jnp.where(target_valid, per_target, 0.0)) < _LARGE[cost.dtype]


def _solve(cost: jax.Array, row_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Min-cost assignment of the valid rows of a batch of costs [r, c, B] (batch last, finite in valid rows)
    to distinct columns. row_valid bool [r, B]. Returns (col4row int32 [r, B], row4col int32 [c, B]), -1 for
    unmatched; valid rows beyond the c-th of a matrix stay unmatched."""
    r, c, b = cost.shape
    dtype = cost.dtype
    if r == 0 or c == 0 or b == 0:
        return jnp.full((r, b), -1, jnp.int32), jnp.full((c, b), -1, jnp.int32)
    words = -(-r // _BITS)
    bidx = jnp.arange(b, dtype=jnp.int32)[None]  # [1, B]
    rows = jnp.arange(r, dtype=jnp.int32)[:, None]  # [r, 1]
    cols = jnp.arange(c, dtype=jnp.int32)[:, None]  # [c, 1]
    cols_f = cols.astype(dtype)

    def bit(i: jax.Array) -> jax.Array:
        """uint32 [words, B]: the bitmask of row i [B]."""
        w = jnp.arange(words, dtype=jnp.int32)[:, None]
        return jnp.where(w == (i >> 5), jnp.left_shift(jnp.uint32(1), (i & 31).astype(jnp.uint32)), jnp.uint32(0))

    def has(mask: jax.Array, i: jax.Array) -> jax.Array:
        """bool [c, B]: is row i [c, B] in the bitmask [words, B]?"""
        if words == 1:
            word = mask[0]
        else:
            word = jnp.take_along_axis(mask, i >> 5, axis=0, mode="promise_in_bounds")
        return (jnp.right_shift(word, (i & 31).astype(jnp.uint32)) & 1) == 1

    def at(x: jax.Array, j: jax.Array) -> jax.Array:
        """x[j[b], ..., b] for x [c, ..., B] and j int [B]."""
        idx = j.reshape((1,) + (1,) * (x.ndim - 2) + (b,))
        idx = jnp.broadcast_to(idx, (1,) + x.shape[1:])
        return jnp.take_along_axis(x, idx, axis=0, mode="promise_in_bounds")[0]

    # Greedy start with v = 0 and u = row minima: a row whose cheapest column no lower valid row also takes is
    # matched there (tight, and every reduced cost stays >= 0). Unmatched columns keep v = 0, as the
    # rectangular problem's optimality needs.
    # Reductions in float: XLA:CPU's integer reductions are several times slower here.
    rows_f = rows.astype(dtype)
    rowmin = jnp.min(cost, axis=1)  # [r, B]
    first_min = jnp.min(jnp.where(cost == rowmin[:, None], cols_f[None], c), axis=1)
    first_min = jnp.where(row_valid, first_min, -1 - rows_f).astype(jnp.int32)  # [r, B]; invalid: unique picks
    earlier = (first_min[None] == first_min[:, None]) & (rows[None] < rows[:, None])  # [r, r', B]: r' < r picks it
    take = row_valid & (jnp.max(jnp.where(earlier, 1.0, 0.0), axis=1) == 0)
    row4col = jnp.full((c, b), -1, jnp.int32).at[jnp.where(take, first_min, c), bidx].set(
        jnp.broadcast_to(rows, (r, b)), mode="drop")
    pending = row_valid & ~take
    # Searches run over the pending rows in index order, at most as many as there are free columns.
    rank = jnp.cumsum(pending.astype(jnp.int32), axis=0) - 1
    n_search = jnp.minimum(jnp.sum(pending, axis=0), c - jnp.sum(take, axis=0)).astype(jnp.int32)  # [B]
    ks = jnp.arange(r + 1, dtype=jnp.int32)[:, None, None]
    # [r + 1, B]; past the last search it holds row r - 1, which is never read for a finished matrix.
    queue = _reduce(jnp.where(pending[None] & (rank[None] == ks), rows_f[None], r - 1), 1, jnp.minimum)
    queue = queue.astype(jnp.int32)

    # Loop state, per column j and matrix b: minv = shortest reduced path length found so far (NaN once the
    # column is in the tree), v = column potential, r4c = matched row (-1 = free), path = row the shortest path
    # reached j from, pm = bitmask of the rows on that path (to flip the whole path at once, no backtracking
    # loop); per matrix k, jprev: search k is at the row matched to column jprev (-1: at its root).
    # Row potentials are implicit: u_i = cost[i, j] - v[j] on the matched edge (i, j), which stays tight.
    init = (jnp.full((c, b), jnp.inf, dtype), jnp.zeros((c, b), dtype), row4col, jnp.zeros((c, b), jnp.int32),
            jnp.zeros((c, words, b), jnp.uint32), jnp.zeros((b,), jnp.int32), jnp.full((b,), -1, jnp.int32))

    def step(carry):
        minv, v, r4c, path, pm, k, jprev = carry
        done = k >= n_search
        root = jprev < 0
        jp = jnp.maximum(jprev, 0)
        i = jnp.where(root, at(queue, k), at(r4c, jp))  # [B] row being scanned
        cost_i = at(cost, i)  # [c, B]
        u_i = jnp.where(root, 0.0, at(cost_i - v, jp)).astype(dtype)
        pm_i = jnp.where(root[None], jnp.uint32(0), at(pm, jp)) | bit(i)
        used = jnp.isnan(minv)
        reduced = cost_i - u_i - v
        better = reduced < minv  # never for used columns: NaN compares False
        minv = jnp.where(better, reduced, minv)
        path = jnp.where(better, i, path)
        pm = jnp.where(better[:, None], pm_i[None], pm)
        cand = jnp.where(used, jnp.inf, minv)
        delta = _reduce(cand, 0, jnp.minimum)
        # Among equally short paths prefer one ending at a free column: ties (small integer costs) end sooner.
        key = jnp.where(cand == delta, jnp.where(r4c < 0, cols_f, cols_f + c), 3 * c)
        jj = _reduce(key, 0, jnp.minimum).astype(jnp.int32)
        found = jj < c
        j = jnp.where(found, jj, jj - c)
        v = jnp.where(used, v - delta, v)
        minv = jnp.where(cols == j, jnp.nan, minv - delta)
        # Free column j reached: every column on the path takes the row it was reached from.
        on_path = (cols == j) | ((r4c >= 0) & has(at(pm, j), jnp.maximum(r4c, 0)))
        new = (jnp.where(found, jnp.inf, minv), v, jnp.where(found & on_path, path, r4c), path, pm,
               jnp.where(found, k + 1, k), jnp.where(found, -1, j))
        return tuple(jnp.where(done, old, nw) for old, nw in zip(carry, new))

    def running(carry):
        return _reduce(jnp.where(carry[5] < n_search, 1.0, 0.0), 0, jnp.maximum) > 0

    # One loop for the batch: it runs until the matrix needing the most search steps is done.
    row4col = lax.while_loop(running, step, init)[2]
    col4row = jnp.full((r, b), -1, jnp.int32).at[jnp.where(row4col >= 0, row4col, r), bidx].set(
        jnp.broadcast_to(cols, (c, b)), mode="drop")
    return col4row, row4col


@jax.jit  # one program when called eagerly; inlined into an enclosing jit
def _lsa_batched(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
    """linear_sum_assignment over a batch: cost [B, n, m] -> (row_ind, col_ind) int32 [B, min(n, m)]."""
    bsz, n, m = cost.shape
    x = cost.astype(_work_dtype(cost.dtype))
    if n <= m:
        valid = jnp.ones((n, bsz), bool)
        col4row, _ = _solve(_batch_minor(jnp.transpose(x, (1, 2, 0)), valid, _all_ordinary(x)), valid)
        return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (bsz, n)), col4row.T
    # More rows than columns: augment the columns, so the searches run over min(n, m).
    valid = jnp.ones((m, bsz), bool)
    row_for_col, _ = _solve(_batch_minor(jnp.transpose(x, (2, 1, 0)), valid, _all_ordinary(x)), valid)
    # Sort the pairs by row: the rank of each pair, then a one-hot permutation (cheaper than a sort here).
    rank = jnp.sum(row_for_col[None, :] < row_for_col[:, None], axis=1)  # [m, B]
    onehot = rank[None] == jnp.arange(m)[:, None, None]  # [position, pair, B]
    row_ind = jnp.sum(jnp.where(onehot, row_for_col[None], 0), axis=1)
    col_ind = jnp.sum(jnp.where(onehot, jnp.arange(m)[None, :, None], 0), axis=1)
    return row_ind.T.astype(jnp.int32), col_ind.T.astype(jnp.int32)


@custom_batching.custom_vmap
def _lsa_one(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
    row_ind, col_ind = _lsa_batched(cost[None])
    return row_ind[0], col_ind[0]


@_lsa_one.def_vmap
def _lsa_vmap(axis_size: int, in_batched: list, cost: jax.Array):
    return _lsa_batched(cost), (True, True)


def linear_sum_assignment(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(row_ind, col_ind), both int32 [min(n, m)], of a minimum-cost assignment of cost float [n, m], rows
    ascending, as `scipy.optimize.linear_sum_assignment` (on ties any optimal assignment; non-finite entries as
    in the module docstring). jit- and vmap-able; under vmap the whole batch runs in one batched solver."""
    _check_cost(cost, "linear_sum_assignment: cost", 2)
    # The assignment is piecewise constant in the costs: no gradient, and under jax.grad the solver then runs
    # (and is compiled) as it is outside it.
    return _lsa_one(lax.stop_gradient(jnp.asarray(cost)))


@jax.jit
def _match_batched(cost: jax.Array, target_valid: jax.Array) -> PaddedMatch:
    """match_padded over a batch: cost [B, n, m], target_valid bool [B, m]."""
    x = cost.astype(_work_dtype(cost.dtype))
    valid = target_valid.T
    # Targets are the searched rows: only valid ones start a search, so padding never enters the assignment,
    # and its costs, which may be anything, are left out of the checks and zeroed.
    ordinary = _all_ordinary(x, target_valid)
    query_for_target, target_for_query = _solve(_batch_minor(jnp.transpose(x, (2, 1, 0)), valid, ordinary), valid)
    return PaddedMatch(query_for_target.T, target_for_query.T >= 0)


@custom_batching.custom_vmap
def _match_one(cost: jax.Array, target_valid: jax.Array) -> PaddedMatch:
    out = _match_batched(cost[None], target_valid[None])
    return PaddedMatch(out.query_for_target[0], out.matched_query[0])


@_match_one.def_vmap
def _match_vmap(axis_size: int, in_batched: list, cost: jax.Array, target_valid: jax.Array):
    # A mask shared by the whole batch (vmapped over the cost only) is broadcast, and vice versa.
    if not in_batched[0]:
        cost = jnp.broadcast_to(cost, (axis_size,) + cost.shape)
    if not in_batched[1]:
        target_valid = jnp.broadcast_to(target_valid, (axis_size,) + target_valid.shape)
    return _match_batched(cost, target_valid), PaddedMatch(True, True)


def match_padded(cost: jax.Array, target_valid: jax.Array) -> PaddedMatch:
    """Minimum-cost matching of queries to the valid targets only: cost float [n, m], target_valid bool [m].

    Invalid (padding) targets are never matched and their costs, NaN included, are never read; the valid ones
    are matched at the minimum total cost, that of `linear_sum_assignment(cost[:, target_valid])`. Needs at most
    n valid targets (the caller checks: inside jit this cannot raise); with more, the result is a valid but not
    optimal matching of n of them. jit- and vmap-able.
    """
    _check_cost(cost, "match_padded: cost", 2)
    _check_valid(target_valid, "match_padded: target_valid", (cost.shape[1],))
    return _match_one(lax.stop_gradient(jnp.asarray(cost)), jnp.asarray(target_valid))


def batched_match(cost: jax.Array, target_valid: jax.Array) -> PaddedMatch:
    """`match_padded` over a batch: cost float [B, n, m], target_valid bool [B, m] -> PaddedMatch of
    query_for_target int32 [B, m] and matched_query bool [B, n]. Same as `jax.vmap(match_padded)`."""
    _check_cost(cost, "batched_match: cost", 3)
    _check_valid(target_valid, "batched_match: target_valid", (cost.shape[0], cost.shape[2]))
    out = _match_batched(lax.stop_gradient(jnp.asarray(cost)), jnp.asarray(target_valid))
    chex.assert_shape(out.query_for_target, target_valid.shape)
    return out
