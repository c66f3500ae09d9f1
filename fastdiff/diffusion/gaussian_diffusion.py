"""Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021): forward process, model posterior,
ancestral and DDIM sampling, training losses and the variational bound in bits per dimension.

Shapes: x, x_start, x_t, noise are [N, C, *spatial]; t is a [N] integer tensor of step indices, with
0 the first (least noisy) step. A model is any callable model(x_t, timesteps, **model_kwargs) that
returns [N, C, *spatial], or [N, 2C, *spatial] when the variance is learned (mean part first).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

Model = Callable[..., torch.Tensor]
DenoisedFn = Callable[[torch.Tensor], torch.Tensor]


class ModelMeanType(enum.Enum):
    """What the model's (first C channels of) output predicts."""

    PREVIOUS_X = enum.auto()  # the posterior mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise added to x_0
    VELOCITY = enum.auto()  # v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022)


class ModelVarType(enum.Enum):
    """Where the reverse-process variance comes from.

    LEARNED: the model outputs log-variance. LEARNED_RANGE: the model outputs v in [-1, 1] that
    interpolates the log-variance between the posterior variance (v = -1) and beta_t (v = 1).
    FIXED_SMALL: the posterior variance. FIXED_LARGE: beta_t (with the posterior variance at t = 0).
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    """Training objective.

    MSE: mean-squared error of the mean prediction, plus the VLB term for learned variances.
    RESCALED_MSE: as MSE, with that VLB term scaled by num_timesteps / 1000.
    KL: the variational-bound term of the sampled step. RESCALED_KL: KL times num_timesteps.
    """

    MSE = enum.auto()
    RESCALED_MSE = enum.auto()
    KL = enum.auto()
    RESCALED_KL = enum.auto()

    def is_vb(self) -> bool:
        """Whether the loss is the variational bound itself (KL or RESCALED_KL)."""
        return self in (LossType.KL, LossType.RESCALED_KL)


_LEARNED_VARIANCES = (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)


def validated_betas(betas: Any) -> np.ndarray:
    """Return betas as a float64 numpy array of shape [T], checking that it is 1-D, non-empty, in (0, 1]."""
    if isinstance(betas, torch.Tensor):
        betas = betas.detach().cpu().double().numpy()
    array = np.array(betas, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {array.shape}")
    if not np.all((array > 0.0) & (array <= 1.0)):
        raise ValueError(f"betas must all lie in (0, 1], got min {array.min()} and max {array.max()}")
    return array


def _check_enum(name: str, value: Any, kind: type[enum.Enum]) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a {kind.__name__}, got {value!r}")


class GaussianDiffusion:
    """Training and sampling utilities for a diffusion model with a fixed beta schedule.

    :param betas: [T] noise variances of the forward steps, each in (0, 1].
    :param model_mean_type: what the model predicts (ModelMeanType).
    :param model_var_type: how the reverse variance is obtained (ModelVarType).
    :param loss_type: the training objective (LossType).
    :param rescale_timesteps: hand the model float timesteps t * 1000 / T, so it always sees the
        range [0, 1000) of the original paper, instead of integer step indices.
    :param snr_gamma: min-SNR-gamma loss weighting (Hang et al. 2023) of the MSE term, or None for
        improved-diffusion's unweighted MSE. With SNR_t = alpha_bar_t / (1 - alpha_bar_t), the weight is
        min(SNR_t, gamma) for x_0 targets, min(SNR_t, gamma) / SNR_t for epsilon and
        min(SNR_t, gamma) / (SNR_t + 1) for v: each the x_0 error weighted by min(SNR_t, gamma).

    Schedule arrays are float64 numpy arrays of shape [T] (as in improved-diffusion). Per-step values
    are gathered from cached torch copies on the data's device, in float64 for float64 data and float32
    otherwise.
    """

    def __init__(
        self,
        *,
        betas: Any,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
        snr_gamma: float | None = None,
    ) -> None:
        _check_enum("model_mean_type", model_mean_type, ModelMeanType)
        _check_enum("model_var_type", model_var_type, ModelVarType)
        _check_enum("loss_type", loss_type, LossType)
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = bool(rescale_timesteps)
        if snr_gamma is not None and not (isinstance(snr_gamma, (int, float)) and snr_gamma > 0):
            raise ValueError(f"snr_gamma must be a number > 0 (or None for no weighting), got {snr_gamma!r}")
        if snr_gamma is not None and model_mean_type == ModelMeanType.PREVIOUS_X:
            raise ValueError("snr_gamma weights epsilon, x_0 or v targets, not PREVIOUS_X")
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)

        betas = validated_betas(betas)
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        with np.errstate(divide="ignore"):  # inf where alpha_bar = 0 (zero terminal SNR)
            self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
            self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance I)
        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus
        # The posterior variance is 0 at t = 0; its log takes the value of t = 1 there (beta_0 when T = 1).
        first_variance = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first_variance, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / one_minus

        # Derived tables used by p_mean_variance and DDIM.
        self.log_betas = np.log(betas)
        self.fixed_large_variance = np.append(first_variance, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1
        self.sqrt_alphas_cumprod_prev = np.sqrt(self.alphas_cumprod_prev)
        self.one_minus_alphas_cumprod_prev = 1.0 - self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod_next = np.sqrt(self.alphas_cumprod_next)
        self.sqrt_one_minus_alphas_cumprod_next = np.sqrt(1.0 - self.alphas_cumprod_next)

        # alpha_bar = 0 at the last step (zero terminal SNR): x_t is pure noise there.
        self.zero_terminal_snr = bool(self.alphas_cumprod[-1] == 0.0)
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

        self._device_tables: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    # ------------------------------------------------------------------ per-step values

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Values of schedule array `name` at steps t, shaped [N, 1, ..., 1] to broadcast against `like`.

        The array is copied to like's device once and cached; the dtype is float64 for float64 `like`
        and float32 otherwise (half-precision data is computed on in float32).
        """
        dtype = torch.promote_types(like.dtype, torch.float32)
        key = (name, like.device, dtype)
        table = self._device_tables.get(key)
        if table is None:
            table = torch.from_numpy(getattr(self, name)).to(device=like.device, dtype=dtype)
            self._device_tables[key] = table
        values = table[t.to(device=like.device, dtype=torch.long)]
        return values.view(-1, *([1] * (like.ndim - 1)))

    def _check_timesteps(self, t: torch.Tensor, x: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"t must be an integer tensor of step indices, got {t!r:.80}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [N] = ({x.shape[0]},) to match x, got {tuple(t.shape)}")

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps as the model sees them: t * 1000 / T (float) when rescaling, else t."""
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x_0): (mean, variance, log_variance), each shaped like x_start [N, ...]."""
        self._check_timesteps(t, x_start)
        mean = self._at("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._at("one_minus_alphas_cumprod", t, x_start).expand(x_start.shape)
        log_variance = self._at("log_one_minus_alphas_cumprod", t, x_start).expand(x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise: [N, ...]."""
        self._check_timesteps(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        elif noise.shape != x_start.shape:
            raise ValueError(
                f"noise must have x_start's shape {tuple(x_start.shape)}, got {tuple(noise.shape)}"
            )
        return (
            self._at("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._at("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0): (mean, variance, clipped log_variance), each shaped like x_t [N, ...]."""
        if x_start.shape != x_t.shape:
            raise ValueError(
                f"x_start and x_t must share one shape, got {tuple(x_start.shape)} and {tuple(x_t.shape)}"
            )
        self._check_timesteps(t, x_t)
        mean = (
            self._at("posterior_mean_coef1", t, x_t) * x_start
            + self._at("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._at("posterior_variance", t, x_t).expand(x_t.shape)
        log_variance = self._at("posterior_log_variance_clipped", t, x_t).expand(x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :param x: [N, C, ...] samples at step t.
        :param t: [N] step indices.
        :param clip_denoised: clamp the x_0 prediction to [-1, 1].
        :param denoised_fn: applied to the x_0 prediction before clipping and before it is used.
        :param model_kwargs: extra keyword arguments for the model (e.g. class labels y).
        :return: dict of "mean", "variance", "log_variance", "pred_xstart", each [N, C, ...].
        """
        self._check_timesteps(t, x)
        model_output = model(x, self._scale_timesteps(t), **(model_kwargs or {}))
        mean_output, variance_output = self._split_model_output(model_output, x)
        return self._p_mean_variance_from_output(
            mean_output, variance_output, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn
        )

    def _split_model_output(
        self, model_output: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split [N, 2C, ...] into mean and variance parts for learned variances; else check [N, C, ...]."""
        channels = x.shape[1]
        learned = self.model_var_type in _LEARNED_VARIANCES
        expected = (x.shape[0], 2 * channels if learned else channels, *x.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"model output must have shape {expected} for model_var_type {self.model_var_type.name}, "
                f"got {tuple(model_output.shape)}"
            )
        if not learned:
            return model_output, None
        mean_output, variance_output = torch.split(model_output, channels, dim=1)
        return mean_output, variance_output

    def _p_mean_variance_from_output(
        self,
        mean_output: torch.Tensor,
        variance_output: torch.Tensor | None,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool,
        denoised_fn: DenoisedFn | None,
    ) -> dict[str, torch.Tensor]:
        """p_mean_variance for an already computed (and split) model output."""
        if self.model_var_type == ModelVarType.LEARNED:
            log_variance = variance_output
            variance = torch.exp(log_variance)
        elif self.model_var_type == ModelVarType.LEARNED_RANGE:
            min_log = self._at("posterior_log_variance_clipped", t, x)
            max_log = self._at("log_betas", t, x)
            frac = (variance_output + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = torch.exp(log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            variance = self._at("fixed_large_variance", t, x).expand(x.shape)
            log_variance = self._at("fixed_large_log_variance", t, x).expand(x.shape)
        else:
            variance = self._at("posterior_variance", t, x).expand(x.shape)
            log_variance = self._at("posterior_log_variance_clipped", t, x).expand(x.shape)

        def process_xstart(pred: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                pred = denoised_fn(pred)
            return pred.clamp(-1, 1) if clip_denoised else pred

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=mean_output))
            mean = mean_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(mean_output)
            elif self.model_mean_type == ModelMeanType.VELOCITY:
                pred_xstart = process_xstart(self._predict_xstart_from_v(x_t=x, t=t, v=mean_output))
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=mean_output))
            mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t): [N, ...]."""
        return (
            self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def _predict_xstart_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v: [N, ...]."""
        return (
            self._at("sqrt_alphas_cumprod", t, x_t) * x_t
            - self._at("sqrt_one_minus_alphas_cumprod", t, x_t) * v
        )

    def _predict_xstart_from_xprev(
        self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor
    ) -> torch.Tensor:
        """x_0 = (posterior mean - coef2 x_t) / coef1: [N, ...]."""
        return (
            self._at("recip_posterior_mean_coef1", t, x_t) * xprev
            - self._at("posterior_mean_coef2_over_coef1", t, x_t) * x_t
        )

    def _predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
    ) -> torch.Tensor:
        """eps = (x_t / sqrt(alpha_bar_t) - x_0) / sqrt(1 / alpha_bar_t - 1): [N, ...].

        Where alpha_bar_t = 0 (zero terminal SNR) x_t is the noise itself, and eps = x_t.
        """
        eps = (self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._at(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )
        if self.zero_terminal_snr:
            eps = torch.where(self._at("alphas_cumprod", t, x_t) == 0.0, x_t, eps)
        return eps

    # ------------------------------------------------------------------ ancestral sampling

    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Draw x_{t-1} ~ p(x_{t-1} | x_t) (no noise where t == 0).

        :return: dict of "sample" and "pred_xstart", each [N, C, ...].
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = torch.randn_like(x)
        sample = out["mean"] + self._nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Sample by running the reverse process from x_T = noise (standard normal if None) to x_0.

        :param shape: the sample shape (N, C, ...).
        :param device: where to sample; defaults to noise's device, else the model's, else CPU.
        :param progress: show a tqdm progress bar.
        :return: [N, C, ...] samples, computed without autograd.
        """
        final: dict[str, torch.Tensor] = {}
        for out in self.p_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
        ):
            final = out
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Like p_sample_loop, but yield p_sample's dict at every step, from t = T - 1 down to 0."""
        img, device = self._initial_noise(model, shape, noise, device)
        for i in self._reverse_indices(progress):
            t = torch.full((img.shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_sample(
                    model,
                    img,
                    t,
                    clip_denoised=clip_denoised,
                    denoised_fn=denoised_fn,
                    model_kwargs=model_kwargs,
                )
            yield out
            img = out["sample"]

    # ------------------------------------------------------------------ DDIM

    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None,
        model_kwargs: dict[str, Any] | None = None,
        eta: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Draw x_{t-1} with DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like.

        :return: dict of "sample" and "pred_xstart", each [N, C, ...].
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        # sigma^2 = eta^2 (1 - alpha_bar_prev) / (1 - alpha_bar) (1 - alpha_bar / alpha_bar_prev), which is
        # eta^2 times the posterior variance; the tables keep it accurate in float32 where alpha_bar ~ 1.
        sigma_squared = eta**2 * self._at("posterior_variance", t, x)
        direction = torch.sqrt(
            (self._at("one_minus_alphas_cumprod_prev", t, x) - sigma_squared).clamp(min=0.0)
        )
        sample = out["pred_xstart"] * self._at("sqrt_alphas_cumprod_prev", t, x) + direction * eps
        if eta != 0:
            sample = sample + self._nonzero_mask(t, x) * torch.sqrt(sigma_squared) * torch.randn_like(x)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None,
        model_kwargs: dict[str, Any] | None = None,
        eta: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Map x_t to x_{t+1} along the deterministic DDIM ODE (the inverse of ddim_sample with eta = 0).

        :return: dict of "sample" and "pred_xstart", each [N, C, ...].
        """
        if eta != 0.0:
            raise ValueError(
                f"ddim_reverse_sample follows the deterministic path and needs eta == 0, got {eta}"
            )
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        sample = (
            out["pred_xstart"] * self._at("sqrt_alphas_cumprod_next", t, x)
            + self._at("sqrt_one_minus_alphas_cumprod_next", t, x) * eps
        )
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """Sample with DDIM from x_T = noise to x_0; arguments as p_sample_loop. Returns [N, C, ...]."""
        final: dict[str, torch.Tensor] = {}
        for out in self.ddim_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            eta=eta,
        ):
            final = out
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Like ddim_sample_loop, but yield ddim_sample's dict at every step, from t = T - 1 down to 0."""
        img, device = self._initial_noise(model, shape, noise, device)
        for i in self._reverse_indices(progress):
            t = torch.full((img.shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.ddim_sample(
                    model,
                    img,
                    t,
                    clip_denoised=clip_denoised,
                    denoised_fn=denoised_fn,
                    model_kwargs=model_kwargs,
                    eta=eta,
                )
            yield out
            img = out["sample"]

    # ------------------------------------------------------------------ loop helpers

    @staticmethod
    def _nonzero_mask(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, ..., 1] mask that is 0 where t == 0 (the last reverse step adds no noise)."""
        return (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    @staticmethod
    def _initial_noise(
        model: Model, shape: Sequence[int], noise: torch.Tensor | None, device: torch.device | str | None
    ) -> tuple[torch.Tensor, torch.device]:
        if not isinstance(shape, (tuple, list, torch.Size)):
            raise TypeError(f"shape must be a tuple or list of ints, got {type(shape).__name__}")
        if noise is not None and tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(noise.shape)}")
        if device is None:
            if noise is not None:
                device = noise.device
            else:
                parameters = getattr(model, "parameters", None)
                first = next(iter(parameters()), None) if callable(parameters) else None
                device = first.device if first is not None else torch.device("cpu")
        device = torch.device(device)
        img = noise.to(device) if noise is not None else torch.randn(*shape, device=device)
        return img, device

    def _reverse_indices(self, progress: bool) -> Iterator[int]:
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            return iter(tqdm(indices))
        return iter(indices)

    # ------------------------------------------------------------------ losses and the bound

    def _vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One term of the variational bound, in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder NLL -log p(x_0 | x_1) at t == 0.

        :return: dict of "output" [N] and "pred_xstart" [N, C, ...].
        """
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        return self._vb_terms_from_prediction(out, x_start, x_t, t)

    def _vb_terms_from_prediction(
        self, out: dict[str, torch.Tensor], x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(
            2.0
        )
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(
                x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
            )
        ) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample training losses at steps t.

        :param x_start: [N, C, ...] clean data.
        :param t: [N] step indices.
        :param noise: [N, C, ...] the Gaussian noise that makes x_t (drawn if None).
        :return: dict of [N] tensors. "loss" always; "mse" for the MSE losses; "vb" (the variational-bound
            term, in bits) for the KL losses and for MSE losses with a learned variance, where the loss is
            mse + vb and vb reaches only the variance (the mean output is detached in it).
        """
        self._check_timesteps(t, x_start)
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        if self.loss_type.is_vb():
            vb = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)[
                "output"
            ]
            if self.loss_type == LossType.RESCALED_KL:
                vb = vb * self.num_timesteps
            return {"loss": vb, "vb": vb}

        terms: dict[str, torch.Tensor] = {}
        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        mean_output, variance_output = self._split_model_output(model_output, x_t)
        if variance_output is not None:
            # The bound trains the variance only; the mean is trained by the MSE term alone.
            frozen = self._p_mean_variance_from_output(
                mean_output.detach(), variance_output, x_t, t, clip_denoised=False, denoised_fn=None
            )
            vb = self._vb_terms_from_prediction(frozen, x_start, x_t, t)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # improved-diffusion's scale: with a factor of 1, the bound term overwhelms the MSE.
                vb = vb * (self.num_timesteps / 1000.0)
            terms["vb"] = vb

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        elif self.model_mean_type == ModelMeanType.VELOCITY:
            target = self.v_target(x_start, noise, t)
        else:
            target = noise
        terms["mse"] = mean_flat((target - mean_output) ** 2)
        if self.snr_gamma is not None:
            terms["mse"] = terms["mse"] * self.min_snr_weight(t, terms["mse"])
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def v_target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x_0: [N, ...]."""
        return (
            self._at("sqrt_alphas_cumprod", t, x_start) * noise
            - self._at("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start
        )

    def min_snr_weight(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The min-SNR-gamma weight of the MSE term at steps t for this model's target: [N].

        x_0: min(SNR, gamma); epsilon: min(SNR, gamma) / SNR, written min(1, gamma / SNR) so that it is
        1 where SNR = 0; v: min(SNR, gamma) / (SNR + 1).
        """
        if self.snr_gamma is None:
            raise ValueError("min_snr_weight needs snr_gamma")
        snr = self._at("snr", t, like).view(-1)
        gamma = torch.full_like(snr, self.snr_gamma)
        if self.model_mean_type == ModelMeanType.START_X:
            return torch.minimum(snr, gamma)
        if self.model_mean_type == ModelMeanType.VELOCITY:
            return torch.minimum(snr, gamma) / (snr + 1.0)
        return torch.minimum(torch.ones_like(snr), gamma / snr)

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension: [N]. It does not depend on the model."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(
        self,
        model: Model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The whole variational bound of x_start, in bits per dimension, with one noise draw per step.

        :param x_start: [N, C, ...] data in [-1, 1].
        :return: dict of "total_bpd" [N] (prior_bpd + vb summed over steps), "prior_bpd" [N], and [N, T]
            tensors "vb" (bound terms), "xstart_mse" (x_0 prediction MSE) and "mse" (eps prediction MSE).
            Columns follow the reverse process, as in improved-diffusion: column j holds step T - 1 - j.
        """
        batch = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in range(self.num_timesteps - 1, -1, -1):
            t = torch.full((batch,), i, device=x_start.device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        vb_t = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }
