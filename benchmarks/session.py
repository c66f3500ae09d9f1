"""State of one benchmark run: its settings (from the command line) and what it has measured so far."""

import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import load_average, machine_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOKE_RESULTS_DIR = Path(tempfile.gettempdir()) / "fastdiff-bench-smoke"


@dataclass(frozen=True)
class BenchSettings:
    """How much to measure. CPU defaults keep a whole run within minutes on a 2-core machine.

    ``smoke``: pytest-benchmark is disabled (``--benchmark-disable``): every path runs once, nothing is timed.
    """

    device: torch.device
    shapes_per_config: int
    dtypes: tuple[str, ...]
    kernel_rounds: int
    kernel_min_round_s: float
    e2e_rounds: int
    sampling_steps: int
    compile_contestant: bool
    compile_report: str
    profile: bool
    results_dir: Path
    smoke: bool

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchRun:
    """Settings, the paired measurements made so far (shared by the tests of one group) and the summary."""

    settings: BenchSettings
    started: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)
    _paired: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = {
            "machine": machine_info(),
            "run": {
                "command": " ".join(["pytest", *sys.argv[1:]]),
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)),
                "device": str(self.settings.device),
                "load_before": load_average(),
                "smoke": self.settings.smoke,
                "settings": {k: str(v) for k, v in self.settings.__dict__.items()},
            },
            "kernels": [],
            "end_to_end": [],
            "traffic": None,
            "compile": None,
            "skipped": [],
        }

    def paired(self, key: str, measure: Callable[[], Any]) -> Any:
        """The measurement of group ``key``: made by ``measure()`` for the group's first test, then reused.

        A failed measurement is remembered too, so the group's other tests fail the same way without
        measuring again.
        """
        if key not in self._paired:
            try:
                self._paired[key] = ("ok", measure())
            except Exception as error:
                self._paired[key] = ("error", error)
        status, value = self._paired[key]
        if status == "error":
            raise RuntimeError(f"the paired measurement of {key!r} failed: {value!r}") from value
        return value

    def finish(self) -> dict[str, Any]:
        """The summary data with the run's duration and the load average now."""
        self.data["run"]["duration_s"] = round(time.time() - self.started, 1)
        self.data["run"]["load_after"] = load_average()
        return self.data

    @property
    def has_results(self) -> bool:
        d = self.data
        return bool(
            d["kernels"]
            or d["end_to_end"]
            or d["traffic"]
            or d["compile"]
            or d.get("diffusers")
            or d.get("group_norm_cpu")
            or d.get("attention_memory")
            or d.get("quality")
        )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def results_dir(option: str | None, smoke: bool) -> Path:
    """Where the summary goes: the option, else ``benchmarks/results`` (a temporary folder for smoke runs)."""
    if option:
        return Path(option)
    return SMOKE_RESULTS_DIR if smoke else RESULTS_DIR


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
