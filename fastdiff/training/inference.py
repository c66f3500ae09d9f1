"""Building a model from flags and loading a plain state_dict into it, for sampling and evaluation."""

import pickle

import torch

from fastdiff import dist_util
from fastdiff.script_util import create_model_and_diffusion
from fastdiff.training.checkpoint import load_model_state


def load_plain_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A ``model*.pt`` / ``ema_*.pt`` file (fastdiff's or improved-diffusion's) as a dict of tensors."""
    if not path:
        raise ValueError("--model_path is required: a model*.pt or ema_*.pt file")
    try:
        state = dist_util.load_state_dict(path, map_location="cpu")
    except FileNotFoundError as error:
        raise ValueError(f"--model_path {path!r} does not exist or cannot be read") from error
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"--model_path {path!r} is not a plain state_dict (pass a model*.pt or ema_*.pt file, not a "
            f"state*.pt training state): {str(error).splitlines()[0]}"
        ) from error
    if not isinstance(state, dict):
        raise ValueError(f"--model_path {path!r} holds a {type(state).__name__}, not a state_dict")
    return state


def build_inference_model(flags: dict, model_path: str, device: torch.device):
    """``(model in eval mode on device, diffusion)`` from ``flags``, with the weights in ``model_path``."""
    model, diffusion = create_model_and_diffusion(**flags)
    load_model_state(model, load_plain_state_dict(model_path), model_path)
    model.to(device).eval().requires_grad_(False)
    return model, diffusion
