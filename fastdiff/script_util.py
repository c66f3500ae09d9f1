"""improved-diffusion's flags API, as thin wrappers over fastdiff's typed configs (``fastdiff.config``).

``model_and_diffusion_defaults()`` is improved-diffusion's dict (``rescale_timesteps=True`` included)
plus guided-diffusion's model options with values that keep improved-diffusion's model, and fastdiff's
:data:`FASTDIFF_OPTIONS`. Scripts do::

    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, model_and_diffusion_defaults())
    args = parser.parse_args()
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults()))

Every flag is a field of ``ModelConfig`` or ``DiffusionConfig``; the factories' signatures are made from
those fields, so a new flag is added in one place.
"""

import argparse
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from fastdiff.builders import NUM_CLASSES, build_diffusion, build_model
from fastdiff.cli import str2bool
from fastdiff.config import (
    DiffusionConfig,
    ModelConfig,
    parse_attention_resolutions,
    parse_channel_mult,
)
from fastdiff.config.sections import DEFAULT_CHANNEL_MULT
from fastdiff.unet import SuperResModel, UNetModel

__all__ = [
    "DEFAULT_CHANNEL_MULT",
    "FASTDIFF_OPTIONS",
    "NUM_CLASSES",
    "add_dict_to_argparser",
    "args_to_dict",
    "create_model",
    "create_model_and_diffusion",
    "model_and_diffusion_defaults",
    "parse_attention_resolutions",
    "parse_channel_mult",
    "sr_create_model",
    "sr_create_model_and_diffusion",
    "sr_model_and_diffusion_defaults",
    "str2bool",
]

FASTDIFF_OPTIONS = (
    "in_channels", "class_dropout_prob", "predict_v", "snr_gamma", "rescale_zero_terminal_snr"
)  # fmt: skip
"""fastdiff's additions, whose defaults keep improved-diffusion's model and diffusion: ``in_channels`` (3:
RGB; 1 grey, 4 RGBA), ``class_dropout_prob`` (> 0: a null class for classifier-free guidance; the trainer
drops labels with this probability), ``predict_v``, ``snr_gamma`` (0: off) and
``rescale_zero_terminal_snr``. (``image_size`` also takes ``(height, width)``.)"""

CREATE_MODEL_ORDER = (
    "num_channels", "num_res_blocks", "learn_sigma", "class_cond", "use_checkpoint", "attention_resolutions",
    "num_heads", "num_heads_upsample", "use_scale_shift_norm", "dropout",
)  # fmt: skip
"""improved-diffusion's positional order of ``create_model`` after the size(s)."""


def model_and_diffusion_defaults() -> dict:
    """Flag defaults for image training: improved-diffusion's, plus guided-diffusion's
    ``num_head_channels=-1``, ``channel_mult=""``, ``resblock_updown=False``,
    ``use_new_attention_order=False`` and fastdiff's :data:`FASTDIFF_OPTIONS` (a fresh dict each call)."""
    return {**ModelConfig.defaults(), **DiffusionConfig.defaults()}


def sr_model_and_diffusion_defaults() -> dict:
    """Flag defaults for super-resolution training: the image defaults with ``large_size=256`` and
    ``small_size=64`` instead of ``image_size``, and without ``sigma_small`` (as in the reference)."""
    defaults = model_and_diffusion_defaults()
    del defaults["image_size"], defaults["sigma_small"]
    return {"large_size": 256, "small_size": 64, **defaults}


def _as_flag_text(value: Any) -> Any:
    """Sequences given for ``channel_mult`` or ``attention_resolutions`` as improved-diffusion's strings."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return value


def configs_from_flags(flags: dict[str, Any]) -> tuple[ModelConfig, DiffusionConfig]:
    """``(ModelConfig, DiffusionConfig)`` from improved-diffusion's flat flags (missing ones: defaults);
    a TypeError names an unknown flag, a ValueError one whose value fails its check."""
    model_names, diffusion_names = set(ModelConfig.field_names()), set(DiffusionConfig.field_names())
    unknown = sorted(set(flags) - model_names - diffusion_names)
    if unknown:
        raise TypeError(f"unexpected model or diffusion flag(s): {', '.join(unknown)}")
    model = ModelConfig(**{k: _as_flag_text(v) for k, v in flags.items() if k in model_names})
    diffusion = DiffusionConfig(**{k: v for k, v in flags.items() if k in diffusion_names})
    return model, diffusion


def _with_signature(parameters: Sequence[inspect.Parameter]) -> Callable:
    """Give the decorated ``(*args, **flags)`` wrapper the signature ``parameters`` (for help and tools)."""

    def decorate(function: Callable) -> Callable:
        function.__signature__ = inspect.Signature(list(parameters))
        return function

    return decorate


def _parameters(defaults: dict[str, Any], required: Iterable[str] = (), order: Iterable[str] = ()) -> list:
    """Signature parameters: ``required`` then ``order`` positional-or-keyword, the rest keyword-only."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    required = list(required)
    positional = [*required, *order]
    result = [inspect.Parameter(name, kind) for name in required]
    result += [inspect.Parameter(name, kind, default=defaults[name]) for name in order]
    result += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value)
        for name, value in defaults.items()
        if name not in positional
    ]
    return result


def _bind(function: Callable, args: tuple, flags: dict) -> dict[str, Any]:
    """The flags a call gives, by name (positional ones in the signature's order)."""
    return dict(inspect.signature(function).bind(*args, **flags).arguments)


_MODEL_FLAGS = {**ModelConfig.defaults(), "learn_sigma": DiffusionConfig.defaults()["learn_sigma"]}


@_with_signature(_parameters(_MODEL_FLAGS, ("image_size", *CREATE_MODEL_ORDER[:2]), CREATE_MODEL_ORDER[2:]))
def create_model(*args, **flags) -> UNetModel:
    """The RGB ``UNetModel`` the flags describe (6 output channels with ``learn_sigma``, 1000 classes
    with ``class_cond``, one more null class with ``class_dropout_prob > 0``). Positional order is
    improved-diffusion's; guided-diffusion's options follow."""
    model, diffusion = configs_from_flags(_bind(create_model, args, flags))
    return build_model(model, diffusion)


@_with_signature(_parameters(model_and_diffusion_defaults()))
def create_model_and_diffusion(**flags):
    """``(UNetModel, SpacedDiffusion)`` from the flags of :func:`model_and_diffusion_defaults`."""
    model, diffusion = configs_from_flags(flags)
    return build_model(model, diffusion), build_diffusion(diffusion)


_SR_MODEL_FLAGS = {k: v for k, v in _MODEL_FLAGS.items() if k != "image_size"}


@_with_signature(_parameters(_SR_MODEL_FLAGS, ("large_size", "small_size", *CREATE_MODEL_ORDER[:2]),
                             CREATE_MODEL_ORDER[2:]))  # fmt: skip
def sr_create_model(*args, **flags) -> SuperResModel:
    """The ``SuperResModel`` producing ``large_size`` images from ``small_size`` ones."""
    bound = _bind(sr_create_model, args, flags)
    small_size = bound.pop("small_size")
    model, diffusion = configs_from_flags({"image_size": bound.pop("large_size"), **bound})
    return build_model(model, diffusion, small_size=small_size)


@_with_signature(_parameters(sr_model_and_diffusion_defaults()))
def sr_create_model_and_diffusion(**flags):
    """``(SuperResModel, SpacedDiffusion)`` from the flags of :func:`sr_model_and_diffusion_defaults`
    (the diffusion's variance is never ``sigma_small``, as in the reference)."""
    bound = _bind(sr_create_model_and_diffusion, (), flags)
    bound = {**sr_model_and_diffusion_defaults(), **bound}
    small_size = bound.pop("small_size")
    model, diffusion = configs_from_flags({"image_size": bound.pop("large_size"), **bound})
    return build_model(model, diffusion, small_size=small_size), build_diffusion(diffusion)


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
