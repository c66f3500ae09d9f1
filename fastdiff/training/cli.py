"""Pieces the three entry points share: flag parsing helpers, kernel backend choice, error reporting."""

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import torch

from fastdiff import dist_util, ops
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


def check_kernels(name: str, device: torch.device) -> str:
    """``name`` (auto | triton | cpp | torch) if this process can serve it on ``device``; else a ValueError.

    The entry points then run under ``fastdiff.ops.use_backend(name)``, which restores the previous choice.
    """
    if name not in ops.BACKENDS:
        raise ValueError(f"--kernels must be one of {list(ops.BACKENDS)}, got {name!r}")
    available = ops.available_backends()
    if name not in available:
        raise ValueError(
            f"--kernels {name} is not available in this process (available: {', '.join(available)}): "
            + (
                "the C++ extension is not built"
                if name == "cpp"
                else "triton needs a CUDA device or TRITON_INTERPRET=1"
            )
        )
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"--kernels cpp serves CPU tensors only, but this run uses {device}")
    if name == "triton" and device.type == "cpu":
        print(
            "note: --kernels triton on the CPU runs Triton's interpreter (slow; for testing)", file=sys.stderr
        )
    return name


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
