"""Building a model from flags and loading a plain state_dict into it, for sampling and evaluation."""

from dataclasses import dataclass

import torch

from fastdiff import dist_util
from fastdiff.script_util import args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults
from fastdiff.training.checkpoint import load_model_state
from fastdiff.training.cli import check_kernels
from fastdiff.training.model_flags import apply_model_flags
from fastdiff.training.precision import Precision, resolve_precision


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


def build_inference_model(flags: dict, model_path: str, device: torch.device, trust: bool = False):
    """``(model in eval mode on device, diffusion)`` from ``flags``, with the weights in ``model_path``."""
    model, diffusion = create_model_and_diffusion(**flags)
    load_model_state(model, load_plain_state_dict(model_path, trust), model_path)
    model.to(device).eval().requires_grad_(False)
    return model, diffusion


@dataclass
class InferenceSetup:
    """What ``fastdiff.sample`` and ``fastdiff.nll`` run with."""

    model: torch.nn.Module
    diffusion: object
    precision: Precision
    kernels: str
    class_names: list[str]


def prepare_inference(args, given: set[str], ctx) -> InferenceSetup:
    """Model flags not on the command line from ``model_flags.json`` beside ``--model_path``, precision and
    kernels checked for ``ctx.device``, and the model with its weights loaded."""
    taken, class_names = apply_model_flags(args, given, args.model_path, model_and_diffusion_defaults())
    precision = resolve_precision(args.precision, ctx.device)
    kernels = check_kernels(args.kernels, ctx.device)
    if ctx.is_main and taken:
        print(f"model flags from model_flags.json beside {args.model_path}: {', '.join(taken)}", flush=True)
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    trust = bool(getattr(args, "trust_checkpoint", False))
    model, diffusion = build_inference_model(flags, args.model_path, ctx.device, trust)
    return InferenceSetup(model, diffusion, precision, kernels, class_names)
