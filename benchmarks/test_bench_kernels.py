"""Kernel benchmarks: each fused op, forward and forward+backward, against eager PyTorch and torch.compile.

One pytest-benchmark group per (op, pass, shape, dtype); its contestants are measured together in paired,
interleaved rounds (``benchmarks.timing``) by the group's first test, and each contestant's test hands
its samples to pytest-benchmark. Contestants:

* ``fastdiff-triton``: ``fastdiff.ops`` on the Triton backend (CUDA only);
* ``fastdiff-cpp``: the C++ backend (CPU only: fastdiff's GroupNorm kernels; for attention PyTorch's fused
  flash-attention CPU kernel);
* ``fastdiff-torch``: the torch reference backend (CPU only; what the end-to-end ``torch`` runs use);
* ``eager``: improved-diffusion's code (``fastdiff.selftest.eager``), the baseline of every ratio;
* ``torch.compile``: that code compiled (``dynamic=False``, ``fullgraph=True``), once per group.
"""

import pytest
import torch

from benchmarks.configs import KernelCase, kernel_cases
from benchmarks.machine import load_average
from benchmarks.session import DTYPES, BenchRun, BenchSettings
from benchmarks.timing import Contestant, PairedResult, feed_benchmark, measure_paired, smoke_run
from fastdiff import ops
from fastdiff.ops import backend as backends
from fastdiff.selftest import eager

NUM_GROUPS = 32
PASSES = ("forward", "forward+backward")
CONTESTANTS = ("fastdiff-triton", "fastdiff-cpp", "fastdiff-torch", "eager", "torch.compile")
EAGER_FUNCTIONS = {
    "group_norm": eager.group_norm32,
    "group_norm_silu": eager.group_norm32_silu,
    "group_norm_scale_shift_silu": eager.group_norm32_scale_shift_silu,
    "qkv_attention": eager.qkv_attention,
}
FASTDIFF_FUNCTIONS = {
    "group_norm": ops.group_norm,
    "group_norm_silu": ops.group_norm_silu,
    "group_norm_scale_shift_silu": ops.group_norm_scale_shift_silu,
    "qkv_attention": ops.qkv_attention,
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    from benchmarks.conftest import bench_run

    settings = bench_run(metafunc.config).settings
    cases = kernel_cases(settings.device, settings.shapes_per_config)
    metafunc.parametrize("case", cases, ids=[f"{c.call.kernel}-{c.id}" for c in cases])
    metafunc.parametrize("pass_name", PASSES, ids=["fwd", "fwdbwd"])
    metafunc.parametrize("dtype_name", settings.dtypes)
    metafunc.parametrize("contestant", CONTESTANTS)


def unavailable(contestant: str, case: KernelCase, run: BenchRun) -> str:
    """Why ``contestant`` cannot run this case on this machine ('' when it can)."""
    device = run.settings.device
    kernel = case.call.kernel
    if contestant == "fastdiff-triton":
        if device.type != "cuda":
            return "Triton timings need a CUDA GPU; none here (the interpreter proves numerics, not speed)"
        if "triton" not in ops.available_backends():
            return "triton is not installed"
        if kernel == "qkv_attention":
            head_dim = case.call.shape[0] // (3 * case.call.heads)
            if head_dim > backends.MAX_TRITON_HEAD_DIM:
                return (
                    f"head dim {head_dim} is over the Triton attention's maximum of "
                    f"{backends.MAX_TRITON_HEAD_DIM} (fastdiff falls back to its torch backend there)"
                )
    if contestant in ("fastdiff-cpp", "fastdiff-torch") and device.type != "cpu":
        return f"{contestant} is a CPU contestant; this run is on {device.type}"
    if contestant == "fastdiff-cpp" and kernel != "qkv_attention" and backends.cpp_extension is None:
        return f"the C++ extension fastdiff._C is not built ({backends.CPP_IMPORT_ERROR})"
    if contestant == "torch.compile" and not run.settings.compile_contestant:
        return "torch.compile left out (--bench-no-compile)"
    return ""


def make_inputs(case: KernelCase, dtype: torch.dtype, device: torch.device, seed: int) -> list[torch.Tensor]:
    """The op's tensor arguments: ``[qkv]``, or ``[x, weight, bias(, scale, shift)]`` (fp32 weight/bias)."""
    gen = torch.Generator().manual_seed(seed)
    shape = case.input_shape
    if case.call.kernel == "qkv_attention":
        qkv = torch.randn(shape, generator=gen).to(device, dtype)
        return [qkv]
    n, c = shape[:2]
    x = torch.randn(shape, generator=gen).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(c, generator=gen)).to(device)
    bias = (0.1 * torch.randn(c, generator=gen)).to(device)
    tensors = [x, weight, bias]
    if case.call.kernel == "group_norm_scale_shift_silu":
        tensors += [(0.1 * torch.randn(n, c, generator=gen)).to(device, dtype) for _ in range(2)]
    return tensors


def _call(kernel: str, fn, tensors: list, heads: int):
    if kernel == "qkv_attention":
        return fn(tensors[0], heads)
    x, weight, bias, *scale_shift = tensors
    return fn(x, NUM_GROUPS, weight, bias, *scale_shift)


def make_runner(kernel: str, fn, tensors: list, heads: int, pass_name: str, backend: str | None):
    """One iteration: the forward under no_grad, or forward then ``autograd.grad`` of all inputs."""
    grad_out = None

    def forward():
        if backend is None:
            return _call(kernel, fn, tensors, heads)
        with ops.use_backend(backend):
            return _call(kernel, fn, tensors, heads)

    def run_forward():
        with torch.no_grad():
            return forward()

    def run_forward_backward():
        nonlocal grad_out
        out = forward()
        if grad_out is None:
            grad_out = torch.randn_like(out)
        return torch.autograd.grad(out, tensors, grad_out)

    return run_forward if pass_name == "forward" else run_forward_backward


def _resolved_backend(case: KernelCase, backend: str, tensors: list) -> str:
    with ops.use_backend(backend):
        if case.call.kernel == "qkv_attention":
            return backends.resolve_attention(tensors[0], case.call.shape[0] // (3 * case.call.heads))
        return backends.resolve_group_norm(tensors[0])


def measure_kernel_contestants(contestants: list[Contestant], settings: BenchSettings) -> PairedResult:
    """Paired rounds of one kernel group with the run's settings (once each in a smoke run)."""
    if settings.smoke:
        return smoke_run(contestants, settings.device)
    return measure_paired(
        contestants,
        settings.device,
        settings.kernel_rounds,
        warmup=2,
        min_round_s=settings.kernel_min_round_s,
    )


def measure_group(case: KernelCase, pass_name: str, dtype_name: str, run: BenchRun) -> dict:
    """Build the inputs and contestants of one group, measure them, and add the record to the summary."""
    settings = run.settings
    kernel = case.call.kernel
    tensors = make_inputs(case, DTYPES[dtype_name], settings.device, seed=0)
    if pass_name == "forward+backward":
        tensors = [t.detach().requires_grad_() for t in tensors]
    heads = case.call.heads
    contestants = []
    for name in CONTESTANTS:
        if unavailable(name, case, run):
            continue
        if name.startswith("fastdiff-"):
            backend = name.removeprefix("fastdiff-")
            info = {"backend": _resolved_backend(case, backend, tensors)}
            runner = make_runner(kernel, FASTDIFF_FUNCTIONS[kernel], tensors, heads, pass_name, backend)
        elif name == "eager":
            info, runner = {}, make_runner(kernel, EAGER_FUNCTIONS[kernel], tensors, heads, pass_name, None)
        else:
            torch._dynamo.reset()
            compiled = torch.compile(EAGER_FUNCTIONS[kernel], dynamic=False, fullgraph=True)
            info, runner = (
                {"mode": "dynamic=False, fullgraph=True"},
                make_runner(kernel, compiled, tensors, heads, pass_name, None),
            )
        contestants.append(Contestant(name, runner, info))
    result = measure_kernel_contestants(contestants, settings)
    record = _record(case, pass_name, dtype_name, run, result)
    run.data["kernels"].append(record)
    return record


def _record(case: KernelCase, pass_name: str, dtype_name: str, run: BenchRun, result: PairedResult) -> dict:
    contestants = {}
    for name in result.samples:
        contestants[name] = {
            "median_s": result.median(name),
            "min_s": min(result.samples[name]),
            "samples_s": result.samples[name],
            "iterations": result.iterations[name],
            "first_call_s": result.first_call_s[name],
            "speedup_vs_eager": result.speedup(name, "eager"),
            "info": result.info[name],
        }
    for name, error in result.errors.items():
        contestants[name] = {"error": error, "info": result.info[name]}
    return {
        "kernel": case.call.kernel,
        "pass": pass_name,
        "config": case.config.name,
        "label": f"{case.call.label} N{case.batch}",
        "shape": list(case.input_shape),
        "heads": case.call.heads,
        "calls_per_forward": case.call.count,
        "dtype": dtype_name,
        "device": str(run.settings.device),
        "smoke": run.settings.smoke,
        "load_after": load_average(),
        "contestants": contestants,
    }


def test_kernel(
    benchmark, bench: BenchRun, case: KernelCase, pass_name: str, dtype_name: str, contestant: str
):
    why = unavailable(contestant, case, bench)
    if why:
        pytest.skip(why)
    group = f"{case.call.kernel} {pass_name} {case.config.name} {case.call.label} N{case.batch} {dtype_name}"
    benchmark.group = group
    record = bench.paired(group, lambda: measure_group(case, pass_name, dtype_name, bench))
    entry = record["contestants"][contestant]
    if "error" in entry:
        pytest.fail(f"{contestant} failed on its first call: {entry['error']}")
    benchmark.extra_info.update(
        median_ms=entry["median_s"] * 1e3,
        speedup_vs_eager=entry["speedup_vs_eager"],
        first_call_ms=entry["first_call_s"] * 1e3,
        iterations_per_round=entry["iterations"],
        calls_per_unet_forward=record["calls_per_forward"],
        **entry["info"],
    )
    feed_benchmark(benchmark, entry["samples_s"])
