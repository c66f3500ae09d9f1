"""Paired timing: alternatives measured in one process, in interleaved rounds, with medians and ratios.

Every contestant is warmed up first (``torch.compile`` compiles there; that first call is kept as
``first_call_s``), then the rounds run contestant after contestant, the order rotating each round so no
contestant always follows the same one. A round runs a contestant ``iterations`` times back to back, with
``iterations`` chosen from the warm-up so a round lasts about ``min_round_s``. On CUDA a round is timed with
CUDA events; on CPU with ``time.perf_counter``, or with another clock given as ``clock`` (e.g.
``time.process_time``: the CPU seconds of this process, which other processes on a shared machine disturb
far less than wall time when torch runs one thread).

Peak memory, per contestant, on its first call (so lazily created state, such as an optimizer's, counts):
the most bytes allocated at once during the call above what was allocated before it. On CUDA from
``torch.cuda.max_memory_allocated``; on CPU from torch.profiler's memory events (every CPU allocation and
free, in order). This counts tensor memory, not the process's resident set (allocator caches, code).
"""

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Runner = Callable[[], object]
Clock = Callable[[], float]


@dataclass
class Contestant:
    """One alternative: ``run()`` does one iteration; ``info`` goes into the results as is."""

    name: str
    run: Runner
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PairedResult:
    """Seconds per iteration of every round, per contestant, and what was measured beside the times."""

    samples: dict[str, list[float]]
    iterations: dict[str, int]
    first_call_s: dict[str, float]
    peak_memory_bytes: dict[str, int | None]
    memory_method: str
    info: dict[str, dict[str, Any]]
    errors: dict[str, str] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def speedup(self, name: str, baseline: str) -> float | None:
        """``median(baseline) / median(name)``: above 1 when ``name`` is faster; None without the baseline."""
        if baseline not in self.samples or not self.samples[name]:
            return None
        return self.median(baseline) / self.median(name)

    def contestant_records(self) -> dict[str, dict[str, Any]]:
        """Per contestant, for a results file: its median, samples, first call and peak memory with its
        info, or (one that failed) its error with its info."""
        records: dict[str, dict[str, Any]] = {}
        for name in self.samples:
            records[name] = {
                "median_s": self.median(name),
                "samples_s": self.samples[name],
                "first_call_s": self.first_call_s[name],
                "peak_memory_bytes": self.peak_memory_bytes.get(name),
                "info": self.info[name],
            }
        for name, error in self.errors.items():
            records[name] = {"error": error, "info": self.info[name]}
        return records


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(
    run: Runner, iterations: int, device: torch.device, clock: Clock = time.perf_counter
) -> float:
    """Seconds for ``iterations`` back-to-back calls of ``run`` (CUDA events on CUDA, else ``clock``)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iterations):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    begin = clock()
    for _ in range(iterations):
        run()
    return clock() - begin


# --- peak memory ----------------------------------------------------------------------------------


def _cpu_peak_allocated(run: Runner) -> int:
    """Peak of the bytes PyTorch's CPU allocator handed out during ``run()``, above what was live before.

    Read from torch.profiler's memory events (``profile_memory=True``): every allocation and free in the call,
    in time order. Blocks allocated before the call and freed during it are not reported by the profiler,
    so callers should not free state created earlier (the end-to-end step drops its gradients at its end).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        raise RuntimeError("this torch.profiler keeps no kineto_results; cannot read its memory events")
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in results.events()
        if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory(run: Runner, device: torch.device) -> tuple[int, str]:
    """(peak bytes allocated by the call ``run()`` above what was allocated before it, method description)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated above start"
    return _cpu_peak_allocated(run), "peak bytes allocated above start (torch.profiler memory events)"


# --- paired rounds --------------------------------------------------------------------------------


def measure_paired(
    contestants: list[Contestant],
    device: torch.device,
    rounds: int,
    warmup: int,
    min_round_s: float,
    with_memory: bool = False,
    clock: Clock = time.perf_counter,
) -> PairedResult:
    """Warm up each contestant (peak memory of its first call if ``with_memory``), then ``rounds``
    interleaved rounds, timed with ``clock`` on CPU."""
    if rounds < 1 or warmup < 1:
        raise ValueError(f"rounds and warmup must be positive, got rounds={rounds}, warmup={warmup}")
    names = [c.name for c in contestants]
    if len(set(names)) != len(names):
        raise ValueError(f"contestant names must be unique, got {names}")
    info = {c.name: dict(c.info) for c in contestants}
    contestants, first_call, errors, memory, method = _first_calls(contestants, device, with_memory)
    iterations: dict[str, int] = {}
    for contestant in contestants:
        last = first_call[contestant.name]
        for _ in range(warmup - 1):
            last = time_iterations(contestant.run, 1, device, clock)
        iterations[contestant.name] = max(1, math.ceil(min_round_s / max(last, 1e-9)))
    samples: dict[str, list[float]] = {c.name: [] for c in contestants}
    for index in range(rounds):
        shift = index % len(contestants)
        for contestant in contestants[shift:] + contestants[:shift]:
            count = iterations[contestant.name]
            samples[contestant.name].append(time_iterations(contestant.run, count, device, clock) / count)
    return PairedResult(
        samples=samples,
        iterations=iterations,
        first_call_s=first_call,
        peak_memory_bytes=memory,
        memory_method=method,
        info=info,
        errors=errors,
    )


def smoke_run(contestants: list[Contestant], device: torch.device) -> PairedResult:
    """Each contestant once (``--benchmark-disable``): proves every path runs; its single time is kept."""
    info = {c.name: dict(c.info) for c in contestants}
    ran, first, errors, _, _ = _first_calls(contestants, device, with_memory=False)
    return PairedResult(
        samples={name: [seconds] for name, seconds in first.items()},
        iterations={c.name: 1 for c in ran},
        first_call_s=first,
        peak_memory_bytes={},
        memory_method="not measured (smoke run)",
        info=info,
        errors=errors,
    )


def _first_calls(
    contestants: list[Contestant], device: torch.device, with_memory: bool
) -> tuple[list[Contestant], dict[str, float], dict[str, str], dict[str, int | None], str]:
    """Time each contestant's first call (and its peak memory if asked); one that raises is dropped and its
    error kept. Returns (contestants that ran, first-call seconds, errors, peak bytes, memory method)."""
    ran, first, errors, memory = [], {}, {}, {}
    method = "not measured"
    for contestant in contestants:
        seconds: list[float] = []

        def timed(run: Runner = contestant.run, out: list[float] = seconds) -> None:
            out.append(time_iterations(run, 1, device))

        try:
            if with_memory:
                memory[contestant.name], method = peak_memory(timed, device)
            else:
                timed()
        except Exception as error:  # a contestant that cannot run is a finding of the run, not its end
            errors[contestant.name] = f"{type(error).__name__}: {error}"[:1000]
            continue
        first[contestant.name] = seconds[0]
        ran.append(contestant)
    return ran, first, errors, memory, method


def feed_contestant(benchmark: Any, record: dict[str, Any], contestant: str, **extra: Any) -> None:
    """One contestant of a paired ``record`` (:meth:`PairedResult.contestant_records` under "contestants",
    beside "batch" and "memory_method") to pytest-benchmark: a failed contestant fails the test; else
    ``extra``, the record's batch and memory figures and the contestant's info go to ``extra_info`` and its
    samples to the fixture."""
    import pytest  # only the benchmark tests call this; the scripts sharing this module run without pytest

    entry = record["contestants"][contestant]
    if "error" in entry:
        pytest.fail(f"{contestant} failed on its first call: {entry['error']}")
    peak = entry["peak_memory_bytes"]
    benchmark.extra_info.update(
        **extra,
        batch=record["batch"],
        peak_memory_mib=None if peak is None else peak / 2**20,
        memory_method=record["memory_method"],
        **entry["info"],
    )
    feed_benchmark(benchmark, entry["samples_s"])


def feed_benchmark(benchmark: Any, seconds_per_iteration: list[float]) -> None:
    """Hand samples measured here to pytest-benchmark's fixture, so its tables and JSON show them.

    pytest-benchmark times only the callables it runs itself; paired, interleaved rounds need their samples
    handed over. This uses the fixture's ``_make_stats`` (pytest-benchmark 4 and 5).
    """
    benchmark._mode = "paired rounds (benchmarks.timing)"
    if benchmark.disabled:
        return
    make_stats = getattr(benchmark, "_make_stats", None)
    if make_stats is None:
        raise RuntimeError(
            "this pytest-benchmark has no BenchmarkFixture._make_stats; use pytest-benchmark 4 or 5"
        )
    stats = make_stats(1)
    for seconds in seconds_per_iteration:
        stats.update(seconds)
