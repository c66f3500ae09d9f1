"""The probability-flow ODE solvers of ``sample_batch``: Euler, EDM's Heun, DPM-Solver++(2M) and (3M), UniPC.

Every solver integrates the probability-flow ODE in the variance-preserving variables x_t = alpha_t x_0 +
sigma_t noise over a grid of :class:`GridPoint` (noisiest first), then takes the step to no noise, whose
result is the x_0 prediction at the last grid point (as DDIM's last step is). It sees the model only through
``denoise(x [N, ...], point) -> x_0 prediction [N, ...]``, one model call each. In lambda = log(alpha/sigma)
the exact solution from (x, lambda) to lambda' = lambda + h is

    x' = (sigma'/sigma) x + sigma' int_lambda^lambda' e^l D(l) dl
       = (sigma'/sigma) x + alpha' [phi_1(h) D + phi_2(h) h D' + phi_3(h) h^2 D'' + ...]

with phi_1(h) = 1 - e^-h, phi_(k+1)(h) = 1/k! - phi_k(h)/h (D', D'' derivatives in lambda). The solvers
differ in how they estimate the derivatives from earlier (multistep) or extra (Heun) model calls.

A grid point with alpha = 0 (zero terminal SNR: lambda = -inf) is only ever a start: the first-order step
from it is the only one defined, and its x_0 prediction is never used to estimate a derivative.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

UNIPC_VARIANTS = ("bh1", "bh2")
"""UniPC's B(h) (Zhao et al. 2023, section 3.3), in data prediction: bh1 = h, bh2 = 1 - e^-h."""


@dataclass(frozen=True)
class GridPoint:
    """One noise level: the model timestep, alpha_t and sigma_t (x_t = alpha_t x_0 + sigma_t noise)."""

    t: float
    alpha: float
    sigma: float


CLEAN = GridPoint(t=-1.0, alpha=1.0, sigma=0.0)
"""The end of every grid: no noise left."""

Denoise = Callable[[torch.Tensor, GridPoint], torch.Tensor]
"""x_0 prediction [N, ...] of the state x [N, ...] at a grid point: one model call."""


def log_snr(point: GridPoint) -> float:
    """lambda = log(alpha / sigma) (-inf where alpha = 0)."""
    return -math.inf if point.alpha == 0.0 else math.log(point.alpha) - math.log(point.sigma)


def first_order_step(x: torch.Tensor, x0: torch.Tensor, here: GridPoint, there: GridPoint) -> torch.Tensor:
    """x' = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) x0: Euler's (= DDIM's) step here -> there."""
    ratio = there.sigma / here.sigma
    return ratio * x + (there.alpha - here.alpha * ratio) * x0


def solve_euler(denoise: Denoise, x: torch.Tensor, grid: list[GridPoint]) -> torch.Tensor:
    """Euler over ``grid`` then to s = 0: len(grid) model calls."""
    for here, there in zip(grid, [*grid[1:], CLEAN], strict=True):
        x = first_order_step(x, denoise(x, here), here, there)
    return x


def solve_heun(denoise: Denoise, x: torch.Tensor, grid: list[GridPoint]) -> torch.Tensor:
    """EDM's Heun (Algorithm 1, deterministic) over ``grid`` then to s = 0: 2 len(grid) - 1 model calls."""
    for here, there in zip(grid, [*grid[1:], CLEAN], strict=True):
        x0 = denoise(x, here)
        predicted = first_order_step(x, x0, here, there)
        if there.sigma == 0.0 or here.alpha == 0.0:
            x = predicted
            continue
        # EDM variables: state y = x / alpha, noise level s = sigma / alpha, slope dy/ds = (y - D) / s.
        s_here, s_there = here.sigma / here.alpha, there.sigma / there.alpha
        y_here, y_there = x / here.alpha, predicted / there.alpha
        slope_here = (y_here - x0) / s_here
        slope_there = (y_there - denoise(predicted, there)) / s_there
        x = there.alpha * (y_here + (s_there - s_here) * 0.5 * (slope_here + slope_there))
    return x


def solve_dpmpp_2m(denoise: Denoise, x: torch.Tensor, grid: list[GridPoint]) -> torch.Tensor:
    """DPM-Solver++(2M) over ``grid`` then to s = 0: len(grid) model calls."""
    previous_x0: torch.Tensor | None = None
    previous_h = math.inf
    for here, there in zip(grid, [*grid[1:], CLEAN], strict=True):
        x0 = denoise(x, here)
        if previous_x0 is None or there.sigma == 0.0:
            corrected = x0
        else:
            h = log_snr(there) - log_snr(here)
            half_inverse_r = h / (2.0 * previous_h)  # 1 / (2 r), r = h_prev / h; 0 after an infinite step
            corrected = (1.0 + half_inverse_r) * x0 - half_inverse_r * previous_x0
        if there.sigma != 0.0:
            previous_h = log_snr(there) - log_snr(here)
        x = first_order_step(x, corrected, here, there)
        previous_x0 = x0
    return x


# ---------------------------------------------------------------------------------------------- multistep


def step_orders(count: int, order: int) -> list[int]:
    """The order of each of a multistep solver's ``count`` steps (the last one to s = 0): ``order``, less
    while too few earlier calls exist (step i has i + 1 of them) and over the last two steps (count - i):
    the step into the last grid point at most second order, the step to s = 0 first order (it is x_0)."""
    return [min(order, i + 1, count - i) for i in range(count)]


def _phis(h: float, count: int) -> list[float]:
    """[phi_1(h), ..., phi_count(h)] (module docstring), phi_1 = 1 - e^-h, phi_(k+1) = 1/k! - phi_k / h."""
    values = [-math.expm1(-h)]
    for k in range(1, count):
        values.append(1.0 / math.factorial(k) - values[-1] / h)
    return values


def solve_dpmpp_3m(
    denoise: Denoise,
    x: torch.Tensor,
    grid: list[GridPoint],
    published_curvature: bool = False,
    jump_start: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022, multistep, data prediction) over ``grid`` then to s = 0:
    len(grid) model calls.

    With the x_0 predictions D_0, D_1, D_2 at the last three points and step sizes h (this step), h_0, h_1
    (the two before), r_0 = h_0 / h, r_1 = h_1 / h: first differences E_0 = (D_0 - D_1) / r_0, E_1 =
    (D_1 - D_2) / r_1, E = E_0 + r_0 / (r_0 + r_1) (E_0 - E_1) ~ h D', F = (E_0 - E_1) / (r_0 + r_1)
    ~ h^2 D''/2; x' = (sigma'/sigma) x + alpha' (phi_1 D_0 + phi_2 E + 2 phi_3 F), exact when D is quadratic
    in lambda. The second-order steps (the second step and the one into the last grid point,
    :func:`step_orders`) are DPM-Solver++(2M)'s, x' = (sigma'/sigma) x + alpha' phi_1 (D_0 + E_0 / 2), and
    the first step is Euler's.

    ``published_curvature``: weight F by phi_3, not 2 phi_3, as Lu et al.'s code and diffusers'
    DPMSolverMultistepScheduler do. That is half the Taylor term, which leaves an O(h^3) local error: the
    method is then second order (tests/test_solvers.py measures both); kept to check against diffusers.

    ``jump_start``: the first point is a capped grid's noisiest trained step, and the step from it a jump to
    sigma_max (7.6 in log-SNR to sigma_max = 10 on cosine 1000, against steps of ~0.9 below). Its x_0
    prediction is then not differenced, as a pure-noise start's never is: a quadratic through a point that
    far away extrapolates D badly (closed form, cosine 1000: with it 4.5e-2 at 5 calls and 4.6e-2 at 8,
    without it 7.1e-2 and 4.3e-2, and the error then falls with the calls on every schedule).
    """
    orders = step_orders(len(grid), 3)
    history: list[tuple[torch.Tensor, float]] = []  # (x_0 prediction, lambda), newest last
    points = [*grid[1:], CLEAN]
    for index, (here, there, order) in enumerate(zip(grid, points, orders, strict=True)):
        x0 = denoise(x, here)
        differenced = here.alpha != 0.0 and not (jump_start and index == 0)
        history = [*history[-2:], (x0, log_snr(here))] if differenced else []
        order = min(order, len(history))
        if order <= 1 or there.sigma == 0.0:
            x = first_order_step(x, x0, here, there)
            continue
        lam = history[-1][1]
        h = log_snr(there) - lam
        ratio = there.sigma / here.sigma
        phi_1, phi_2, phi_3 = _phis(h, 3)
        r_0 = (lam - history[-2][1]) / h
        e_0 = (x0 - history[-2][0]) / r_0
        if order == 2:
            x = ratio * x + (there.alpha * phi_1) * (x0 + 0.5 * e_0)
            continue
        r_1 = (history[-2][1] - history[-3][1]) / h
        e_1 = (history[-2][0] - history[-3][0]) / r_1
        slope = e_0 + (r_0 / (r_0 + r_1)) * (e_0 - e_1)
        curvature = (e_0 - e_1) / (r_0 + r_1)
        weight = phi_3 if published_curvature else 2.0 * phi_3
        x = ratio * x + there.alpha * (phi_1 * x0 + phi_2 * slope + weight * curvature)
    return x


def _unipc_weights(h: float, ratios: list[float], variant: str, fixed: bool) -> tuple[float, np.ndarray]:
    """B(h) and UniPC's weights a [len(ratios)] for the differences (D_k - D_0) / r_k at lambda + r_k h.

    They solve sum_k a_k r_k^(j-1) = j! phi_(j+1)(h) / B(h), j = 1..len(ratios) (Zhao et al. 2023, eq. 8 in
    data prediction), so that the weighted differences match the Taylor terms of the exact solution; one
    difference (``fixed``) takes a = 1/2, the limit of that rule as h -> 0, as the paper's UniP-2 and UniC-1
    do.
    """
    b_h = h if variant == "bh1" else -math.expm1(-h)
    count = len(ratios)
    if fixed and count == 1:
        return b_h, np.array([0.5])
    phis = _phis(h, count + 1)
    rhs = np.array([math.factorial(j) * phis[j] / b_h for j in range(1, count + 1)])
    matrix = np.array([[r ** (j - 1) for r in ratios] for j in range(1, count + 1)])
    return b_h, np.linalg.solve(matrix, rhs)


def solve_unipc(
    denoise: Denoise, x: torch.Tensor, grid: list[GridPoint], order: int = 2, variant: str = "bh2"
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023: UniP-p predictor, UniC corrector, data prediction) over ``grid`` then to
    s = 0: len(grid) model calls.

    Step i predicts x at the next point with UniP of order p_i (:func:`step_orders`) from the x_0
    predictions at the last p_i points: x' = (sigma'/sigma) x + alpha' (phi_1 D_0 + B(h) sum_k a_k (D_k - D_0)
    / r_k), r_k = (lambda_k - lambda_0) / h < 0. The model call at the predicted x' (the next step's call)
    then corrects it with UniC, which adds (D' - D_0) at r = 1 to the differences (order p_i + 1), and the
    next step starts from the corrected x'. No correction follows the last step (no call is left), nor with
    bh1 a step from alpha = 0 (infinite h); an x_0 prediction at alpha = 0 is never differenced.
    ``variant``: bh1 (B(h) = h) or bh2 (B(h) = 1 - e^-h).
    """
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"UniPC variant must be one of {list(UNIPC_VARIANTS)}, got {variant!r}")
    orders = step_orders(len(grid), order)
    history: list[tuple[torch.Tensor, float]] = []  # (x_0 prediction, lambda), newest last
    last: tuple[torch.Tensor, GridPoint, int] | None = None  # (x before the last prediction, its point, p)
    for here, there, step_order in zip(grid, [*grid[1:], CLEAN], orders, strict=True):
        x0 = denoise(x, here)
        if (
            there.sigma == 0.0
        ):  # the step to no noise: x_0 itself (a correction here would need one more call)
            return x0
        if here.alpha == 0.0:  # from pure noise: the first-order step, the only one defined; with bh2
            # (B(inf) = 1) UniC-1 corrects it, with bh1 (B(inf) = inf) it cannot
            history, last = [(x0, -math.inf)], (x, here, 1) if variant == "bh2" else None
            x = _unipc_base(x, here, there, x0)
            continue
        if last is not None:
            x = _unic(last[0], last[1], here, x0, history, last[2], variant)
        history = [*(item for item in history if math.isfinite(item[1])), (x0, log_snr(here))][-order:]
        step_order = min(step_order, len(history))
        last = (x, here, step_order)
        x = _unip(x, here, there, history, step_order, variant)
    return x


def _unipc_base(x: torch.Tensor, here: GridPoint, there: GridPoint, x0: torch.Tensor) -> torch.Tensor:
    """(sigma'/sigma) x + alpha' phi_1(h) x0: the first-order part of every UniPC update."""
    h = log_snr(there) - log_snr(here)
    return (there.sigma / here.sigma) * x + (there.alpha * -math.expm1(-h)) * x0


def _differences(history: list[tuple[torch.Tensor, float]], count: int, h: float):
    """The ``count`` - 1 earlier points' ratios r_k and differences (D_k - D_0) / r_k, newest first."""
    x0, lam = history[-1]
    ratios, differences = [], []
    for k in range(1, count):
        earlier, lam_k = history[-1 - k]
        ratio = (lam_k - lam) / h
        ratios.append(ratio)
        differences.append((earlier - x0) / ratio)
    return ratios, differences


def _unip(
    x: torch.Tensor,
    here: GridPoint,
    there: GridPoint,
    history: list[tuple[torch.Tensor, float]],
    order: int,
    variant: str,
) -> torch.Tensor:
    """UniP-``order``: x at ``there`` from x at ``here`` and the last ``order`` x_0 predictions."""
    x0 = history[-1][0]
    if order <= 1:
        return _unipc_base(x, here, there, x0)
    h = log_snr(there) - log_snr(here)
    ratios, differences = _differences(history, order, h)
    b_h, weights = _unipc_weights(h, ratios, variant, fixed=True)
    update = sum(float(w) * d for w, d in zip(weights, differences, strict=True))
    return _unipc_base(x, here, there, x0) + (there.alpha * b_h) * update


def _unic(
    x: torch.Tensor,
    here: GridPoint,
    there: GridPoint,
    x0_there: torch.Tensor,
    history: list[tuple[torch.Tensor, float]],
    order: int,
    variant: str,
) -> torch.Tensor:
    """UniC-``order``: the step ``here`` -> ``there`` of x redone with the x_0 prediction at ``there`` (the
    call made at the predicted state) added to the last ``order`` ones."""
    h = log_snr(there) - log_snr(here)
    ratios, differences = _differences(history, order, h)
    x0 = history[-1][0]
    b_h, weights = _unipc_weights(h, [*ratios, 1.0], variant, fixed=True)
    update = sum(float(w) * d for w, d in zip(weights, [*differences, x0_there - x0], strict=True))
    return _unipc_base(x, here, there, x0) + (there.alpha * b_h) * update
