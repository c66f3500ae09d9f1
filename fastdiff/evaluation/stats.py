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


@dataclass
class ReferenceStats:
    """Features ``[N, D]`` of reference images of side ``image_size`` and their moments; labels ``[N]``."""

    features: np.ndarray
    labels: np.ndarray | None
    image_size: int
    network_sha1: str

    def __post_init__(self) -> None:
        self.mu, self.sigma = feature_statistics(self.features)

    def subset(self, label: int) -> "ReferenceStats":
        """The reference images of class ``label``."""
        if self.labels is None:
            raise ValueError("the reference has no class labels: --per_class needs labelled references")
        return ReferenceStats(self.features[self.labels == label], None, self.image_size, self.network_sha1)

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


def load_stats(path: str, network_sha1: str, image_size: int | None = None) -> ReferenceStats:
    """Read a statistics file, refusing one made with another feature network or (when given) image size."""
    try:
        with np.load(path) as data:
            if "format" not in data.files or str(data["format"]) != STATS_FORMAT:
                raise ValueError(f"{path!r} is not a fastdiff statistics file (written by --save_ref_stats)")
            stats = ReferenceStats(
                data["features"].astype(np.float64),
                data["labels"] if (data["labels"] >= 0).any() else None,
                int(data["image_size"]),
                str(data["network_sha1"]),
            )
    except (OSError, zipfile.BadZipFile, KeyError) as error:
        raise ValueError(f"statistics file {path!r} cannot be read: {error}") from error
    if stats.network_sha1 != network_sha1:
        raise ValueError(
            f"statistics file {path!r} was computed with another feature network (SHA-1 "
            f"{stats.network_sha1}, this one is {network_sha1}): recompute it with --save_ref_stats"
        )
    if image_size is not None and stats.image_size != image_size:
        raise ValueError(
            f"statistics file {path!r} is for {stats.image_size}x{stats.image_size} images, the samples are "
            f"{image_size}x{image_size}: recompute it at --image_size {image_size}"
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
