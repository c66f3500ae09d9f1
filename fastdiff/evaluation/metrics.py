"""Sample-quality metrics on feature arrays ``[N, D]``: FID, KID, precision and recall.

- FID: the Frechet distance between Gaussians fitted to the two feature sets, in float64, with the trace of
  the matrix square root taken in the symmetric form ``tr sqrt(S1^1/2 S2 S1^1/2)`` (eigenvalues, clipped at
  0), so no complex parts arise.
- KID (Binkowski et al. 2018): the unbiased MMD^2 with the kernel ``(x.y / D + 1)^3``, averaged over random
  subsets; its standard deviation over the subsets is reported beside it.
- Precision and recall (Kynkaanniemi et al. 2019): a sample is "precise" when it lies within the k-th
  nearest-neighbour radius of some reference feature; a reference is "recalled" when it lies within that
  radius of some sample.
"""

import warnings

import numpy as np
import torch


def _check_features(features: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a [N, D] feature array, got shape {list(array.shape)}")
    if array.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 feature vectors, got {array.shape[0]}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite values")
    return array


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean ``[D]``, covariance ``[D, D]``) in float64; warns when N <= D (FID is then biased)."""
    array = _check_features(features, "features")
    if array.shape[0] <= array.shape[1]:
        warnings.warn(
            f"{array.shape[0]} feature vectors for {array.shape[1]} dimensions: the covariance is singular "
            "and FID is biased upwards at this size (use more images to compare with published numbers)",
            stacklevel=2,
        )
    return array.mean(axis=0), np.cov(array, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)`` in float64 for covariance matrices ``[D, D]``."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"means and covariances must be [D] and [D, D] alike, got {mu1.shape}, {sigma1.shape}, "
            f"{mu2.shape}, {sigma2.shape}"
        )
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets ``[N, D]`` and ``[M, D]``."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between ``x [m, D]`` and ``y [n, D]`` with the kernel ``(a.b / D + 1)^3``."""
    dim = x.shape[1]
    kxx = (x @ x.T / dim + 1.0) ** 3
    kyy = (y @ y.T / dim + 1.0) ** 3
    kxy = (x @ y.T / dim + 1.0) ** 3
    m, n = x.shape[0], y.shape[0]
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2.0 * kxy.mean()
    )


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial MMD^2 over ``num_subsets`` random subsets of
    ``min(subset_size, N, M)`` vectors from each set (drawn without replacement within a subset)."""
    a = _check_features(features_a, "features_a")
    b = _check_features(features_b, "features_b")
    if num_subsets <= 0 or subset_size < 2:
        raise ValueError(f"num_subsets must be >= 1 and subset_size >= 2, got {num_subsets}, {subset_size}")
    size = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    values = [
        polynomial_mmd2(
            a[rng.choice(a.shape[0], size, replace=False)], b[rng.choice(b.shape[0], size, replace=False)]
        )
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


def _pairwise_distances(x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    return torch.cat([torch.cdist(x[i : i + chunk], y) for i in range(0, x.shape[0], chunk)])


def knn_radii(features: np.ndarray, k: int = 3) -> np.ndarray:
    """Distance from each vector ``[N, D]`` to its k-th nearest neighbour among the others ``[N]``."""
    x = torch.from_numpy(np.asarray(features, np.float64))
    if x.shape[0] <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} vectors per set, got {x.shape[0]}")
    distances = _pairwise_distances(x, x)
    return distances.kthvalue(k + 1, dim=1).values.numpy()


def coverage_fraction(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of ``points [N, D]`` within ``radii[j]`` of some ``centres[j]``."""
    distances = _pairwise_distances(torch.from_numpy(points), torch.from_numpy(centres))
    return float((distances <= torch.from_numpy(radii)[None]).any(dim=1).double().mean())


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, real_radii: np.ndarray | None = None
) -> tuple[float, float]:
    """Kynkaanniemi et al.'s (precision, recall) of ``fake`` against ``real`` with k-NN radii."""
    real = _check_features(real, "reference features")
    fake = _check_features(fake, "sample features")
    real_radii = knn_radii(real, k) if real_radii is None else np.asarray(real_radii, np.float64)
    return coverage_fraction(fake, real, real_radii), coverage_fraction(real, fake, knn_radii(fake, k))
