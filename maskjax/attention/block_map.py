"""Block maps: which (query block, key block) tiles of a mask are empty, partial or full.

Computed by evaluating the mask function one query-block row at a time (never n x n at once), with
numpy results at trace time when the mask is static (cached) and with jnp on device when it is traced.

Example::

    bm = causal().block_map(1000, 1000, 128, 128)
    bm.kind[0, 0]          # int8 [8, 8]: 2 on the diagonal's left, 1 on it, 0 right of it
    bm.kv_indices[0, 0, 3], bm.kv_counts[0, 0, 3]   # [0, 1, 2, 3, 3, 3, ...], 4
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMap:
    """Block structure of a mask for (q_len, k_len, block_q, block_k).

    nq = ceil(q_len / block_q), nk = ceil(k_len / block_k); Bm in {1, batch}, Hm in {1, heads}
    (1 when the mask does not vary along that axis: index with ``b if Bm > 1 else 0``).

    kind:       int8  [Bm, Hm, nq, nk]   EMPTY=0 / PARTIAL=1 / FULL=2. Padding keys (>= k_len) count as
                masked, padding queries (>= q_len) are ignored; so a block containing padding keys is
                never FULL.
    kv_indices: int32 [Bm, Hm, nq, max_kv] non-empty key blocks of each query block, ascending; slots
                >= kv_counts repeat the last valid index (0 if the row is empty), so a kernel that keeps
                stepping fetches nothing new.
    kv_kinds:   int8  [Bm, Hm, nq, max_kv] kind of each listed block; EMPTY in padding slots.
    kv_counts:  int32 [Bm, Hm, nq].
    q_indices, q_kinds: [Bm, Hm, nk, max_q], q_counts: [Bm, Hm, nk]: the same per key block (for the
                dK/dV backward pass).
    max_kv / max_q: static; for a static mask the largest count (>= 1), for a traced one nk / nq.
    is_static: arrays are numpy (known at trace time).
    """

    kind: Any
    kv_indices: Any
    kv_kinds: Any
    kv_counts: Any
    q_indices: Any
    q_kinds: Any
    q_counts: Any
    q_len: int = dataclasses.field(metadata=dict(static=True))
    k_len: int = dataclasses.field(metadata=dict(static=True))
    block_q: int = dataclasses.field(metadata=dict(static=True))
    block_k: int = dataclasses.field(metadata=dict(static=True))
    is_static: bool = dataclasses.field(metadata=dict(static=True))

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.k_len // self.block_k)

    @property
    def max_kv(self) -> int:
        return self.kv_indices.shape[-1]

    @property
    def max_q(self) -> int:
        return self.q_indices.shape[-1]

    def block_density(self):
        """Fraction of non-empty blocks, per [Bm, Hm]."""
        xp = np if self.is_static else jnp
        return xp.mean((self.kind > 0).astype(xp.float32), axis=(-2, -1))

    def num_nonempty(self):
        xp = np if self.is_static else jnp
        return xp.sum(self.kind > 0, axis=(-2, -1))

    def pairs(self):
        """Non-empty blocks as a list sorted by (q block, kv block), per (b, h).

        Returns (q_block int32 [Bm, Hm, P], kv_block int32 [Bm, Hm, P], kind int8 [Bm, Hm, P],
        count int32 [Bm, Hm]); P is the largest count (static) or nq * nk (traced); padding entries
        repeat the last valid pair with kind EMPTY.
        """
        if self.is_static:
            return _pairs_np(self.kind)
        return _pairs_jnp(self.kind)


def _lists_np(kind: np.ndarray):
    nonempty = kind > 0
    counts = nonempty.sum(-1).astype(np.int32)
    order = np.argsort(~nonempty, axis=-1, kind="stable").astype(np.int32)
    width = max(1, int(counts.max()) if counts.size else 1)
    order = order[..., :width]
    j = np.arange(width)
    last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], axis=-1)
    idx = np.where(j < counts[..., None], order, last).astype(np.int32)
    kinds = np.where(j < counts[..., None], np.take_along_axis(kind, idx, axis=-1), EMPTY).astype(np.int8)
    return idx, kinds, counts


def _lists_jnp(kind: jax.Array):
    nonempty = kind > 0
    counts = nonempty.sum(-1).astype(jnp.int32)
    order = jnp.argsort(~nonempty, axis=-1, stable=True).astype(jnp.int32)
    j = jnp.arange(kind.shape[-1])
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    idx = jnp.where(j < counts[..., None], order, last).astype(jnp.int32)
    kinds = jnp.where(j < counts[..., None], jnp.take_along_axis(kind, idx, axis=-1), EMPTY).astype(jnp.int8)
    return idx, kinds, counts


def _pairs_np(kind: np.ndarray):
    n_b, n_h, nq, nk = kind.shape
    flat = kind.reshape(n_b, n_h, nq * nk)
    idx, kinds, counts = _lists_np(flat)
    return (idx // nk).astype(np.int32), (idx % nk).astype(np.int32), kinds, counts


def _pairs_jnp(kind: jax.Array):
    n_b, n_h, nq, nk = kind.shape
    flat = kind.reshape(n_b, n_h, nq * nk)
    idx, kinds, counts = _lists_jnp(flat)
    return (idx // nk).astype(jnp.int32), (idx % nk).astype(jnp.int32), kinds, counts


def _block_kinds(mask, q_len: int, k_len: int, block_q: int, block_k: int, n_b: int, n_h: int):
    """int8 [n_b, n_h, nq, nk] by evaluating the mask one query-block row at a time (jnp)."""
    nq, nk = -(-q_len // block_q), -(-k_len // block_k)
    q_pad, k_pad = nq * block_q, nk * block_k
    padded = mask.padded(q_pad, k_pad)
    kv_idx = jnp.arange(k_pad, dtype=jnp.int32)[None, :]
    # Rows per lax.map step: bound the live mask slab to ~16M elements.
    rows_per_step = max(1, min(nq, (1 << 24) // max(1, n_b * n_h * block_q * k_pad)))

    def row(i):
        q_idx = i * block_q + jnp.arange(block_q, dtype=jnp.int32)[:, None]

        def one(b, h):
            sel = padded.select(b, h).slice_blocks(i * block_q, block_q, 0, k_pad)
            m = sel.evaluate(b, h, q_idx, kv_idx) & (kv_idx < k_len)
            valid = q_idx < q_len
            any_ = (m & valid).reshape(block_q, nk, block_k).any(axis=(0, 2))
            all_ = (m | ~valid).reshape(block_q, nk, block_k).all(axis=(0, 2))
            return jnp.where(all_, FULL, jnp.where(any_, PARTIAL, EMPTY)).astype(jnp.int8)

        bs = jnp.arange(n_b, dtype=jnp.int32)
        hs = jnp.arange(n_h, dtype=jnp.int32)
        return jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None))(bs, hs)

    rows = jax.lax.map(row, jnp.arange(nq, dtype=jnp.int32), batch_size=rows_per_step)
    return jnp.transpose(rows, (1, 2, 0, 3))


_CACHE: "collections.OrderedDict[Any, BlockMap]" = collections.OrderedDict()
_CACHE_SIZE = 64


def compute_block_map(mask, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int = 1,
                      heads: int = 1) -> BlockMap:
    """Block map of ``mask`` (see :class:`BlockMap`). numpy + cached for static masks."""
    for name, val in (("q_len", q_len), ("k_len", k_len), ("block_q", block_q), ("block_k", block_k),
                      ("batch", batch), ("heads", heads)):
        if not isinstance(val, (int, np.integer)) or val <= 0:
            raise ValueError(f"block_map: {name} must be a positive int, got {val!r}")
    mask.check(batch, heads, q_len, k_len)
    dep_b, dep_h = mask.depends_on()
    n_b, n_h = (batch if dep_b else 1), (heads if dep_h else 1)

    if mask.is_static():
        key = (mask.cache_key(), q_len, k_len, block_q, block_k, n_b, n_h)
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
        with jax.ensure_compile_time_eval():
            kind = np.asarray(jax.jit(_block_kinds, static_argnums=(1, 2, 3, 4, 5, 6))(
                mask, q_len, k_len, block_q, block_k, n_b, n_h))
        kv_idx, kv_kinds, kv_counts = _lists_np(kind)
        q_idx, q_kinds, q_counts = _lists_np(np.swapaxes(kind, -1, -2))
        result = BlockMap(kind, kv_idx, kv_kinds, kv_counts, q_idx, q_kinds, q_counts,
                          q_len, k_len, block_q, block_k, True)
        _CACHE[key] = result
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return result

    kind = _block_kinds(mask, q_len, k_len, block_q, block_k, n_b, n_h)
    kv_idx, kv_kinds, kv_counts = _lists_jnp(kind)
    q_idx, q_kinds, q_counts = _lists_jnp(jnp.swapaxes(kind, -1, -2))
    return BlockMap(kind, kv_idx, kv_kinds, kv_counts, q_idx, q_kinds, q_counts,
                    q_len, k_len, block_q, block_k, False)


def block_kinds_from_dense(dense: np.ndarray, block_q: int, block_k: int) -> np.ndarray:
    """Block kinds of a dense bool mask [..., q_len, k_len] (numpy; used by tests and benchmarks as
    an independent construction)."""
    *lead, q_len, k_len = dense.shape
    nq, nk = -(-q_len // block_q), -(-k_len // block_k)
    m = np.zeros(tuple(lead) + (nq * block_q, nk * block_k), bool)
    m[..., :q_len, :k_len] = dense
    valid = np.zeros(nq * block_q, bool)
    valid[:q_len] = True
    valid = valid[:, None]
    any_ = (m & valid).reshape(*lead, nq, block_q, nk, block_k).any(axis=(-3, -1))
    all_ = (m | ~valid).reshape(*lead, nq, block_q, nk, block_k).all(axis=(-3, -1))
    return np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY)).astype(np.int8)


__all__ = ["BlockMap", "EMPTY", "PARTIAL", "FULL", "compute_block_map", "block_kinds_from_dense"]
