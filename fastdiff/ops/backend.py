"""Which implementation serves an op: ``triton`` | ``cpp`` | ``torch``, chosen per call from the device.

``auto`` (the default, or ``FASTDIFF_BACKEND``): CUDA tensors -> triton, CPU tensors -> cpp when the C++
extension is built, else the torch reference. A forced backend that cannot serve a call raises
:class:`BackendUnavailableError` saying why; ``auto`` falls back silently (or once, with a warning, where
the fallback costs speed on a GPU).

Availability is decided once at import, so resolving a backend inside ``torch.compile`` is plain Python
over constants and the tensor's device and dtype.
"""

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "cpp", "torch")

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Triton's interpreter is on: Triton kernels also run on CPU tensors (slowly; used by the tests)."""

HAS_TRITON = importlib.util.find_spec("triton") is not None

try:
    from fastdiff import _C as cpp_extension
except ImportError as error:  # not built: a pure-Python install
    cpp_extension = None
    CPP_IMPORT_ERROR = str(error)
else:
    CPP_IMPORT_ERROR = ""

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPP_GROUP_NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve this call (wrong device, dtype, missing build or package)."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


_state = {"backend": _check_name(os.environ.get("FASTDIFF_BACKEND", "auto"), "FASTDIFF_BACKEND")}


def get_backend() -> str:
    """The backend name in force: ``auto``, ``triton``, ``cpp`` or ``torch``."""
    return _state["backend"]


def set_backend(name: str) -> None:
    """Force ``name`` for every following op call in this process (``auto`` restores the default choice)."""
    _state["backend"] = _check_name(name, "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the body with backend ``name`` forced, then restore the previous choice."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        _state["backend"] = previous


def available_backends() -> list[str]:
    """Backend names this process can serve for at least one device: always ``auto`` and ``torch``."""
    names = ["auto", "torch"]
    if cpp_extension is not None:
        names.append("cpp")
    if HAS_TRITON and (torch.cuda.is_available() or TRITON_INTERPRET):
        names.append("triton")
    return names


def _triton_refusal(device: torch.device, dtype: torch.dtype) -> str:
    """Why the Triton kernels cannot run on this device/dtype ('' when they can)."""
    if not HAS_TRITON:
        return "triton is not installed (pip install triton)"
    if device.type == "cpu" and not TRITON_INTERPRET:
        return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to interpret them on the CPU)"
    if device.type not in ("cuda", "cpu"):
        return f"Triton kernels run on CUDA tensors, got device {device}"
    if dtype not in TRITON_DTYPES:
        return f"Triton kernels take float32, float16 or bfloat16, got {dtype}"
    return ""


def _cpp_group_norm_refusal(device: torch.device, dtype: torch.dtype) -> str:
    """Why the C++ GroupNorm kernels cannot run on this device/dtype ('' when they can)."""
    if cpp_extension is None:
        return f"the C++ extension fastdiff._C is not built ({CPP_IMPORT_ERROR})"
    if device.type != "cpu":
        return f"the C++ kernels run on CPU tensors, got device {device}"
    if dtype not in CPP_GROUP_NORM_DTYPES:
        return f"the C++ kernels take float16, bfloat16, float32 or float64, got {dtype}"
    return ""


def _cpp_attention_refusal(device: torch.device, dtype: torch.dtype) -> str:
    if device.type != "cpu":
        return f"the CPU attention kernel runs on CPU tensors, got device {device}"
    return ""


def _forced(op: str, name: str, why: str) -> str:
    if why:
        raise BackendUnavailableError(f"backend {name!r} cannot run {op}: {why}")
    return name


def resolve_group_norm(x: torch.Tensor) -> str:
    """The backend that runs a GroupNorm-family op on ``x``."""
    name = get_backend()
    if name == "triton":
        return _forced("group_norm", name, _triton_refusal(x.device, x.dtype))
    if name == "cpp":
        return _forced("group_norm", name, _cpp_group_norm_refusal(x.device, x.dtype))
    if name == "torch":
        return name
    if x.device.type == "cuda":
        return "torch" if _triton_refusal(x.device, x.dtype) else "triton"
    return "torch" if _cpp_group_norm_refusal(x.device, x.dtype) else "cpp"


MAX_TRITON_HEAD_DIM = 128

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def resolve_attention(q: torch.Tensor, head_dim: int) -> str:
    """The backend that runs attention on ``q`` (``[B, H, T, D]`` or qkv) with head dim ``head_dim``.

    ``cpp`` for attention is PyTorch's fused C++ flash-attention CPU kernel (fastdiff's own C++ kernels
    cover the GroupNorm family).
    """
    name = get_backend()
    triton_why = _triton_refusal(q.device, q.dtype)
    if not triton_why and head_dim > MAX_TRITON_HEAD_DIM:
        triton_why = f"head dim {head_dim} is over the kernel's maximum of {MAX_TRITON_HEAD_DIM}"
    if name == "triton":
        return _forced("attention", name, triton_why)
    if name == "cpp":
        return _forced("attention", name, _cpp_attention_refusal(q.device, q.dtype))
    if name == "torch":
        return name
    if q.device.type == "cuda":
        if triton_why:
            _warn_once(f"fastdiff: attention falls back to the torch reference: {triton_why}")
            return "torch"
        return "triton"
    return "cpp"
