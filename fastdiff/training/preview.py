"""Sample grids during training: the EMA model, a few deterministic DDIM steps, the same noise every time."""

import copy
import os
from collections.abc import Callable

import torch

from fastdiff.runtime.generate import sample_from_noise
from fastdiff.runtime.image_grid import save_image_grid
from fastdiff.runtime.precision import Precision
from fastdiff.runtime.rng import derive_seed
from fastdiff.training.ema import ParameterEMA


def preview_filename(step: int) -> str:
    """``samples_{step:06d}.png``."""
    return f"samples_{step:06d}.png"


class EmaSampler:
    """Samples of the EMA weights (rate index 0) from starting ``noise`` ``[K, C, H, W]`` and ``labels``
    ``[K]`` (or None) fixed for the run, with a respaced ``diffusion`` and ``sampling`` (sample_batch's
    options, ``SamplingConfig.options()``). The grids and the in-training evaluation both draw this way.
    ``decode`` (a latent model's VAE decoder) turns sampled latents into images before they become uint8."""

    def __init__(
        self,
        model: torch.nn.Module,
        diffusion,
        noise: torch.Tensor,
        labels: torch.Tensor | None,
        sampling: dict,
        precision: Precision,
        batch_size: int = 64,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.decode = decode
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        device = next(self.model.parameters()).device
        self.diffusion = diffusion
        self.noise = noise.to(device)
        self.labels = labels.to(device) if labels is not None else None
        self.sampling = dict(sampling)
        self.precision = precision
        self.batch_size = batch_size

    @torch.no_grad()
    def draw(self, ema: ParameterEMA, seed: int) -> torch.Tensor:
        """uint8 samples ``[K, H, W, C]`` (CPU; decoded images for a latent model); any noise the sampler
        draws comes from ``seed``."""
        ema.copy_to(self.model, 0)
        return sample_from_noise(
            self.model, self.diffusion, self.noise, self.labels, self.sampling, self.precision, seed,
            self.batch_size, self.decode,
        )  # fmt: skip


class SamplePreview(EmaSampler):
    """Writes a PNG grid of ``num_samples`` EMA samples of ``shape`` ``(C, H, W)`` (the model's; decoded by
    ``decode`` for a latent model; see :class:`EmaSampler`);
    any noise the sampler draws comes from a generator of its own.

    The starting noise and the class labels (0, 1, ..., cycling over ``num_classes``) are fixed for the
    run, so successive grids show the same samples improving. The global RNGs are left as they were.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sampling_diffusion,
        shape: tuple[int, int, int],
        num_samples: int,
        num_classes: int | None,
        seed: int,
        precision: Precision,
        sampling: dict,
        batch_size: int = 64,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        generator = torch.Generator().manual_seed(derive_seed(seed, 0x5A3))
        noise = torch.randn((num_samples, *shape), generator=generator)
        labels = torch.arange(num_samples) % num_classes if num_classes else None
        super().__init__(model, sampling_diffusion, noise, labels, sampling, precision, batch_size, decode)
        self.seed = seed

    def write(self, ema: ParameterEMA, log_dir: str, step: int) -> str:
        """Sample with the EMA weights and write ``samples_{step}.png`` in ``log_dir``; returns its path."""
        images = self.draw(ema, derive_seed(self.seed, 0x5A4))
        path = os.path.join(log_dir, preview_filename(step))
        save_image_grid(images.numpy(), path)
        return path
