"""Gaussian data with the exact denoiser and the exact probability-flow map: a closed-form check of samplers.

For x_0 ~ N(m, diag(c^2)) and x_t = alpha x_0 + sigma noise, in EDM's variables (y = x_t / alpha, noise level
s = sigma / alpha) the perfectly trained model is D(y, s) = m + c^2 / (c^2 + s^2) (y - m) per coordinate, and
the probability-flow ODE dy/ds = (y - D) / s keeps (y - m) / sqrt(c^2 + s^2) constant. So the exact ODE map
from the starting noise x_T at the noisiest trained step to any noise level is known, and a solver's error
is its distance from it (``benchmarks/solver_error.py --closed_form``, tests/test_sampling.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .data_moments import DataMoments
from .gaussian_diffusion import GaussianDiffusion, ModelMeanType, ModelVarType
from .sampling import NoiseSchedule
from .solvers import GridPoint


class GaussianData:
    """x_0 ~ N(mean, diag(scales^2)) over C coordinates; samples are [N, C] float64."""

    def __init__(self, mean: torch.Tensor, scales: torch.Tensor) -> None:
        self.mean = mean.to(torch.float64)
        self.scales = scales.to(torch.float64)

    @classmethod
    def log_uniform(cls, channels: int, low: float, high: float, seed: int = 0, mean: float = 0.0):
        """Scales log-uniform over [low, high] (drawn with ``seed``), every coordinate's mean ``mean``."""
        generator = torch.Generator().manual_seed(seed)
        fractions = torch.rand(channels, generator=generator, dtype=torch.float64)
        scales = torch.exp(math.log(low) + fractions * (math.log(high) - math.log(low)))
        return cls(torch.full((channels,), float(mean), dtype=torch.float64), scales)

    def moments(self, rank: int | None = None) -> DataMoments:
        """The exact Gaussian fit (items of shape [C]): every coordinate a principal direction, or the
        ``rank`` largest, the others' mean variance as the residual."""
        variances, order = torch.sort(self.scales**2, descending=True)
        rank = len(order) if rank is None else rank
        directions = torch.eye(len(order), dtype=torch.float64)[order[:rank]]
        rest = variances[rank:]
        residual = float(rest.mean()) if len(rest) else 0.0
        return DataMoments(self.mean.clone(), directions, variances[:rank].clone(), residual, count=2)

    def denoise(self, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """E[x_0 | x_t = x] for x [N, C] at (alpha, sigma); alpha = 0 gives the mean."""
        variances = self.scales**2
        gain = alpha * variances / (alpha**2 * variances + sigma**2)
        return self.mean + (x - alpha * self.mean) * gain

    def model(self, diffusion: GaussianDiffusion) -> Callable[..., torch.Tensor]:
        """The perfectly trained model of ``diffusion`` (its mean type; a learned variance's channels -1),
        called as model(x [N, C], t [N]) with the diffusion's model timesteps, fractional ones too (mapped
        to a noise level as ``NoiseSchedule.point_at_sigma`` maps back: log s linear between trained
        steps)."""
        schedule = NoiseSchedule.from_diffusion(diffusion)
        sigmas = schedule.edm_sigmas()
        finite = np.isfinite(sigmas)
        times, log_sigmas = schedule.model_timesteps[finite], np.log(sigmas[finite])
        mean_type = diffusion.model_mean_type
        learned = diffusion.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)

        def model(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
            step = float(t[0])
            if not finite[-1] and step > times[-1]:
                alpha, sigma = 0.0, 1.0
            else:
                s = math.exp(float(np.interp(step, times, log_sigmas)))
                alpha, sigma = 1.0 / math.sqrt(1.0 + s * s), s / math.sqrt(1.0 + s * s)
            x0 = self.denoise(x, alpha, sigma)
            if mean_type == ModelMeanType.START_X:
                out = x0
            else:
                eps = (x - alpha * x0) / sigma
                out = alpha * eps - sigma * x0 if mean_type == ModelMeanType.VELOCITY else eps
            return torch.cat([out, -torch.ones_like(out)], 1) if learned else out

        return model

    def flow(self, schedule: NoiseSchedule, noise: torch.Tensor, end: GridPoint) -> torch.Tensor:
        """The exact probability-flow map of x_T = ``noise`` [N, C] at the noisiest trained step to the
        noise level of ``end``, then the x_0 prediction there (what every solver returns for a grid that
        ends at ``end``): [N, C]."""
        variances = self.scales**2
        alpha_bar_top = float(schedule.alphas_cumprod[-1])
        if alpha_bar_top == 0.0:  # zero terminal SNR: (y - m) / sqrt(c^2 + s^2) -> x_T as s -> inf
            invariant = noise
        else:
            s_top = math.sqrt((1.0 - alpha_bar_top) / alpha_bar_top)
            invariant = (noise / math.sqrt(alpha_bar_top) - self.mean) / torch.sqrt(variances + s_top**2)
        s_end = end.sigma / end.alpha
        y_end = self.mean + invariant * torch.sqrt(variances + s_end**2)
        return self.denoise(end.alpha * y_end, end.alpha, end.sigma)
