"""Checkpoint files: improved-diffusion's names, atomic writes, finding the newest, checking they fit.

Per save at step ``s`` the trainer writes, in this order, each to a temporary file renamed into place:

    model{s:06d}.pt          model state_dict (fp32), loadable by improved-diffusion's scripts
    ema_{rate}_{s:06d}.pt    the same keys with rate ``rate``'s EMA parameters
    opt{s:06d}.pt            optimizer state_dict
    state{s:06d}.pt          the full training state for an exact resume (written last)

so a ``state`` file only exists once everything of its step is complete, and a crash leaves at most a
``*.tmp.*`` file behind, never a half-written checkpoint under a real name.
"""

import glob
import os
import re
import shutil
from typing import Any

import torch

STATE_PATTERN = re.compile(r"^state(\d{6,})\.pt$")
MODEL_PATTERN = re.compile(r"^model(\d{6,})\.pt$")


def model_filename(step: int) -> str:
    """``model{step:06d}.pt``."""
    return f"model{step:06d}.pt"


def ema_filename(rate: float, step: int) -> str:
    """``ema_{rate}_{step:06d}.pt`` with the rate as Python prints the float (``0.9999``)."""
    return f"ema_{rate}_{step:06d}.pt"


def opt_filename(step: int) -> str:
    """``opt{step:06d}.pt``."""
    return f"opt{step:06d}.pt"


def state_filename(step: int) -> str:
    """``state{step:06d}.pt``: the full training state."""
    return f"state{step:06d}.pt"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space, read-only, quota): earlier files are intact."""


def payload_bytes(obj: Any) -> int:
    """The bytes of every tensor in ``obj`` (nested dicts, lists, tuples): about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(payload_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(value) for value in obj)
    return 0


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed onto ``path``.

    A failed write removes its temporary file, leaves ``path`` and every other file as they were, and raises
    :class:`CheckpointWriteError` naming the directory, the bytes needed and the bytes free.
    """
    directory = os.path.dirname(os.path.abspath(path))
    temporary = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(directory, exist_ok=True)
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        try:
            free = f"{shutil.disk_usage(directory).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        raise CheckpointWriteError(
            error.errno,
            f"cannot write checkpoint {os.path.basename(path)} in {directory}: it needs about "
            f"{payload_bytes(obj):,} bytes ({free}): {error.strerror or error}. Earlier checkpoints are "
            "intact; make room (or point --log_dir elsewhere) and run again to resume",
        ) from error
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def step_of(path: str) -> int | None:
    """The step encoded in a ``state*.pt`` or ``model*.pt`` file name, or None."""
    name = os.path.basename(path)
    match = STATE_PATTERN.match(name) or MODEL_PATTERN.match(name)
    return int(match.group(1)) if match else None


def find_latest_state(log_dir: str) -> str | None:
    """The ``state*.pt`` with the highest step in ``log_dir``, or None."""
    if not log_dir or not os.path.isdir(log_dir):
        return None
    candidates = [path for path in glob.glob(os.path.join(log_dir, "state*.pt")) if step_of(path) is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda path: step_of(path))


def prune_states(log_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` full training states (``keep <= 0`` keeps every one)."""
    if keep <= 0:
        return
    states = sorted(
        (path for path in glob.glob(os.path.join(log_dir, "state*.pt")) if step_of(path) is not None),
        key=lambda path: step_of(path),
    )
    for path in states[:-keep]:
        os.remove(path)


def mismatched_keys(expected: dict[str, torch.Tensor], found: dict[str, Any]) -> list[str]:
    """Why ``found`` cannot load strictly where ``expected`` does: missing, unexpected, reshaped keys."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    reshaped = [
        f"{name} (expected {list(expected[name].shape)}, found {list(found[name].shape)})"
        for name in sorted(set(expected) & set(found))
        if isinstance(found[name], torch.Tensor) and found[name].shape != expected[name].shape
    ]
    if reshaped:
        problems.append(f"shape mismatches: {', '.join(reshaped)}")
    return problems


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state, strict=True)``, raising a ValueError listing every mismatch first."""
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{source} is not a plain state_dict of tensors")
    problems = mismatched_keys(model.state_dict(), state)
    if problems:
        raise ValueError(
            f"{source} does not fit the model built from these flags (trained with other model flags?): "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Flags whose saved value differs from the current one, as ``name: saved -> current``."""
    return [
        f"{name}: {saved.get(name)!r} -> {current.get(name)!r}"
        for name in sorted(set(saved) | set(current))
        if saved.get(name) != current.get(name)
    ]
