"""``python -m fastdiff.selftest [--device cuda:N|cpu] [--quick] [--out DIR]``."""

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch


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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastdiff.selftest",
        description="Prove fastdiff's kernels on this machine: accuracy against float64, every launch "
        "config, determinism, timings against PyTorch, a UNet train step. Writes selftest.json and "
        "selftest.md; exits 1 when a check fails.",
    )
    parser.add_argument(
        "--device",
        type=parse_device,
        default=None,
        help="cpu, cuda or cuda:N (default: the current CUDA device if there is one, else cpu)",
    )
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (CI on a CPU)")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for selftest.json/.md")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:  # before minutes of checks, not after
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"argument --out: cannot create directory {str(args.out)!r}: {error.strerror}")
    device = args.device or parse_device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # the Triton kernels run interpreted on CPU tensors; must be set before triton decorates them
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        torch.cuda.set_device(device)
    from fastdiff.selftest.run import run  # after TRITON_INTERPRET is settled

    return run(device, args.quick, args.out)


if __name__ == "__main__":
    sys.exit(main())
