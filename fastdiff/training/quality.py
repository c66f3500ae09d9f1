"""Sample quality during training: every ``--eval_interval`` steps, FID/KID/precision/recall of
``--eval_samples`` EMA samples (rate index 0) against the training data, and the best EMA checkpoint kept.

The reference statistics (``--eval_ref`` training images, evenly spaced over the dataset, with the training
data's channels: grey ones repeat their channel for the feature network, RGBA ones drop alpha) are computed
once, all ranks sharing the feature extraction, and cached in the log dir as ``fid_reference_{S}px_{N}.npz``
(``{H}x{W}px`` for non-square images, ``_{C}ch`` added for C other than 3 channels); a cached file from
another feature network, image size or channel count is recomputed. A latent model's samples and
reference items are decoded by its VAE (``decode``) first, and the cache's name carries the VAE's
fingerprint (``_vae`` + 8 hex digits). The samples are drawn like the
sample grids (the preview's respaced diffusion and sampler, through sample_batch) from noise fixed for the
run, each rank drawing its share. When an evaluation gives a lower FID than any before in this log dir,
rank 0 writes ``ema_{rate}_best.pt`` and ``ema_{rate}_best.json`` (step and metrics) atomically; a resumed
run reads that JSON and keeps the best.
"""

import json
import math
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch

from fastdiff import dist_util
from fastdiff.evaluation.features import extract_features, reference_stats
from fastdiff.evaluation.inception import load_feature_network
from fastdiff.evaluation.stats import ReferenceStats, is_stats_file, load_stats, score
from fastdiff.runtime.checkpoint import atomic_save
from fastdiff.runtime.precision import Precision
from fastdiff.runtime.rng import derive_seed
from fastdiff.training.ema import ParameterEMA
from fastdiff.training.preview import EmaSampler

METRIC_NAMES = ("fid", "kid", "kid_std", "precision", "recall")
FEATURE_CHANNELS = (1, 3, 4)
"""Channel counts the feature network scores (grey repeated, RGBA without alpha)."""
PR_K = 3


def best_filenames(rate: float) -> tuple[str, str]:
    """``(ema_{rate}_best.pt, ema_{rate}_best.json)``."""
    return f"ema_{rate}_best.pt", f"ema_{rate}_best.json"


def reference_filename(shape: tuple[int, ...], num_ref: int, tag: str = "") -> str:
    """The cached reference statistics of images ``shape`` ``(C, H, W)``: ``fid_reference_16px_256.npz`` for
    16x16 RGB, ``fid_reference_16x24px_1ch_256.npz`` for 16x24 grey; ``tag`` (e.g. ``vae0123abcd`` for
    decoded latents) goes before the count."""
    channels, height, width = shape
    size = f"{height}" if height == width else f"{height}x{width}"
    tagged = f"_{tag}" if tag else ""
    return f"fid_reference_{size}px{'' if channels == 3 else f'_{channels}ch'}{tagged}_{num_ref}.npz"


Decoder = Callable[[torch.Tensor], torch.Tensor]
"""A latent model's VAE decoder: latents ``[B, C, h, w]`` -> images ``[B, C', H, W]`` in [-1, 1]."""


def dataset_uint8(dataset, count: int, decode: Decoder | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``count`` items of a training dataset (float ``[C, H, W]`` in [-1, 1]; latents decoded by ``decode``)
    evenly spaced over it, as uint8 ``[count, H, W, C]`` (rounded: the inverse of the loaders' ``u / 127.5 -
    1``) and labels ``[count]``."""
    indices = np.linspace(0, len(dataset) - 1, count).round().astype(int)
    items = [dataset[int(index)] for index in indices]
    images = torch.stack([image for image, _ in items])
    if decode is not None:
        images = decode(images).cpu()
    images = images.add(1.0).mul(127.5).round().clamp(0, 255)
    labels = np.array([int(label) for _, label in items], dtype=np.int64)
    return images.to(torch.uint8).permute(0, 2, 3, 1).numpy(), labels


class TrainingEvaluation:
    """Scores the EMA model every ``interval`` steps (see the module docstring). Every rank must call."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        sampling_diffusion,
        sampling: dict,
        dataset,
        interval: int,
        num_samples: int,
        num_ref: int,
        num_classes: int | None,
        seed: int,
        precision: Precision,
        ctx,
        log_dir: str,
        ema_rate: float,
        inception: str = "",
        batch_size: int = 64,
        decode: Decoder | None = None,
        decode_tag: str = "",
    ) -> None:
        if interval <= 0:
            raise ValueError(f"eval_interval must be positive, got {interval}")
        least = PR_K + 1
        if num_samples < least:
            raise ValueError(
                f"--eval_samples must be >= {least} (precision/recall's k is {PR_K}), got {num_samples}"
            )
        if num_ref < least or len(dataset) < least:
            raise ValueError(
                f"--eval_interval needs at least {least} reference images: --eval_ref is {num_ref} and the "
                f"training data holds {len(dataset)}"
            )
        shape = tuple(int(side) for side in dataset[0][0].shape)  # (C, H, W) of the model
        image_shape = shape
        if decode is not None:  # latents: the images are the VAE's decodings
            image_shape = tuple(int(side) for side in decode(dataset[0][0][None]).shape[1:])
        if image_shape[0] not in FEATURE_CHANNELS:
            raise ValueError(
                f"the feature network scores 1-, 3- or 4-channel images; the training data has "
                f"{image_shape[0]} channels (--in_channels)"
            )
        self.decode, self.decode_tag = decode, decode_tag
        self.interval = interval
        self.ctx = ctx
        self.log_dir = log_dir
        self.ema_rate = ema_rate
        self.seed = seed
        self.batch_size = batch_size
        self.network = load_feature_network(inception, ctx.device)
        share = math.ceil(num_samples / ctx.world_size)
        self.num_samples = num_samples
        generator = torch.Generator().manual_seed(derive_seed(seed, 0xE7A1, ctx.rank))
        noise = torch.randn((share, *shape), generator=generator)
        positions = torch.arange(share) * ctx.world_size + ctx.rank
        labels = positions % num_classes if num_classes else None
        self.sampler = EmaSampler(
            model, sampling_diffusion, noise, labels, sampling, precision, batch_size, decode
        )
        self.reference = self._reference(dataset, num_ref, image_shape)
        self.best_fid = self._read_best_fid()

    def _reference(self, dataset, num_ref: int, shape: tuple[int, ...]) -> ReferenceStats:
        path = os.path.join(self.log_dir, reference_filename(shape, num_ref, self.decode_tag))
        usable = dist_util.broadcast_object(os.path.isfile(path) and is_stats_file(path))
        if usable:
            try:
                return load_stats(path, self.network.sha1, shape[1:], shape[0])
            except ValueError:
                pass
        images, labels = dataset_uint8(dataset, min(num_ref, len(dataset)), self.decode)
        stats = reference_stats(self.network, images, labels, self.ctx, self.batch_size)
        if self.ctx.is_main:
            stats.save(path)
        return stats

    def state_dict(self) -> dict[str, float]:
        """The best FID so far (saved in every full training state)."""
        return {"best_fid": float(self.best_fid)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """The saved best, unless the best checkpoint on disk is better (it is never replaced by a worse)."""
        self.best_fid = min(float(state["best_fid"]), self._read_best_fid())

    def _read_best_fid(self) -> float:
        path = os.path.join(self.log_dir, best_filenames(self.ema_rate)[1])
        if not os.path.isfile(path):
            return math.inf
        with open(path) as handle:
            return float(json.load(handle)["fid"])

    @torch.no_grad()
    def _samples(self, ema: ParameterEMA) -> np.ndarray:
        """``num_samples`` uint8 EMA samples ``[K, H, W, C]``, gathered from every rank."""
        images = self.sampler.draw(ema, derive_seed(self.seed, 0xE7A2, self.ctx.rank))
        parts = dist_util.all_gather_object(images.numpy())
        return np.concatenate(parts)[: self.num_samples]

    def run(self, ema: ParameterEMA, model: torch.nn.Module, step: int) -> dict[str, float]:
        """The metrics of this step's EMA samples (``eval_`` + fid, kid, ...); keeps the best checkpoint."""
        images = self._samples(ema)
        features = extract_features(self.network, images, self.ctx, self.batch_size, desc="eval features")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small K: FID is biased, as docs/evaluation.md says
            metrics = score(self.reference, features, kid_subsets=50, k=PR_K, seed=step)
        values = {f"eval_{name}": float(metrics[name]) for name in METRIC_NAMES}
        if metrics["fid"] < self.best_fid:
            self.best_fid = metrics["fid"]
            if self.ctx.is_main:
                self._write_best(ema, model, step, metrics)
            values["eval_best"] = 1.0
        return values

    def _write_best(self, ema: ParameterEMA, model: torch.nn.Module, step: int, metrics: dict) -> None:
        weights_name, json_name = best_filenames(self.ema_rate)
        state = {name: value.detach().cpu().clone() for name, value in ema.model_state_dict(model, 0).items()}
        atomic_save(state, os.path.join(self.log_dir, weights_name))
        record = {"step": step, **metrics, "checkpoint": weights_name}
        partial = os.path.join(self.log_dir, json_name + ".tmp")
        with open(partial, "w") as handle:
            json.dump(record, handle, indent=1)
        os.replace(partial, os.path.join(self.log_dir, json_name))
