"""``python -m fastdiff.selftest [--device cuda:N|cpu] [--quick] [--out DIR] [--budget SECONDS]
[--only GROUPS] [--skip GROUPS]`` (flags: ``fastdiff.config.SelftestConfig``).

The default budget (``SelftestConfig.budget``) is sized for a cold H100 (empty Triton and inductor caches) to
run the first five groups (versions, accuracy, determinism, train_step, kernel_timing), compiles
included; each group has a share of it, what a group leaves goes to the next, and what the budget cuts
is reported as not run. How it was sized: the notes under ``groups.GROUPS``.
"""

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from fastdiff.cli import parse_command
from fastdiff.config import SelftestCommand
from fastdiff.selftest.groups import NAMES, parse_names, select

DESCRIPTION = (
    "Prove fastdiff's kernels on this machine within a time budget. Groups, in priority order: "
    f"{', '.join(NAMES)}. Rewrites selftest.json and selftest.md after every check; a check the budget cut "
    "is reported as not run. Exits 1 when a check fails or crashes."
)


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


def usage_error(message: str) -> None:
    """Exit 2 with the usage line and ``message``, as argparse does, before any check runs."""
    argparse.ArgumentParser(prog="python -m fastdiff.selftest").error(message)


def _checked(flag: str, parse, value: str):
    """``parse(value)``, or a usage error naming ``flag`` when it fails."""
    try:
        return parse(value)
    except (ValueError, argparse.ArgumentTypeError) as error:
        usage_error(f"argument {flag}: {str(error).removeprefix(f'{flag}: ')}")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, given = parse_command(SelftestCommand, argv, "fastdiff.selftest", DESCRIPTION)
    except ValueError as error:
        usage_error(str(error))
    options = config.selftest
    try:
        only = parse_names(options.only, "--only") if "only" in given else None
        skip = parse_names(options.skip, "--skip") if "skip" in given else None
        device = parse_device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (ValueError, argparse.ArgumentTypeError) as error:
        flag = (
            "--only"
            if str(error).startswith("--only")
            else "--skip"
            if str(error).startswith("--skip")
            else "--device"
        )
        usage_error(f"argument {flag}: {str(error).removeprefix(f'{flag}: ')}")
    out = Path(options.out)
    problem = check_writable(out)  # before minutes of checks, not after
    if problem:
        usage_error(f"argument --out: {problem}")
    groups = select(only, skip)
    if not groups:
        usage_error("arguments --only/--skip: no group left to run")
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
    return run(Options(device, options.quick), options.budget, out, groups)


if __name__ == "__main__":
    sys.exit(main())
