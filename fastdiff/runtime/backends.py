"""The ``--kernels`` and ``--autotune`` choices, checked for the device a command runs on."""

import sys

import torch

from fastdiff import ops
from fastdiff.ops import backend as backends

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
