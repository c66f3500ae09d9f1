"""What the entry points share: one argument-parser builder, and for ``sample``, ``nll`` and ``evaluate``
the set-up of a trained model (flags from ``model_flags.json``, weights, precision, kernels, output folder).
"""

import argparse
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fastdiff import dist_util
from fastdiff.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from fastdiff.training.checkpoint import load_model_state
from fastdiff.training.cli import check_kernels
from fastdiff.training.model_flags import apply_model_flags
from fastdiff.training.precision import Precision, resolve_precision


def build_parser(
    prog: str,
    description: str,
    defaults: dict,
    flag_help: dict[str, str] | None = None,
    epilog: str = "",
    parents: Iterable[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    """The parser of ``python -m {prog}``: one ``--name`` per entry of ``defaults`` (typed by its default,
    documented by ``flag_help[name]``), after the flags of ``parents``, which ``defaults`` may redefine."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description=description,
        epilog=epilog or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=list(parents),
        conflict_handler="resolve",
    )
    add_dict_to_argparser(parser, defaults)
    flag_help = flag_help or {}
    for action in parser._actions:
        if action.dest in flag_help:
            action.help = flag_help[action.dest]
    return parser


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


def build_inference_model(flags: dict, model_path: str, device: torch.device, trust: bool = False):
    """``(model in eval mode on device, diffusion)`` from ``flags``, with the weights in ``model_path``."""
    model, diffusion = create_model_and_diffusion(**flags)
    load_model_state(model, load_plain_state_dict(model_path, trust), model_path)
    model.to(device).eval().requires_grad_(False)
    return model, diffusion


@dataclass
class InferenceSetup:
    """What ``fastdiff.sample``, ``fastdiff.nll`` and ``fastdiff.evaluate`` run with."""

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
