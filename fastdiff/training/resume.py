"""Where a run resumes from: an explicit --resume_checkpoint or the newest full state in the log dir.

A full state (``state{step}.pt``) resumes exactly. improved-diffusion's ``model{step}.pt`` resumes the
weights and, when found beside it, ``opt{step}.pt`` and ``ema_{rate}_{step}.pt`` (its own behaviour);
when ``state{step}.pt`` sits beside it, that is used instead.
"""

import os
from dataclasses import dataclass

from fastdiff import dist_util
from fastdiff.training.checkpoint import (
    ema_filename,
    find_latest_state,
    opt_filename,
    state_filename,
    step_of,
)


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
