"""improved-diffusion's flags: defaults, the model and diffusion factory, and the argparse helpers.

``model_and_diffusion_defaults()`` is improved-diffusion's dict (``rescale_timesteps=True`` included)
plus guided-diffusion's model options with values that keep improved-diffusion's model. Scripts do::

    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, model_and_diffusion_defaults())
    args = parser.parse_args()
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults()))
"""

import argparse
from collections.abc import Iterable, Sequence

from fastdiff.unet import SuperResModel, UNetModel

NUM_CLASSES = 1000
"""Classes of a class-conditional model (ImageNet), as in the reference."""

DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
"""The references' channel multipliers by image size when ``channel_mult`` is empty (32, 64, 256 from
improved-diffusion; 128 and 512 from guided-diffusion)."""

_MODEL_DEFAULTS = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    attention_resolutions="16,8",
    dropout=0.0,
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    use_scale_shift_norm=True,
    num_head_channels=-1,
    channel_mult="",
    resblock_updown=False,
    use_new_attention_order=False,
    class_dropout_prob=0.0,
)
_DIFFUSION_DEFAULTS = dict(
    sigma_small=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=True,
    rescale_learned_sigmas=True,
    predict_v=False,
    snr_gamma=0.0,
    rescale_zero_terminal_snr=False,
)
FASTDIFF_OPTIONS = ("class_dropout_prob", "predict_v", "snr_gamma", "rescale_zero_terminal_snr")
"""fastdiff's additions (issue 13), whose defaults keep improved-diffusion's model and diffusion:
``class_dropout_prob`` (> 0: a null class for classifier-free guidance; the trainer drops labels with this
probability), ``predict_v``, ``snr_gamma`` (0: off) and ``rescale_zero_terminal_snr``."""


def model_and_diffusion_defaults() -> dict:
    """Flag defaults for image training: improved-diffusion's, plus guided-diffusion's
    ``num_head_channels=-1``, ``channel_mult=""``, ``resblock_updown=False``,
    ``use_new_attention_order=False`` and fastdiff's :data:`FASTDIFF_OPTIONS` (which leave
    improved-diffusion's model and diffusion unchanged)."""
    return {**_MODEL_DEFAULTS, **_DIFFUSION_DEFAULTS}


def parse_channel_mult(channel_mult: str | Sequence[float], image_size: int) -> tuple[float, ...]:
    """``""`` -> the reference's multipliers for ``image_size``; ``"1,2,2"`` -> ``(1, 2, 2)``;
    a sequence of numbers is returned as a tuple. Entries may be fractional (``"0.5,1"``)."""
    if not isinstance(channel_mult, str):
        return tuple(channel_mult)
    if not channel_mult.strip():
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"no default channel_mult for image_size={image_size} (defaults exist for "
                f"{sorted(DEFAULT_CHANNEL_MULT)}); pass channel_mult, e.g. '1,2,2,2'"
            )
        return DEFAULT_CHANNEL_MULT[image_size]
    values = []
    for entry in channel_mult.split(","):
        try:
            value = float(entry)
        except ValueError:
            raise ValueError(
                f"channel_mult must be comma-separated numbers like '1,2,2', got {channel_mult!r}"
            ) from None
        if value <= 0:
            raise ValueError(f"channel_mult entries must be positive, got {channel_mult!r}")
        values.append(int(value) if value.is_integer() else value)
    return tuple(values)


def parse_attention_resolutions(
    attention_resolutions: str | Iterable[int], image_size: int
) -> tuple[int, ...]:
    """Resolutions ``"16,8"`` -> downsample factors ``(image_size // 16, image_size // 8)``.

    An empty string means no attention outside the middle block. Each resolution must divide
    ``image_size``. A non-string iterable is taken as resolutions too.
    """
    if isinstance(attention_resolutions, str):
        entries = [e for e in attention_resolutions.split(",") if e.strip()]
    else:
        entries = list(attention_resolutions)
    factors = []
    for entry in entries:
        try:
            res = int(entry)
        except (TypeError, ValueError):
            raise ValueError(
                "attention_resolutions must be comma-separated ints like '16,8', "
                f"got {attention_resolutions!r}"
            ) from None
        if res < 1 or image_size % res:
            raise ValueError(
                f"attention_resolutions entry {res} must be a positive divisor of image_size={image_size}"
            )
        factors.append(image_size // res)
    return tuple(factors)


def create_model(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    learn_sigma: bool = _MODEL_DEFAULTS["learn_sigma"],
    class_cond: bool = _MODEL_DEFAULTS["class_cond"],
    use_checkpoint: bool = _MODEL_DEFAULTS["use_checkpoint"],
    attention_resolutions: str = _MODEL_DEFAULTS["attention_resolutions"],
    num_heads: int = _MODEL_DEFAULTS["num_heads"],
    num_heads_upsample: int = _MODEL_DEFAULTS["num_heads_upsample"],
    use_scale_shift_norm: bool = _MODEL_DEFAULTS["use_scale_shift_norm"],
    dropout: float = _MODEL_DEFAULTS["dropout"],
    num_head_channels: int = _MODEL_DEFAULTS["num_head_channels"],
    channel_mult: str | Sequence[float] = _MODEL_DEFAULTS["channel_mult"],
    resblock_updown: bool = _MODEL_DEFAULTS["resblock_updown"],
    use_new_attention_order: bool = _MODEL_DEFAULTS["use_new_attention_order"],
    class_dropout_prob: float = _MODEL_DEFAULTS["class_dropout_prob"],
) -> UNetModel:
    """The RGB ``UNetModel`` the flags describe (6 output channels with ``learn_sigma``, 1000 classes
    with ``class_cond``, one more null class with ``class_dropout_prob > 0``). Positional order is
    improved-diffusion's; guided-diffusion's options follow."""
    null_class = check_class_dropout(class_dropout_prob, class_cond)
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, image_size),
        num_classes=NUM_CLASSES if class_cond else None,
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        null_class=null_class,
    )


def check_class_dropout(class_dropout_prob: float, class_cond: bool) -> bool:
    """Whether the model needs a null class; ValueError unless ``class_dropout_prob`` is in [0, 1) and,
    when positive, the model is class-conditional."""
    if isinstance(class_dropout_prob, bool) or not isinstance(class_dropout_prob, (int, float)):
        raise ValueError(f"class_dropout_prob must be a number in [0, 1), got {class_dropout_prob!r}")
    if not 0.0 <= class_dropout_prob < 1.0:
        raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
    if class_dropout_prob > 0 and not class_cond:
        raise ValueError("class_dropout_prob > 0 drops class labels and needs class_cond True")
    return class_dropout_prob > 0


def _create_diffusion(
    diffusion_steps: int,
    learn_sigma: bool,
    sigma_small: bool,
    noise_schedule: str,
    use_kl: bool,
    predict_xstart: bool,
    rescale_timesteps: bool,
    rescale_learned_sigmas: bool,
    timestep_respacing: str,
    predict_v: bool = False,
    snr_gamma: float = 0.0,
    rescale_zero_terminal_snr: bool = False,
):
    from fastdiff.diffusion import create_gaussian_diffusion

    return create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
        predict_v=predict_v,
        snr_gamma=snr_gamma,
        rescale_zero_terminal_snr=rescale_zero_terminal_snr,
    )


def create_model_and_diffusion(
    image_size: int = _MODEL_DEFAULTS["image_size"],
    class_cond: bool = _MODEL_DEFAULTS["class_cond"],
    learn_sigma: bool = _MODEL_DEFAULTS["learn_sigma"],
    sigma_small: bool = _DIFFUSION_DEFAULTS["sigma_small"],
    num_channels: int = _MODEL_DEFAULTS["num_channels"],
    num_res_blocks: int = _MODEL_DEFAULTS["num_res_blocks"],
    num_heads: int = _MODEL_DEFAULTS["num_heads"],
    num_heads_upsample: int = _MODEL_DEFAULTS["num_heads_upsample"],
    attention_resolutions: str = _MODEL_DEFAULTS["attention_resolutions"],
    dropout: float = _MODEL_DEFAULTS["dropout"],
    diffusion_steps: int = _DIFFUSION_DEFAULTS["diffusion_steps"],
    noise_schedule: str = _DIFFUSION_DEFAULTS["noise_schedule"],
    timestep_respacing: str = _DIFFUSION_DEFAULTS["timestep_respacing"],
    use_kl: bool = _DIFFUSION_DEFAULTS["use_kl"],
    predict_xstart: bool = _DIFFUSION_DEFAULTS["predict_xstart"],
    rescale_timesteps: bool = _DIFFUSION_DEFAULTS["rescale_timesteps"],
    rescale_learned_sigmas: bool = _DIFFUSION_DEFAULTS["rescale_learned_sigmas"],
    use_checkpoint: bool = _MODEL_DEFAULTS["use_checkpoint"],
    use_scale_shift_norm: bool = _MODEL_DEFAULTS["use_scale_shift_norm"],
    num_head_channels: int = _MODEL_DEFAULTS["num_head_channels"],
    channel_mult: str | Sequence[float] = _MODEL_DEFAULTS["channel_mult"],
    resblock_updown: bool = _MODEL_DEFAULTS["resblock_updown"],
    use_new_attention_order: bool = _MODEL_DEFAULTS["use_new_attention_order"],
    class_dropout_prob: float = _MODEL_DEFAULTS["class_dropout_prob"],
    predict_v: bool = _DIFFUSION_DEFAULTS["predict_v"],
    snr_gamma: float = _DIFFUSION_DEFAULTS["snr_gamma"],
    rescale_zero_terminal_snr: bool = _DIFFUSION_DEFAULTS["rescale_zero_terminal_snr"],
):
    """``(UNetModel, SpacedDiffusion)`` from the flags of :func:`model_and_diffusion_defaults`."""
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        num_head_channels=num_head_channels,
        channel_mult=channel_mult,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        class_dropout_prob=class_dropout_prob,
    )
    diffusion = _create_diffusion(
        diffusion_steps, learn_sigma, sigma_small, noise_schedule, use_kl, predict_xstart, rescale_timesteps,
        rescale_learned_sigmas, timestep_respacing, predict_v, snr_gamma, rescale_zero_terminal_snr,
    )  # fmt: skip
    return model, diffusion


def sr_model_and_diffusion_defaults() -> dict:
    """Flag defaults for super-resolution training: the image defaults with ``large_size=256`` and
    ``small_size=64`` instead of ``image_size``, and without ``sigma_small`` (as in the reference)."""
    defaults = model_and_diffusion_defaults()
    del defaults["image_size"], defaults["sigma_small"]
    return {"large_size": 256, "small_size": 64, **defaults}


def sr_create_model(
    large_size: int,
    small_size: int,
    num_channels: int,
    num_res_blocks: int,
    learn_sigma: bool = _MODEL_DEFAULTS["learn_sigma"],
    class_cond: bool = _MODEL_DEFAULTS["class_cond"],
    use_checkpoint: bool = _MODEL_DEFAULTS["use_checkpoint"],
    attention_resolutions: str = _MODEL_DEFAULTS["attention_resolutions"],
    num_heads: int = _MODEL_DEFAULTS["num_heads"],
    num_heads_upsample: int = _MODEL_DEFAULTS["num_heads_upsample"],
    use_scale_shift_norm: bool = _MODEL_DEFAULTS["use_scale_shift_norm"],
    dropout: float = _MODEL_DEFAULTS["dropout"],
    num_head_channels: int = _MODEL_DEFAULTS["num_head_channels"],
    channel_mult: str | Sequence[float] = _MODEL_DEFAULTS["channel_mult"],
    resblock_updown: bool = _MODEL_DEFAULTS["resblock_updown"],
    use_new_attention_order: bool = _MODEL_DEFAULTS["use_new_attention_order"],
    class_dropout_prob: float = _MODEL_DEFAULTS["class_dropout_prob"],
) -> SuperResModel:
    """The ``SuperResModel`` producing ``large_size`` images from ``small_size`` ones."""
    _check_sizes(large_size, small_size)
    null_class = check_class_dropout(class_dropout_prob, class_cond)
    return SuperResModel(
        image_size=large_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, large_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, large_size),
        num_classes=NUM_CLASSES if class_cond else None,
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        null_class=null_class,
    )


def _check_sizes(large_size: int, small_size: int) -> None:
    if not 0 < small_size < large_size:
        raise ValueError(f"small_size must be positive and below large_size={large_size}, got {small_size}")


def sr_create_model_and_diffusion(
    large_size: int = 256,
    small_size: int = 64,
    class_cond: bool = _MODEL_DEFAULTS["class_cond"],
    learn_sigma: bool = _MODEL_DEFAULTS["learn_sigma"],
    num_channels: int = _MODEL_DEFAULTS["num_channels"],
    num_res_blocks: int = _MODEL_DEFAULTS["num_res_blocks"],
    num_heads: int = _MODEL_DEFAULTS["num_heads"],
    num_heads_upsample: int = _MODEL_DEFAULTS["num_heads_upsample"],
    attention_resolutions: str = _MODEL_DEFAULTS["attention_resolutions"],
    dropout: float = _MODEL_DEFAULTS["dropout"],
    diffusion_steps: int = _DIFFUSION_DEFAULTS["diffusion_steps"],
    noise_schedule: str = _DIFFUSION_DEFAULTS["noise_schedule"],
    timestep_respacing: str = _DIFFUSION_DEFAULTS["timestep_respacing"],
    use_kl: bool = _DIFFUSION_DEFAULTS["use_kl"],
    predict_xstart: bool = _DIFFUSION_DEFAULTS["predict_xstart"],
    rescale_timesteps: bool = _DIFFUSION_DEFAULTS["rescale_timesteps"],
    rescale_learned_sigmas: bool = _DIFFUSION_DEFAULTS["rescale_learned_sigmas"],
    use_checkpoint: bool = _MODEL_DEFAULTS["use_checkpoint"],
    use_scale_shift_norm: bool = _MODEL_DEFAULTS["use_scale_shift_norm"],
    num_head_channels: int = _MODEL_DEFAULTS["num_head_channels"],
    channel_mult: str | Sequence[float] = _MODEL_DEFAULTS["channel_mult"],
    resblock_updown: bool = _MODEL_DEFAULTS["resblock_updown"],
    use_new_attention_order: bool = _MODEL_DEFAULTS["use_new_attention_order"],
    class_dropout_prob: float = _MODEL_DEFAULTS["class_dropout_prob"],
    predict_v: bool = _DIFFUSION_DEFAULTS["predict_v"],
    snr_gamma: float = _DIFFUSION_DEFAULTS["snr_gamma"],
    rescale_zero_terminal_snr: bool = _DIFFUSION_DEFAULTS["rescale_zero_terminal_snr"],
):
    """``(SuperResModel, SpacedDiffusion)`` from the flags of :func:`sr_model_and_diffusion_defaults`
    (the diffusion's variance is never ``sigma_small``, as in the reference)."""
    model = sr_create_model(
        large_size,
        small_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        num_head_channels=num_head_channels,
        channel_mult=channel_mult,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        class_dropout_prob=class_dropout_prob,
    )
    diffusion = _create_diffusion(
        diffusion_steps, learn_sigma, False, noise_schedule, use_kl, predict_xstart, rescale_timesteps,
        rescale_learned_sigmas, timestep_respacing, predict_v, snr_gamma, rescale_zero_terminal_snr,
    )  # fmt: skip
    return model, diffusion


def str2bool(value: str | bool) -> bool:
    """``yes/true/t/y/1`` -> True, ``no/false/f/n/0`` -> False (any case); else an argparse error."""
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (yes/no, true/false, 1/0), got {value!r}")


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: dict) -> None:
    """One ``--key`` option per entry, typed by its default: bools parse with :func:`str2bool`,
    None defaults take strings, everything else the default's type."""
    for key, value in default_dict.items():
        if value is None:
            value_type = str
        elif isinstance(value, bool):
            value_type = str2bool
        else:
            value_type = type(value)
        parser.add_argument(f"--{key}", default=value, type=value_type)


def args_to_dict(args: argparse.Namespace, keys: Iterable[str]) -> dict:
    """``{key: args.key}`` for each key."""
    return {key: getattr(args, key) for key in keys}
