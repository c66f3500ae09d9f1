"""Issue 3's CPU figure: GroupNorm+SiLU and scale-shift GroupNorm+SiLU, forward+backward, on the C++
backend against eager PyTorch, at every GroupNorm shape of improved-diffusion's 64x64 UNet with batch 8.

Contestants, paired per (op, shape, dtype) in one process (``benchmarks.timing``):

* ``fastdiff``: ``fastdiff.ops`` with its default backend (``auto``, which is ``cpp`` here), forward then
  ``autograd.grad``: what a model pays, validation and autograd included;
* ``kernels``: ``fastdiff._C``'s forward and backward called directly: the C++ kernels alone;
* ``eager``: improved-diffusion's code (``fastdiff.selftest.eager``), the baseline of every ratio.

Besides each shape's ratio, the UNet-weighted ratio: each shape's median times its calls per UNet forward,
summed. Goes to the run's data under ``"group_norm_cpu"``; reported, never asserted. CPU only.

    pytest benchmarks/test_bench_group_norm_cpu.py --benchmark-only
"""

import pytest
import torch

from benchmarks.configs import IMAGENET_64, KernelCall, KernelCase, unet_kernel_calls
from benchmarks.machine import load_average
from benchmarks.session import DTYPES, BenchRun
from benchmarks.test_bench_kernels import NUM_GROUPS, make_inputs, make_runner, measure_kernel_contestants
from benchmarks.timing import Contestant, feed_benchmark
from fastdiff import ops
from fastdiff.ops import backend as backends
from fastdiff.selftest import eager

BATCH = 8
FIGURE_DTYPES = ("fp32", "bf16")
"""The C++ kernels' dtypes named by the issue."""
CONTESTANTS = ("fastdiff", "kernels", "eager")
OPS = {
    "group_norm_silu": (ops.group_norm_silu, eager.group_norm32_silu),
    "group_norm_scale_shift_silu": (ops.group_norm_scale_shift_silu, eager.group_norm32_scale_shift_silu),
}


def figure_calls() -> list[KernelCall]:
    """Every GroupNorm+SiLU and scale-shift shape of the 64x64 UNet, with its calls per forward."""
    calls = [c for c in unet_kernel_calls(IMAGENET_64) if c.kernel in OPS]
    return sorted(calls, key=lambda c: (c.kernel, c.elements))


def _kernels_runner(tensors: list[torch.Tensor]):
    """One iteration of the C++ forward then backward, called directly (all five gradients)."""
    cpp = backends.cpp_extension
    x, weight, bias, *scale_shift = tensors
    scale, shift = scale_shift or (None, None)
    dy = torch.randn_like(x)
    needs = (True, True, True, scale is not None, scale is not None)

    def run():
        y, mean, rstd = cpp.group_norm_forward(x, NUM_GROUPS, weight, bias, scale, shift, 1e-5, True)
        return y, cpp.group_norm_backward(
            dy, x, NUM_GROUPS, weight, bias, scale, shift, mean, rstd, True, needs
        )

    return run


def measure(call: KernelCall, dtype_name: str, run: BenchRun) -> dict:
    case = KernelCase(IMAGENET_64, call, BATCH)
    tensors = [t.requires_grad_() for t in make_inputs(case, DTYPES[dtype_name], run.settings.device, seed=0)]
    resolved = backends.resolve_group_norm(tensors[0])
    if resolved != "cpp":
        raise RuntimeError(f"fastdiff's default backend resolved to {resolved!r} here, not the C++ kernels")
    fastdiff_fn, eager_fn = OPS[call.kernel]
    contestants = [
        Contestant("fastdiff", make_runner(call.kernel, fastdiff_fn, tensors, 0, "forward+backward", None)),
        Contestant("kernels", _kernels_runner([t.detach() for t in tensors])),
        Contestant("eager", make_runner(call.kernel, eager_fn, tensors, 0, "forward+backward", None)),
    ]
    result = measure_kernel_contestants(contestants, run.settings)
    record = {
        "kernel": call.kernel,
        "label": f"{call.label} N{BATCH}",
        "shape": list(case.input_shape),
        "calls_per_forward": call.count,
        "dtype": dtype_name,
        "load_after": load_average(),
        "contestants": {
            name: {
                "median_s": result.median(name),
                "samples_s": result.samples[name],
                "speedup_vs_eager": result.speedup(name, "eager"),
            }
            for name in result.samples
        },
    }
    run.data.setdefault("group_norm_cpu", []).append(record)
    return record


def _unavailable(run: BenchRun) -> str:
    if run.settings.device.type != "cpu":
        return f"the C++ kernels are CPU kernels; this run is on {run.settings.device.type}"
    if backends.cpp_extension is None:
        return f"the C++ extension fastdiff._C is not built ({backends.CPP_IMPORT_ERROR})"
    return ""


@pytest.mark.parametrize("contestant", CONTESTANTS)
@pytest.mark.parametrize("dtype_name", FIGURE_DTYPES)
@pytest.mark.parametrize("call", figure_calls(), ids=lambda c: f"{c.kernel}-{c.label}")
def test_group_norm_cpu(benchmark, bench: BenchRun, call: KernelCall, dtype_name: str, contestant: str):
    why = _unavailable(bench)
    if why:
        pytest.skip(why)
    group = f"issue-3 CPU figure {call.kernel} {call.label} N{BATCH} {dtype_name}"
    benchmark.group = group
    record = bench.paired(group, lambda: measure(call, dtype_name, bench))
    entry = record["contestants"][contestant]
    benchmark.extra_info.update(
        median_ms=entry["median_s"] * 1e3,
        speedup_vs_eager=entry["speedup_vs_eager"],
        calls_per_unet_forward=call.count,
    )
    feed_benchmark(benchmark, entry["samples_s"])
