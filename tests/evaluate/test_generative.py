"""Sample-quality metrics against independent computations: scipy's matrix square root for the Fréchet distance,
an explicit double loop for the unbiased MMD^2 of KID, and scipy's cdist for k-NN precision / recall."""

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

from maskjax.evaluate import generative as G


def scipy_frechet(mu1, s1, mu2, s2):
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(root)))


@pytest.mark.parametrize("d,n", [(4, 50), (16, 200), (32, 40)])  # the last: rank-deficient covariances
def test_frechet_distance_matches_scipy(d, n):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(size=(n, d)) * 2 + 1
    mu1, s1 = G.gaussian_stats(a)
    mu2, s2 = G.gaussian_stats(b)
    np.testing.assert_allclose(mu1, a.mean(0))
    np.testing.assert_allclose(s1, np.cov(a.T))
    assert G.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-5,
                                                                   abs=1e-6)


def test_frechet_distance_is_zero_for_equal_gaussians_and_closed_form_for_diagonal_ones():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 5))
    mu, sigma = G.gaussian_stats(x)
    assert abs(G.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    # Diagonal: sum (sqrt(a) - sqrt(b))^2 = (1 - 3)^2 + (2 - 1)^2 = 5, plus ||mu1 - mu2||^2 = 2.
    assert G.frechet_distance(np.zeros(2), s1, np.ones(2), s2) == pytest.approx(7.0)


def test_unbiased_polynomial_mmd_matches_a_double_loop():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(9, 3)) + 0.5
    k = lambda a, b: (a @ b / 3 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(12) for j in range(12) if i != j) / (12 * 11)
    yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(x[i], y[j]) for i in range(12) for j in range(9)) / (12 * 9)
    assert G.polynomial_mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(2)
    a, b, c = rng.normal(size=(400, 8)), rng.normal(size=(400, 8)), rng.normal(size=(400, 8)) + 1.0
    same, _ = G.kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    other, _ = G.kernel_inception_distance(a, c, num_subsets=20, subset_size=200)
    assert abs(same) < 0.02 and other > 0.2


def test_precision_recall_match_brute_force():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(60, 4))
    fake = np.concatenate([rng.normal(size=(30, 4)) * 0.5, rng.normal(size=(20, 4)) + 6.0])
    def coverage(ref, queries, k=3):
        d = cdist(ref, ref)
        radii = np.sort(d, axis=1)[:, k]  # column 0 is the point itself
        return np.mean((cdist(queries, ref) <= radii[None]).any(1))
    precision, recall = G.precision_recall(real, fake, k=3)
    assert precision == pytest.approx(coverage(real, fake))
    assert recall == pytest.approx(coverage(fake, real))
    assert precision < 0.75  # the 20 far fakes lie outside the real manifold


def test_bad_features_are_named():
    with pytest.raises(ValueError, match=r"real: expected features \[n >= 4, d\], got shape \(3, 2\)"):
        G.precision_recall(np.zeros((3, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="NaN"):
        G.gaussian_stats(np.full((4, 2), np.nan))
