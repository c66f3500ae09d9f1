"""Beta schedules: the per-step noise variances beta_t of the forward diffusion process."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import numpy as np

BETA_SCHEDULES = ("linear", "cosine")


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Return a named beta schedule as a float64 array of shape [num_diffusion_timesteps].

    "linear" is Ho et al.'s schedule (1e-4 to 0.02 at 1000 steps), with both ends scaled by
    1000 / num_diffusion_timesteps so the process stays similar at other step counts.
    "cosine" is Nichol & Dhariwal's alpha_bar(s) = cos(((s + 0.008) / 1.008) * pi / 2)^2, with each
    beta capped at 0.999.
    """
    num_diffusion_timesteps = _step_count(num_diffusion_timesteps)
    if schedule_name == "linear":
        scale = 1000.0 / num_diffusion_timesteps
        beta_start, beta_end = scale * 1e-4, scale * 0.02
        if beta_end > 1.0:
            raise ValueError(
                f"the linear schedule needs num_diffusion_timesteps >= 20 (its last beta is "
                f"20 / num_diffusion_timesteps), got {num_diffusion_timesteps}"
            )
        return np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(num_diffusion_timesteps, _cosine_alpha_bar)
    raise ValueError(f"unknown schedule_name {schedule_name!r}; expected one of {list(BETA_SCHEDULES)}")


def _step_count(num_diffusion_timesteps: int) -> int:
    if isinstance(num_diffusion_timesteps, bool):
        raise TypeError("num_diffusion_timesteps must be an int, got a bool")
    try:
        steps = operator.index(num_diffusion_timesteps)
    except TypeError:
        raise TypeError(
            f"num_diffusion_timesteps must be an int, got {type(num_diffusion_timesteps).__name__}"
        ) from None
    if steps < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {steps}")
    return steps


def _cosine_alpha_bar(s: float) -> float:
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha_bar(s), s in [0, 1], into betas of shape [num_diffusion_timesteps].

    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta), so the cumulative product of
    (1 - beta) follows alpha_bar at the step boundaries. max_beta < 1 keeps the last steps from being
    singular.
    """
    num_diffusion_timesteps = _step_count(num_diffusion_timesteps)
    if not 0.0 < max_beta <= 1.0:
        raise ValueError(f"max_beta must lie in (0, 1], got {max_beta}")
    steps = num_diffusion_timesteps
    betas = [min(1.0 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)]
    return np.array(betas, dtype=np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so that the last step has zero SNR (Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Algorithm 1): [T] -> [T].

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged; the
    betas follow from the ratios of consecutive alpha_bar. The last beta is exactly 1, so alpha_bar_T = 0
    exactly: x_T is pure noise, as the sampler's starting point assumes. An epsilon-predicting model is
    undefined there (x_0 cannot be recovered from x_T = noise), so use it with v or x_0 prediction.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2:
        raise ValueError(f"rescale_zero_terminal_snr needs a 1-D schedule of >= 2 steps, got {betas.shape}")
    sqrt_alpha_bar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = np.append(alpha_bar[0], alpha_bar[1:] / alpha_bar[:-1])
    alphas[-1] = 0.0  # (0 - 0) * scale is 0 already; stated so the last beta is exactly 1
    return 1.0 - alphas
