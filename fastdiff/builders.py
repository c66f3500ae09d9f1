"""Models and diffusions from configs: the one place every path (training, previews, in-training
evaluation, sample, nll, evaluate, improved-diffusion's ``create_model_and_diffusion``) builds them."""

from fastdiff.config import ConfigError, DiffusionConfig, ModelConfig
from fastdiff.diffusion import SpacedDiffusion, create_gaussian_diffusion, space_timesteps
from fastdiff.unet import SuperResModel, UNetModel

NUM_CLASSES = 1000
"""Classes of a class-conditional model (ImageNet), as in the reference."""


def build_diffusion(config: DiffusionConfig, respacing: str | None = None) -> SpacedDiffusion:
    """The diffusion ``config`` describes, respaced by ``respacing`` (None: ``config.timestep_respacing``;
    ``""``: every trained step)."""
    return create_gaussian_diffusion(
        steps=config.diffusion_steps,
        learn_sigma=config.learn_sigma,
        sigma_small=config.sigma_small,
        noise_schedule=config.noise_schedule,
        use_kl=config.use_kl,
        predict_xstart=config.predict_xstart,
        rescale_timesteps=config.rescale_timesteps,
        rescale_learned_sigmas=config.rescale_learned_sigmas,
        timestep_respacing=config.timestep_respacing if respacing is None else respacing,
        predict_v=config.predict_v,
        snr_gamma=config.snr_gamma,
        rescale_zero_terminal_snr=config.rescale_zero_terminal_snr,
    )


def build_model(model: ModelConfig, diffusion: DiffusionConfig, small_size: int | None = None) -> UNetModel:
    """The UNet ``model`` describes: ``in_channels`` in, as many out (twice when ``diffusion.learn_sigma``),
    1000 classes with ``class_cond``, one more null class with ``class_dropout_prob > 0``; with
    ``small_size``, the super-resolution model producing ``image_size`` images from ``small_size`` ones.
    A ConfigError names the flag when the image size does not fit the UNet (``ModelConfig.geometry``)."""
    try:
        channel_mult, attention_factors = model.geometry()
    except ConfigError as error:
        raise ConfigError(f"--{error.field}", error.problem) from None
    kind = UNetModel
    if small_size is not None:
        if not isinstance(model.image_size, int):
            raise ConfigError("large_size", f"must be one side (square images), got {model.image_size!r}")
        if not 0 < small_size < model.image_size:
            raise ConfigError(
                "small_size", f"must be positive and below large_size={model.image_size}, got {small_size}"
            )
        kind = SuperResModel
    return kind(
        image_size=model.image_size,
        in_channels=model.in_channels,
        model_channels=model.num_channels,
        out_channels=model.in_channels * (2 if diffusion.learn_sigma else 1),
        num_res_blocks=model.num_res_blocks,
        attention_resolutions=attention_factors,
        dropout=model.dropout,
        channel_mult=channel_mult,
        num_classes=NUM_CLASSES if model.class_cond else None,
        use_checkpoint=model.use_checkpoint,
        num_heads=model.num_heads,
        num_head_channels=model.num_head_channels,
        num_heads_upsample=model.num_heads_upsample,
        use_scale_shift_norm=model.use_scale_shift_norm,
        resblock_updown=model.resblock_updown,
        use_new_attention_order=model.use_new_attention_order,
        null_class=model.null_class,
    )


def preview_steps(diffusion_steps: int, steps: int) -> int:
    """The grid points of an ODE sampler's sample grids and in-training evaluation: ``steps``, at most all
    the trained steps."""
    if steps <= 0:
        raise ConfigError("--preview_steps", f"must be positive, got {steps}")
    return min(steps, diffusion_steps)


def preview_respacing(diffusion_steps: int, steps: int, use_ddim: bool) -> str:
    """The respacing of the sample grids and the in-training evaluation: ``steps`` trained steps (at most
    all of them), by DDIM's stride (``ddim{steps}``) when ``use_ddim`` and the step count allows it, else
    evenly spread."""
    steps = preview_steps(diffusion_steps, steps)
    if use_ddim:
        try:
            space_timesteps(diffusion_steps, f"ddim{steps}")
            return f"ddim{steps}"
        except ValueError:
            pass
    return str(steps)
