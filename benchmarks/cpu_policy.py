"""The figures behind ``auto``'s CPU policy (``fastdiff.ops.cpu_policy``): each op against the eager op it
replaces, then the whole train step, on this machine's CPU.

    python -m benchmarks.cpu_policy                 # ops, then train steps
    python -m benchmarks.cpu_policy --part ops      # or --part step
    python -m benchmarks.cpu_policy --json out.json

Ops: every GroupNorm-family and attention shape of the yardstick UNet (improved-diffusion's 32x32, 64
channels, 2 res blocks, learn_sigma) at batch 16, in fp32 and in bf16 (x bf16, weight/bias fp32, as under
autocast), contiguous and channels_last, forward (no grad) and forward+backward. Contestants, measured in
paired, interleaved rounds (``benchmarks.timing``):

* ``cpp``: ``fastdiff.ops`` forced to the ``cpp`` backend (fastdiff's C++ GroupNorm kernels; for
  attention ATen's flash-attention CPU kernel);
* ``native``: PyTorch's own ops as fastdiff's ``native`` path runs them (``native_group_norm``,
  ``native_qkv_attention``);
* ``math`` (attention only): matmul, fp32 softmax, matmul (``math_qkv_attention``), auto's other CPU path;
* ``eager``: improved-diffusion's code (``fastdiff.selftest.eager``), the baseline of every ratio.

Each ratio is eager's median seconds over the contestant's (above 1: faster than eager); the spread is the
interquartile range of the per-round ratios (round i of eager over round i of the contestant). A summary
line per (op, dtype, layout, pass) weighs each shape by its calls per UNet forward. Rounds are timed with
``--clock``: ``cpu`` (default with one torch thread: this process's CPU seconds, ``time.process_time``,
which the other processes of a shared machine disturb far less than wall time) or ``wall``.

Step: the yardstick train step (forward, backward, AdamW) with the model and input in channels_last, in
fp32 and in bf16 autocast: ``auto`` (fastdiff's default), ``cpp`` (forced: what ``auto`` ran on every CPU
before ``cpu_policy``) and ``eager`` (the same model with the fused modules swapped for improved-diffusion's
code). The CPU model, its ISA flags, torch's CPU capability and
threads, and the load average are printed with every table: CPU figures mean nothing without them.
"""

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.configs import YARDSTICK, KernelCall, unet_kernel_calls
from benchmarks.machine import load_average
from benchmarks.timing import Clock, Contestant, PairedResult, measure_paired
from fastdiff import ops
from fastdiff.ops import backend as backends
from fastdiff.ops import cpu_policy
from fastdiff.ops.attention import math_qkv_attention, native_qkv_attention
from fastdiff.ops.group_norm import native_group_norm
from fastdiff.selftest import eager

NUM_GROUPS = 32
BATCH = 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("contiguous", "channels_last")
PASSES = ("forward", "forward+backward")
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
"""The /proc/cpuinfo flags that decide which kernels are fast here."""

FASTDIFF_FUNCTIONS: dict[str, Callable] = {
    "group_norm": ops.group_norm,
    "group_norm_silu": ops.group_norm_silu,
    "group_norm_scale_shift_silu": ops.group_norm_scale_shift_silu,
    "qkv_attention": ops.qkv_attention,
}
EAGER_FUNCTIONS: dict[str, Callable] = {
    "group_norm": eager.group_norm32,
    "group_norm_silu": eager.group_norm32_silu,
    "group_norm_scale_shift_silu": eager.group_norm32_scale_shift_silu,
    "qkv_attention": eager.qkv_attention,
}


def _native(kernel: str) -> Callable:
    if kernel == "qkv_attention":
        return native_qkv_attention
    silu = kernel != "group_norm"

    def run(x, num_groups, weight, bias, scale=None, shift=None):
        return native_group_norm(x, num_groups, weight, bias, scale, shift, 1e-5, silu)

    return run


def cpu_facts() -> dict:
    """CPU model, its relevant ISA flags, torch's view of it, threads, and the load right now."""
    flags = cpu_policy.cpu_flags() or set()
    return {
        "cpu_model": cpu_policy.cpu_model(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpp_isa": backends.cpp_extension._group_norm_isa() if backends.cpp_extension is not None else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "auto_policy": cpu_policy.describe(),
    }


def header(facts: dict) -> str:
    return (
        f"CPU: {facts['cpu_model']}; flags {' '.join(facts['cpu_flags']) or '-'}; torch {facts['torch']} "
        f"(capability {facts['cpu_capability']}, {facts['torch_threads']} threads); fastdiff._C kernels "
        f"{facts['cpp_isa']}; load average {facts['load_average']}"
    )


# --- ops -------------------------------------------------------------------------------------------


def op_inputs(call: KernelCall, dtype: torch.dtype, layout: str, seed: int = 0) -> list[torch.Tensor]:
    """``[qkv]`` or ``[x, weight, bias(, scale, shift)]``: x (and scale/shift) in ``dtype``, weight/bias
    fp32 as the model's parameters are under autocast; all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, *call.shape)
    x = torch.randn(shape, generator=gen).to(dtype)
    if call.kernel == "qkv_attention":
        return [x.requires_grad_()]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    tensors = [x, 1 + 0.1 * torch.randn(c, generator=gen), 0.1 * torch.randn(c, generator=gen)]
    if call.kernel == "group_norm_scale_shift_silu":
        tensors += [(0.1 * torch.randn(BATCH, c, generator=gen)).to(dtype) for _ in range(2)]
    return [t.requires_grad_() for t in tensors]


def op_runner(call: KernelCall, fn: Callable, tensors: list[torch.Tensor], pass_name: str, backend: str):
    """One iteration of ``fn`` on ``tensors``: forward under no_grad, or forward then ``autograd.grad``."""
    grad_out: list[torch.Tensor] = []

    def forward():
        with ops.use_backend(backend):
            if call.kernel == "qkv_attention":
                return fn(tensors[0], call.heads)
            x, weight, bias, *scale_shift = tensors
            return fn(x, NUM_GROUPS, weight, bias, *scale_shift)

    def run():
        if pass_name == "forward":
            with torch.no_grad():
                return forward()
        out = forward()
        if not grad_out:
            grad_out.append(torch.randn_like(out))
        return torch.autograd.grad(out, tensors, grad_out[0])

    return run


@dataclass
class Ratio:
    """eager's median over a contestant's, and the interquartile range of the per-round ratios."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:5.2f} [{self.low:4.2f}-{self.high:4.2f}]"


def ratio(result: PairedResult, name: str, baseline: str = "eager") -> Ratio:
    per_round = [b / a for a, b in zip(result.samples[name], result.samples[baseline], strict=False)]
    quartiles = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    return Ratio(result.median(baseline) / result.median(name), quartiles[0], quartiles[-1])


def resolved_backend(call: KernelCall, tensors: list[torch.Tensor], grad: bool) -> str:
    """What ``auto`` runs for this call (``grad``: gradients will be taken)."""
    with ops.use_backend("auto"):
        if call.kernel == "qkv_attention":
            return backends.resolve_attention(tensors[0], call.shape[0] // (3 * call.heads), grad=grad)
        x, weight, bias, *scale_shift = tensors
        return backends.resolve_group_norm(x, weight, bias, *scale_shift)


CLOCKS: dict[str, Clock] = {"cpu": time.process_time, "wall": time.perf_counter}


def measure_ops(rounds: int, min_round_s: float, kernels: list[str] | None, clock: Clock) -> list[dict]:
    calls = [c for c in unet_kernel_calls(YARDSTICK) if kernels is None or c.kernel in kernels]
    calls.sort(key=lambda c: (c.kernel, -c.elements))
    records = []
    for call in calls:
        layouts = ("contiguous",) if call.kernel == "qkv_attention" else LAYOUTS
        for dtype_name, dtype in DTYPES.items():
            for layout in layouts:
                tensors = op_inputs(call, dtype, layout)
                functions = {
                    "cpp": (FASTDIFF_FUNCTIONS[call.kernel], "cpp"),
                    "native": (_native(call.kernel), "auto"),
                    "eager": (EAGER_FUNCTIONS[call.kernel], "auto"),
                }
                if call.kernel == "qkv_attention":
                    functions["math"] = (math_qkv_attention, "auto")
                for pass_name in PASSES:
                    contestants = [
                        Contestant(name, op_runner(call, fn, tensors, pass_name, backend))
                        for name, (fn, backend) in functions.items()
                    ]
                    result = measure_paired(
                        contestants, torch.device("cpu"), rounds, 2, min_round_s, clock=clock
                    )
                    record = {
                        "kernel": call.kernel,
                        "shape": [BATCH, *call.shape],
                        "heads": call.heads,
                        "calls_per_forward": call.count,
                        "dtype": dtype_name,
                        "layout": layout,
                        "pass": pass_name,
                        "auto": resolved_backend(call, tensors, grad=pass_name != "forward"),
                        "median_s": {n: result.median(n) for n in result.samples},
                        "ratio_vs_eager": {n: vars(ratio(result, n)) for n in result.samples if n != "eager"},
                    }
                    records.append(record)
                    print(_op_line(record), flush=True)
    return records


def _label(record: dict) -> str:
    shape = "x".join(map(str, record["shape"]))
    where = f"{record['dtype']:<4} {record['layout']:<13} {record['pass']:<16}"
    return f"{record['kernel']:<28} {shape:<14} {where}"


def _op_line(record: dict) -> str:
    cells = "  ".join(f"{n} {Ratio(**r)}" for n, r in record["ratio_vs_eager"].items())
    eager_ms = record["median_s"]["eager"] * 1e3
    return f"{_label(record)} eager {eager_ms:8.3f} ms  {cells}  auto={record['auto']}"


def weighted_summary(records: list[dict]) -> list[dict]:
    """Per (op, dtype, layout, pass): each contestant's medians weighted by calls per UNet forward."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in records:
        key = (r["kernel"], r["dtype"], r["layout"], r["pass"])
        totals = groups.setdefault(key, {})
        for name, seconds in r["median_s"].items():
            totals[name] = totals.get(name, 0.0) + seconds * r["calls_per_forward"]
    return [
        {
            "kernel": k[0],
            "dtype": k[1],
            "layout": k[2],
            "pass": k[3],
            "ratio_vs_eager": {n: totals["eager"] / totals[n] for n in totals if n != "eager"},
        }
        for k, totals in groups.items()
    ]


# --- train step ------------------------------------------------------------------------------------


STEP_CONTESTANTS = {"auto": "auto", "cpp": "cpp", "eager": "auto"}
"""Step contestant -> backend in force (``eager`` swaps the modules, so its backend serves nothing)."""


def step_runner(name: str, dtype_name: str):
    """One yardstick train step (channels_last) for contestant ``name`` of ``STEP_CONTESTANTS``."""
    torch.manual_seed(0)
    model, diffusion = YARDSTICK.create()
    model.to(memory_format=torch.channels_last).train()
    gen = torch.Generator().manual_seed(0)
    x, kwargs = YARDSTICK.model_inputs(BATCH, "cpu", generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, diffusion.num_timesteps, (BATCH,), generator=gen)
    noise = torch.randn(x.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if dtype_name == "bf16" else contextlib.nullcontext()
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        swap = eager.eager_modules(model) if name == "eager" else contextlib.nullcontext()
        with ops.use_backend(STEP_CONTESTANTS[name]), swap:
            with autocast:
                losses = diffusion.training_losses(model, x, t, model_kwargs=kwargs, noise=noise)
            losses["loss"].mean().backward()
        optimizer.step()

    return step


def measure_steps(rounds: int, clock: Clock) -> list[dict]:
    records = []
    for dtype_name in DTYPES:
        contestants = [Contestant(n, step_runner(n, dtype_name)) for n in STEP_CONTESTANTS]
        result = measure_paired(
            contestants, torch.device("cpu"), rounds, warmup=2, min_round_s=0.0, clock=clock
        )
        ratios = {n: ratio(result, n) for n in ("auto", "cpp")}
        record = {
            "dtype": dtype_name,
            "layout": "channels_last",
            "median_s": {n: result.median(n) for n in result.samples},
            "samples_s": result.samples,
            "ratio_vs_eager": {n: vars(r) for n, r in ratios.items()},
            "load_average": load_average(),
        }
        records.append(record)
        medians = ", ".join(f"{n} {s * 1e3:.1f} ms" for n, s in record["median_s"].items())
        print(
            f"train step {YARDSTICK.name} batch {BATCH} {dtype_name} channels_last ({rounds} paired rounds): "
            f"{medians}; eager/auto {ratios['auto']}, eager/cpp {ratios['cpp']}",
            flush=True,
        )
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "ops", "step"), default="all")
    parser.add_argument("--rounds", type=int, default=9, help="paired rounds per op case")
    parser.add_argument("--min-round-s", type=float, default=0.01, help="seconds per op round")
    parser.add_argument("--step-rounds", type=int, default=15, help="paired rounds per train step")
    parser.add_argument("--kernels", nargs="*", choices=sorted(FASTDIFF_FUNCTIONS), help="ops to measure")
    parser.add_argument("--clock", choices=sorted(CLOCKS), help="cpu (default with 1 torch thread) or wall")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.step_rounds < 2:
        parser.error("--rounds and --step-rounds must be at least 2 (the spread needs two rounds)")
    clock_name = args.clock or ("cpu" if torch.get_num_threads() == 1 else "wall")
    if clock_name == "cpu" and torch.get_num_threads() != 1:
        parser.error(f"--clock cpu needs one torch thread (CPU seconds of {torch.get_num_threads()} add up)")
    clock = CLOCKS[clock_name]
    facts = cpu_facts()
    facts["clock"] = clock_name
    print(f"{header(facts)}; clock {clock_name}", flush=True)
    print(f"auto on this CPU: {facts['auto_policy']}", flush=True)
    out: dict = {"machine": facts}
    if args.part in ("all", "ops"):
        print("ratios eager/contestant: median [interquartile range of per-round ratios]; >1 beats eager")
        out["ops"] = measure_ops(args.rounds, args.min_round_s, args.kernels, clock)
        out["ops_weighted"] = weighted_summary(out["ops"])
        print("UNet-weighted (each shape's median x its calls per forward), eager/contestant:")
        for s in out["ops_weighted"]:
            cells = "  ".join(f"{n} {r:.2f}" for n, r in s["ratio_vs_eager"].items())
            print(f"  {s['kernel']:<28} {s['dtype']:<4} {s['layout']:<13} {s['pass']:<16} {cells}")
    if args.part in ("all", "step"):
        out["steps"] = measure_steps(args.step_rounds, clock)
    out["machine"]["load_average_end"] = load_average()
    print(f"load average at the end: {out['machine']['load_average_end']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
