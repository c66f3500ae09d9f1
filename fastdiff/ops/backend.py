"""Which implementation serves an op, chosen per call from the tensors' device and dtype: the contract.

Backends (what ``use_backend`` / ``FASTDIFF_BACKEND`` / ``--kernels`` name):

* ``triton``: fastdiff's Triton kernels. CUDA tensors run compiled; CPU tensors run the same kernels
  under Triton's interpreter (slow; for tests, and only when ``triton`` is forced); meta tensors (forced)
  go through the launch layer, which records each launch's compile key and runs nothing. Needs Triton
  >= ``MIN_TRITON`` and float32/float16/bfloat16.
* ``cpp``: CPU tensors: fastdiff's C++ GroupNorm kernels (``fastdiff._C``); for attention PyTorch's fused
  C++ flash-attention CPU kernel.
* ``torch``: the float32 reference (``fastdiff.ops.reference``), any device: the executable spec the
  kernels are tested against. Served only when forced, or for devices no kernel serves (e.g. meta).
* ``auto`` (default): CUDA -> triton; CPU -> per op, dtype and instruction set, the faster of ``cpp`` and
  PyTorch's own ops (``native`` GroupNorm, ``math`` attention), by the measured table in
  ``fastdiff.ops.cpu_policy`` (GroupNorm: the reference when the extension is not built).

Fallback policy (one for every op family, ``auto_cuda``): where Triton cannot serve a CUDA call under
``auto`` (Triton missing or older than ``MIN_TRITON``, a dtype or size the kernels do not take), the op
runs ``native``, PyTorch's own CUDA kernels (GroupNorm: ``F.group_norm`` then scale-shift and SiLU;
attention: ``F.scaled_dot_product_attention``), and warns once saying so and why. It never falls back to
the reference on CUDA. A forced backend that cannot serve a call raises :class:`BackendUnavailableError`
saying why. ``backend_refusal`` answers the same question for the training CLI's ``--kernels`` check.

Availability is decided once at import, so resolving a backend inside ``torch.compile`` is plain Python
over constants and the tensor's device, dtype and sizes.

The contract every backend that serves the ops' kernels implements is one Protocol, :class:`Backend`
(``group_norm_forward``/``group_norm_backward``, ``attention_forward``/``attention_backward``);
``implementation(name)`` returns the one named ``torch`` (the reference), ``cpp`` or ``triton``. The
``native`` fallback is PyTorch's own ops under plain autograd, outside the ``fastdiff::`` ops. Inputs are
checked once, in ``fastdiff.ops``, before a backend is resolved: the kernels behind a backend only assert
their own invariants. The Triton kernels' limits come from ``fastdiff.kernels.limits`` (no Triton import).
"""

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Protocol

import torch

from fastdiff.kernels.limits import DTYPES as TRITON_DTYPES
from fastdiff.kernels.limits import MAX_HEAD_DIM as MAX_TRITON_HEAD_DIM
from fastdiff.kernels.limits import MAX_SAMPLE_ELEMENTS as MAX_TRITON_SAMPLE_ELEMENTS
from fastdiff.ops import cpu_attention, cpu_policy, reference

Tensor = torch.Tensor
OptTensor = Tensor | None

BACKENDS = ("auto", "triton", "cpp", "torch")
NATIVE = "native"
"""PyTorch's own fused kernels (``F.group_norm``, ``F.scaled_dot_product_attention``): what ``auto`` resolves
to on CUDA when Triton cannot serve a call, and on a CPU where ``cpu_policy`` measured them faster."""
MATH = "math"
"""Attention from PyTorch's matmul and an fp32 softmax under plain autograd (the weights stored): what
``auto`` resolves to on a CPU where ``cpu_policy`` measured it faster than the flash kernel."""

MIN_TRITON = (3, 4)
"""Oldest Triton the kernels take (the launch layer reads ``triton.knobs``); the tests run 3.9."""

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Triton's interpreter is on for every kernel (``TRITON_INTERPRET=1`` set before Triton is imported)."""


def _triton_version() -> tuple[int, ...] | None:
    """Installed Triton's (major, minor); None when it is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # a source checkout without metadata
        import triton

        version = triton.__version__
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


TRITON_VERSION = _triton_version()
HAS_TRITON = TRITON_VERSION is not None

try:
    from fastdiff import _C as cpp_extension
except ImportError as error:  # not built: a pure-Python install
    cpp_extension = None
    CPP_IMPORT_ERROR = str(error)
else:
    CPP_IMPORT_ERROR = ""

CPP_GROUP_NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Backend(Protocol):
    """What serves the kernels of the ``fastdiff::`` ops for one backend name.

    GroupNorm: x ``[N, C, *spatial]``, weight/bias ``[C]`` or None, scale/shift ``[N, C]`` or both None.
    The forward returns (y like x, mean ``[N, G]``, rstd ``[N, G]``); the backward returns the gradients of
    (x, weight, bias, scale, shift), None where ``needs_input_grad`` is False or the input is None.
    Attention: q ``[B, H, Tq, D]``, k and v ``[B, H, Tk, D]`` of any strides; the forward returns (out, lse
    ``[B, H, Tq]``), written into ``out`` when given; the backward returns (dq, dk, dv), written into the
    given destinations. Arguments are checked by the op before the call.
    """

    def group_norm_forward(
        self,
        x: Tensor,
        num_groups: int,
        weight: OptTensor,
        bias: OptTensor,
        scale: OptTensor,
        shift: OptTensor,
        eps: float,
        silu: bool,
    ) -> tuple[Tensor, Tensor, Tensor]: ...

    def group_norm_backward(
        self,
        dy: Tensor,
        x: Tensor,
        num_groups: int,
        weight: OptTensor,
        bias: OptTensor,
        scale: OptTensor,
        shift: OptTensor,
        mean: Tensor,
        rstd: Tensor,
        silu: bool,
        needs_input_grad: Sequence[bool],
    ) -> tuple[OptTensor, OptTensor, OptTensor, OptTensor, OptTensor]: ...

    def attention_forward(
        self, q: Tensor, k: Tensor, v: Tensor, scale: float, out: OptTensor = None
    ) -> tuple[Tensor, Tensor]: ...

    def attention_backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        scale: float,
        dq: OptTensor = None,
        dk: OptTensor = None,
        dv: OptTensor = None,
    ) -> tuple[Tensor, Tensor, Tensor]: ...


class ModuleBackend:
    """A :class:`Backend` whose GroupNorm and attention functions live in two modules, each imported on
    first use (the Triton kernels import Triton)."""

    def __init__(self, name: str, group_norm: Callable[[], ModuleType], attention: Callable[[], ModuleType]):
        self.name = name
        self._group_norm = group_norm
        self._attention = attention

    def group_norm_forward(self, *args) -> tuple[Tensor, Tensor, Tensor]:
        return self._group_norm().group_norm_forward(*args)

    def group_norm_backward(self, *args) -> tuple[OptTensor, OptTensor, OptTensor, OptTensor, OptTensor]:
        return self._group_norm().group_norm_backward(*args)

    def attention_forward(self, *args, **kwargs) -> tuple[Tensor, Tensor]:
        return self._attention().attention_forward(*args, **kwargs)

    def attention_backward(self, *args, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
        return self._attention().attention_backward(*args, **kwargs)

    def __repr__(self) -> str:
        return f"ModuleBackend({self.name!r})"


def _triton_group_norm_module() -> ModuleType:
    from fastdiff.kernels import group_norm

    return group_norm


def _triton_attention_module() -> ModuleType:
    from fastdiff.kernels import attention

    return attention


IMPLEMENTATIONS: dict[str, Backend] = {
    "torch": ModuleBackend("torch", lambda: reference, lambda: reference),
    "cpp": ModuleBackend("cpp", lambda: cpp_extension, lambda: cpu_attention),
    "triton": ModuleBackend("triton", _triton_group_norm_module, _triton_attention_module),
}


def implementation(name: str) -> Backend:
    """The :class:`Backend` that a resolved backend name (``torch``, ``cpp``, ``triton``) runs."""
    try:
        return IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(f"no kernels for backend {name!r}; known: {sorted(IMPLEMENTATIONS)}") from None


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


def _triton_missing() -> str:
    """Why Triton cannot run at all here ('' when it can)."""
    if not HAS_TRITON:
        return "triton is not installed (pip install triton)"
    if TRITON_VERSION < MIN_TRITON:
        found = ".".join(map(str, TRITON_VERSION))
        wanted = ".".join(map(str, MIN_TRITON))
        return f"triton {found} is too old: the kernels need triton >= {wanted}"
    return ""


def backend_refusal(name: str, device: torch.device) -> str:
    """Why backend ``name`` cannot serve tensors on ``device`` at all in this process ('' when it can
    serve some calls there); what the training CLI's ``--kernels`` check asks."""
    device = torch.device(device)
    if name in ("auto", "torch"):
        return ""
    if name == "cpp":
        return _cpp_group_norm_refusal(device, torch.float32)
    if name == "triton":
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        return _triton_refusal(device, torch.float32)
    return f"unknown backend {name!r}"


def set_autotune(enabled: bool) -> None:
    """Autotune the Triton kernels' launch configs on CUDA (picks persisted per GPU and Triton version),
    or keep the fixed rule (False). ``torch.use_deterministic_algorithms(True)`` always keeps the rule.
    Enabling it without a usable Triton is a ValueError."""
    missing = _triton_missing()
    if missing:
        if enabled:
            raise ValueError(f"autotuning needs the Triton kernels: {missing}")
        return
    from fastdiff.kernels import launch

    launch.set_autotune(enabled)


def available_backends() -> list[str]:
    """Backend names this process can serve for at least one device: always ``auto`` and ``torch``
    (``triton`` whenever a new enough Triton is installed: on the CPU it runs the interpreter)."""
    names = ["auto", "torch"]
    if cpp_extension is not None:
        names.append("cpp")
    if not _triton_missing():
        names.append("triton")
    return names


def _triton_refusal(device: torch.device, dtype: torch.dtype) -> str:
    """Why the Triton kernels cannot run on this device/dtype ('' when they can; CPU: the interpreter)."""
    missing = _triton_missing()
    if missing:
        return missing
    if device.type not in ("cuda", "cpu", "meta"):
        return (
            "Triton kernels run on CUDA tensors (or CPU tensors, interpreted; meta tensors: launches "
            f"recorded, not run), got device {device}"
        )
    if dtype not in TRITON_DTYPES:
        return f"Triton kernels take float32, float16 or bfloat16, got {dtype}"
    return ""


def _cpp_group_norm_refusal(device: torch.device, dtype: torch.dtype) -> str:
    """Why the C++ GroupNorm kernels cannot run on this device/dtype ('' when they can)."""
    if cpp_extension is None:
        return f"the C++ extension fastdiff._C is not built ({CPP_IMPORT_ERROR})"
    if device.type != "cpu":
        return f"the C++ kernels serve CPU tensors only, got device {device}"
    if dtype not in CPP_GROUP_NORM_DTYPES:
        return f"the C++ kernels take float16, bfloat16, float32 or float64, got {dtype}"
    return ""


def _cpp_attention_refusal(device: torch.device, dtype: torch.dtype) -> str:
    if device.type != "cpu":
        return f"the CPU attention kernel serves CPU tensors only, got device {device}"
    return ""


def _forced(op: str, name: str, why: str) -> str:
    if why:
        raise BackendUnavailableError(f"backend {name!r} cannot run {op}: {why}")
    return name


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def auto_cuda(op: str, triton_why: str, native: str) -> str:
    """The fallback policy of ``auto`` for a CUDA call of ``op``: ``triton`` when ``triton_why`` is empty,
    else ``NATIVE`` (PyTorch's ``native`` kernels), warning once why."""
    if not triton_why:
        return "triton"
    _warn_once(
        f"fastdiff: {op} on CUDA falls back to PyTorch's {native} "
        f"(slower than fastdiff's kernels): {triton_why}"
    )
    return NATIVE


def _triton_group_norm_refusal(x: torch.Tensor, params: Sequence[OptTensor]) -> str:
    why = _triton_refusal(x.device, x.dtype)
    wrong = [t.dtype for t in params if t is not None and t.dtype not in TRITON_DTYPES]
    if not why and wrong:
        why = f"Triton kernels take float32, float16 or bfloat16 parameters, got {wrong[0]}"
    if not why and x.dim() > 1 and x[:1].numel() >= MAX_TRITON_SAMPLE_ELEMENTS:
        why = f"one sample of x has {x[:1].numel()} elements, the kernels take fewer than 2**31"
    return why


def _resolve(
    op: str,
    device: torch.device,
    triton_why: Callable[[], str],
    cpp_why: Callable[[], str],
    native: str,
    cpu_pick: Callable[[], str],
) -> str:
    """The one policy every op family follows: a forced backend serves the call or raises why it cannot;
    ``auto`` takes triton on CUDA (else ``native``, warning once, see ``auto_cuda``), on the CPU what
    ``cpu_pick`` chooses (``fastdiff.ops.cpu_policy``: cpp, or PyTorch's own op where that is faster there)
    when the cpp backend can serve, else the reference, and the reference on any other device. Refusals
    are computed only when asked."""
    name = get_backend()
    if name == "torch":
        return name
    if name in ("triton", "cpp"):
        return _forced(op, name, triton_why() if name == "triton" else cpp_why())
    if device.type == "cuda":
        return auto_cuda(op, triton_why(), native)
    return "torch" if cpp_why() else cpu_pick()


def resolve_group_norm(x: torch.Tensor, *params: OptTensor) -> str:
    """The backend that runs a GroupNorm-family op on ``x`` (``params``: weight, bias, scale, shift, any
    of them None): ``triton``, ``cpp``, ``torch`` or ``native``."""
    return _resolve(
        "group_norm",
        x.device,
        lambda: _triton_group_norm_refusal(x, params),
        lambda: _cpp_group_norm_refusal(x.device, x.dtype),
        "F.group_norm (+ scale-shift, SiLU)",
        lambda: NATIVE if cpu_policy.group_norm_choice(x.dtype) == "native" else "cpp",
    )


def _triton_attention_refusal(q: torch.Tensor, head_dim: int) -> str:
    why = _triton_refusal(q.device, q.dtype)
    if not why and head_dim > MAX_TRITON_HEAD_DIM:
        why = f"head dim {head_dim} is over the Triton kernel's maximum of {MAX_TRITON_HEAD_DIM}"
    return why


def _attention_sizes(q: torch.Tensor, head_dim: int, keys: int | None) -> tuple[int, int]:
    """(Tq * Tk, B * H * Tq * Tk) of attention on ``q``: qkv ``[B, 3*H*D, T]`` or ``[B, H, Tq, D]``."""
    if q.dim() == 3:
        batch_heads, queries = q.shape[0] * (q.shape[1] // (3 * head_dim)), q.shape[2]
    else:
        batch_heads, queries = q.shape[0] * q.shape[1], q.shape[2]
    query_keys = queries * (queries if keys is None else keys)
    return query_keys, batch_heads * query_keys


def resolve_attention(
    q: torch.Tensor, head_dim: int, keys: int | None = None, grad: bool | None = None
) -> str:
    """The backend that runs attention on ``q`` (``[B, H, Tq, D]`` or qkv ``[B, 3*H*D, T]``) with head dim
    ``head_dim``: ``triton``, ``cpp``, ``torch``, ``native`` (``F.scaled_dot_product_attention``, auto's
    CUDA fallback) or ``math`` (auto's choice on some CPUs, see ``cpu_policy``). ``keys``: Tk (None: Tq);
    ``grad``: whether gradients will be taken (None: grad mode is on and q requires grad).

    ``cpp`` for attention is PyTorch's fused C++ flash-attention CPU kernel (fastdiff's own C++ kernels
    cover the GroupNorm family).
    """
    return _resolve(
        "attention",
        q.device,
        lambda: _triton_attention_refusal(q, head_dim),
        lambda: _cpp_attention_refusal(q.device, q.dtype),
        "F.scaled_dot_product_attention",
        lambda: _cpu_attention_pick(q, head_dim, keys, grad),
    )


def _cpu_attention_pick(q: torch.Tensor, head_dim: int, keys: int | None, grad: bool | None) -> str:
    """``cpp`` (the flash kernel) or ``math`` for attention on the CPU, by ``cpu_policy``."""
    if grad is None:
        grad = torch.is_grad_enabled() and q.requires_grad
    query_keys, scores = _attention_sizes(q, head_dim, keys)
    return MATH if cpu_policy.attention_choice(q.dtype, query_keys, scores, grad) == "math" else "cpp"
