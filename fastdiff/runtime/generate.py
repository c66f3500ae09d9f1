"""Samples from fixed starting noise: the training grids and the in-training evaluation draw this way."""

from collections.abc import Callable

import torch

from fastdiff.diffusion.sampling import sample_batch
from fastdiff.runtime.image_grid import to_uint8_nhwc
from fastdiff.runtime.precision import Precision


@torch.no_grad()
def sample_from_noise(
    model: torch.nn.Module,
    diffusion,
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    sampling: dict,
    precision: Precision,
    seed: int,
    batch_size: int,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """uint8 samples ``[K, H, W, C]`` (CPU) from the starting ``noise`` ``[K, C, H, W]`` and class ``labels``
    ``[K]`` (or None), by sample_batch with the options ``sampling`` (``SamplingConfig.options()``),
    ``batch_size`` at a time. ``decode`` (a latent model's VAE decoder: latents ``[k, C, h, w]`` -> images
    ``[k, C', H, W]`` in [-1, 1]) turns the samples into images first.
    Any noise the sampler draws comes from ``seed``; the global RNGs are left as
    they were."""
    chunks = []
    devices = [noise.device] if noise.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), precision.autocast():
        torch.manual_seed(seed)
        for start in range(0, noise.shape[0], batch_size):
            part = noise[start : start + batch_size]
            kwargs = {} if labels is None else {"y": labels[start : start + batch_size]}
            sample = sample_batch(
                model,
                diffusion,
                tuple(part.shape),
                noise=part,
                model_kwargs=kwargs,
                **sampling,
            )
            if decode is not None:
                sample = decode(sample)
            chunks.append(to_uint8_nhwc(sample).cpu())
    return torch.cat(chunks)
