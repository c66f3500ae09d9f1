"""Sample grids during training: the EMA model, a few deterministic DDIM steps, the same noise every time."""

import copy
import os

import torch

from fastdiff.diffusion.sampling import sample_batch
from fastdiff.training.ema import ParameterEMA
from fastdiff.training.image_grid import save_image_grid, to_uint8_nhwc
from fastdiff.training.precision import Precision
from fastdiff.training.rng import derive_seed


def preview_filename(step: int) -> str:
    """``samples_{step:06d}.png``."""
    return f"samples_{step:06d}.png"


class SamplePreview:
    """Writes a PNG grid of ``num_samples`` EMA samples (rate index 0) with a respaced diffusion, by DDIM
    (deterministic, eta 0) or by ancestral DDPM sampling (its noise drawn from a generator of its own), or
    with ``sampling``: sample_batch's options (sampler, steps, timestep_spacing, guidance_scale).

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
        use_ddim: bool = True,
        batch_size: int = 64,
        sampling: dict | None = None,
    ) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.diffusion = sampling_diffusion
        self.precision = precision
        self.use_ddim = use_ddim
        self.sampling = sampling or {"sampler": "ddim" if use_ddim else "ddpm"}
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
) -> torch.Tensor:
    """uint8 samples ``[K, S, S, 3]`` (CPU) from the starting ``noise`` ``[K, 3, S, S]`` and class ``labels``
    ``[K]`` (or None), by sample_batch with ``sampling``'s options, ``batch_size`` at a time. Any noise the
    sampler draws comes from ``seed``; the global RNGs are left as they were."""
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
                clip_denoised=True,
                model_kwargs=kwargs,
                **sampling,
            )
            chunks.append(to_uint8_nhwc(sample).cpu())
    return torch.cat(chunks)
