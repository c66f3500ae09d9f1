"""Reference statistics: what FID, KID and precision/recall need from the reference images, saved and checked.

A statistics file (``--save_ref_stats PATH``, an ``.npz``) keeps the float64 mean and covariance (FID), the
reference features themselves as float32 ``[N, 2048]`` (KID and precision/recall need every vector, not just
the moments; about 8 KiB per image), the reference class labels (``-1`` when there are none), the image size
and the SHA-1 of the feature network. A file from another network or image size is refused.
"""

import os
import zipfile
from dataclasses import dataclass

import numpy as np

from fastdiff.evaluation.metrics import (
    feature_statistics,
    frechet_distance,
    kid,
    knn_radii,
    precision_recall,
)

STATS_FORMAT = "fastdiff-fid-stats-v1"


def size_text(size: tuple[int, int]) -> str:
    """``(48, 64)`` -> ``"48x64"`` (height x width)."""
    return f"{size[0]}x{size[1]}"


def _as_sides(image_size: int | tuple[int, int] | np.ndarray) -> tuple[int, int]:
    sides = np.asarray(image_size).reshape(-1).tolist()
    return (int(sides[0]), int(sides[-1]))


@dataclass
class ReferenceStats:
    """Features ``[N, D]`` of reference images of ``image_size`` (``(height, width)``; a side is taken for a
    square) with ``channels`` channels, and their moments; labels ``[N]``."""

    features: np.ndarray
    labels: np.ndarray | None
    image_size: tuple[int, int]
    network_sha1: str
    channels: int = 3

    def __post_init__(self) -> None:
        self.image_size = _as_sides(self.image_size)
        self.mu, self.sigma = feature_statistics(self.features)

    def subset(self, label: int) -> "ReferenceStats":
        """The reference images of class ``label``."""
        if self.labels is None:
            raise ValueError("the reference has no class labels: --per_class needs labelled references")
        return ReferenceStats(
            self.features[self.labels == label], None, self.image_size, self.network_sha1, self.channels
        )

    def save(self, path: str) -> None:
        """Write the ``.npz`` statistics file (atomically)."""
        if not path.endswith(".npz"):
            raise ValueError(f"--save_ref_stats must name a .npz file, got {path!r}")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        partial = path[: -len(".npz")] + ".partial.npz"
        np.savez(
            partial,
            format=np.array(STATS_FORMAT),
            mu=self.mu,
            sigma=self.sigma,
            features=self.features.astype(np.float32),
            labels=np.full(len(self.features), -1) if self.labels is None else self.labels.astype(np.int64),
            image_size=np.array(self.image_size),
            channels=np.array(self.channels),
            network_sha1=np.array(self.network_sha1),
        )
        os.replace(partial, path)


def is_stats_file(path: str) -> bool:
    """Whether ``path`` is an ``.npz`` written by :meth:`ReferenceStats.save`."""
    try:
        with np.load(path) as data:
            return "format" in data.files and str(data["format"]) == STATS_FORMAT
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


def load_stats(
    path: str,
    network_sha1: str,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
) -> ReferenceStats:
    """Read a statistics file, refusing one made with another feature network or (when given) image size
    (a side or ``(height, width)``) or channel count."""
    try:
        with np.load(path) as data:
            if "format" not in data.files or str(data["format"]) != STATS_FORMAT:
                raise ValueError(f"{path!r} is not a fastdiff statistics file (written by --save_ref_stats)")
            stats = ReferenceStats(
                data["features"].astype(np.float64),
                data["labels"] if (data["labels"] >= 0).any() else None,
                _as_sides(data["image_size"]),
                str(data["network_sha1"]),
                int(data["channels"]) if "channels" in data.files else 3,
            )
    except (OSError, zipfile.BadZipFile, KeyError) as error:
        raise ValueError(f"statistics file {path!r} cannot be read: {error}") from error
    if stats.network_sha1 != network_sha1:
        raise ValueError(
            f"statistics file {path!r} was computed with another feature network (SHA-1 "
            f"{stats.network_sha1}, this one is {network_sha1}): recompute it with --save_ref_stats"
        )
    if image_size is not None and stats.image_size != _as_sides(image_size):
        size = _as_sides(image_size)
        raise ValueError(
            f"statistics file {path!r} is for {size_text(stats.image_size)} images, the samples are "
            f"{size_text(size)}: recompute it at --image_size {','.join(map(str, dict.fromkeys(size)))}"
        )
    if channels is not None and stats.channels != channels:
        raise ValueError(
            f"statistics file {path!r} is for {stats.channels}-channel images, the samples have {channels}: "
            "recompute it from references with the samples' channel count"
        )
    return stats


def score(
    reference: ReferenceStats,
    sample_features: np.ndarray,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    k: int = 3,
    seed: int = 0,
) -> dict[str, float | int]:
    """fid, kid, kid_std, precision, recall, num_samples, num_ref of ``sample_features`` ``[N, D]``."""
    mu, sigma = feature_statistics(sample_features)
    kid_mean, kid_std = kid(reference.features, sample_features, kid_subsets, kid_subset_size, seed)
    precision, recall = precision_recall(
        reference.features, sample_features, k, real_radii=knn_radii(reference.features, k)
    )
    return {
        "fid": frechet_distance(reference.mu, reference.sigma, mu, sigma),
        "kid": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "num_samples": len(sample_features),
        "num_ref": len(reference.features),
    }
