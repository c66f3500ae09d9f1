"""Issue 4's memory figure: peak memory of a 64x64 UNet train step (attention at 32, 16, 8; batch 8).

fastdiff's attention against improved-diffusion's einsum attention, each in its own process, plus a
baseline whose attention keeps nothing, so attention's own share can be read off:
``(fastdiff - none) / (einsum - none)``. Two peaks: the step's (bytes allocated above the weights and
optimizer state live before it: activations, gradients, temporaries), the figure; and the process's
resident peak, which adds the interpreter, the libraries and that state. Reported in pytest-benchmark's
extra_info, never asserted.
About a minute per process on two CPU cores.

    pytest benchmarks/test_bench_attention_memory.py --benchmark-only
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.attention_memory_step import MODES

ROOT = Path(__file__).resolve().parents[1]
_peaks: dict[str, dict] = {}


def _run(mode: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.attention_memory_step", mode]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
    if done.returncode:
        pytest.fail(f"{mode} step failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["none", "einsum", "fastdiff"])
def test_unet64_train_step_peak_memory(benchmark, mode):
    assert mode in MODES
    benchmark.group = "UNet 64x64 train step peak memory, attention at 32/16/8, batch 8"
    benchmark.pedantic(lambda: _peaks.__setitem__(mode, _run(mode)), rounds=1, iterations=1)
    record = _peaks[mode]
    benchmark.extra_info.update(
        record, peak_mib=record["peak_bytes"] / 2**20, step_peak_mib=record["step_peak_bytes"] / 2**20
    )
    if mode == "fastdiff" and {"none", "einsum"} <= _peaks.keys():
        base, einsum = _peaks["none"], _peaks["einsum"]
        for key, label in (("step_peak_bytes", "step"), ("peak_bytes", "process")):
            benchmark.extra_info.update(
                {
                    f"{label}_peak_vs_einsum": record[key] / einsum[key],
                    f"{label}_attention_share_vs_einsum": (record[key] - base[key])
                    / (einsum[key] - base[key]),
                }
            )
