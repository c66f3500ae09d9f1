"""Sample grids during training: the EMA model, a few deterministic DDIM steps, the same noise every time."""

import copy
import os

import torch

from fastdiff.runtime.generate import sample_from_noise
from fastdiff.runtime.image_grid import save_image_grid
from fastdiff.runtime.precision import Precision
from fastdiff.runtime.rng import derive_seed
from fastdiff.training.ema import ParameterEMA


def preview_filename(step: int) -> str:
    """``samples_{step:06d}.png``."""
    return f"samples_{step:06d}.png"


class SamplePreview:
    """Writes a PNG grid of ``num_samples`` EMA samples (rate index 0) with a respaced diffusion and
    ``sampling``: sample_batch's options (``SamplingConfig.options()``); any noise the sampler draws comes
    from a generator of its own.

    The starting noise and the class labels (0, 1, ..., cycling over ``num_classes``) are fixed for the
    run, so successive grids show the same samples improving. The global RNGs are left as they were.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sampling_diffusion,
        image_size: int,
        num_samples: int,
        num_classes: int | None,
        seed: int,
        precision: Precision,
        sampling: dict,
        batch_size: int = 64,
    ) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.diffusion = sampling_diffusion
        self.precision = precision
        self.sampling = dict(sampling)
        self.seed = seed
        self.batch_size = batch_size
        device = next(self.model.parameters()).device
        generator = torch.Generator().manual_seed(derive_seed(seed, 0x5A3))
        self.noise = torch.randn((num_samples, 3, image_size, image_size), generator=generator).to(device)
        self.labels = torch.arange(num_samples, device=device) % num_classes if num_classes else None

    @torch.no_grad()
    def write(self, ema: ParameterEMA, log_dir: str, step: int) -> str:
        """Sample with the EMA weights and write ``samples_{step}.png`` in ``log_dir``; returns its path."""
        ema.copy_to(self.model, 0)
        images = sample_from_noise(
            self.model,
            self.diffusion,
            self.noise,
            self.labels,
            self.sampling,
            self.precision,
            derive_seed(self.seed, 0x5A4),
            self.batch_size,
        )
        path = os.path.join(log_dir, preview_filename(step))
        save_image_grid(images.numpy(), path)
        return path
