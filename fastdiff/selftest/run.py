"""The list of checks, run in order, and the exit code."""

import time
from pathlib import Path

import torch

from fastdiff.selftest import numerics, report, timing, train_step
from fastdiff.selftest.records import Check, Options, Result, guarded

CHECKS: list[tuple[str, Check]] = [
    ("versions", report.check_versions),
    ("compile", timing.check_first_call),  # first: these are the process's first calls of each op
    ("accuracy", numerics.check_accuracy),
    ("configs", numerics.check_configs),
    ("determinism", numerics.check_determinism),
    ("timing", timing.check_timings),
    ("train_step", train_step.check_train_step),
    ("large", numerics.check_large),  # last: a kernel faulting on 64-bit offsets would end the process
]


def run_checks(options: Options, checks: list[tuple[str, Check]]) -> tuple[list[Result], dict[str, float]]:
    """Each check's results in order, and the seconds each group took; failures are printed at once."""
    results, seconds = [], {}
    for group, check in checks:
        began = time.perf_counter()
        for result in guarded(group, check, options):
            results.append(result)
            if result.status == "fail":
                print(f"FAIL {result.name}: {result.detail}", flush=True)
        seconds[group] = seconds.get(group, 0.0) + time.perf_counter() - began
        print(f"[{group}: {seconds[group]:.1f} s]", flush=True)
    return results, seconds


def run(device: torch.device, quick: bool, out: Path, checks: list[tuple[str, Check]] = CHECKS) -> int:
    """Run ``checks`` on ``device``, write the reports under ``out``; 0 when nothing failed, else 1."""
    options = Options(device, quick)
    began = time.perf_counter()
    results, group_seconds = run_checks(options, checks)
    seconds = time.perf_counter() - began
    paths = report.write_reports(results, options, seconds, group_seconds, out)
    report.print_summary(results, seconds, paths)
    return 0 if report.summary(results)["ok"] else 1
