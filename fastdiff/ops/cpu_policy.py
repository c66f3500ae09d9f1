"""What ``auto`` runs on a CPU, per op family, dtype and instruction set: a small, fixed, measured table.

On a CPU ``auto`` must never run slower than the eager ops it replaces (improved-diffusion's
``GroupNorm32`` + SiLU and its einsum attention). The candidates:

* ``cpp``: fastdiff's C++ GroupNorm kernels; for attention ATen's fused flash-attention CPU kernel
  (``fastdiff.ops.cpu_attention``);
* ``native``: PyTorch's own GroupNorm (``fastdiff.ops.group_norm.native_group_norm``);
* ``math``: attention from PyTorch's matmul and an fp32 softmax (``fastdiff.ops.attention.math_attention``),
  which stores the ``[B, H, Tq, Tk]`` weights, as improved-diffusion does.

Measured with ``python -m benchmarks.cpu_policy`` (and the same paired rounds at more lengths) on an AMD
EPYC with AVX-512 and AVX512_BF16, no AMX, then checked on an Intel Xeon with AMX (below); torch 2.13, 1
thread, improved-diffusion's 32x32 UNet shapes at batch 16; ratios are eager time over the candidate's,
medians of paired rounds of CPU time on a shared machine, about +-15% run to run:

* GroupNorm, GroupNorm+SiLU, scale-shift GroupNorm+SiLU: with each shape weighted by its calls per UNet,
  ``cpp`` beats eager (1.0x-5.7x) and ``native`` in every dtype (fp32, bf16), layout and pass but one:
  plain GroupNorm, fp32, contiguous, forward+backward (``cpp`` 0.85x, ``native`` 0.91x: a tie within the
  noise, both short of eager on small contiguous groups): ``cpp`` on every ISA and dtype.
* Attention, forward (fp32 and bf16) and fp32 forward+backward: the flash kernel wins from T = 256 (1.3x-
  2.7x eager) and loses below (T = 16, 64, 128: 0.5x-1.0x) where ``math`` runs at eager's speed: the
  flash kernel from ``Tq * Tk >= 256 * 256``, ``math`` below.
* Attention, bf16 forward+backward: the flash kernel's bf16 backward is slow: 0.15x-0.35x eager
  at T = 16-128, 0.7x at T = 384, 0.9x-1.1x at T = 256, then 1.3x at T = 512 and 3.4x at T = 1024: the
  flash kernel from ``Tq * Tk >= 512 * 512``, ``math`` below.

On an Intel Xeon with AMX (2026-12-04, the same benchmark) the same table holds: AMX speeds up neither the
flash kernel's small-T forward (fp32 0.46x-0.70x eager at T = 16-64, ``math`` 1.07x-1.12x) nor its bf16
backward (0.14x at T = 16, 0.20x at T = 64, 0.95x at T = 256, ``math`` 1.03x-1.11x), and from T = 256 the
flash kernel wins as above (fp32 forward 2.44x, fp32 forward+backward 1.32x, bf16 forward 2.13x).
GroupNorm: ``cpp`` 1.0x-3.7x eager, weighted per UNet, in every case but plain GroupNorm on contiguous fp32
(0.86x forward, 0.78x forward+backward; ``native``, the very op eager calls, 0.87x and 0.85x: the op
boundary's own cost, about 7 us a call). There the C++ kernel is also slower than ATen's on the smallest
groups (16x128x4x4 forward: 40 us against 27 us) and level from 16x16 up.

``math`` stores ``B * H * Tq * Tk`` weights: above ``MATH_MAX_SCORES`` the flash kernel runs whatever the
table says. CPUs below AVX512_BF16 (AVX-512 without bf16, AVX2) were not measured; they take the same
rows (their bf16 flash backward has no faster path than these two's). float16 and float64
keep ``cpp`` (not measured). A forced backend (``use_backend("cpp")``, ``--kernels cpp``) still runs what
was asked; this table is only ``auto``'s.
"""

import math
import platform
from pathlib import Path

import torch

ISAS = ("amx", "avx512_bf16", "avx512", "avx2", "default")
"""CPU instruction-set levels, best first: ``amx`` (AMX tiles with bf16), ``avx512_bf16`` (AVX-512 with
the bf16 dot product), ``avx512``, ``avx2``, ``default``."""

FLASH_MIN_SCORES: dict[tuple[torch.dtype, bool], int] = {
    (torch.float32, False): 256 * 256,
    (torch.float32, True): 256 * 256,
    (torch.bfloat16, False): 256 * 256,
    (torch.bfloat16, True): 512 * 512,
}
"""(dtype, gradients wanted) -> the ``Tq * Tk`` from which attention runs the flash kernel (``cpp``) on a
CPU, with or without AMX; below it ``math``. Dtypes not listed run ``cpp``."""

MATH_MAX_SCORES = 2**25
"""Most attention weights (``B * H * Tq * Tk``) ``math`` may store: 128 MiB as fp32; above, ``cpp``."""


def isa_from_flags(flags: set[str]) -> str:
    """The ISA level of a CPU with these ``/proc/cpuinfo`` flags."""
    if {"amx_tile", "amx_bf16"} <= flags:
        return "amx"
    if {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= flags:
        return "avx512_bf16"
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "default"


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line's value in ``/proc/cpuinfo`` (Linux), or None."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return None
    for line in cpuinfo.read_text().splitlines():
        if line.startswith(field):
            return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """This CPU's ``/proc/cpuinfo`` flags (Linux), or None where there is no such file."""
    flags = _cpuinfo("flags")
    return None if flags is None else set(flags.split())


def _detect_isa() -> str:
    """This CPU's ISA level (``/proc/cpuinfo`` on Linux; elsewhere from torch's CPU capability)."""
    flags = cpu_flags()
    if flags is not None:
        return isa_from_flags(flags)
    capability = torch.backends.cpu.get_cpu_capability()
    return "avx512" if "AVX512" in capability else "avx2" if "AVX2" in capability else "default"


CPU_ISA = _detect_isa()
"""Read once at import: the ops consult it on every call, also while torch.compile traces them, where
file reads and torch.backends queries would break the graph."""


def cpu_isa() -> str:
    """This CPU's ISA level (:data:`CPU_ISA`)."""
    return CPU_ISA


def _isa(isa: str | None) -> str:
    isa = cpu_isa() if isa is None else isa
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    return isa


def group_norm_choice(dtype: torch.dtype, isa: str | None = None) -> str:
    """``cpp`` or ``native`` for a GroupNorm-family call on ``dtype`` tensors on a CPU of level ``isa``
    (this CPU's when None). ``cpp`` for every level and dtype: see the module's figures."""
    _isa(isa)
    return "cpp"


def attention_choice(
    dtype: torch.dtype, query_keys: int, scores: int, grad: bool, isa: str | None = None
) -> str:
    """``cpp`` (flash kernel) or ``math`` for attention on ``dtype`` tensors on a CPU of level ``isa``
    (this CPU's when None): ``query_keys`` is ``Tq * Tk``, ``scores`` is ``B * H * Tq * Tk``, ``grad``
    whether gradients will be taken. The same on every level: see the module's figures."""
    _isa(isa)
    if scores > MATH_MAX_SCORES or (dtype, grad) not in FLASH_MIN_SCORES:
        return "cpp"
    return "math" if query_keys < FLASH_MIN_SCORES[dtype, grad] else "cpp"


def describe(isa: str | None = None) -> dict[str, str]:
    """What ``auto`` picks on a CPU of level ``isa`` (this CPU's when None), in words per op and dtype."""
    isa = _isa(isa)
    picks = {"isa": isa}
    for dtype in (torch.float32, torch.bfloat16):
        picks[f"group_norm/{str(dtype).removeprefix('torch.')}"] = group_norm_choice(dtype, isa)
    for (dtype, grad), flash_from in FLASH_MIN_SCORES.items():
        key = f"attention/{str(dtype).removeprefix('torch.')}/{'forward+backward' if grad else 'forward'}"
        side = math.isqrt(flash_from)
        picks[key] = f"math below Tq*Tk = {side}x{side}, cpp from it"
    return picks
