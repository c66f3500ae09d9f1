"""Gaussian diffusion of improved-diffusion: schedules, process, losses, respacing, timestep samplers."""

from .factory import create_gaussian_diffusion
from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .resample import (
    LossAwareSampler,
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from .respace import SpacedDiffusion, space_timesteps
from .sampling import SAMPLERS, sample_batch
from .schedules import betas_for_alpha_bar, get_named_beta_schedule, rescale_zero_terminal_snr

__all__ = [
    "SAMPLERS",
    "GaussianDiffusion",
    "LossAwareSampler",
    "LossSecondMomentResampler",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "ScheduleSampler",
    "SpacedDiffusion",
    "UniformSampler",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "create_gaussian_diffusion",
    "create_named_schedule_sampler",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "rescale_zero_terminal_snr",
    "sample_batch",
    "space_timesteps",
]
