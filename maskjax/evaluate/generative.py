"""Sample-quality metrics in any feature space (numpy, float64): Fréchet distance (FID's formula, Heusel et al.
2017), kernel inception distance (KID: unbiased MMD^2 with a cubic polynomial kernel, Bińkowski et al. 2018) and
precision / recall of k-NN manifolds (Kynkäänniemi et al. 2019).

maskjax computes them in the features of a classifier trained on the same data (no Inception weights offline).
The Fréchet distance is biased at small sample counts (compare runs at equal counts); KID is unbiased.

Example::

    fd = frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))      # real, fake: [n, d] features
    kid_mean, kid_std = kernel_inception_distance(real, fake, rng=np.random.default_rng(0))
    precision, recall = precision_recall(real, fake, k=3)
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def _check_features(name: str, x: np.ndarray, min_rows: int = 2) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < min_rows:
        raise ValueError(f"{name}: expected features [n >= {min_rows}, d], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: features hold NaN or inf")
    return x


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], covariance [d, d]) of features [n, d] (unbiased covariance, as FID implementations)."""
    x = _check_features("features", features)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): a symmetric PSD matrix, so its square root comes from
    an eigendecomposition, with no complex round-off as with `scipy.linalg.sqrtm(S1 @ S2)`.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / "
                         f"{sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: Optional[float] = None,
                             coef0: float = 1.0) -> float:
    """Unbiased MMD^2 between samples x [m, d] and y [n, d] with k(a, b) = (gamma a.b + coef0)^degree,
    gamma = 1/d by default (KID's kernel)."""
    x, y = _check_features("x", x), _check_features("y", y)
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    kxx = (gamma * x @ x.T + coef0) ** degree
    kyy = (gamma * y @ y.T + coef0) ** degree
    kxy = (gamma * x @ y.T + coef0) ** degree
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, *, num_subsets: int = 10,
                              subset_size: int = 1000, rng: Optional[np.random.Generator] = None
                              ) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial MMD^2 over `num_subsets` random subsets of min(subset_size, n) rows
    of each set, drawn without replacement (the KID protocol)."""
    real, fake = _check_features("real", real), _check_features("fake", fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"kernel_inception_distance: feature widths differ ({real.shape[1]} vs {fake.shape[1]})")
    rng = np.random.default_rng(0) if rng is None else rng
    size = min(subset_size, len(real), len(fake))
    values = [polynomial_mmd2_unbiased(real[rng.choice(len(real), size, replace=False)],
                                       fake[rng.choice(len(fake), size, replace=False)]) for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = np.sum(a ** 2, 1)[:, None] + np.sum(b ** 2, 1)[None] - 2.0 * a @ b.T
    return np.sqrt(np.clip(squared, 0.0, None))


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """[n]: distance of each row to its k-th nearest other row."""
    distances = _pairwise_distances(features, features)
    np.fill_diagonal(distances, np.inf)
    return np.partition(distances, k - 1, axis=1)[:, k - 1]


def manifold_coverage(reference: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Share of `queries` inside the k-NN manifold of `reference` (the union of balls around each reference row
    with its k-NN radius)."""
    radii = knn_radii(reference, k)
    return float(np.mean(np.any(_pairwise_distances(queries, reference) <= radii[None], axis=1)))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision (share of fake inside the real manifold: fidelity) and recall (share of real inside the
    fake manifold: diversity), Kynkäänniemi et al. 2019, with k-NN radii (k = 3)."""
    real, fake = _check_features("real", real, k + 1), _check_features("fake", fake, k + 1)
    return manifold_coverage(real, fake, k), manifold_coverage(fake, real, k)
