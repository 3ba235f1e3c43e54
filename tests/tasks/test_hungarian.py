"""The on-device Hungarian matcher against scipy.optimize.linear_sum_assignment (the independent reference):
total cost on random, rectangular, tied, padded and non-finite costs, under jit and jit(vmap); a hand-solved case;
errors named before compute.

Compiling the solver costs 1-3 s per distinct shape on the shared 2-core CPU, so the tests reuse a few jitted functions
and a fixed batch size, and check many matrices per compilation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from maskjax.tasks.hungarian import PaddedMatch, batched_match, linear_sum_assignment, match_padded

B = 6  # matrices per batched call; one size for every test, so compilations are shared
SHAPES = [(5, 5), (10, 7), (7, 10), (50, 10)]


@functools.cache
def _lsa_vmap():
    return jax.jit(jax.vmap(linear_sum_assignment))


@functools.cache
def _lsa_jit():
    return jax.jit(linear_sum_assignment)


def _scipy_cost(cost: np.ndarray) -> float:
    cost = cost.astype(np.float64)
    rows, cols = optimize.linear_sum_assignment(cost)
    return float(cost[rows, cols].sum())


def _check_assignment(cost: np.ndarray, rows, cols) -> float:
    """Asserts scipy's output format (int32 [min(n, m)], rows ascending, no repeats); returns the total cost."""
    rows, cols = np.asarray(rows), np.asarray(cols)
    k = min(cost.shape)
    assert rows.shape == cols.shape == (k,) and rows.dtype == cols.dtype == np.int32
    assert np.all(np.diff(rows) > 0), rows
    assert len(set(cols.tolist())) == k, cols
    assert rows.min(initial=0) >= 0 and cols.min(initial=0) >= 0
    return float(cost[rows, cols].astype(np.float64).sum())


def _assert_cost_close(got: float, want: float):
    assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), (got, want)


def _random_batches(shape, seed):
    rng = np.random.default_rng(seed)
    uniform = rng.random((B,) + shape).astype(np.float32)
    scaled = (rng.standard_normal((B,) + shape) * 100).astype(np.float32)  # negative entries, wide range
    return uniform, scaled


@pytest.mark.parametrize("shape", SHAPES)
def test_random_matches_scipy_under_jit_vmap(shape):
    for seed in range(2):
        for costs in _random_batches(shape, seed):
            rows, cols = _lsa_vmap()(costs)
            for b in range(B):
                _assert_cost_close(_check_assignment(costs[b], rows[b], cols[b]), _scipy_cost(costs[b]))


def test_random_matches_scipy_under_jit():
    rng = np.random.default_rng(1)
    for _ in range(3):
        cost = rng.random((50, 10)).astype(np.float32)
        rows, cols = _lsa_jit()(cost)
        _assert_cost_close(_check_assignment(cost, rows, cols), _scipy_cost(cost))


@pytest.mark.parametrize("shape", [(5, 5), (7, 10)])
def test_ties(shape):
    rng = np.random.default_rng(2)
    tiny = rng.integers(0, 3, (B,) + shape).astype(np.float32)  # many optimal assignments
    equal = np.full((B,) + shape, 2.5, np.float32)
    for costs in (tiny, equal):
        rows, cols = _lsa_vmap()(costs)
        for b in range(B):
            assert _check_assignment(costs[b], rows[b], cols[b]) == _scipy_cost(costs[b])


def test_hand_made_3x2():
    # 3 queries x 2 targets. Each target's cheapest query is 0 (1.0 and 1.5), so a greedy matcher gives target 0
    # to query 0 and target 1 to its next best, query 1: 1 + 5 = 6. The optimum moves target 0 to query 2 to free
    # query 0 for target 1: 1.2 + 1.5 = 2.7. All 6 assignments: (q0,q1) 6, (q0,q2) 11, (q1,q0) 6.5, (q1,q2) 15,
    # (q2,q0) 2.7, (q2,q1) 6.2, written (query of target 0, query of target 1).
    cost = np.array([[1.0, 1.5], [5.0, 5.0], [1.2, 10.0]], np.float32)
    rows, cols = linear_sum_assignment(cost)
    np.testing.assert_array_equal(rows, [0, 2])
    np.testing.assert_array_equal(cols, [1, 0])
    assert _scipy_cost(cost) == pytest.approx(2.7)


def test_infinite_nan_and_huge_entries():
    rng = np.random.default_rng(3)
    costs = rng.random((B, 7, 10)).astype(np.float32)
    costs[0, :, :3] = np.inf  # forbidden columns; 7 finite ones remain for the 7 rows
    costs[1][rng.random((7, 10)) < 0.5] = np.inf
    costs[1, np.arange(7), np.arange(7)] = 0.5  # keeps a finite assignment
    costs[2, 3, :9] = np.inf  # row 3 has a single allowed column
    costs[3, 0, 0] = 1e35  # >= 1e30 counts as forbidden, like +inf
    costs[3, 1, :] = np.nan  # a row of NaN: row 1 must take a forbidden entry, the others stay optimal
    costs[4] = np.inf  # nothing allowed: still a valid assignment
    costs[5] *= 1e20  # huge but ordinary
    costs[5, 2, 4] = -np.inf  # preferred
    rows, cols = map(np.asarray, _lsa_vmap()(costs))
    for b in range(B):
        _check_assignment(costs[b], rows[b], cols[b])
    for b in (0, 1, 2):  # feasible: scipy accepts +inf entries and avoids them
        got = costs[b][rows[b], cols[b]]
        assert np.all(np.isfinite(got))
        _assert_cost_close(float(got.sum()), _scipy_cost(costs[b]))

    def rest_is_optimal(b, row):
        # The rows other than `row` are optimal on the matrix without `row` and the column it took.
        col = cols[b][rows[b] == row][0]
        keep = rows[b] != row
        sub = np.delete(np.delete(costs[b], row, axis=0), col, axis=1)
        _assert_cost_close(float(costs[b][rows[b][keep], cols[b][keep]].astype(np.float64).sum()),
                           _scipy_cost(np.where(sub >= 1e30, np.inf, sub)))
        return col

    rest_is_optimal(3, 1)
    assert 0 not in cols[3][rows[3] == 0]  # the 1e35 entry is avoided
    assert rest_is_optimal(5, 2) == 4  # the -inf entry is taken


def _padded_reference(cost: np.ndarray, valid: np.ndarray) -> float:
    sub = cost[:, valid]
    return _scipy_cost(sub) if sub.shape[1] else 0.0


def _check_padded(cost, valid, match):
    qft, mq = np.asarray(match.query_for_target), np.asarray(match.matched_query)
    assert qft.dtype == np.int32 and mq.dtype == bool
    assert np.all(qft[~valid] == -1) and np.all(qft[valid] >= 0)
    assert len(set(qft[valid].tolist())) == valid.sum()
    np.testing.assert_array_equal(np.flatnonzero(mq), np.sort(qft[valid]))
    got = float(cost[qft[valid], np.flatnonzero(valid)].astype(np.float64).sum())
    _assert_cost_close(got, _padded_reference(cost, valid))


def test_padded_targets():
    rng = np.random.default_rng(4)
    n, m = 12, 6
    costs = rng.random((B, n, m)).astype(np.float32)
    valid = rng.random((B, m)) < 0.6
    valid[0], valid[1] = False, True  # no valid target; all valid
    costs[2][:, ~valid[2]] = np.nan  # padding costs are never read
    costs[3][:, ~valid[3]] = -1e9  # ...however attractive
    out = batched_match(costs, valid)
    assert isinstance(out, PaddedMatch) and out.query_for_target.shape == (B, m) and out.matched_query.shape == (B, n)
    for b in range(B):
        _check_padded(costs[b], valid[b], PaddedMatch(out.query_for_target[b], out.matched_query[b]))


def test_padded_more_slots_than_queries_under_vmap():
    # 4 queries, 8 target slots of which at most 4 are valid (the documented requirement).
    rng = np.random.default_rng(5)
    costs = rng.random((B, 4, 8)).astype(np.float32)
    valid = np.zeros((B, 8), bool)
    for b in range(B):
        valid[b, rng.choice(8, size=b % 5, replace=False)] = True
    out = jax.jit(jax.vmap(match_padded))(costs, valid)
    for b in range(B):
        _check_padded(costs[b], valid[b], PaddedMatch(out.query_for_target[b], out.matched_query[b]))


def test_shared_mask_and_gradient():
    # Same shapes as test_padded_targets: the solver compiled there is reused.
    rng = np.random.default_rng(6)
    cost = jnp.asarray(rng.random((B, 12, 6)), jnp.float32)
    valid = rng.random(6) < 0.5
    # vmap over the costs only, one mask for the whole batch: same as broadcasting the mask.
    shared = jax.vmap(match_padded, in_axes=(0, None))(cost, valid)
    want = batched_match(cost, np.broadcast_to(valid, (B, 6)))
    np.testing.assert_array_equal(shared.query_for_target, want.query_for_target)

    # The integer outputs have no gradient; a loss that indexes with them still differentiates.
    def loss(scale):
        c = cost * scale
        qft = jax.vmap(match_padded)(c, jnp.asarray(np.broadcast_to(valid, (B, 6)))).query_for_target
        picked = jnp.take_along_axis(c, jnp.maximum(qft, 0)[:, None, :], axis=1)[:, 0]
        return jnp.sum(jnp.where(qft >= 0, picked, 0.0))

    assert float(jax.grad(loss)(1.0)) == pytest.approx(float(loss(1.0)), rel=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"2-D cost matrix \[n, m\], got shape \(3,\)"):
        linear_sum_assignment(jnp.zeros(3))
    with pytest.raises(ValueError, match=r"3-D cost matrix \[B, n, m\], got shape \(3, 4\)"):
        batched_match(jnp.zeros((3, 4)), jnp.ones((3, 4), bool))
    with pytest.raises(TypeError, match="floating dtype, got int32"):
        linear_sum_assignment(jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(TypeError, match="expected an array, got list"):
        linear_sum_assignment([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"target_valid: expected shape \(4,\).*got \(3,\)"):
        match_padded(jnp.zeros((3, 4)), jnp.ones(3, bool))
    with pytest.raises(TypeError, match="target_valid: expected dtype bool, got int32"):
        match_padded(jnp.zeros((3, 4)), jnp.ones(4, jnp.int32))
    with pytest.raises(ValueError, match=r"expected shape \(2, 4\)"):
        batched_match(jnp.zeros((2, 3, 4)), jnp.ones((3, 4), bool))
