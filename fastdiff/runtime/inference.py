"""A trained model ready to sample or score: its run config, weights, precision and kernels.

``fastdiff.sample``, ``fastdiff.nll`` and ``fastdiff.evaluate`` set up here. Model and diffusion flags not
given on the command line come from the run config beside ``--model_path`` (``run_config.json``, or an
earlier fastdiff's ``model_flags.json``); improved-diffusion's checkpoints have none, and take every flag
from the command line, as in its scripts.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastdiff import dist_util
from fastdiff.builders import build_diffusion, build_model
from fastdiff.config import Bundle, find_run_config, load_run_config, with_saved_model
from fastdiff.diffusion.data_moments import DataMoments, moments_beside
from fastdiff.runtime.backends import check_kernels
from fastdiff.runtime.checkpoint import load_model_state
from fastdiff.runtime.precision import Precision, resolve_precision


def output_dir(out_dir: str, model_path: str) -> str:
    """``out_dir``, or the folder of ``model_path`` when it is empty; created if missing."""
    folder = out_dir or os.path.dirname(os.path.abspath(model_path))
    os.makedirs(folder, exist_ok=True)
    return folder


def load_plain_state_dict(path: str, trust: bool = False) -> dict[str, torch.Tensor]:
    """A ``model*.pt`` / ``ema_*.pt`` file (fastdiff's or improved-diffusion's) as a dict of tensors, read
    with ``weights_only=True`` unless ``trust`` (``--trust_checkpoint``)."""
    if not path:
        raise ValueError("--model_path is required: a model*.pt or ema_*.pt file")
    try:
        state = dist_util.load_file(path, trust=trust)
    except FileNotFoundError as error:
        raise ValueError(f"--model_path {path!r} does not exist or cannot be read") from error
    except dist_util.UnsafeCheckpointError as error:
        raise dist_util.UnsafeCheckpointError(f"--model_path: {error}") from None
    except ValueError as error:  # truncated or corrupt
        raise ValueError(
            f"--model_path {path!r} is not a plain state_dict (pass a model*.pt or ema_*.pt file): {error}"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(
            f"--model_path {path!r} is not a plain state_dict of tensors (pass a model*.pt or ema_*.pt file, "
            "not a state*.pt training state)"
        )
    return state


@dataclass
class InferenceSetup:
    """What ``fastdiff.sample``, ``fastdiff.nll`` and ``fastdiff.evaluate`` run with."""

    config: Bundle
    model: torch.nn.Module
    diffusion: object
    precision: Precision
    kernels: str
    class_names: list[str]
    latent_info: object | None = None
    """The ``fastdiff.latents.LatentInfo`` the run config records for a model of latents; None: pixels."""
    decode: Callable | None = None
    """A latent model's VAE decoder (latents -> images in [-1, 1]) when ``--vae`` gave one."""
    data_moments: DataMoments | None = None
    """The training data's Gaussian fit beside the model (``data_moments.npz``), for the ODE's Gaussian
    start; None when there is none."""


def with_run_config(
    config: Bundle, given: set[str], model_path: str, announce: bool
) -> tuple[Bundle, list[str], object | None]:
    """``config`` with the model and diffusion flags not given taken from the run config beside
    ``model_path`` (when there is one), that run's class names and its latent info (None: pixels)."""
    path = find_run_config(model_path) if model_path else None
    if path is None:
        return config, [], None
    saved = load_run_config(path)
    config, taken = with_saved_model(config, saved, given)
    if announce and taken:
        print(
            f"model flags from {os.path.basename(path)} beside {model_path}: {', '.join(taken)}", flush=True
        )
    return config, list(saved.class_names), saved.latents.latent_info


def prepare_inference(config: Bundle, given: set[str], model_path: str, ctx) -> InferenceSetup:
    """The model of ``model_path`` in eval mode on ``ctx.device`` with its diffusion (flags completed from
    its run config), precision and kernels checked for the device."""
    config, class_names, latent_info = with_run_config(config, given, model_path, ctx.is_main)
    precision = resolve_precision(config.runtime.precision, ctx.device)
    kernels = check_kernels(config.runtime.kernels, ctx.device)
    model = build_model(config.model, config.diffusion)
    load_model_state(model, load_plain_state_dict(model_path, config.runtime.trust_checkpoint), model_path)
    model.to(ctx.device).eval().requires_grad_(False)
    diffusion = build_diffusion(config.diffusion)
    moments = moments_beside(model_path) if model_path else None
    item = (config.model.in_channels, *config.model.image_hw)
    if moments is not None and moments.shape != item:
        raise ValueError(
            f"the data moments beside --model_path {model_path} are of items {list(moments.shape)}, the "
            f"model makes {list(item)}: remove that data_moments.npz or measure it again (python -m "
            "fastdiff.measure_moments)"
        )
    return InferenceSetup(
        config, model, diffusion, precision, kernels, class_names, latent_info, data_moments=moments
    )
