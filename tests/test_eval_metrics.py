"""FID, KID and precision/recall against closed forms and hand-built point sets (no feature network)."""

import numpy as np
import pytest
import torch

from fastdiff.evaluation.metrics import (
    feature_statistics,
    fid,
    frechet_distance,
    kid,
    polynomial_mmd2,
    precision_recall,
)
from fastdiff.evaluation.stats import ReferenceStats, load_stats, score


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_matches_closed_form_for_commuting_covariances():
    # Diagonal covariances commute: tr sqrt(S1 S2) = sum sqrt(d1 * d2) exactly.
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    d1, d2 = rng.uniform(0.1, 3.0, 7), rng.uniform(0.1, 3.0, 7)
    mu1, mu2 = rng.standard_normal(7), rng.standard_normal(7)
    expected = ((mu1 - mu2) ** 2).sum() + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum()
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-10)
    # Rotating both by the same orthogonal matrix changes nothing.
    q, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(d1) @ q.T, q @ mu2, q @ np.diag(d2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_general_covariances_against_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    s1, s2 = _random_spd(rng, 9), _random_spd(rng, 9)
    mu1, mu2 = rng.standard_normal(9), rng.standard_normal(9)
    root = scipy_linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric():
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    a = rng.standard_normal((50, 6))
    b = rng.standard_normal((40, 6)) * 1.5 + 0.3
    assert fid(a, a) == pytest.approx(0.0, abs=1e-9)
    assert fid(a, b) == pytest.approx(fid(b, a), rel=1e-12)
    assert fid(a, b) > 0.1


def test_feature_statistics_warns_when_fewer_vectors_than_dimensions_and_rejects_one():
    with pytest.warns(UserWarning, match="biased"):
        feature_statistics(np.random.default_rng(0).standard_normal((5, 8)))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 8)))
    with pytest.raises(ValueError, match="non-finite"):
        feature_statistics(np.full((3, 2), np.nan))


def test_polynomial_mmd2_is_unbiased_for_identical_distributions():
    # The unbiased estimator averages to 0 when both sets come from one distribution (a biased one would not).
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    values = [polynomial_mmd2(rng.standard_normal((20, 4)), rng.standard_normal((20, 4))) for _ in range(400)]
    assert abs(np.mean(values)) < 4 * np.std(values) / np.sqrt(len(values))


def test_polynomial_mmd2_matches_the_expectation_for_shifted_point_masses():
    # x ~ delta(a), y ~ delta(b): MMD^2 = k(a,a) + k(b,b) - 2 k(a,b) exactly.
    a, b = np.array([[1.0, 2.0]]), np.array([[0.5, -1.0]])
    kernel = lambda u, v: (u @ v.T / 2 + 1) ** 3  # noqa: E731
    expected = (kernel(a, a) + kernel(b, b) - 2 * kernel(a, b)).item()
    assert polynomial_mmd2(np.repeat(a, 3, 0), np.repeat(b, 4, 0)) == pytest.approx(expected, rel=1e-12)


def test_kid_mean_and_std_over_subsets():
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    a, b = rng.standard_normal((60, 5)), rng.standard_normal((60, 5)) + 1.0
    mean, std = kid(a, b, num_subsets=10, subset_size=30, seed=1)
    assert mean > 0 and std > 0
    assert kid(a, b, num_subsets=1, subset_size=1000) == (pytest.approx(polynomial_mmd2(a, b)), 0.0)


def test_precision_recall_on_hand_built_points():
    # Reference: 5 points on a line, spacing 1, so every 3-NN radius is >= 2. Samples: two inside, one far.
    real = np.array([[0.0, 0], [1, 0], [2, 0], [3, 0], [4, 0]])
    fake = np.array([[1.5, 0.5], [2.0, 0.0], [50.0, 50.0], [51.0, 50.0], [50.0, 51.0]])
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == pytest.approx(2 / 5)
    # Fake 3-NN radii: the two near points' third neighbour is far away (about 68), so they cover all reals.
    assert recall == pytest.approx(1.0)
    precision, recall = precision_recall(real, real + 100.0, k=3)
    assert (precision, recall) == (0.0, 0.0)
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(real[:3], fake, k=3)


def test_score_and_stats_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    reference = ReferenceStats(rng.standard_normal((30, 4)), np.arange(30) % 3, 16, "abc")
    path = str(tmp_path / "ref.npz")
    reference.save(path)
    loaded = load_stats(path, "abc", 16)
    np.testing.assert_allclose(loaded.features, reference.features, rtol=1e-6)
    assert (loaded.labels == reference.labels).all()
    result = score(loaded, reference.features, kid_subsets=5, kid_subset_size=10)
    assert result["fid"] == pytest.approx(0.0, abs=1e-5)
    assert (result["precision"], result["recall"]) == (1.0, 1.0)
    assert (result["num_ref"], result["num_samples"]) == (30, 30)
    with pytest.raises(ValueError, match="another feature network"):
        load_stats(path, "def", 16)
    with pytest.raises(ValueError, match="32x32"):
        load_stats(path, "abc", 32)
    assert len(reference.subset(1).features) == 10
