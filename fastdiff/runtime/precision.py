"""Mixed precision with torch.amp: which autocast dtype, whether a GradScaler, and whether the device can.

Weights, gradients, optimizer state and EMA stay fp32 in every mode (autocast only lowers the precision of
the ops that run under it). ``auto`` means bf16 where the device computes in bf16 natively: a CUDA device
of compute capability 8.0+, or a CPU with AVX512-BF16 or AMX; fp32 elsewhere (fp16 needs loss scaling and
can overflow: ask for it explicitly; bf16 autocast on CPUs without native bf16 is slower than fp32).
"""

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionUnsupportedError(ValueError):
    """The device cannot run the precision asked for."""


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` (fp32 | bf16 | fp16) on ``device``."""

    name: str
    device: torch.device

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype autocast lowers to, or None for plain fp32."""
        return _DTYPES[self.name]

    @property
    def uses_grad_scaler(self) -> bool:
        """fp16 needs dynamic loss scaling; bf16 and fp32 do not."""
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context to run forward passes (and losses) under."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def _cpu_autocast_runs(dtype: torch.dtype) -> bool:
    """Whether a conv and a matmul run under CPU autocast to ``dtype`` in this torch build."""
    try:
        with torch.autocast(device_type="cpu", dtype=dtype):
            x = torch.ones(1, 1, 3, 3)
            y = torch.nn.functional.conv2d(x, torch.ones(1, 1, 1, 1)) @ torch.ones(3, 3)
        return y.dtype == dtype and bool(torch.isfinite(y.float()).all())
    except (RuntimeError, TypeError):
        return False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX tiles)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def auto_precision(device: torch.device) -> str:
    """``auto``'s choice: bf16 where ``device`` has native bf16, else fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and cpu_has_native_bf16() and _cpu_autocast_runs(torch.bfloat16):
        return "bf16"
    return "fp32"


def device_supports(name: str, device: torch.device) -> tuple[bool, str]:
    """(whether ``device`` can run precision ``name``, why not)."""
    if name == "fp32":
        return True, ""
    if device.type == "cuda":
        if name == "bf16" and not torch.cuda.is_bf16_supported():
            gpu = torch.cuda.get_device_name(device)
            return False, f"{gpu} has no bf16 support (needs compute capability 8.0+): use fp16 or fp32"
        return True, ""
    if device.type == "cpu":
        if not _cpu_autocast_runs(_DTYPES[name]):
            return False, f"this torch build cannot autocast to {name} on the CPU: use fp32"
        return True, ""
    return False, f"precision {name} is not supported on device type {device.type!r}"


def resolve_precision(name: str, device: torch.device, use_fp16: bool = False) -> Precision:
    """The precision to train in, from ``--precision`` (and improved-diffusion's ``--use_fp16``).

    ``use_fp16=True`` is an alias of ``fp16``; combined with another explicit precision it is an error.
    Raises :class:`PrecisionUnsupportedError` when the device cannot run the precision asked for.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    if use_fp16:
        if name not in ("auto", "fp16"):
            raise ValueError(f"--use_fp16 True asks for fp16 but --precision is {name!r}: pass only one")
        name = "fp16"
    if name == "auto":
        name = auto_precision(device)
    supported, reason = device_supports(name, device)
    if not supported:
        raise PrecisionUnsupportedError(f"precision {name!r} cannot run on {device}: {reason}")
    return Precision(name, device)
