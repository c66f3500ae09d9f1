"""Timings: the device's copy bandwidth, each op against PyTorch's own kernels (forward and
forward+backward, GB/s and share of the bandwidth), and the first call's time (compile + load)."""

import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.ops import backend as backends
from fastdiff.selftest.cases import NORM_OPS
from fastdiff.selftest.records import Options, Result

DTYPES = (torch.bfloat16, torch.float32)
"""Timed dtypes (a full run): the GPU default first."""

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
    """The GPU's theoretical DRAM bandwidth in bytes/s from its properties (None when not reported)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def copy_bandwidth(options: Options) -> float:
    """Achievable bandwidth in bytes/s: a device-to-device copy (bytes read + bytes written)."""
    size = (4 << 20) if options.quick else (1 << 30) if options.is_cuda else (64 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=options.device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * size / median_seconds(lambda: dst.copy_(src), options)


# --- the contestants -------------------------------------------------------------------------------


def _torch_norm(kind: str, groups: int) -> Callable[..., Tensor]:
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
    """improved-diffusion's attention: einsum logits, fp32 softmax, einsum with v."""
    scale = q.shape[-1] ** -0.25
    weight = torch.einsum("bhtd,bhsd->bhts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    return torch.einsum("bhts,bhsd->bhtd", weight, v)


def _norm_inputs(shape, dtype, device) -> tuple[list[Tensor], Tensor]:
    n, c = shape[:2]
    tensors = [torch.randn(shape), torch.randn(c), torch.randn(c), torch.randn(n, c) * 0.1, torch.randn(n, c)]
    tensors = [t.to(device, dtype).requires_grad_(True) for t in tensors]
    return tensors, torch.randn(shape, device=device, dtype=dtype)


def _timing_cases(options: Options) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
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
    """(name -> fn(*inputs), inputs, output grad, fastdiff's backend) for one timing case."""
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
    fns = {"fastdiff": _fastdiff_norm(op, 32), "torch": _torch_norm(op, 32)}
    return fns, inputs, dy, backends.resolve_group_norm(inputs[0])


def check_timings(options: Options) -> Iterator[Result]:
    """Copy bandwidth, then each op's median time against PyTorch's kernels, forward and fwd+bwd."""
    bandwidth, peak = copy_bandwidth(options), peak_bandwidth(options.device)
    detail = f"device-to-device copy {bandwidth / 1e9:.1f} GB/s"
    detail += f" ({bandwidth / peak:.0%} of the {peak / 1e9:.0f} GB/s peak)" if peak else " (no peak known)"
    data = {"copy_GBps": bandwidth / 1e9, "peak_GBps": peak / 1e9 if peak else None}
    yield Result("timing", "copy bandwidth", "info", detail, data)
    for op, dtype, shape in _timing_cases(options):
        fns, inputs, dy, backend = _contestants(op, dtype, shape, options.device)
        x_bytes = dy.numel() * dy.element_size()
        # bytes floor: norms read x and write y (+ read x, dy and write dx backward); attention reads q, k,
        # v and writes o (+ reads q, k, v, o, dO and writes dq, dk, dv backward)
        floor = {"forward": 2 * x_bytes, "forward+backward": 5 * x_bytes}
        if op == "attention":
            floor = {"forward": 4 * x_bytes, "forward+backward": 12 * x_bytes}
        for mode, bytes_floor in floor.items():
            seconds = {}
            for name, fn in fns.items():
                with torch.no_grad() if mode == "forward" else torch.enable_grad():
                    seconds[name] = median_seconds(_caller(fn, inputs, dy, mode == "forward"), options)
            ours = seconds["fastdiff"]
            gbps = bytes_floor / ours / 1e9
            versus = ", ".join(f"{seconds[n] / ours:.2f}x vs {n}" for n in seconds if n != "fastdiff")
            label = f"{op} {str(dtype).removeprefix('torch.')} {'x'.join(map(str, shape))} {mode}"
            detail = (
                f"{ours * 1e3:.3f} ms on {backend}, {gbps:.1f} GB/s ({gbps * 1e9 / bandwidth:.0%} of copy"
                + (f", {gbps * 1e9 / peak:.0%} of peak" if peak else "")
                + f"); {versus}"
            )
            data = {
                "seconds": seconds,
                "backend": backend,
                "bytes_floor": bytes_floor,
                "GBps": gbps,
                "share_of_copy": gbps * 1e9 / bandwidth,
                "share_of_peak": gbps * 1e9 / peak if peak else None,
                "speedup": {n: seconds[n] / ours for n in seconds if n != "fastdiff"},
            }
            yield Result("timing", label, "info", detail, data)


def _caller(fn: Callable, inputs: list[Tensor], dy: Tensor, forward_only: bool) -> Callable[[], object]:
    """``fn(*inputs)``, or that and the gradients of every input for output gradient ``dy``."""
    if forward_only:
        return lambda: fn(*inputs)
    return lambda: torch.autograd.grad(fn(*inputs), inputs, dy)


def _triton_cache_entries() -> int:
    cache = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return sum(1 for _ in cache.iterdir()) if cache.is_dir() else 0


def check_first_call(options: Options) -> Iterator[Result]:
    """Each op's first forward+backward (Triton compile or cache load, autotuning) against a later call.

    Runs before the other checks, so these calls are the process's first of each op."""
    cached = _triton_cache_entries()
    for op, dtype, shape in _timing_cases(options):
        if not options.quick and dtype != DTYPES[0]:
            continue
        fns, inputs, dy, backend = _contestants(op, dtype, shape, options.device)
        call = _caller(fns["fastdiff"], inputs, dy, forward_only=False)

        def run(call=call) -> None:
            call()
            _sync(options.device)

        began = time.perf_counter()
        run()
        first = time.perf_counter() - began
        later = median_seconds(run, options, warmup=0)
        label = f"{op} {str(dtype).removeprefix('torch.')} {'x'.join(map(str, shape))}"
        detail = f"first call {first:.2f} s, later {later * 1e3:.2f} ms on {backend}"
        if backend == "triton":
            detail += f" (Triton cache had {cached} entries at start)"
        data = {"first_s": first, "later_s": later, "backend": backend, "triton_cache_entries": cached}
        yield Result("compile", label, "info", detail, data)
