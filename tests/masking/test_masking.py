"""Masking strategies: exact counts, the index contract, determinism, and each strategy's defining
property, all checked against independent numpy computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from maskjax import masking as M

B = 4
GRID = (8, 8)
N = 64


def _scores(seed, batch=B, n=N):
    return np.random.default_rng(seed).normal(size=(batch, n)).astype(np.float32)


# name, kwargs, grid, ratio, expected masked count per sample (computed here, independently of the code)
CASES = {
    "random": ("random", {}, GRID, 0.75, round(0.75 * 64)),
    "random_shuffle": ("random", {"order": "shuffle"}, GRID, 0.3, round(0.3 * 64)),
    "block": ("block", {"min_num_patches": 4}, GRID, 0.4, round(0.4 * 64)),
    "grid2": ("grid", {"cell": 2}, GRID, 0.6, round(0.6 * 16) * 4),
    "grid_rect": ("grid", {"cell": (2, 4)}, GRID, 0.5, round(0.5 * 8) * 8),
    "tube": ("tube", {}, (3, 4, 4), 0.55, round(0.55 * 16) * 3),
    "attention_high": ("attention", {"scores": _scores(1)}, GRID, 0.5, 32),
    "attention_mixed": ("attention", {"scores": _scores(2), "mode": "low", "random_fraction": 0.25}, GRID, 0.45,
                        round(0.45 * 64)),
    "hard_patch": ("hard_patch", {"scores": _scores(3), "alpha": 0.5}, GRID, 0.75, 48),
    "noise_red": ("noise", {"color": "red"}, GRID, 0.5, 32),
    "noise_green": ("noise", {"color": "green"}, GRID, 0.7, round(0.7 * 64)),
    "checkerboard": ("checkerboard", {"cell": 2}, GRID, 0.5, 32),
}


@pytest.fixture(scope="module")
def results():
    """Each case drawn with two keys (same key twice is checked in test_determinism)."""
    out = {}
    for case, (name, kw, grid, ratio, _) in CASES.items():
        out[case] = [M.STRATEGIES[name](jax.random.key(seed), B, grid, ratio, **kw) for seed in (0, 1)]
    return out


def _np(res):
    return {f: np.asarray(getattr(res, f)) for f in ("mask", "ids_keep", "ids_masked", "ids_restore")}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_count_shapes_and_partition(results, case):
    _, _, grid, _, expected = CASES[case]
    n = math.prod(grid)
    for res in results[case]:
        r = _np(res)
        assert r["mask"].shape == (B, n) and r["mask"].dtype == np.bool_
        assert r["ids_keep"].shape == (B, n - expected) and r["ids_keep"].dtype == np.int32
        assert r["ids_masked"].shape == (B, expected) and r["ids_masked"].dtype == np.int32
        assert r["ids_restore"].shape == (B, n) and r["ids_restore"].dtype == np.int32
        np.testing.assert_array_equal(r["mask"].sum(1), np.full(B, expected))
        for b in range(B):
            assert sorted(r["ids_keep"][b].tolist() + r["ids_masked"][b].tolist()) == list(range(n))
            assert not r["mask"][b, r["ids_keep"][b]].any()
            assert r["mask"][b, r["ids_masked"][b]].all()
            # ids_restore inverts the shuffle: shuffle[ids_restore[j]] == j for every position j.
            shuffle = np.concatenate([r["ids_keep"][b], r["ids_masked"][b]])
            np.testing.assert_array_equal(shuffle[r["ids_restore"][b]], np.arange(n))
            if CASES[case][1].get("order", "sorted") == "sorted":
                assert (np.diff(r["ids_keep"][b]) > 0).all() and (np.diff(r["ids_masked"][b]) > 0).all()


@pytest.mark.parametrize("case", list(CASES))
def test_determinism_and_key_dependence(results, case):
    name, kw, grid, ratio, _ = CASES[case]
    again = M.STRATEGIES[name](jax.random.key(0), B, grid, ratio, **kw)
    for f in ("mask", "ids_keep", "ids_masked", "ids_restore"):
        np.testing.assert_array_equal(np.asarray(getattr(again, f)), np.asarray(getattr(results[case][0], f)))
    first, second = np.asarray(results[case][0].mask), np.asarray(results[case][1].mask)
    if case == "attention_high":   # purely score-driven: the key only breaks ties (there are none)
        np.testing.assert_array_equal(first, second)
    elif case == "checkerboard":   # only two possible masks: see test_checkerboard_is_one_of_two_phases
        pass
    else:
        assert (first != second).any(), "a different key must give a different mask"
        assert len({row.tobytes() for row in first}) > 1, "rows of one batch must differ"


def test_per_example_keys_do_not_depend_on_batch_composition():
    keys = M.masking_key(7, 11, index=jnp.arange(6))
    full = M.noise_masking(keys, 6, GRID, 0.5)
    part = M.noise_masking(M.masking_key(7, 11, index=jnp.array([3, 4])), 2, GRID, 0.5)
    np.testing.assert_array_equal(np.asarray(full.mask[3:5]), np.asarray(part.mask))


def test_masking_key_separates_seed_step_purpose():
    data = lambda k: np.asarray(jax.random.key_data(k)).tobytes()
    base = data(M.masking_key(0, 5))
    assert base == data(M.masking_key(0, 5))
    assert len({base, data(M.masking_key(1, 5)), data(M.masking_key(0, 6)),
                data(M.masking_key(0, 5, purpose="teacher"))}) == 4
    # Traced step (inside a compiled train step) gives the same key as a Python int.
    assert data(jax.jit(lambda s: M.masking_key(0, s))(5)) == base


def test_gather_and_restore_tokens_match_numpy_loops():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, N, 5)).astype(np.float32)
    token = rng.normal(size=(5,)).astype(np.float32)
    for order in ("sorted", "shuffle"):
        res = M.random_masking(jax.random.key(3), B, GRID, 0.75, order=order)
        ids_keep, mask = np.asarray(res.ids_keep), np.asarray(res.mask)
        visible = np.asarray(M.gather_tokens(jnp.asarray(x), res.ids_keep))
        expected_visible = np.stack([[x[b, i] for i in ids_keep[b]] for b in range(B)])
        np.testing.assert_array_equal(visible, expected_visible)
        restored = np.asarray(M.restore_tokens(jnp.asarray(visible), jnp.asarray(token)[None, None],
                                               res.ids_restore))
        expected = np.empty_like(x)
        for b in range(B):
            for j in range(N):
                expected[b, j] = token if mask[b, j] else x[b, j]
        np.testing.assert_array_equal(restored, expected)


def test_shuffle_order_reproduces_mae_random_masking():
    noise = np.random.default_rng(4).random((3, 50)).astype(np.float32)
    ratio = 0.75
    len_keep = int(50 * (1 - ratio))                         # MAE's formula
    ids_shuffle = np.argsort(noise, axis=1)
    ids_restore = np.argsort(ids_shuffle, axis=1)
    mae_mask = np.ones((3, 50))
    mae_mask[:, :len_keep] = 0
    mae_mask = np.take_along_axis(mae_mask, ids_restore, axis=1)
    res = M.mask_from_scores(jnp.asarray(noise), 50 - len_keep, order="shuffle")
    np.testing.assert_array_equal(np.asarray(res.ids_keep), ids_shuffle[:, :len_keep])
    np.testing.assert_array_equal(np.asarray(res.ids_masked), ids_shuffle[:, len_keep:])
    np.testing.assert_array_equal(np.asarray(res.ids_restore), ids_restore)
    np.testing.assert_array_equal(np.asarray(res.mask), mae_mask.astype(bool))


def _mean_masked_neighbours(mask_bhw):
    """Mean over masked cells of the number of masked 4-neighbours (explicit loops)."""
    total, count = 0, 0
    for m in mask_bhw:
        h, w = m.shape
        for i in range(h):
            for j in range(w):
                if m[i, j]:
                    count += 1
                    total += sum(m[a, c] for a, c in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1))
                                 if 0 <= a < h and 0 <= c < w)
    return total / count


def test_block_masks_are_more_contiguous_than_random():
    key, grid, ratio = jax.random.key(0), (14, 14), 0.4
    block = np.asarray(M.block_masking(key, 8, grid, ratio, min_num_patches=16).mask).reshape(8, 14, 14)
    rand = np.asarray(M.random_masking(key, 8, grid, ratio).mask).reshape(8, 14, 14)
    nb_block, nb_rand = _mean_masked_neighbours(block), _mean_masked_neighbours(rand)
    assert nb_rand < 2.0 and nb_block > nb_rand + 1.0, (nb_block, nb_rand)


def test_noise_colours_shape_the_masks():
    key, grid = jax.random.key(0), (14, 14)
    nb = {c: _mean_masked_neighbours(np.asarray(M.noise_masking(key, 8, grid, 0.5, color=c, sigma=s).mask)
                                     .reshape(8, 14, 14)) for c, s in (("white", 1.0), ("red", 1.0), ("blue", 0.5))}
    # Random at 50%: ~1.8 masked neighbours (edges have fewer); low-pass noise clusters, high-pass spreads out.
    assert nb["red"] > nb["white"] + 0.5 and nb["blue"] < nb["white"] - 0.2, nb


def test_filter_noise_matches_scipy_gaussian_filter():
    noise = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    sigma = 1.5
    blur = lambda s: np.stack([scipy.ndimage.gaussian_filter(n.astype(np.float64), s, mode="wrap", truncate=8)
                               for n in noise])
    low, wide = blur(sigma), blur(2 * sigma)
    for color, expected in (("red", low), ("blue", noise - low), ("green", low - wide),
                            ("purple", noise - low + wide), ("white", noise)):
        got = np.asarray(M.filter_noise(jnp.asarray(noise), color, sigma))
        # The filter samples the continuous Gaussian's frequency response; scipy samples the spatial kernel.
        np.testing.assert_allclose(got, expected, atol=2e-3)


def test_grid_masks_whole_cells():
    res = M.grid_masking(jax.random.key(2), B, (8, 12), 0.5, cell=(2, 3))
    m = np.asarray(res.mask).reshape(B, 4, 2, 4, 3)
    cell_any, cell_all = m.any(axis=(2, 4)), m.all(axis=(2, 4))
    np.testing.assert_array_equal(cell_any, cell_all)                 # every cell fully masked or visible
    np.testing.assert_array_equal(cell_all.reshape(B, -1).sum(1), np.full(B, round(0.5 * 16)))


def test_checkerboard_is_one_of_two_phases():
    res = M.checkerboard_masking(jax.random.key(0), 16, (4, 6), 0.5, cell=(1, 2))
    board = np.array([[(i + j // 2) % 2 == 1 for j in range(6)] for i in range(4)]).reshape(-1)
    m = np.asarray(res.mask)
    is_a, is_b = (m == board).all(1), (m == ~board).all(1)
    assert (is_a | is_b).all() and is_a.any() and is_b.any()


def test_mask_from_bool_lists_true_entries():
    mask = np.zeros((3, 10), bool)
    rng = np.random.default_rng(0)
    for row in mask:
        row[rng.choice(10, 4, replace=False)] = True
    res = M.mask_from_bool(jnp.asarray(mask), 4)
    np.testing.assert_array_equal(np.asarray(res.mask), mask)
    np.testing.assert_array_equal(np.asarray(res.ids_masked), np.stack([np.flatnonzero(r) for r in mask]))
    np.testing.assert_array_equal(np.asarray(res.ids_keep), np.stack([np.flatnonzero(~r) for r in mask]))


@pytest.mark.slow
def test_sharded_batch_gives_the_same_masks():
    """Keys and scores sharded over 8 devices (batch axis) -> the same masks as on one device."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    keys = M.masking_key(0, 1, index=jnp.arange(8))
    scores = _scores(8, batch=8)
    fn = jax.jit(lambda k, s: (M.block_masking(k, 8, GRID, 0.5).mask,
                               M.hard_patch_masking(k, 8, GRID, 0.5, scores=s, alpha=0.5).mask))
    shard = NamedSharding(mesh, P("data"))
    sharded = fn(jax.device_put(keys, shard), jax.device_put(scores, shard))
    single = fn(keys, scores)
    for a, b in zip(sharded, single):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_upsample_mask_matches_numpy_kron():
    coarse = np.random.default_rng(0).random((3, 12)) < 0.5
    got = np.asarray(M.upsample_mask(jnp.asarray(coarse), (3, 4), (2, 3)))
    expected = np.stack([np.kron(c.reshape(3, 4), np.ones((2, 3), bool)).reshape(-1) for c in coarse])
    np.testing.assert_array_equal(got, expected)


def test_tube_masks_repeat_over_frames(results):
    block_tube = M.tube_masking(jax.random.key(1), B, (3, 4, 4), 0.55, spatial="block",
                                spatial_options={"min_num_patches": 4})
    for res in (results["tube"][0], block_tube):
        m = np.asarray(res.mask).reshape(B, 3, 16)
        for t in range(1, 3):
            np.testing.assert_array_equal(m[:, t], m[:, 0])
        np.testing.assert_array_equal(m[:, 0].sum(1), np.full(B, round(0.55 * 16)))
        assert len({row.tobytes() for row in m[:, 0]}) > 1


def test_attention_masks_the_top_k_scores():
    scores = _scores(5)
    k = round(0.5 * N)
    for mode, expected_ids in (("high", np.argsort(-scores, axis=1)[:, :k]),
                               ("low", np.argsort(scores, axis=1)[:, :k])):
        res = M.attention_masking(jax.random.key(0), B, GRID, 0.5, scores=scores, mode=mode)
        np.testing.assert_array_equal(np.asarray(res.ids_masked), np.sort(expected_ids, axis=1))


def test_attention_random_fraction_keeps_the_guided_part():
    scores = _scores(6)
    k = round(0.5 * N)
    num_random = round(0.25 * k)
    top = np.argsort(-scores, axis=1)[:, :k - num_random]
    masks = []
    for seed in range(3):
        m = np.asarray(M.attention_masking(jax.random.key(seed), B, GRID, 0.5, scores=scores,
                                           random_fraction=0.25).mask)
        for b in range(B):
            assert m[b, top[b]].all()
        masks.append(m)
    # The random part is not simply the next-best scores, and it changes with the key.
    next_best = np.argsort(-scores, axis=1)[:, :k]
    assert any(not masks[0][b, next_best[b]].all() for b in range(B))
    assert (masks[0] != masks[1]).any()


def test_hard_patch_masks_the_hardest_alpha_fraction():
    scores = _scores(7)
    k = round(0.75 * N)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        num_hard = int(alpha * k)                             # HPM's int(...)
        hardest = np.argsort(-scores, axis=1)[:, :num_hard]
        # alpha as a 0-d array is traced: one compilation for all values.
        res = M.hard_patch_masking(jax.random.key(0), B, GRID, 0.75, scores=scores, alpha=np.asarray(alpha))
        m = np.asarray(res.mask)
        assert all(m[b, hardest[b]].all() for b in range(B))
        np.testing.assert_array_equal(m.sum(1), np.full(B, k))
        if alpha == 1.0:
            np.testing.assert_array_equal(np.asarray(res.ids_masked), np.sort(np.argsort(-scores, 1)[:, :k], 1))
    # A traced alpha (a schedule inside one compiled step) gives the same masks as a Python alpha.
    fn = jax.jit(lambda key, s, a: M.hard_patch_masking(key, B, GRID, 0.75, scores=s, alpha=a).mask)
    eager = M.hard_patch_masking(jax.random.key(9), B, GRID, 0.75, scores=scores, alpha=0.3).mask
    np.testing.assert_array_equal(np.asarray(fn(jax.random.key(9), scores, 0.3)), np.asarray(eager))


def test_hard_patch_alpha_schedule_formula():
    total = 10
    got = [float(M.hard_patch_alpha(s, total)) for s in range(total)]
    np.testing.assert_allclose(got, [(s + 1) / total * 0.5 for s in range(total)], rtol=1e-6)


# Each strategy inside a caller's jit (key and scores traced) gives the eager result.
@pytest.mark.parametrize("case", ["random", "block", "grid2", "tube", "attention_mixed", "hard_patch", "noise_green",
                                  "checkerboard"])
def test_jit_matches_eager(results, case):
    name, kw, grid, ratio, _ = CASES[case]
    arrays = {k: v for k, v in kw.items() if isinstance(v, np.ndarray)}
    static = {k: v for k, v in kw.items() if k not in arrays}
    fn = jax.jit(lambda key, arr: M.STRATEGIES[name](key, B, grid, ratio, **static, **arr))
    res = fn(jax.random.key(0), arrays)
    for f in ("mask", "ids_keep", "ids_masked", "ids_restore"):
        np.testing.assert_array_equal(np.asarray(getattr(res, f)), np.asarray(getattr(results[case][0], f)))


def test_make_masking_binds_options():
    fn = M.make_masking("grid", cell=4)
    res = fn(jax.random.key(0), 2, (8, 8), 0.5)
    m = np.asarray(res.mask).reshape(2, 2, 4, 2, 4)
    np.testing.assert_array_equal(m.any(axis=(2, 4)), m.all(axis=(2, 4)))
    assert set(M.STRATEGIES) >= {"random", "block", "grid", "tube", "attention", "hard_patch", "noise", "checkerboard"}


KEY = jax.random.key(0)
BAD = [
    (lambda: M.random_masking(KEY, B, GRID, 0.0), r"ratio=0\.0"),
    (lambda: M.random_masking(KEY, B, GRID, 1.0), r"ratio=1\.0"),
    (lambda: M.random_masking(KEY, B, GRID, -0.2), r"ratio=-0\.2"),
    (lambda: M.random_masking(KEY, B, GRID, 0.001), r"ratio=0\.001"),          # rounds to 0 masked tokens
    (lambda: M.random_masking(KEY, B, GRID, jnp.float32(0.5) + jnp.zeros(())), r"ratio="),
    (lambda: M.random_masking(KEY, 0, GRID, 0.5), r"batch=0"),
    (lambda: M.random_masking(KEY, B, GRID, 0.5, order="random"), r"order='random'"),
    (lambda: M.block_masking(KEY, B, (3, 3), 0.9, min_num_patches=9, min_aspect=0.5), r"grid_hw=\(3, 3\)"),
    (lambda: M.block_masking(KEY, B, (2, 40), 0.5, min_num_patches=16), r"grid_hw=\(2, 40\) is too small"),
    (lambda: M.block_masking(KEY, B, GRID, 0.1, min_num_patches=16), r"min_num_patches=16"),
    (lambda: M.block_masking(KEY, B, GRID, 0.5, min_aspect=-1.0), r"min_aspect=-1\.0"),
    (lambda: M.grid_masking(KEY, B, (14, 14), 0.5, cell=4), r"grid_hw=\(14, 14\).*cell=\(4, 4\)"),
    (lambda: M.tube_masking(KEY, B, (4, 4), 0.5), r"grid_thw=\(4, 4\)"),
    (lambda: M.tube_masking(KEY, B, (2, 4, 4), 0.5, spatial="tube"), r"spatial='tube'"),
    (lambda: M.attention_masking(KEY, B, GRID, 0.5, scores=np.zeros((B, 10))), r"\(4, 10\)"),
    (lambda: M.attention_masking(KEY, B, GRID, 0.5, scores=_scores(0), mode="top"), r"mode='top'"),
    (lambda: M.attention_masking(KEY, B, GRID, 0.5, scores=_scores(0), random_fraction=1.5), r"random_fraction=1\.5"),
    (lambda: M.hard_patch_masking(KEY, B, GRID, 0.5, scores=_scores(0), alpha=-0.1), r"alpha=-0\.1"),
    (lambda: M.noise_masking(KEY, B, GRID, 0.5, color="pink"), r"color='pink'"),
    (lambda: M.make_masking("checkers"), r"name='checkers'"),
    (lambda: M.checkerboard_masking(KEY, B, GRID, 0.4), r"ratio=0\.4"),
    (lambda: M.checkerboard_masking(KEY, B, (3, 3), 0.5), r"odd number \(9\)"),
    (lambda: M.make_masking("block", min_patches=3), r"min_patches"),
    (lambda: M.random_masking(jax.random.split(KEY, 3), B, GRID, 0.5), r"3 per-example keys but batch=4"),
    (lambda: M.restore_tokens(jnp.zeros((2, 3, 4)), jnp.zeros((5,)), jnp.zeros((2, 6), jnp.int32)), r"\(5,\)"),
]


@pytest.mark.parametrize("call,match", BAD)
def test_bad_inputs_raise_value_error_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()
