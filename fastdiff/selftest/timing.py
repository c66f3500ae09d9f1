"""Group ``kernel_timing``: the device's copy bandwidth, then each op against PyTorch's kernels
(``F.group_norm`` + scale-shift + ``F.silu``; SDPA and improved-diffusion's einsum attention) and, on CUDA,
``torch.compile`` of the same PyTorch code: forward and forward+backward medians, GB/s over the op's bytes
floor, and its share of the copy bandwidth and of the GPU's peak. Timings are reported, never asserted.
``median_seconds`` serves the train_step group too."""

import functools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.ops import backend as backends
from fastdiff.selftest import compiles
from fastdiff.selftest.cases import NORM_OPS
from fastdiff.selftest.records import Check, Options, Result

GROUP = "kernel_timing"
DTYPES = (torch.bfloat16, torch.float32)
"""Timed dtypes (a full run): the GPU's training dtype first."""
COMPILED_DTYPES = (torch.bfloat16,)
"""Dtypes with a ``torch.compile`` contestant: each costs an inductor compile per op and mode (seconds)."""
NOMINAL_PEAK_GBPS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "A100-SXM4-80GB": 2039.0}
"""Spec-sheet DRAM bandwidth by GPU name (substring), where the device properties do not give it."""

Tensor = torch.Tensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], options: Options, warmup: int = 2) -> float:
    """Median wall time of ``fn`` over ``options.repeats`` runs after ``warmup`` (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(options.repeats):
        if options.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def peak_bandwidth(device: torch.device) -> float | None:
    """The GPU's DRAM bandwidth in bytes/s: from its properties (memory clock x bus width), else its
    spec-sheet figure by name; None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8
    named = [gbps for name, gbps in NOMINAL_PEAK_GBPS.items() if name in props.name]
    return named[0] * 1e9 if named else None


@functools.cache
def copy_bandwidth(options: Options) -> float:
    """Achievable bandwidth in bytes/s: a device-to-device copy (bytes read + bytes written); measured
    once per process and device."""
    size = (4 << 20) if options.quick else (1 << 30) if options.is_cuda else (64 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=options.device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * size / median_seconds(lambda: dst.copy_(src), options)


# --- the contestants -------------------------------------------------------------------------------


def _torch_norm(kind: str, groups: int) -> Callable[..., Tensor]:
    """``F.group_norm`` (+ scale-shift) (+ ``F.silu``): PyTorch's kernels for one op of the family."""

    def run(x, weight, bias, scale=None, shift=None):
        y = F.group_norm(x, groups, weight, bias)
        if kind == "group_norm":
            return y
        if scale is not None:
            y = y * (1 + scale[..., None, None]) + shift[..., None, None]
        return F.silu(y)

    return run


def _fastdiff_norm(kind: str, groups: int) -> Callable[..., Tensor]:
    def run(x, weight, bias, scale=None, shift=None):
        if kind == "group_norm_scale_shift_silu":
            return ops.group_norm_scale_shift_silu(x, groups, weight, bias, scale, shift)
        return getattr(ops, kind)(x, groups, weight, bias)

    return run


def einsum_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """improved-diffusion's attention on ``[B, H, T, D]``: einsum logits, fp32 softmax, einsum with v
    (``eager.qkv_attention``'s math, on separate q, k, v)."""
    scale = q.shape[-1] ** -0.25
    weight = torch.einsum("bhtd,bhsd->bhts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    return torch.einsum("bhts,bhsd->bhtd", weight, v)


def _norm_inputs(shape, dtype, device) -> tuple[list[Tensor], Tensor]:
    n, c = shape[:2]
    tensors = [torch.randn(shape), torch.randn(c), torch.randn(c), torch.randn(n, c) * 0.1, torch.randn(n, c)]
    tensors = [t.to(device, dtype).requires_grad_(True) for t in tensors]
    return tensors, torch.randn(shape, device=device, dtype=dtype)


def timing_cases(options: Options) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(op, dtype, shape): each norm at ImageNet-64's first level, attention at T=1024, D=64 (a GPU's
    batch; smaller on a CPU, small with --quick)."""
    if options.quick:
        return [(op, torch.float32, (4, 64, 16, 16)) for op in NORM_OPS] + [
            ("attention", torch.float32, (1, 2, 128, 32))
        ]
    norm_shape = (32, 128, 64, 64) if options.is_cuda else (8, 128, 32, 32)
    attention_shape = (16, 8, 1024, 64) if options.is_cuda else (2, 4, 256, 64)
    names = (*NORM_OPS, "attention")
    return [(op, d, attention_shape if op == "attention" else norm_shape) for op in names for d in DTYPES]


def _contestants(op: str, dtype, shape, device) -> tuple[dict[str, Callable], list[Tensor], Tensor, str]:
    """(name -> fn(*inputs), inputs, output grad, fastdiff's backend) for one timing case; the PyTorch
    code ``torch.compile`` compiles is the ``F.group_norm`` one (norms) and the einsum one (attention)."""
    if op == "attention":
        inputs = [torch.randn(shape, device=device, dtype=dtype).requires_grad_(True) for _ in range(3)]
        fns = {
            "fastdiff": ops.flash_attention,
            "sdpa": F.scaled_dot_product_attention,
            "einsum": einsum_attention,
        }
        backend = backends.resolve_attention(inputs[0], shape[-1])
        return fns, inputs, torch.randn(shape, device=device, dtype=dtype), backend
    inputs, dy = _norm_inputs(shape, dtype, device)
    if op != "group_norm_scale_shift_silu":
        inputs = inputs[:3]
    fns = {"fastdiff": _fastdiff_norm(op, 32), "F.group_norm": _torch_norm(op, 32)}
    return fns, inputs, dy, backends.resolve_group_norm(inputs[0])


def _caller(fn: Callable, inputs: list[Tensor], dy: Tensor, forward_only: bool) -> Callable[[], object]:
    """``fn(*inputs)``, or that and the gradients of every input for output gradient ``dy``."""
    if forward_only:
        return lambda: fn(*inputs)
    return lambda: torch.autograd.grad(fn(*inputs), inputs, dy)


def compiled_first_call(call: Callable[[], object], device: torch.device) -> float:
    """Run ``call`` (a ``torch.compile`` function's first call) once; its seconds, counted as compiling
    (less what Triton launches inside it were counted already)."""
    counted, began = compiles.counted_seconds(), time.perf_counter()
    call()
    _sync(device)
    seconds = time.perf_counter() - began
    compiles.add_compile_seconds(seconds - (compiles.counted_seconds() - counted))
    return seconds


def _check_copy(options: Options) -> Result:
    bandwidth, peak = copy_bandwidth(options), peak_bandwidth(options.device)
    detail = f"device-to-device copy {bandwidth / 1e9:.1f} GB/s"
    detail += f" ({bandwidth / peak:.0%} of the {peak / 1e9:.0f} GB/s peak)" if peak else " (no peak known)"
    return Result(GROUP, "", "info", detail, {"copy_GBps": bandwidth / 1e9, "peak_GBps": peak and peak / 1e9})


def _check_op(op: str, dtype: torch.dtype, shape: tuple[int, ...], mode: str, options: Options) -> Result:
    """One op's median time in ``mode`` against each contestant; GB/s over its bytes floor."""
    bandwidth, peak = copy_bandwidth(options), peak_bandwidth(options.device)
    fns, inputs, dy, backend = _contestants(op, dtype, shape, options.device)
    x_bytes = dy.numel() * dy.element_size()
    # bytes floor: norms read x and write y (+ read x, dy and write dx backward); attention reads q, k, v
    # and writes o (+ reads q, k, v, o, dO and writes dq, dk, dv backward)
    per_mode = {"forward": (2, 4), "forward+backward": (5, 12)}[mode]
    bytes_floor = per_mode[op == "attention"] * x_bytes
    forward_only = mode == "forward"
    compiled_note, compile_first = "torch.compile: not run (no CUDA device)", None
    if options.is_cuda and dtype in COMPILED_DTYPES:
        eager_fn = fns["einsum" if op == "attention" else "F.group_norm"]
        fns["torch.compile"] = torch.compile(eager_fn, dynamic=False)
        with torch.no_grad() if forward_only else torch.enable_grad():
            compile_first = compiled_first_call(
                _caller(fns["torch.compile"], inputs, dy, forward_only), options.device
            )
        compiled_note = f"torch.compile's first call {compile_first:.1f} s"
    elif options.is_cuda:
        compiled_note = (
            f"torch.compile timed in {', '.join(str(d).removeprefix('torch.') for d in COMPILED_DTYPES)} only"
        )
    seconds = {}
    for name, fn in fns.items():
        with torch.no_grad() if forward_only else torch.enable_grad():
            seconds[name] = median_seconds(_caller(fn, inputs, dy, forward_only), options)
    ours = seconds["fastdiff"]
    gbps = bytes_floor / ours / 1e9
    versus = ", ".join(f"{seconds[n] / ours:.2f}x vs {n}" for n in seconds if n != "fastdiff")
    detail = (
        f"{ours * 1e3:.3f} ms on {backend}, {gbps:.1f} GB/s ({gbps * 1e9 / bandwidth:.0%} of copy"
        + (f", {gbps * 1e9 / peak:.0%} of peak" if peak else "")
        + f"); {versus}; {compiled_note}"
    )
    data = {
        "seconds": seconds,
        "backend": backend,
        "bytes_floor": bytes_floor,
        "GBps": gbps,
        "share_of_copy": gbps * 1e9 / bandwidth,
        "share_of_peak": gbps * 1e9 / peak if peak else None,
        "speedup": {n: seconds[n] / ours for n in seconds if n != "fastdiff"},
        "compile_first_call_s": compile_first,
    }
    return Result(GROUP, "", "info", detail, data)


def plan(options: Options) -> list[Check]:
    checks = [Check("copy bandwidth", lambda: _check_copy(options))]
    for op, dtype, shape in timing_cases(options):
        for mode in ("forward", "forward+backward"):
            name = f"{op} {str(dtype).removeprefix('torch.')} {'x'.join(map(str, shape))} {mode}"
            checks.append(Check(name, lambda a=(op, dtype, shape, mode): _check_op(*a, options)))
    return checks
