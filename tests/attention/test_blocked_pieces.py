"""blocked: the piece decomposition (FULL rectangles of several query blocks, masked pieces on a causal-like
diagonal) and its forward / backward, at sizes where the defaults would hand every tile to the pairs.

The module's piece sizes are shrunk with monkeypatch so that small masks exercise multi-row pieces, several
piece widths, masked pieces in both mask modes (trace-time table and per-piece evaluation), padded per-head
piece lists and fixed key slices; values and gradients are compared with the dense jnp reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.attention import block_map as bmap
from maskjax.attention import blocked as B
from maskjax.attention import masks as M
from maskjax.attention import score_mods as S
from tests.attention import np_reference as R
from tests.attention.test_masks import KINDS, _expected


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of up to 2 query blocks and 12 scores per (batch, head); no minimum piece size."""
    monkeypatch.setattr(B, "_PIECE_ROWS", 4)
    monkeypatch.setattr(B, "_PIECE_ELEMS", 24)
    monkeypatch.setattr(B, "_STEP_ELEMS", 1 << 20)
    monkeypatch.setattr(B, "_MIN_PIECE_ELEMS", 0)


def _check_cover(kind, rows, max_w):
    """Every non-empty tile is in exactly one piece or left (PARTIAL) to the pairs; FULL pieces hold only FULL
    tiles; the per-piece tile counts are right."""
    pieces, rest = B._pieces(kind, rows, max_w)
    n_b, n_h = kind.shape[:2]
    cover = (rest != bmap.EMPTY).astype(int)
    assert np.all((rest == bmap.EMPTY) | (rest == bmap.PARTIAL))
    for masked, r, w, pi, pj, valid, n_t, n_p, padded, fixed in pieces:
        assert padded == bool((valid == 0).any())
        assert not fixed or np.all(pj == pj.flat[0])
        for b in range(n_b):
            for h in range(n_h):
                for i, j, ok, t, p in zip(pi[b, h], pj[b, h], valid[b, h], n_t[b, h], n_p[b, h]):
                    if not ok:
                        continue
                    reg = kind[b, h, i:i + r, j:j + w]
                    assert reg.shape == (r, w)
                    assert masked or np.all(reg == bmap.FULL)
                    assert t == (reg != bmap.EMPTY).sum() and p == (reg == bmap.PARTIAL).sum()
                    cover[b, h, i:i + r, j:j + w] += reg != bmap.EMPTY
    np.testing.assert_array_equal(cover, kind != bmap.EMPTY)
    return pieces, rest


def test_pieces_cover_every_nonempty_tile_once():
    rng = np.random.default_rng(0)
    for trial in range(300):
        nq, nk = rng.integers(1, 12, 2)
        kind = rng.integers(0, 3, (2, 3, nq, nk)).astype(np.int8)
        if trial % 3 == 1:
            kind = np.where(rng.random(kind.shape) < 0.8, bmap.FULL, kind).astype(np.int8)
        elif trial % 3 == 2:
            i, j = np.meshgrid(np.arange(nq), np.arange(nk), indexing="ij")
            kind[:] = np.where(j < i, bmap.FULL, np.where(j == i, bmap.PARTIAL, bmap.EMPTY))
        _check_cover(kind, int(rng.integers(1, 7)), int(rng.integers(1, 6)))


def test_causal_map_is_full_pieces_and_masked_diagonal_pieces():
    """At the default sizes a causal map at n = 4096 / 128-token blocks needs no pair: FULL rectangles of 4
    query blocks and one masked 4 x 4 piece per group on the diagonal; no mask is 16 pieces of 4 x 16 blocks."""
    kind = np.asarray(M.causal().block_map(4096, 4096, 128, 128).kind)
    rows = B._PIECE_ROWS // 128
    max_w = B._PIECE_ELEMS // (rows * 128 * 128)
    pieces, rest = _check_cover(kind, rows, max_w)
    assert not (rest != bmap.EMPTY).any()
    shapes = {(m, r, w): int(v.sum()) for m, r, w, _, _, v, *_ in pieces}
    assert shapes[(True, 4, 4)] == 8 and all(r == 4 for _, r, _ in shapes)
    full = np.full((1, 1, 32, 32), bmap.FULL, np.int8)
    pieces, rest = _check_cover(full, rows, max_w)
    assert [(m, r, w, int(v.sum()), fixed) for m, r, w, _, _, v, _, _, _, fixed in pieces] == \
        [(False, 4, 16, 16, False)]


@pytest.mark.parametrize("kind, tile_table", [(k, i % 2 == 0) for i, k in enumerate(KINDS)])
def test_pieces_match_dense_reference(small_pieces, kind, tile_table):
    mask, q_len, k_len, expected = _expected(kind)
    heads = expected.shape[1]
    rng = np.random.default_rng(len(kind))
    q = jnp.asarray(rng.normal(size=(2, q_len, heads, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, k_len, heads, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, k_len, heads, 8)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(1, heads, q_len, k_len)), jnp.float32)
    cap = jnp.float32(3.0)
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    live = expected.any(-1).transpose(0, 2, 1)[..., None]  # [b, q, h, 1]

    def run(fn):
        @jax.jit
        def go(q, k, v, bias, cap, cot):
            out, vjp = jax.vjp(fn, q, k, v, bias, cap)
            return out, vjp(cot)
        return go(q, k, v, bias, cap, cot)

    got, got_g = run(lambda q, k, v, b, c: B.blocked_attention(
        q, k, v, mask, b, score_mod=S.soft_cap(c), block_q=2, block_k=3, tile_table=tile_table))
    want, want_g = run(lambda q, k, v, b, c: R.dense_attention(
        q, k, v, expected, b, score_fn=lambda s: c * jnp.tanh(s / c)))
    np.testing.assert_allclose(np.where(live, got, 0), np.where(live, want, 0), atol=2e-5, rtol=2e-5)
    for a, b, what in zip(got_g, want_g, "qkvbc"):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4, err_msg=what)
    _, stats = jax.jit(lambda q, k, v: B.blocked_attention(q, k, v, mask, block_q=2, block_k=3,
                                                           return_stats=True, tile_table=tile_table))(q, k, v)
    kinds = R.np_block_kinds(expected, 2, 3)
    np.testing.assert_array_equal(np.asarray(stats["tiles"]), (kinds > 0).sum((-1, -2)))
    np.testing.assert_array_equal(np.asarray(stats["masked_tiles"]), (kinds == 1).sum((-1, -2)))


def test_pieces_gqa_bf16_and_fully_masked_rows(small_pieces):
    """GQA, bfloat16 inputs, a causal mask with lengths (dead rows): zeros and zero gradients there."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(2, 21, 4, 8)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(2, 18, 2, 8)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(2, 18, 2, 8)), jnp.bfloat16)
    mask = M.lengths(q_lengths=np.array([17, 21]), kv_lengths=np.array([18, 0])) & M.causal(offset=-2)
    dense = (R.np_lengths(21, 18, [17, 21], [18, 0]) & R.np_causal(21, 18, -2)[None])[:, None]
    cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def run(fn):
        @jax.jit
        def go(q, k, v):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, vjp(cot.astype(out.dtype))
        return go(q, k, v)

    out, grads = run(lambda q, k, v: B.blocked_attention(q, k, v, mask, block_q=2, block_k=2))
    f32 = lambda x: x.astype(jnp.float32)
    want, _ = run(lambda q, k, v: R.dense_attention(f32(q), jnp.repeat(f32(k), 2, 2), jnp.repeat(f32(v), 2, 2), dense))
    dead = ~dense[:, 0].any(-1)  # [b, q]
    out32 = np.asarray(out, np.float32)
    assert not np.isnan(out32).any() and np.all(out32[dead] == 0)
    np.testing.assert_allclose(out32[~dead], np.asarray(want, np.float32)[~dead], atol=3e-2, rtol=3e-2)
    assert np.all(np.asarray(grads[0], np.float32)[dead] == 0)
    assert np.all(np.asarray(grads[1], np.float32)[1] == 0)


def test_default_pieces_match_reference_at_block_128():
    """The default piece sizes (no monkeypatch) on a causal and an unmasked problem with 128-token blocks and
    a ragged length (padded key block), against the dense reference."""
    rng = np.random.default_rng(4)
    n = 1000
    q, k, v, cot = (jnp.asarray(rng.normal(size=(1, n, 2, 16)), jnp.float32) for _ in range(4))
    for mask, dense in ((None, None), (M.causal(), R.np_causal(n, n)[None, None])):
        def run(fn):
            @jax.jit
            def go(q, k, v):
                out, vjp = jax.vjp(fn, q, k, v)
                return out, vjp(cot)
            return go(q, k, v)

        got, got_g = run(lambda q, k, v: B.blocked_attention(q, k, v, mask, block_q=128, block_k=128))
        want, want_g = run(lambda q, k, v: R.dense_attention(q, k, v, dense))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
        for a, b in zip(got_g, want_g):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
