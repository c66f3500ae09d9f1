"""Pieces the three entry points share: flag parsing helpers, kernel backend choice, error reporting."""

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import torch

from fastdiff import dist_util, ops
from fastdiff.ops import backend as backends
from fastdiff.training.checkpoint import CheckpointWriteError
from fastdiff.training.nonfinite import NonFiniteStepsError

_UNSET = object()


def explicit_flags(
    make_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None
) -> set[str]:
    """Names of the options present on the command line ``argv`` (defaults set aside)."""
    parser = make_parser()
    parser.set_defaults(**{action.dest: _UNSET for action in parser._actions if action.dest != "help"})
    parsed = parser.parse_args(argv)
    return {name for name, value in vars(parsed).items() if value is not _UNSET}


_MISSING = {"cpp": "the C++ extension is not built", "triton": "Triton is not installed or too old"}


def check_kernels(name: str, device: torch.device) -> str:
    """``name`` (auto | triton | cpp | torch) if this process can serve it on ``device``; else a ValueError
    with the reason ``fastdiff.ops.backend.backend_refusal`` gives.

    The entry points then run under ``fastdiff.ops.use_backend(name)``, which restores the previous choice.
    """
    if name not in ops.BACKENDS:
        raise ValueError(f"--kernels must be one of {list(ops.BACKENDS)}, got {name!r}")
    available = ops.available_backends()
    why = backends.backend_refusal(name, device)
    if name not in available or why:
        raise ValueError(
            f"--kernels {name} is not available in this process on {device} "
            f"(available: {', '.join(available)}): {why or _MISSING.get(name, 'unknown backend')}"
        )
    if name == "triton" and device.type == "cpu":
        print(
            "note: --kernels triton on the CPU runs Triton's interpreter (slow; for testing)", file=sys.stderr
        )
    return name


def check_autotune(enabled: bool) -> None:
    """``--autotune True``: autotune the Triton kernels' launch configs on CUDA, picks persisted on disk
    (see ``fastdiff.kernels.launch``); False keeps the fixed rule (the same bits in every process)."""
    backends.set_autotune(bool(enabled))


def run_main(main: Callable[[Sequence[str] | None], int], program: str) -> None:
    """Run ``main`` and exit; bad input (ValueError), too many non-finite steps or a failed checkpoint write
    print one line instead of a traceback."""
    try:
        code = main(None)
    except (ValueError, FileNotFoundError, NonFiniteStepsError, CheckpointWriteError) as error:
        ranks = int(os.environ.get("WORLD_SIZE", "1") or 1)
        where = f" (rank {os.environ.get('RANK', '0')})" if ranks > 1 else ""
        print(f"{program}: error{where}: {error}", file=sys.stderr, flush=True)
        dist_util.cleanup_dist()
        sys.exit(2)
    sys.exit(code)
