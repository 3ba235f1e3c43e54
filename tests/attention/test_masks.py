"""The mask language against dense masks written out independently in numpy (np_reference.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.attention import block_map as bmap
from maskjax.attention import masks as M
from tests.attention import np_reference as R

RNG = np.random.default_rng(0)
SEG = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1], [0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3]])
GROUPS = np.array([[0, 0, 1, 1, 1, 2, 2, 0, 1, 2, 2], [2, 2, 2, 1, 1, 0, 0, 0, 0, 1, 1]])
ALLOWED = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 1]], bool)
QMASK = RNG.random((2, 11, 13)) < 0.3
QMASK[0, 2] = False
QMASK[1, 5] = False
DENSE4 = RNG.random((2, 3, 11, 13)) < 0.5


def _expected(name):
    """(mask, q_len, k_len, batch, heads, expected dense [batch, heads, q, k])."""
    b4 = lambda x: np.broadcast_to(x, (2, 3) + x.shape[-2:])
    if name == "full":
        return M.full(), 11, 13, b4(np.ones((11, 13), bool))
    if name == "causal":
        return M.causal(), 11, 11, b4(R.np_causal(11, 11))
    if name == "causal_offset":
        return M.causal(offset=2), 11, 13, b4(R.np_causal(11, 13, 2))
    if name == "prefix_lm":
        return M.prefix_lm(4), 11, 11, b4(R.np_prefix_lm(11, 4))
    if name == "prefix_lm_batch":
        exp = np.stack([R.np_prefix_lm(11, 2), R.np_prefix_lm(11, 7)])[:, None]
        return M.prefix_lm(np.array([2, 7])), 11, 11, b4(exp)
    if name == "local_1d":
        return M.local_1d(left=3, right=1), 11, 13, b4(R.np_local(11, 13, 3, 1))
    if name == "window_2d_row":
        m = M.window_2d(M.TokenGrid(4, 5, num_prefix=2), radius=(1, 2))
        return m, 22, 22, b4(R.np_window_2d(4, 5, 2, None, radius=(1, 2)))
    if name == "window_2d_tile_dilated":
        g = M.TokenGrid(4, 6, num_prefix=1, tile=(2, 3))
        m = M.window_2d(g, radius=(1, 1), dilation=(2, 1), prefix_sees_grid=False)
        return m, 25, 25, b4(R.np_window_2d(4, 6, 1, (2, 3), radius=(1, 1), dilation=(2, 1),
                                            prefix_sees_grid=False))
    if name == "window_2d_swin_shift":
        g = M.TokenGrid(6, 6, num_prefix=1)
        m = M.window_2d(g, mode="partition", window=(3, 3), shift=(1, 2), grid_sees_prefix=False)
        return m, 37, 37, b4(R.np_window_2d(6, 6, 1, None, mode="partition", window=(3, 3), shift=(1, 2),
                                            grid_sees_prefix=False))
    if name == "directional":
        m = M.directional_2d(M.TokenGrid(4, 4, num_prefix=1), directions=[0, 135, 270], fov=90)
        return m, 17, 17, np.broadcast_to(R.np_directional(4, 4, [0, 135, 270], 90, 1), (2, 3, 17, 17))
    if name == "directional_wide_far":
        m = M.directional_2d(M.TokenGrid(5, 4), directions=[45, 180, 300], fov=200, max_distance=2.5)
        exp = R.np_directional(5, 4, [45, 180, 300], 200, 0, max_distance=2.5)
        return m, 20, 20, np.broadcast_to(exp, (2, 3, 20, 20))
    if name == "segments":
        return M.segment_ids(SEG), 11, 11, b4(R.np_segments(SEG, SEG)[:, None])
    if name == "routing":
        m = M.group_routing(GROUPS, allowed=ALLOWED)
        return m, 11, 11, b4(R.np_routing(GROUPS, GROUPS, ALLOWED)[:, None])
    if name == "lengths":
        m = M.lengths(np.array([9, 11]), np.array([13, 4]))
        return m, 11, 13, b4(R.np_lengths(11, 13, [9, 11], [13, 4])[:, None])
    if name == "dense":
        return M.dense(DENSE4), 11, 13, DENSE4
    if name == "query_masks_fallback":
        exp = QMASK | ~QMASK.any(-1, keepdims=True)
        return M.query_masks(QMASK, fallback_to_all=True), 11, 13, b4(exp[:, None])
    if name == "query_masks":
        return M.query_masks(QMASK, fallback_to_all=False), 11, 13, b4(QMASK[:, None])
    if name == "function":
        m = M.function_mask(lambda b, h, q, k: ((q + 2 * k + h) % 3 == 0) | (b == 1))
        i, j = np.arange(11)[:, None], np.arange(13)[None]
        exp = np.stack([np.stack([((i + 2 * j + h) % 3 == 0) | (b == 1) for h in range(3)]) for b in range(2)])
        return m, 11, 13, exp
    if name == "function_arrays":
        keep = RNG.random((2, 13)) < 0.6
        m = M.function_mask(lambda b, h, q, k, kp: (kp != 0) & (k <= q + 3), keep, axes=("bk",))
        exp = keep[:, None, None, :] & R.np_causal(11, 13, 3)[None, None]
        return m, 11, 13, np.broadcast_to(exp, (2, 3, 11, 13))
    if name == "and_or_not":
        m = (M.causal() & ~M.local_1d(left=2, right=0)) | M.segment_ids(SEG)
        exp = (R.np_causal(11, 11) & ~R.np_local(11, 11, 2, 0))[None] | R.np_segments(SEG, SEG)
        return m, 11, 11, b4(exp[:, None])
    if name == "per_head":
        m = M.per_head([M.causal(), M.local_1d(left=1, right=1), M.segment_ids(SEG)])
        exp = np.stack([np.broadcast_to(R.np_causal(11, 11), (2, 11, 11)),
                        np.broadcast_to(R.np_local(11, 11, 1, 1), (2, 11, 11)), R.np_segments(SEG, SEG)], 1)
        return m, 11, 11, exp
    raise KeyError(name)


KINDS = ["full", "causal", "causal_offset", "prefix_lm", "prefix_lm_batch", "local_1d", "window_2d_row",
         "window_2d_tile_dilated", "window_2d_swin_shift", "directional", "directional_wide_far", "segments",
         "routing", "lengths", "dense", "query_masks_fallback", "query_masks", "function", "function_arrays",
         "and_or_not", "per_head"]


@pytest.mark.parametrize("name", KINDS)
def test_materialize_matches_numpy(name):
    mask, q_len, k_len, expected = _expected(name)
    got = mask.materialize(q_len, k_len, batch=2, heads=3)
    assert isinstance(got, np.ndarray) and got.dtype == bool
    np.testing.assert_array_equal(np.broadcast_to(got, expected.shape), expected)


@pytest.mark.parametrize("fov", [90, 180, 270])
def test_directional_edges_are_inside_eagerly_and_under_jit(fov):
    """Keys exactly on a view cone's edge (offsets perpendicular to a diagonal direction, or at 45 degrees from it)
    are inside both when evaluated eagerly and when XLA may fuse the multiply-adds under jit."""
    directions = list(range(0, 360, 45))
    mask = M.directional_2d(M.TokenGrid(8, 8), directions=directions, fov=fov)
    expected = R.np_directional(8, 8, directions, fov)
    eager = mask.materialize(64, 64, heads=len(directions), as_jax=True)
    jitted = jax.jit(lambda: mask.materialize(64, 64, heads=len(directions), as_jax=True))()
    np.testing.assert_array_equal(np.asarray(eager)[0], expected)
    np.testing.assert_array_equal(np.asarray(jitted)[0], expected)


@pytest.mark.parametrize("name", KINDS)
def test_block_map_matches_dense_construction(name):
    mask, q_len, k_len, expected = _expected(name)
    bq, bk = 4, 3
    bm = mask.block_map(q_len, k_len, bq, bk, batch=2, heads=3)
    want = R.np_block_kinds(expected, bq, bk)
    kind = np.broadcast_to(bm.kind, want.shape)
    np.testing.assert_array_equal(kind, want)
    # Lists: ascending non-empty indices, padding repeats the last one, counts consistent.
    for lists, counts, kinds_l, k2 in ((bm.kv_indices, bm.kv_counts, bm.kv_kinds, kind),
                                       (bm.q_indices, bm.q_counts, bm.q_kinds, np.swapaxes(kind, -1, -2))):
        lists = np.broadcast_to(lists, k2.shape[:-1] + lists.shape[-1:])
        counts = np.broadcast_to(counts, k2.shape[:-1])
        kinds_l = np.broadcast_to(kinds_l, lists.shape)
        for idx in np.ndindex(*k2.shape[:-1]):
            nz = np.nonzero(k2[idx])[0]
            assert counts[idx] == len(nz)
            np.testing.assert_array_equal(lists[idx][:len(nz)], nz)
            np.testing.assert_array_equal(kinds_l[idx][:len(nz)], k2[idx][nz])
            pad = lists[idx][len(nz):]
            assert np.all(pad == (nz[-1] if len(nz) else 0))
            assert np.all(kinds_l[idx][len(nz):] == 0)


def test_traced_masks_materialize_and_block_map_on_device():
    mask_np, q_len, k_len, expected = _expected("query_masks_fallback")

    @jax.jit
    def f(qm, seg):
        m = M.query_masks(qm, fallback_to_all=True) & M.segment_ids(seg, jnp.zeros((2, 13), jnp.int32))
        assert not m.is_static()
        bm = m.block_map(q_len, k_len, 4, 3, batch=2, heads=3)
        return m.materialize(q_len, k_len, batch=2, heads=3), bm.kind, bm.kv_indices, bm.kv_counts

    seg = np.zeros((2, 11), np.int32)
    seg[1, 7:] = 1
    dense, kind, kv_idx, kv_counts = f(jnp.asarray(QMASK), jnp.asarray(seg))
    want = expected[:, :1] & (seg[:, None, :, None] == 0)
    np.testing.assert_array_equal(np.asarray(dense), want)
    np.testing.assert_array_equal(np.asarray(kind), R.np_block_kinds(want, 4, 3))
    assert kv_idx.shape[-1] == 5  # traced: static upper bound nk
    np.testing.assert_array_equal(np.asarray(kv_counts), (R.np_block_kinds(want, 4, 3) > 0).sum(-1))


def test_masks_are_pytrees_hashable_and_composable():
    m = (M.causal() & M.segment_ids(SEG)) | ~M.local_1d(left=2)
    leaves, treedef = jax.tree.flatten(m)
    assert len(leaves) == 2 and all(isinstance(x, np.ndarray) for x in leaves)
    again = jax.tree.unflatten(treedef, leaves)
    assert again == m and hash(again) == hash(m)
    assert M.causal() != M.causal(offset=1)
    assert M.segment_ids(SEG) != M.segment_ids(SEG[::-1])
    assert len({M.causal(), M.causal(), M.full()}) == 2
    # Nested & flattens; layouts follow tree-leaves order.
    assert len((M.causal() & M.full() & M.local_1d(1)).children) == 3
    lay = m.leaf_layouts()
    assert [(l.q, l.kv) for l in lay] == [(True, False), (False, True)]


def test_mask_passed_through_jit_as_argument():
    m = M.segment_ids(SEG)

    @jax.jit
    def f(mask):
        return mask.materialize(11, 11, batch=2)

    np.testing.assert_array_equal(np.asarray(f(m))[:, 0], R.np_segments(SEG, SEG))


def test_leaf_block_protocol_reproduces_dense_mask():
    """Evaluate the way a kernel does: per (b, h, i, j) fetch leaf blocks by leaf_block_shape/index
    from the padded leaves, unflatten, evaluate with absolute positions; compare with numpy."""
    mask, q_len, k_len, expected = _expected("and_or_not")
    mask = mask & M.dense(DENSE4[..., :11, :11]) | M.per_head([M.full(), M.causal(), M.full()]) & M.causal(-5)
    expected = expected & DENSE4[..., :11, :11] | (np.array([1, 1, 1])[:, None, None].astype(bool)
                                                   & (np.array([[1], [1], [1]])[:, :, None] > 0)
                                                   & R.np_causal(11, 11, -5)[None])[None]
    bq, bk = 4, 8
    q_pad, k_pad = 12, 16
    padded = mask.padded(q_pad, k_pad)
    leaves, treedef = jax.tree.flatten(padded)
    layouts = padded.leaf_layouts()
    got = np.zeros((2, 3, q_pad, k_pad), bool)
    for b in range(2):
        for h in range(3):
            for i in range(q_pad // bq):
                for j in range(k_pad // bk):
                    blocks = []
                    for leaf, lay in zip(leaves, layouts):
                        shape = M.leaf_block_shape(leaf.shape, lay, bq, bk)
                        index = M.leaf_block_index(leaf.shape, lay, b, h, i, j)
                        sl = tuple(slice(ix * s, (ix + 1) * s) for ix, s in zip(index, shape))
                        blocks.append(np.asarray(leaf)[sl].reshape(shape[2:]))
                    blk = jax.tree.unflatten(treedef, blocks)
                    qi = i * bq + np.arange(bq, dtype=np.int32)[:, None]
                    ki = j * bk + np.arange(bk, dtype=np.int32)[None]
                    got[b, h, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk] = np.asarray(
                        blk.evaluate(jnp.int32(b), jnp.int32(h), jnp.asarray(qi), jnp.asarray(ki)))
    np.testing.assert_array_equal(got[:, :, :11, :11], expected)


def test_token_grid_permutation_round_trip_and_tile_density():
    g = M.TokenGrid(8, 8, num_prefix=1, tile=(4, 4))
    perm, inv = g.permutation(), g.inverse_permutation()
    x = np.arange(65)
    np.testing.assert_array_equal(x[perm][inv], x)
    r, c = R.grid_coords(8, 8, 1, (4, 4))
    np.testing.assert_array_equal((r * 8 + c)[1:] + 1, perm[1:])
    # Tile order makes a 2-D window's block density smaller than row order.
    # 64x64 grid, radius 8, blocks of 64 tokens: a row-order block is one grid row and touches 17
    # rows (~sqrt of the element density), an 8x8 tile touches at most 3x3 tiles.
    row = M.window_2d(M.TokenGrid(64, 64), radius=(8, 8))
    tile = M.window_2d(M.TokenGrid(64, 64, tile=(8, 8)), radius=(8, 8))
    d_row = float(row.block_map(4096, 4096, 64, 64).block_density()[0, 0])
    d_tile = float(tile.block_map(4096, 4096, 64, 64).block_density()[0, 0])
    assert d_tile <= 9 / 64 < 17 / 64 * 0.9 < d_row


def test_block_map_static_equals_traced_and_is_cached():
    m = M.causal() & M.local_1d(left=9)
    a = m.block_map(40, 40, 8, 8)
    assert a is m.block_map(40, 40, 8, 8)
    kind_traced = jax.jit(lambda: M.dense(jnp.asarray(m.materialize(40, 40))).block_map(40, 40, 8, 8).kind)()
    np.testing.assert_array_equal(a.kind, np.asarray(kind_traced))
    assert a.max_kv == 3 and a.is_static


@pytest.mark.parametrize("bad, match", [
    (lambda: M.local_1d(left=-1), "left"),
    (lambda: M.window_2d(M.TokenGrid(4, 4), mode="ring"), "mode"),
    (lambda: M.TokenGrid(4, 6, tile=(4, 4)), "tile"),
    (lambda: M.group_routing(GROUPS, allowed=np.ones((3, 2), bool)), "allowed"),
    (lambda: M.causal().materialize(4, 4) & 1 if False else M.window_2d(M.TokenGrid(2, 2)).materialize(5, 5), "q_len"),
    (lambda: M.per_head([M.causal()] * 2).materialize(4, 4, heads=3), "heads"),
    (lambda: M.segment_ids(SEG).materialize(12, 12, batch=2), "query dim"),
    (lambda: M.dense(np.ones((2, 3, 4, 4), bool)).materialize(4, 4, batch=3, heads=3), "batch"),
    (lambda: M.causal() & np.ones(3), "Mask"),
])
def test_bad_input_raises_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_block_kinds_from_dense_matches_loop_reference():
    d = RNG.random((3, 10, 7)) < 0.2
    d[0] = True
    np.testing.assert_array_equal(bmap.block_kinds_from_dense(d, 4, 3), R.np_block_kinds(d, 4, 3))
