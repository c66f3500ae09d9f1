"""create_gaussian_diffusion: improved-diffusion's flags to a (respaced) GaussianDiffusion."""

from __future__ import annotations

from collections.abc import Sequence

from . import schedules
from .gaussian_diffusion import LossType, ModelMeanType, ModelVarType
from .respace import SpacedDiffusion, space_timesteps


def create_gaussian_diffusion(
    *,
    steps: int = 1000,
    learn_sigma: bool = False,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing: str | Sequence[int] = "",
    predict_v: bool = False,
    snr_gamma: float = 0.0,
    rescale_zero_terminal_snr: bool = False,
) -> SpacedDiffusion:
    """Build the diffusion improved-diffusion's script_util builds from the same flags.

    Loss: RESCALED_KL if use_kl, else RESCALED_MSE if rescale_learned_sigmas, else MSE. Mean: START_X if
    predict_xstart, else EPSILON. Variance: LEARNED_RANGE if learn_sigma, else FIXED_SMALL if
    sigma_small, else FIXED_LARGE. timestep_respacing ("" for all steps) goes to space_timesteps.

    fastdiff's additions (their defaults keep improved-diffusion's behaviour): predict_v (VELOCITY mean
    type), snr_gamma (> 0: min-SNR-gamma weighting of the MSE term; 0: off) and rescale_zero_terminal_snr
    (betas rescaled so alpha_bar_T = 0; needs v or x_0 prediction, since epsilon is undefined there).
    """
    if predict_v and predict_xstart:
        raise ValueError("predict_v and predict_xstart are exclusive: the model predicts one target")
    if isinstance(snr_gamma, bool) or not isinstance(snr_gamma, (int, float)) or snr_gamma < 0:
        raise ValueError(f"snr_gamma must be a number > 0 (0 turns min-SNR weighting off), got {snr_gamma!r}")
    if rescale_zero_terminal_snr and not (predict_v or predict_xstart):
        raise ValueError(
            "rescale_zero_terminal_snr makes the last step pure noise, where an epsilon prediction cannot "
            "give x_0: pass predict_v True (recommended) or predict_xstart True"
        )
    betas = schedules.get_named_beta_schedule(noise_schedule, steps)
    if rescale_zero_terminal_snr:
        betas = schedules.rescale_zero_terminal_snr(betas)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        model_var_type = ModelVarType.LEARNED_RANGE
    elif sigma_small:
        model_var_type = ModelVarType.FIXED_SMALL
    else:
        model_var_type = ModelVarType.FIXED_LARGE
    if predict_v:
        mean_type = ModelMeanType.VELOCITY
    else:
        mean_type = ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps]),
        betas=betas,
        model_mean_type=mean_type,
        model_var_type=model_var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
        snr_gamma=snr_gamma or None,
    )
