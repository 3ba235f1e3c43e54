"""Mask schedules against the official MaskGIT formulas (libml/mask_schedule.py), written out here in numpy."""

import math

import jax
import numpy as np
import pytest

from maskjax.masking import schedules


def official(name, r, n):
    """google-research/maskgit schedule_ratio -> mask ratio, clipped to [1e-6, 1]."""
    r = np.asarray(r, np.float64)
    with np.errstate(divide="ignore"):
        value = {"linear": 1 - r, "square": 1 - r ** 2, "cubic": 1 - r ** 3, "sqrt": 1 - r ** 0.5,
                 "cosine": np.cos(math.pi / 2 * r), "log": -np.log2(r) / np.log2(n),
                 "exp": 1 - np.exp2(-np.log2(n) * (1 - r))}[name]
    return np.clip(value, 1e-6, 1.0)


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
def test_schedule_matches_official_formula(name):
    r = np.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(schedules.mask_schedule(name, r, 64), official(name, r, 64), rtol=1e-5, atol=1e-6)
    # 'exp' starts at 1 - 1/N in the official code; the others mask everything at r = 0.
    assert float(schedules.mask_schedule(name, 0.0, 64)) == pytest.approx(1 - 1 / 64 if name == "exp" else 1.0)
    assert float(schedules.mask_schedule(name, 1.0, 64)) == pytest.approx(1e-6)


@pytest.mark.parametrize("name,concave", [("cosine", True), ("square", True), ("cubic", True), ("exp", True),
                                          ("sqrt", False), ("log", False)])
def test_schedule_curvature(name, concave):
    r = np.linspace(0.05, 0.95, 19)
    second_difference = np.diff(np.asarray(schedules.mask_schedule(name, r, 64), np.float64), 2)
    assert np.all(second_difference < 0) if concave else np.all(second_difference > 0)
    above_linear = np.asarray(schedules.mask_schedule(name, r, 64)) > official("linear", r, 64)
    assert np.all(above_linear) if concave else not np.any(above_linear)


def test_training_counts_are_ceil_of_gamma_and_in_range():
    key = jax.random.key(3)
    counts = np.asarray(schedules.masked_count_for_training("cosine", key, 4096, 64))
    r = np.asarray(jax.random.uniform(key, (4096,)))
    np.testing.assert_array_equal(counts, np.clip(np.ceil(official("cosine", r, 64) * 64), 1, 64))
    assert counts.min() >= 1 and counts.max() <= 64
    # E[cos(pi/2 r)] = 2/pi of the tokens masked on average.
    assert counts.mean() / 64 == pytest.approx(2 / math.pi, abs=0.02)


@pytest.mark.parametrize("name,steps", [("cosine", 8), ("linear", 12), ("log", 5), ("exp", 16), ("cubic", 64)])
def test_masked_after_step_follows_floor_of_schedule(name, steps):
    n = 64
    remaining = np.array([n])
    for t in range(steps):
        got = int(schedules.masked_after_step(name, t, steps, np.array([n]), remaining)[0])
        want = 0 if t == steps - 1 else int(min(max(math.floor(n * official(name, (t + 1) / steps, n) + 1e-9), 1),
                                                remaining[0] - 1))
        assert got == want, (t, got, want)
        assert got < remaining[0]
        remaining = np.array([got])
    assert remaining[0] == 0


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="schedule='cosin'"):
        schedules.check_schedule("cosin")
    with pytest.raises(ValueError, match="needs num_tokens"):
        schedules.mask_schedule("log", 0.5)


def test_halton_order_is_a_permutation_spread_over_the_grid():
    order = schedules.halton_order((8, 8))
    assert sorted(order.tolist()) == list(range(64))
    rows, cols = order[:16] // 8, order[:16] % 8
    # The first 16 cells of a low-discrepancy order cover every 2x2 quadrant block of the grid equally.
    quadrants = np.bincount((rows // 4) * 2 + cols // 4, minlength=4)
    assert quadrants.min() >= 3


@pytest.mark.parametrize("name,steps", [("cosine", 8), ("linear", 5), ("cubic", 64)])
def test_group_sizes_follow_the_decoding_counts(name, steps):
    sizes = schedules.step_group_sizes(name, 64, steps)
    assert sizes.sum() == 64 and sizes.min() >= 1 and len(sizes) == steps
    remaining = 64 - np.cumsum(sizes)
    for t in range(steps - 1):
        assert remaining[t] == min(max(math.floor(64 * official(name, (t + 1) / steps, 64) + 1e-9), 1),
                                   (64 if t == 0 else remaining[t - 1]) - 1)
    groups = schedules.token_groups(schedules.halton_order((8, 8)), sizes)
    np.testing.assert_array_equal(np.bincount(groups, minlength=steps + 1)[1:], sizes)
