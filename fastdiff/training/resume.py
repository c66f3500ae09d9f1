"""Where a run resumes from: an explicit --resume_checkpoint or the newest full state in the log dir.

A full state (``state{step}.pt``) resumes exactly. improved-diffusion's ``model{step}.pt`` resumes the
weights and, when found beside it, ``opt{step}.pt`` and ``ema_{rate}_{step}.pt`` (its own behaviour);
when ``state{step}.pt`` sits beside it, that is used instead.
"""

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch

from fastdiff import dist_util
from fastdiff.config import RunConfig
from fastdiff.runtime.checkpoint import (
    config_differences,
    ema_filename,
    find_latest_state,
    mismatched_keys,
    opt_filename,
    state_filename,
    step_of,
)

STATE_FORMAT = "fastdiff-training-state"
STATE_VERSION = 3
"""Version 3 saves the run config as ``run_config.json`` holds it and the in-training evaluation's best FID;
version 2 (still read) kept the model and diffusion flags flat under ``run_config["model_and_diffusion"]``
and only tensors and plain Python values (loads with ``weights_only=True``); version 1 held numpy's
generator state as an array (loads with ``--trust_checkpoint`` only)."""


@dataclass(frozen=True)
class ResumeSource:
    """A checkpoint to resume: ``kind`` is ``"state"`` (full) or ``"model"`` (improved-diffusion files)."""

    kind: str
    path: str
    step: int
    opt_path: str | None = None
    ema_paths: tuple[str | None, ...] = ()


def _locate(resume_checkpoint: str, log_dir: str, ema_rates: list[float]) -> ResumeSource | str | None:
    """Rank 0's view of the file system: a source, None (start fresh), or an error message."""
    if not resume_checkpoint:
        latest = find_latest_state(log_dir)
        return ResumeSource("state", latest, step_of(latest)) if latest else None
    if not os.path.isfile(resume_checkpoint):
        return f"--resume_checkpoint {resume_checkpoint!r} does not exist (or is not a file)"
    name = os.path.basename(resume_checkpoint)
    step = step_of(resume_checkpoint)
    if name.startswith("state") and step is not None:
        return ResumeSource("state", resume_checkpoint, step)
    if step is None:
        return (
            f"--resume_checkpoint {resume_checkpoint!r}: expected a file named state{{step}}.pt or "
            "model{step}.pt (the step is read from the name)"
        )
    directory = os.path.dirname(resume_checkpoint)
    sibling_state = os.path.join(directory, state_filename(step))
    if os.path.isfile(sibling_state):
        return ResumeSource("state", sibling_state, step)
    opt_path = os.path.join(directory, opt_filename(step))
    ema_paths = tuple(
        path if os.path.isfile(path) else None
        for path in (os.path.join(directory, ema_filename(rate, step)) for rate in ema_rates)
    )
    return ResumeSource(
        "model", resume_checkpoint, step, opt_path if os.path.isfile(opt_path) else None, ema_paths
    )


def find_resume_source(resume_checkpoint: str, log_dir: str, ema_rates: list[float]) -> ResumeSource | None:
    """Decided on rank 0 and shared with every rank; raises ValueError for a path that is not there."""
    located = _locate(resume_checkpoint, log_dir, ema_rates) if dist_util.rank() == 0 else None
    located = dist_util.broadcast_object(located)
    if isinstance(located, str):
        raise ValueError(located)
    return located


def check_training_state(
    path: str,
    state: Any,
    *,
    required: tuple[str, ...],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_rates: list[float],
    schedule_sampler: Any,
    dataset_len: int,
    model_flags: dict,
) -> list[str]:
    """Raise a ValueError naming ``path`` unless every part of ``state`` fits this run, before anything is
    loaded (so a refused state leaves the run untouched); returns the model flags that differ (a warning)."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a fastdiff training state (pass a state*.pt or model*.pt file)")
    version = state.get("version")
    if not isinstance(version, int) or version > STATE_VERSION:
        raise ValueError(
            f"{path} has state format version {version!r}; this fastdiff reads versions up to "
            f"{STATE_VERSION}: resume it with the fastdiff that wrote it (or a newer one)"
        )
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"{path} is incomplete: it lacks {', '.join(missing)}")
    differences = config_differences(saved_model_flags(state.get("run_config") or {}, path), model_flags)
    problems = mismatched_keys(model.state_dict(), state["model"])
    if problems:
        flags = f" Flags that differ: {'; '.join(differences)}." if differences else ""
        raise ValueError(f"{path} comes from another model configuration: {'; '.join(problems)}.{flags}")
    params = dict(model.named_parameters())
    ema = state["ema"]
    if [float(rate) for rate in ema.get("rates", [])] != [float(rate) for rate in ema_rates]:
        raise ValueError(f"{path}: its EMA rates {ema.get('rates')} differ from --ema_rate {ema_rates}")
    for shadow in ema.get("shadows", []):
        problems = mismatched_keys(params, shadow)
        if problems:
            raise ValueError(f"{path}: its EMA does not fit this model: {'; '.join(problems)}")
    _check_optimizer(path, state["optimizer"], optimizer)
    if int(state["data"].get("dataset_len", -1)) != dataset_len:
        raise ValueError(
            f"{path}: its data position is for a dataset of {state['data'].get('dataset_len')} items, "
            f"this one has {dataset_len}"
        )
    try:
        copy.deepcopy(schedule_sampler).load_state_dict(state["schedule_sampler"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path}: its timestep sampler state does not fit --schedule_sampler: {error}"
        ) from error
    return differences


def saved_model_flags(run_config: dict, path: str) -> dict[str, Any]:
    """The flat model and diffusion flags of a state's ``run_config`` (version 3's layout or version 2's)."""
    if not run_config:
        return {}
    return RunConfig.from_dict(run_config, f"{path} (its run_config)").model_flags()


def _check_optimizer(path: str, saved: Any, optimizer: torch.optim.Optimizer) -> None:
    """Same parameter groups, same parameter count in each, moments shaped like the parameters."""
    groups = saved.get("param_groups", []) if isinstance(saved, dict) else []
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if [len(group.get("params", [])) for group in groups] != sizes:
        raise ValueError(f"{path}: its optimizer state does not fit this model's parameters")
    params = [param for group in optimizer.param_groups for param in group["params"]]
    ids = [index for group in groups for index in group["params"]]
    for index, param in zip(ids, params, strict=True):
        for name, value in saved.get("state", {}).get(index, {}).items():
            if name != "step" and isinstance(value, torch.Tensor) and value.shape != param.shape:
                raise ValueError(
                    f"{path}: optimizer {name} of parameter {index} has shape {list(value.shape)}, "
                    f"expected {list(param.shape)}"
                )
