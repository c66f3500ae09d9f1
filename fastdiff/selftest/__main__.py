"""``python -m fastdiff.selftest [--device cuda:N|cpu] [--quick] [--out DIR] [--budget SECONDS]
[--only GROUPS] [--skip GROUPS]``.

The default budget, ``DEFAULT_BUDGET``, is sized for a cold H100 (empty Triton and inductor caches) to
run the first five groups (versions, accuracy, determinism, train_step, kernel_timing), compiles
included; each group has a share of it, what a group leaves goes to the next, and what the budget cuts
is reported as not run. How it was sized: the notes under ``groups.GROUPS``.
"""

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from fastdiff.selftest.groups import NAMES, parse_names, select

DEFAULT_BUDGET = 300.0
"""Seconds (see the module doc)."""


def parse_device(value: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` naming a device this machine has; else an argparse error."""
    try:
        device = torch.device(value)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{value!r}: no CUDA device is available on this machine")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise argparse.ArgumentTypeError(f"{value!r}: this machine has {count} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def parse_budget(value: str) -> float:
    """A positive, finite number of seconds; else an argparse error."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return seconds


def _group_names(flag: str):
    def parse(value: str) -> list[str]:
        try:
            return parse_names(value, flag)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{flag}: ")) from None

    return parse


def check_writable(directory: Path) -> str:
    """Why reports cannot be written under ``directory`` ('' when they can): it is created if missing and
    a file is written and removed in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".selftest-probe-"):
            pass
    except OSError as error:
        return f"cannot write reports in directory {str(directory)!r}: {error.strerror or error}"
    return ""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastdiff.selftest",
        description="Prove fastdiff's kernels on this machine within a time budget. Groups, in priority "
        f"order: {', '.join(NAMES)}. Rewrites selftest.json and selftest.md after every check; a check the "
        "budget cut is reported as not run. Exits 1 when a check fails or crashes.",
    )
    parser.add_argument(
        "--device",
        type=parse_device,
        default=None,
        help="cpu, cuda or cuda:N (default: the current CUDA device if there is one, else cpu)",
    )
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (CI on a CPU)")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for selftest.json/.md")
    parser.add_argument(
        "--budget",
        type=parse_budget,
        default=DEFAULT_BUDGET,
        help=f"seconds; no check starts after them (default {DEFAULT_BUDGET:g}: the first five groups on a "
        "cold H100, compiles included)",
    )
    parser.add_argument(
        "--only",
        type=_group_names("--only"),
        default=None,
        help=f"comma-separated groups to run: {', '.join(NAMES)}",
    )
    parser.add_argument(
        "--skip", type=_group_names("--skip"), default=None, help="comma-separated groups to leave out"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    problem = check_writable(args.out)  # before minutes of checks, not after
    if problem:
        parser.error(f"argument --out: {problem}")
    groups = select(args.only, args.skip)
    if not groups:
        parser.error("arguments --only/--skip: no group left to run")
    device = args.device or parse_device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # the Triton kernels run interpreted on CPU tensors; must be set before triton decorates them
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        torch.cuda.set_device(device)
    from fastdiff.selftest.compiles import triton_problem
    from fastdiff.selftest.records import Options  # after TRITON_INTERPRET is settled
    from fastdiff.selftest.run import run

    if triton_problem():
        print(f"fastdiff.selftest: {triton_problem()}; the Triton kernels are not checked", file=sys.stderr)
    return run(Options(device, args.quick), args.budget, args.out, groups)


if __name__ == "__main__":
    sys.exit(main())
