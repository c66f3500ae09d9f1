"""Issue 4's memory figure: peak memory of a 64x64 UNet train step (attention at 32, 16, 8; batch 8).

fastdiff's attention against improved-diffusion's einsum attention, each in its own process, plus a
baseline whose attention keeps nothing, so attention's own share can be read off:
``(fastdiff - none) / (einsum - none)``. In fp32 and under bf16 autocast (fastdiff's ``--precision auto``
on CPUs with native bf16 and on Ampere or newer GPUs). Two peaks per run: the step's (bytes allocated
above the weights and optimizer state live before it: activations, gradients, temporaries) and the
process's resident peak, which adds the interpreter, the libraries and that state. Reported in
pytest-benchmark's extra_info and the run's data (``"attention_memory"``), never asserted. About a
minute per process on two CPU cores.

    pytest benchmarks/test_bench_attention_memory.py --benchmark-only
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.attention_memory_step import MODES, PRECISIONS, ratios
from benchmarks.session import BenchRun

ROOT = Path(__file__).resolve().parents[1]


def _run(mode: str, precision: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.attention_memory_step", mode, precision]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
    if done.returncode:
        pytest.fail(f"{mode} {precision} step failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["none", "einsum", "fastdiff"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_unet64_train_step_peak_memory(benchmark, bench: BenchRun, precision: str, mode: str):
    assert mode in MODES
    benchmark.group = f"UNet 64x64 train step peak memory, attention at 32/16/8, batch 8, {precision}"
    runs = bench.data.setdefault("attention_memory", {}).setdefault(precision, {})
    benchmark.pedantic(lambda: runs.__setitem__(mode, _run(mode, precision)), rounds=1, iterations=1)
    record = runs[mode]
    benchmark.extra_info.update(
        record, peak_mib=record["peak_bytes"] / 2**20, step_peak_mib=record["step_peak_bytes"] / 2**20
    )
    if mode == "fastdiff" and {"none", "einsum"} <= runs.keys():
        benchmark.extra_info.update(ratios(runs))
