"""One place to sample a batch: DDPM, DDIM, DPM-Solver++(2M) and (3M), UniPC, EDM's Heun and Euler, with
optional classifier-free guidance, over any model of a (respaced) GaussianDiffusion.

Every sampler takes the same three things: a model function (the network, possibly guided), the noise
schedule it was trained with (the diffusion's alpha_bar at its discrete steps) and a grid of steps.

- ``ddpm`` and ``ddim`` are GaussianDiffusion's own ``p_sample_loop`` and ``ddim_sample_loop`` (the one
  implementation, improved-diffusion's results bit for bit), run on the diffusion respaced to the chosen
  trained steps. One model call per step.
- ``euler``, ``heun``, ``dpmpp_2m``, ``dpmpp_3m`` and ``unipc`` integrate the probability-flow ODE in the
  variance-preserving variables x_t = alpha_t x_0 + sigma_t noise (alpha_t = sqrt(alpha_bar_t), sigma_t =
  sqrt(1 - alpha_bar_t); EDM's noise level is s = sigma_t / alpha_t and its state x_t / alpha_t), in
  ``fastdiff.diffusion.solvers`` (formulas there). They see the model only through its x_0 prediction
  D(x_t, t), converted from epsilon, x_0 or v (the mean channels of a learned-sigma model), clamped to
  [-1, 1] with clip_denoised. Each ends with the step to s = 0, whose result is D at the last grid point, as
  DDIM's last step is. heun makes 2N - 1 model calls for N grid points, the others N: euler (DDIM's
  update), heun (EDM's Algorithm 1), dpmpp_2m and dpmpp_3m (Lu et al. 2022, multistep, data prediction) and
  unipc (Zhao et al. 2023: predictor of order --solver_order, 2 by default, and a corrector that reuses the
  next step's model call; B(h) variant bh2 by default).

Grids (``timestep_spacing``) over the diffusion's K trained steps, N points from the noisiest step down:
``uniform`` (improved-diffusion's even spacing, ``space_timesteps(K, [N])``), ``quadratic`` (step indices
(K-1) (i/(N-1))^2, rounded and kept distinct), ``trailing`` (diffusers' K-1-round(iK/N): from step K-1 by
even strides, ending at step K/N-1 rather than 0), ``karras`` (EDM's
s_i = (s_max^(1/7) + i/(N-1) (s_min^(1/7) - s_max^(1/7)))^7 between the schedule's extreme noise levels;
ODE samplers only), ``logsnr`` (log s, i.e. lambda = -log s, evenly spaced between the same extremes:
DPM-Solver's "logSNR" grid; ODE samplers only) and ``capped_logsnr`` / ``capped_karras``: the noisiest
trained step, then the logsnr / karras spacing from ``--sigma_max`` down to ``--sigma_min`` (ODE samplers
only). uniform, quadratic and trailing land on trained steps. Noise levels between trained steps are mapped
to a fractional timestep by linear interpolation of log s over the trained steps (the model is called with
that fractional timestep, which the UNet's sinusoidal embedding takes as it is), and the schedule's alpha,
sigma at that point come from s itself.

Which grid: ``auto`` is ``uniform`` for ddpm and ddim (improved-diffusion's results) and ``capped_logsnr``
for the ODE samplers. Its start (--sigma_max 0) is 80, EDM's sigma_max for data in [-1, 1], and for the
multistep samplers (unipc, dpmpp_2m, dpmpp_3m) their model calls between 10 and 80; its end (--sigma_min 0)
is s = (1.6 / model calls)^2, or step 0 where that is higher (0.10 at 5 calls, 0.026 at 10, step 0 from 20
on cosine 1000). With the training data's Gaussian fit (``--ode_start``) it starts lower still, with no
model call above its start. Both ends spend no points where little happens:

* the start. Above s ~ 80 the data's share of x_t is ~1/80 of the noise's and the solution barely moves:
  the first step, from the noisiest trained step, is Euler's (DDIM's) step to sigma_max, exact as D stops
  changing there (its error falls as (c/sigma_max)^2 for data of scale c). On the cosine schedule the
  clipped last beta makes s jump 642 -> 20291 (1000 steps) or 2567 -> 81160 (4000) at the top step, and
  s > 80 spans 5.5 (6.9) of the 15 (16) units of log s: a log-SNR grid from the top spends a third of its
  points there (4 of 20 inside the top interval alone), the capped grid none. On the linear schedules
  (s_max ~ 155) the cap changes little; with zero terminal SNR (s = inf at the top step) the capped grid
  steps from pure noise straight to sigma_max, the only step defined from s = inf (unipc's bh2 corrector
  follows it: B(inf) = 1). With few calls a lower start pays: on the main job's model unipc at 10 calls
  scores KID 0.0503 from 10 against 0.0535 from 20, and at 15 and 20 calls the start at 15-20 is as good as
  or better than 10 (0.0453 and 0.0441 against 0.0464 and 0.0451): hence the calls, from 10 to 80.
  dpmpp_2m and dpmpp_3m take the same rule: their closed-form error (below) then falls with the calls, and
  dpmpp_3m's KID at 5 / 8 / 10 / 15 / 20 calls is 0.084 / 0.072 / 0.054 / 0.047 / 0.046 against 0.126 /
  0.075 / 0.069 / 0.046 / 0.045 from 80 (three seeds).
* the start from the data's Gaussian fit (``--ode_start``; ``fastdiff.diffusion.data_moments``). For data of
  the fit's mean and covariance the probability-flow ODE is linear and its solution from x_T is known in
  closed form; while the noise is large against the data's spread, a trained model's x_0 prediction is close
  to that Gaussian's (the linear estimate from mean and covariance). With the fit, which fastdiff.train
  writes beside its checkpoints, ``auto`` takes the flow from x_T down to --sigma_max (0: 0.3 x grid points
  between 2 and 3) in closed form and spends every model call below it, where the noise start spends one at
  the noisiest step and part of its grid above s ~ 5. On the main job's model (three seeds) unipc's KID
  at 5 / 8 / 10 / 20 calls is 0.062 / 0.050 / 0.045 / 0.044 from the fit against 0.084 / 0.055 / 0.050 /
  0.044 from noise (DDIM: 0.069 at 20 calls, 0.049 at 50). The start rises with the calls because the
  model's own flow between s ~ 10 and 3 matters once there are calls to spend on it (at 50 calls from the
  fit at 10: 0.051, at 3: 0.046; at 5 calls 2 beats 3: 0.059 against 0.062).
* the end. The sample is D at the last grid point. Below s ~ 0.1 a trained model's D changes the image by
  less than its error at few calls, yet a log-SNR grid to step 0 (s = 0.0064) puts points there: with 5
  calls unipc's grid from 20 was 20 -> 1.4 -> 0.094 -> 0.0064, two of its four ODE points at or below 0.1
  and steps of 2.7 in log s. Ending at (1.6 / calls)^2 spends those points above it: on the main job's
  model unipc's KID at 5 / 8 calls is 0.084 / 0.055 against 0.151 / 0.073 to step 0 from 20 (three seeds;
  ends tried with seed 0: at 5 calls 0.05-0.3, best 0.07-0.15; at 10 calls 0.1 is worse, 0.02 and step 0
  tie). The closed-form error below is measured to step 0, so a grid that ends above it is charged for the
  noise it leaves.

Measured with ``benchmarks/solver_error.py --closed_form`` (Gaussian data with scales log-uniform over
[0.05, 2] and the exact denoiser, RMS error against the exact probability-flow map to step 0, in
``benchmarks/results/solver_error.md``), every solver's error on its default grid falls at every step from 5
to 80 calls on all six schedules measured, from noise (no fit) and from the exact fit. From noise on cosine
1000: unipc 3.9e-2, 2.9e-2, 1.8e-2, 8.5e-3, 4.8e-3, 7.1e-4, 1.1e-4 at 5, 8, 10, 15, 20, 40, 80 calls; dpmpp_2m
6.7e-2, 1.1e-2, 9.8e-3, 8.3e-3, 6.3e-3, 1.9e-3, 5.4e-4; dpmpp_3m 7.1e-2, 4.3e-2, 2.4e-2, 5.1e-3, 2.3e-3,
5.5e-4, 1.4e-4, its multistep history starting at sigma_max (``solve_dpmpp_3m``'s ``jump_start``: with the
noisiest step's prediction differenced it was 4.5e-2 at 5 calls and 4.6e-2 at 8). From the fit: unipc 1.9e-2
at 5 calls, 4.3e-3 at 10. unipc's default order is 2: on the
main job's model its RMS distance from the converged ODE solution at 5/8/10 calls was 0.18/0.045/0.025
against 0.34/0.084/0.034 for order 3 (from sigma_max 20 to step 0). ``trailing`` errors are measured to its
own last point (step K/N - 1) and are not comparable.

Classifier-free guidance (Ho & Salimans 2022) with scale w: eps = eps_uncond + w (eps_cond - eps_uncond),
applied to the model's mean output (epsilon, x_0 or v alike), both halves in one forward on a doubled batch;
a learned variance is taken from the conditional half. w = 1 is the conditional model and w = 0 the
unconditional one: both call the model once on the plain batch (bit for bit what an unguided call gives).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .data_moments import MOMENTS_FILENAME, DataMoments
from .gaussian_diffusion import GaussianDiffusion, Model, ModelMeanType, ModelVarType
from .respace import SpacedDiffusion, space_timesteps
from .solvers import (
    UNIPC_VARIANTS,
    GridPoint,
    solve_dpmpp_2m,
    solve_dpmpp_3m,
    solve_euler,
    solve_heun,
    solve_unipc,
)

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "heun", "euler")
ODE_SAMPLERS = ("dpmpp_2m", "dpmpp_3m", "unipc", "heun", "euler")
SPACINGS = ("auto", "uniform", "quadratic", "trailing", "karras", "logsnr", "capped_karras", "capped_logsnr")
CAPPED_SPACINGS = {"capped_karras": "karras", "capped_logsnr": "logsnr"}
"""Spacings that start the ODE at --sigma_max (a step from the noisiest trained step), and the spacing of
their points below it."""
FREE_SPACINGS = ("karras", "logsnr", *CAPPED_SPACINGS)
"""Spacings whose noise levels fall between trained steps: ODE samplers only."""
MIN_STEPS = {"ddpm": 1, "ddim": 1, "euler": 1, "dpmpp_2m": 2, "dpmpp_3m": 3, "unipc": 2, "heun": 2}
"""Fewest grid points per sampler: the higher-order ones need as many as their order."""
SOLVER_ORDERS = {"unipc": (1, 2, 3), "dpmpp_3m": (3,), "dpmpp_2m": (2,)}
"""The orders --solver_order may ask of each multistep sampler (0: the first, its default, for dpmpp_*)."""
DEFAULT_SOLVER_ORDER = {"unipc": 2, "dpmpp_3m": 3, "dpmpp_2m": 2}
KARRAS_RHO = 7.0
EDM_SIGMA_MAX = 80.0
"""EDM's sigma_max for data in [-1, 1] (Karras et al. 2022): where the data's share of x_t is 1/80 of the
noise's; heun's and euler's default start, and the multistep samplers' from 80 model calls on."""
MULTISTEP_SAMPLERS = ("unipc", "dpmpp_2m", "dpmpp_3m")
"""Samplers whose default start is their model calls, between SIGMA_MAX_FLOOR and EDM_SIGMA_MAX."""
SIGMA_MAX_FLOOR = 10.0
"""The multistep samplers' lowest default start from noise (module docstring)."""
GRID_END_SCALE = 1.6
"""The capped grids' default last point (--sigma_min 0): s = (GRID_END_SCALE / model calls)^2, or step 0's
s where that is higher: 0.10 at 5 calls, 0.026 at 10, step 0 from about 20 (see the module docstring)."""
ODE_STARTS = ("auto", "noise", "gaussian")
"""Where the ODE's first state comes from: noise (the noisiest trained step, then a step to --sigma_max),
gaussian (the data's Gaussian fit, ``data_moments``, flowed to --sigma_max in closed form), auto (gaussian
when the ODE sampler runs a capped grid and the fit is known, else noise)."""
GAUSSIAN_START_SCALE = 0.3
GAUSSIAN_START_RANGE = (2.0, 3.0)
"""The Gaussian start's default level (--sigma_max 0): GAUSSIAN_START_SCALE x grid points, in this range."""


# ---------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class NoiseSchedule:
    """A diffusion's trained discrete schedule: alpha_bar [K] at its steps and the model timestep of each.

    ``model_timesteps[k]`` is what the model is called with at step k (the base-process step index,
    times 1000 / original steps when the diffusion rescales timesteps).
    """

    alphas_cumprod: np.ndarray
    model_timesteps: np.ndarray
    integer_timesteps: bool

    @classmethod
    def from_diffusion(cls, diffusion: GaussianDiffusion) -> NoiseSchedule:
        steps = np.asarray(
            getattr(diffusion, "timestep_map", range(diffusion.num_timesteps)), dtype=np.float64
        )
        original = getattr(diffusion, "original_num_steps", diffusion.num_timesteps)
        if diffusion.rescale_timesteps:
            return cls(diffusion.alphas_cumprod, steps * (1000.0 / original), False)
        return cls(diffusion.alphas_cumprod, steps, True)

    @property
    def num_steps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def point(self, index: int) -> GridPoint:
        """The trained step ``index`` as a grid point (exact table values)."""
        alpha_bar = float(self.alphas_cumprod[index])
        return GridPoint(float(self.model_timesteps[index]), math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar))

    def edm_sigmas(self) -> np.ndarray:
        """EDM noise levels s_k = sqrt((1 - alpha_bar_k) / alpha_bar_k): [K], inf where alpha_bar = 0."""
        with np.errstate(divide="ignore"):
            return np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

    def point_at_sigma(self, sigma: float) -> GridPoint:
        """A grid point at EDM noise level ``sigma`` (finite, within the trained range): its timestep by
        linear interpolation of log s over the trained steps, alpha and sigma from s itself."""
        sigmas = self.edm_sigmas()
        finite = np.isfinite(sigmas)
        t = float(np.interp(math.log(sigma), np.log(sigmas[finite]), self.model_timesteps[finite]))
        scale = math.sqrt(1.0 + sigma * sigma)
        return GridPoint(t, 1.0 / scale, sigma / scale)


def step_indices(num_steps: int, steps: int, spacing: str) -> list[int]:
    """``steps`` distinct trained step indices in [0, num_steps), increasing, with 0 and num_steps - 1."""
    if spacing == "uniform":
        return sorted(space_timesteps(num_steps, [steps]))
    if spacing != "quadratic":
        raise ValueError(f"step_indices takes uniform or quadratic spacing, got {spacing!r}")
    if steps == 1:
        return [num_steps - 1]
    raw = [round((num_steps - 1) * (i / (steps - 1)) ** 2) for i in range(steps)]
    for i in range(1, steps):  # keep them distinct (dense near 0) ...
        raw[i] = max(raw[i], raw[i - 1] + 1)
    raw[-1] = num_steps - 1
    for i in range(steps - 2, -1, -1):  # ... and below the last
        raw[i] = min(raw[i], raw[i + 1] - 1)
    return raw


def resolve_spacing(sampler: str, spacing: str) -> str:
    """``spacing``, with "auto" resolved: uniform (improved-diffusion's grid) for ddpm and ddim, logsnr for
    the ODE samplers (the grid they are most accurate on, see the module docstring)."""
    if spacing != "auto":
        return spacing
    return "uniform" if sampler in ("ddpm", "ddim") else "capped_logsnr"


def trailing_indices(num_steps: int, steps: int) -> list[int]:
    """diffusers' "trailing" trained steps: K - 1 - round(i K / N) for i < N, increasing (the last of them
    step K - 1, then even strides of K / N; the smallest is K / N - 1, not 0)."""
    return sorted({num_steps - 1 - round(i * num_steps / steps) for i in range(steps)})


def largest_finite_sigma(schedule: NoiseSchedule) -> float:
    """The schedule's largest finite EDM noise level (below the pure-noise step of zero terminal SNR)."""
    sigmas = schedule.edm_sigmas()
    return float(sigmas[np.isfinite(sigmas)][-1])


def resolved_sigma_max(
    schedule: NoiseSchedule, calls: int, sigma_max: float = 0.0, sampler: str = "", gaussian: bool = False
) -> float:
    """The noise level a capped grid starts its ODE at: ``sigma_max``, or for 0 the default, at most the
    schedule's largest finite noise level: from noise :data:`EDM_SIGMA_MAX` (for the
    :data:`MULTISTEP_SAMPLERS`: ``calls`` between :data:`SIGMA_MAX_FLOOR` and that); from the ``gaussian``
    fit :data:`GAUSSIAN_START_SCALE` x grid points (``calls``; heun's (calls + 1) / 2) within
    :data:`GAUSSIAN_START_RANGE` (heun's error grows fast with its first step's length)."""
    if sigma_max != 0.0:
        return float(sigma_max)
    if gaussian:
        low, high = GAUSSIAN_START_RANGE
        points = (calls + 1) // 2 if sampler == "heun" else calls
        cap = min(max(GAUSSIAN_START_SCALE * points, low), high)
    elif sampler in MULTISTEP_SAMPLERS:
        cap = min(max(float(calls), SIGMA_MAX_FLOOR), EDM_SIGMA_MAX)
    else:
        cap = EDM_SIGMA_MAX
    return min(cap, largest_finite_sigma(schedule))


def resolved_sigma_min(schedule: NoiseSchedule, calls: int, sigma_min: float = 0.0) -> float:
    """The noise level a capped grid ends at (its last point, whose x_0 prediction is the sample):
    ``sigma_min``, or for 0 the larger of (:data:`GRID_END_SCALE` / ``calls``)^2 and step 0's."""
    if sigma_min != 0.0:
        return float(sigma_min)
    return max((GRID_END_SCALE / calls) ** 2, float(schedule.edm_sigmas()[0]))


def model_calls(sampler: str, steps: int) -> int:
    """The model calls a sampler makes over ``steps`` grid points (heun: 2 steps - 1)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def _free_levels(high: float, low: float, count: int, spacing: str) -> list[float]:
    """``count`` >= 2 noise levels from ``high`` to ``low``: Karras' rho = 7 or log-uniform."""
    fractions = [i / (count - 1) for i in range(count)]
    if spacing == "karras":
        s_max, s_min = high ** (1.0 / KARRAS_RHO), low ** (1.0 / KARRAS_RHO)
        return [(s_max + f * (s_min - s_max)) ** KARRAS_RHO for f in fractions]
    return [math.exp(math.log(high) + f * (math.log(low) - math.log(high))) for f in fractions]


def sampling_grid(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str,
    sigma_max: float = 0.0,
    sampler: str = "",
    sigma_min: float = 0.0,
    gaussian: bool = False,
) -> list[GridPoint]:
    """``steps`` grid points from the noisiest trained step down to step 0 (trailing: to step K/N - 1;
    capped: to ``sigma_min``).

    The capped spacings go from the noisiest trained step to ``sigma_max`` (:func:`resolved_sigma_max`,
    0: ``sampler``'s default) in one step, then by their spacing down to ``sigma_min``
    (:func:`resolved_sigma_min`, 0: the default for ``sampler``'s model calls); with 2 points, the
    noisiest step and ``sigma_min``. With a ``gaussian`` start (capped spacings only) every point lies on
    the spacing from ``sigma_max`` to ``sigma_min`` (1 point: ``sigma_max``): the state at the first comes
    from the data's Gaussian fit, not from a model call at the noisiest step.
    """
    if spacing == "trailing":
        return [schedule.point(i) for i in reversed(trailing_indices(schedule.num_steps, steps))]
    if spacing not in FREE_SPACINGS:
        return [schedule.point(i) for i in reversed(step_indices(schedule.num_steps, steps, spacing))]
    sigmas = schedule.edm_sigmas()
    finite = np.flatnonzero(np.isfinite(sigmas))
    top, bottom = int(finite[-1]), 0
    if spacing in CAPPED_SPACINGS:
        calls = model_calls(sampler, steps)
        end = resolved_sigma_min(schedule, calls, sigma_min)
        last = schedule.point(bottom) if end == float(sigmas[bottom]) else schedule.point_at_sigma(end)
        cap = resolved_sigma_max(schedule, calls, sigma_max, sampler, gaussian)
        if gaussian:
            if steps == 1:
                return [schedule.point_at_sigma(cap)]
            levels = _free_levels(cap, end, steps, CAPPED_SPACINGS[spacing])
            return [*(schedule.point_at_sigma(s) for s in levels[:-1]), last]
        noisiest = schedule.point(schedule.num_steps - 1)
        if steps <= 2:
            return [noisiest, last][:steps]
        if cap >= sigmas[-1]:  # the schedule starts at or below the cap: nothing to skip
            levels = _free_levels(float(sigmas[-1]), end, steps, CAPPED_SPACINGS[spacing])
            return [noisiest, *(schedule.point_at_sigma(s) for s in levels[1:-1]), last]
        levels = _free_levels(cap, end, steps - 1, CAPPED_SPACINGS[spacing])
        return [noisiest, *(schedule.point_at_sigma(s) for s in levels[:-1]), last]
    head: list[GridPoint] = []
    if not math.isfinite(sigmas[-1]):  # zero terminal SNR: start at the pure-noise step, then the grid
        head, steps = [schedule.point(schedule.num_steps - 1)], steps - 1
    if steps == 1:
        return [*head, schedule.point(top)]
    fractions = [i / (steps - 1) for i in range(1, steps - 1)]
    if spacing == "karras":
        s_max, s_min = sigmas[top] ** (1.0 / KARRAS_RHO), sigmas[bottom] ** (1.0 / KARRAS_RHO)
        inner = [(s_max + f * (s_min - s_max)) ** KARRAS_RHO for f in fractions]
    else:
        log_max, log_min = math.log(sigmas[top]), math.log(sigmas[bottom])
        inner = [math.exp(log_max + f * (log_min - log_max)) for f in fractions]
    return [*head, schedule.point(top), *(schedule.point_at_sigma(s) for s in inner), schedule.point(bottom)]


# ---------------------------------------------------------------------------------------------- guidance


def _unwrapped(model: Any) -> Any:
    """The nn.Module under DDP (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    for name in ("module", "_orig_mod"):
        while hasattr(model, name):
            model = getattr(model, name)
    return model


def null_label_of(model: Any, flag: str = "--guidance_scale") -> int:
    """The null class label of a model trained with class dropout; ValueError (naming ``flag``) if none."""
    inner = _unwrapped(model)
    if getattr(inner, "num_classes", None) is None:
        raise ValueError(f"{flag} other than 1 needs a class-conditional model (class_cond True)")
    null_label = getattr(inner, "null_label", None)
    if null_label is None:
        raise ValueError(
            f"{flag} other than 1 needs a model trained with --class_dropout_prob > 0 (it has no "
            "null class to give the unconditional prediction)"
        )
    return int(null_label)


class GuidedModel:
    """Classifier-free guidance around a class-conditional model: called as model(x, t, y=labels).

    Output channels [: C] (the mean prediction) are eps_u + w (eps_c - eps_u); channels [C:] (a learned
    variance) are the conditional model's. w = 1 and w = 0 make a single call on the plain batch.
    """

    def __init__(self, model: Model, scale: float, null_label: int) -> None:
        self.model = model
        self.scale = float(scale)
        self.null_label = null_label

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any):
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y")
        null = torch.full_like(y, self.null_label)
        if self.scale == 1.0:
            return self.model(x, t, y=y, **kwargs)
        if self.scale == 0.0:
            return self.model(x, t, y=null, **kwargs)
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]), **kwargs)
        cond, uncond = both.chunk(2)
        channels = x.shape[1]
        mean = uncond[:, :channels] + self.scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([mean, cond[:, channels:]], dim=1)


# ---------------------------------------------------------------------------------------------- checks


def check_sampling_options(
    diffusion: GaussianDiffusion,
    sampler: str,
    steps: int,
    timestep_spacing: str,
    guidance_scale: float,
    model: Any = None,
    eta: float = 0.0,
    flag_prefix: str = "",
    solver_order: int = 0,
    unipc_variant: str = "bh2",
    sigma_max: float = 0.0,
    sigma_min: float = 0.0,
    ode_start: str = "auto",
    data_moments: DataMoments | None = None,
) -> int:
    """Check the options against the diffusion (and the model, when given, for guidance; ``data_moments``,
    the data's Gaussian fit if known, for ``ode_start``) before sampling.

    Returns the number of grid points (``steps``, or all the diffusion's steps for 0). ValueError names
    the flag (``--{flag_prefix}sampler``, ...) and what was expected.
    """
    sampler_flag, steps_flag = f"--{flag_prefix}sampler", f"--{flag_prefix}steps"
    spacing_flag, guidance_flag = f"--{flag_prefix}timestep_spacing", f"--{flag_prefix}guidance_scale"
    order_flag = f"--{flag_prefix}solver_order"
    if sampler not in SAMPLERS:
        raise ValueError(f"{sampler_flag} must be one of {list(SAMPLERS)}, got {sampler!r}")
    if timestep_spacing not in SPACINGS:
        raise ValueError(f"{spacing_flag} must be one of {list(SPACINGS)}, got {timestep_spacing!r}")
    timestep_spacing = resolve_spacing(sampler, timestep_spacing)
    if timestep_spacing in FREE_SPACINGS and sampler in ("ddpm", "ddim"):
        raise ValueError(
            f"{spacing_flag} {timestep_spacing} places noise levels between trained steps, which "
            f"{sampler_flag} {sampler} cannot step to: use uniform, quadratic or trailing, or one of "
            f"{list(ODE_SAMPLERS)}"
        )
    trained = diffusion.num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{steps_flag} must be an integer >= 0 (0: all {trained} steps), got {steps!r}")
    count = steps or trained
    if count > trained:
        raise ValueError(f"{steps_flag} {steps} exceeds the {trained} trained timesteps of this diffusion")
    if count < MIN_STEPS[sampler]:
        raise ValueError(f"{sampler_flag} {sampler} needs {steps_flag} >= {MIN_STEPS[sampler]}, got {steps}")
    if solver_order != 0:
        allowed = SOLVER_ORDERS.get(sampler, ())
        if isinstance(solver_order, bool) or solver_order not in allowed:
            expected = f"one of {list(allowed)} (or 0: {DEFAULT_SOLVER_ORDER[sampler]})" if allowed else "0"
            raise ValueError(
                f"{order_flag} for {sampler_flag} {sampler} must be {expected}, got {solver_order!r}"
            )
        if count < solver_order:
            raise ValueError(
                f"{order_flag} {solver_order} needs {steps_flag} >= {solver_order} (a step of order p uses "
                f"the x_0 predictions at p grid points), got {count}"
            )
    if unipc_variant not in UNIPC_VARIANTS:
        raise ValueError(
            f"--{flag_prefix}unipc_variant must be one of {list(UNIPC_VARIANTS)}, got {unipc_variant!r}"
        )
    gaussian = gaussian_start(ode_start, sampler, timestep_spacing, data_moments, flag_prefix)
    _check_grid_ends(diffusion, sampler, count, sigma_max, sigma_min, timestep_spacing, flag_prefix, gaussian)
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"--eta applies to {sampler_flag} ddim only, got eta {eta} with {sampler}")
    mean_type = diffusion.model_mean_type
    if sampler not in ("ddpm", "ddim") and mean_type == ModelMeanType.PREVIOUS_X:
        raise ValueError(
            f"{sampler_flag} {sampler} needs a model predicting epsilon, x_0 or v, not the posterior mean "
            "(PREVIOUS_X): use ddpm or ddim"
        )
    if diffusion.alphas_cumprod[-1] == 0.0 and mean_type in (ModelMeanType.EPSILON, ModelMeanType.PREVIOUS_X):
        raise ValueError(
            "this schedule has zero terminal SNR (alpha_bar_T = 0), where an epsilon-predicting model cannot "
            "give x_0: sample only v- or x_0-predicting models with it (--predict_v True)"
        )
    if (
        not isinstance(guidance_scale, (int, float))
        or not math.isfinite(guidance_scale)
        or guidance_scale < 0
    ):
        raise ValueError(f"{guidance_flag} must be a finite number >= 0, got {guidance_scale!r}")
    if guidance_scale != 1.0 and model is not None:
        null_label_of(model, guidance_flag)
    return count


def gaussian_start(
    ode_start: str, sampler: str, spacing: str, data_moments: DataMoments | None, flag_prefix: str = ""
) -> bool:
    """Whether the ODE starts from the data's Gaussian fit (``ode_start`` of :data:`ODE_STARTS`; ``spacing``
    resolved): auto does for an ODE sampler on a capped grid when ``data_moments`` is known; gaussian must
    (a ValueError naming ``--{flag_prefix}ode_start`` otherwise)."""
    flag = f"--{flag_prefix}ode_start"
    if ode_start not in ODE_STARTS:
        raise ValueError(f"{flag} must be one of {list(ODE_STARTS)}, got {ode_start!r}")
    usable = sampler in ODE_SAMPLERS and spacing in CAPPED_SPACINGS
    if ode_start != "gaussian":
        return ode_start == "auto" and usable and data_moments is not None
    if not usable:
        raise ValueError(
            f"{flag} gaussian starts the ODE of a capped grid: it needs one of {list(ODE_SAMPLERS)} with "
            f"--{flag_prefix}timestep_spacing {' or '.join(CAPPED_SPACINGS)} (or auto), got {sampler} on "
            f"{spacing}"
        )
    if data_moments is None:
        raise ValueError(
            f"{flag} gaussian needs the data's Gaussian fit ({MOMENTS_FILENAME}, which fastdiff.train writes "
            "beside the checkpoints; python -m fastdiff.measure_moments measures it for an earlier run), and "
            "there is none"
        )
    return True


def _check_grid_ends(
    diffusion: GaussianDiffusion,
    sampler: str,
    count: int,
    sigma_max: float,
    sigma_min: float,
    spacing: str,
    flag_prefix: str,
    gaussian: bool = False,
) -> None:
    """--sigma_max and --sigma_min: 0 (the defaults), or with a capped spacing noise levels inside the
    schedule, the end below the start."""
    cap_flag, end_flag = f"--{flag_prefix}sigma_max", f"--{flag_prefix}sigma_min"
    schedule = NoiseSchedule.from_diffusion(diffusion)
    smallest, largest = float(schedule.edm_sigmas()[0]), largest_finite_sigma(schedule)
    for flag, value, lowest in ((cap_flag, sigma_max, "<"), (end_flag, sigma_min, "<=")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{flag} must be a number >= 0 (0: the sampler's default), got {value!r}")
        if value == 0:
            continue
        if spacing not in CAPPED_SPACINGS:
            raise ValueError(
                f"{flag} applies to --{flag_prefix}timestep_spacing {' or '.join(CAPPED_SPACINGS)} only, "
                f"got {spacing}"
            )
        inside = smallest < value <= largest if lowest == "<" else smallest <= value < largest
        if not inside:
            raise ValueError(
                f"{flag} {value} is beyond this schedule: its noise levels sigma/alpha run from "
                f"{smallest:.4g} (step 0) to {largest:.4g} (the noisiest finite step); give one in that "
                "range or 0"
            )
    if spacing not in CAPPED_SPACINGS:
        return
    calls = model_calls(sampler, count)
    start = min(resolved_sigma_max(schedule, calls, sigma_max, sampler, gaussian), largest)
    end = resolved_sigma_min(schedule, calls, sigma_min)
    if count > (1 if gaussian else 2) and not end < start:
        raise ValueError(
            f"{end_flag} {end:.4g} (where the grid ends) must lie below {cap_flag} {start:.4g} (where its "
            "ODE starts)"
        )


# ---------------------------------------------------------------------------------------------- sampling


def sample_batch(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    sampler: str = "ddpm",
    steps: int = 0,
    timestep_spacing: str = "auto",
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    solver_order: int = 0,
    unipc_variant: str = "bh2",
    sigma_max: float = 0.0,
    sigma_min: float = 0.0,
    ode_start: str = "auto",
    data_moments: DataMoments | None = None,
    clip_denoised: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Samples of ``shape`` [N, C, ...] from ``model`` (called as model(x, t, **model_kwargs)).

    :param diffusion: the (respaced) GaussianDiffusion the model was trained with.
    :param sampler, steps, timestep_spacing, guidance_scale: see ``fastdiff.config.SamplingConfig``.
    :param eta: DDIM's noise (ddim only).
    :param solver_order, unipc_variant, sigma_max, sigma_min, ode_start: unipc's order and B(h), the capped
        grids' start and end (0: the sampler's defaults) and where the ODE's first state comes from (see
        ``SamplingConfig``).
    :param data_moments: the training data's Gaussian fit, for the Gaussian start (None: unknown).
    :param clip_denoised: clamp every x_0 prediction to [-1, 1].
    :param model_kwargs: e.g. ``{"y": labels [N]}``; guidance needs y.
    :param noise: the starting x_T [N, C, ...] (standard normal if None).
    :return: [N, C, ...] samples, computed without autograd.
    """
    count = check_sampling_options(
        diffusion, sampler, steps, timestep_spacing, guidance_scale, model, eta,
        solver_order=solver_order, unipc_variant=unipc_variant, sigma_max=sigma_max, sigma_min=sigma_min,
        ode_start=ode_start, data_moments=data_moments,
    )  # fmt: skip
    timestep_spacing = resolve_spacing(sampler, timestep_spacing)
    # The starting noise, on the model's device unless told otherwise (drawn as p_sample_loop draws it).
    x, device = GaussianDiffusion._initial_noise(model, shape, noise, device)
    if guidance_scale != 1.0:
        model = GuidedModel(model, guidance_scale, null_label_of(model))
    common = dict(noise=x, clip_denoised=clip_denoised, model_kwargs=model_kwargs, device=device)
    if sampler in ("ddpm", "ddim"):
        if count != diffusion.num_timesteps or timestep_spacing != "uniform":
            indices = (
                trailing_indices(diffusion.num_timesteps, count)
                if timestep_spacing == "trailing"
                else step_indices(diffusion.num_timesteps, count, timestep_spacing)
            )
            diffusion = respaced(diffusion, indices)
        if sampler == "ddim":
            return diffusion.ddim_sample_loop(model, shape, progress=progress, eta=eta, **common)
        return diffusion.p_sample_loop(model, shape, progress=progress, **common)
    schedule = NoiseSchedule.from_diffusion(diffusion)
    gaussian = gaussian_start(ode_start, sampler, timestep_spacing, data_moments)
    grid = sampling_grid(schedule, count, timestep_spacing, sigma_max, sampler, sigma_min, gaussian)
    if gaussian:  # the fit's exact flow from x_T at the noisiest step to the first grid point (x = alpha y)
        first, top = grid[0], float(schedule.edm_sigmas()[-1])
        x = first.alpha * data_moments.flow_from_noise(x, first.sigma / first.alpha, top)
    denoiser = Denoiser(model, diffusion, schedule, clip_denoised, model_kwargs or {})
    with torch.no_grad():
        if sampler == "unipc":
            return solve_unipc(
                denoiser, x, grid, solver_order or DEFAULT_SOLVER_ORDER["unipc"], unipc_variant
            )
        if sampler == "dpmpp_3m":
            jump_start = timestep_spacing in CAPPED_SPACINGS and not gaussian and len(grid) > 2
            return solve_dpmpp_3m(denoiser, x, grid, jump_start=jump_start)
        solver = {"euler": solve_euler, "heun": solve_heun, "dpmpp_2m": solve_dpmpp_2m}
        return solver[sampler](denoiser, x, grid)


def respaced(diffusion: GaussianDiffusion, indices: Sequence[int]) -> SpacedDiffusion:
    """``diffusion`` restricted to its steps ``indices`` (a SpacedDiffusion over the same base process)."""
    base_map = getattr(diffusion, "timestep_map", None)
    kept = [base_map[i] for i in indices] if base_map is not None else list(indices)
    return SpacedDiffusion(
        use_timesteps=kept,
        betas=getattr(diffusion, "base_betas", diffusion.betas),
        model_mean_type=diffusion.model_mean_type,
        model_var_type=diffusion.model_var_type,
        loss_type=diffusion.loss_type,
        rescale_timesteps=diffusion.rescale_timesteps,
    )


class Denoiser:
    """D(x_t, point): the model's x_0 prediction [N, C, ...] at a grid point, from epsilon, x_0 or v."""

    def __init__(
        self,
        model: Model,
        diffusion: GaussianDiffusion,
        schedule: NoiseSchedule,
        clip_denoised: bool,
        model_kwargs: dict[str, Any],
    ) -> None:
        self.model = model
        self.mean_type = diffusion.model_mean_type
        self.learned_sigma = diffusion.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        self.schedule = schedule
        self.clip_denoised = clip_denoised
        self.model_kwargs = model_kwargs
        self.calls = 0

    def __call__(self, x: torch.Tensor, point: GridPoint) -> torch.Tensor:
        self.calls += 1
        if self.schedule.integer_timesteps and float(point.t).is_integer():
            t = torch.full((x.shape[0],), int(point.t), device=x.device, dtype=torch.long)
        else:
            t = torch.full((x.shape[0],), point.t, device=x.device, dtype=torch.float32)
        output = self.model(x, t, **self.model_kwargs)
        channels = x.shape[1]
        expected = 2 * channels if self.learned_sigma else channels
        if output.shape[1] != expected:
            raise ValueError(f"model output must have {expected} channels, got shape {tuple(output.shape)}")
        mean = output[:, :channels].to(torch.promote_types(x.dtype, torch.float32))
        if self.mean_type == ModelMeanType.START_X:
            x0 = mean
        elif self.mean_type == ModelMeanType.VELOCITY:
            x0 = point.alpha * x - point.sigma * mean
        else:
            x0 = (x - point.sigma * mean) / point.alpha
        return x0.clamp(-1.0, 1.0) if self.clip_denoised else x0
