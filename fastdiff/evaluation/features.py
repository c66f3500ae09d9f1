"""Feature extraction over ranks: each rank takes every ``world_size``-th image, features are gathered."""

import numpy as np
from tqdm.auto import tqdm

from fastdiff import dist_util
from fastdiff.evaluation.inception import FEATURE_DIM, FeatureNetwork
from fastdiff.evaluation.stats import ReferenceStats


def extract_features(
    network: FeatureNetwork, images: np.ndarray, ctx, batch_size: int = 64, desc: str = "features"
) -> np.ndarray:
    """Features float64 ``[N, 2048]`` of uint8 ``[N, H, W, C]`` (the same on every rank; C 1, 3 or 4, made
    RGB by :func:`fastdiff.evaluation.inception.preprocess`), with a progress bar on rank 0; rank ``r``
    computes images ``r, r + W, r + 2W, ...``."""
    share = images[ctx.rank :: ctx.world_size]
    with tqdm(total=len(images), desc=desc, unit="img", disable=not ctx.is_main, leave=False) as bar:
        features = network.features(share, batch_size, progress=lambda n: bar.update(n * ctx.world_size))
    if ctx.world_size == 1:
        return features
    gathered = np.empty((len(images), FEATURE_DIM), dtype=np.float64)
    for rank, part in enumerate(dist_util.all_gather_object(features)):
        gathered[rank :: ctx.world_size] = part
    return gathered


def reference_stats(
    network: FeatureNetwork, images: np.ndarray, labels: np.ndarray | None, ctx, batch_size: int = 64
) -> ReferenceStats:
    """:class:`ReferenceStats` of uint8 reference images ``[N, H, W, C]`` (labels ``[N]`` or None)."""
    features = extract_features(network, images, ctx, batch_size, desc="reference features")
    return ReferenceStats(
        features, labels, (int(images.shape[1]), int(images.shape[2])), network.sha1, int(images.shape[3])
    )
