"""The runner: plans each selected group, runs its checks while the budget lasts, and rewrites the reports
after every check, so that a run cut short (by the budget, a crash or a killed process) keeps what it did.

* The budget: a check starts only while ``budget`` seconds have not passed since the run began, and only
  while its group has time left of its allowance: the group's ``share`` of the budget (shares of the
  selected groups, normalised) plus whatever earlier groups left of theirs. So a group slower than
  planned (a cold compile cache) cannot starve the groups after it, and a fast one hands its time on.
  Every check that may not start is recorded ``not run`` (reason ``budget``). A started check runs to
  its end.
* A check that raises is recorded as ``error`` with its exception; the run goes on. When the exception
  left the CUDA device unusable (a kernel fault: synchronising raises again), every later check is
  recorded ``not run`` (reason ``crash``) instead of being tried.
* A process killed mid-check leaves the reports of the previous check, whose ``in_progress`` names the
  check that was running.
"""

import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from fastdiff.selftest import compiles, report
from fastdiff.selftest.groups import Group
from fastdiff.selftest.records import Check, Options, Result, not_run


def _cuda_usable(options: Options) -> bool:
    """False when the CUDA device is left unusable (a sticky fault); True on a CPU."""
    if not options.is_cuda:
        return True
    try:
        torch.cuda.synchronize(options.device)
    except RuntimeError:
        return False
    return True


def _error(group: str, name: str, error: BaseException) -> Result:
    last = traceback.format_exception_only(type(error), error)[-1].strip()
    return Result(group, name, "error", last, {"exception": type(error).__name__})


def _raising(error: Exception):
    """A check's ``run`` that raises ``error`` (a group whose planning crashed is recorded as one error)."""

    def run() -> Result:
        raise error

    return run


def run_check(group: str, check: Check, clock: compiles.CompileClock) -> Result:
    """Run one check: its Result with this group and name, timed (wall seconds less compile seconds) and
    its distinct compiles counted; an exception becomes an ``error`` Result."""
    count, compile_began, began = compiles.count(), clock.seconds, time.perf_counter()
    try:
        result = check.run()
    except Exception as error:  # a crashing check is recorded, and the run goes on
        result = _error(group, check.name, error)
    wall, compiling = time.perf_counter() - began, clock.seconds - compile_began
    return replace(
        result,
        group=group,
        name=check.name,
        seconds=round(max(wall - compiling, 0.0), 4),
        compile_seconds=round(compiling, 4),
        compiles=compiles.difference(count, compiles.count()),
    )


class Runner:
    """One selftest run: ``options``, ``budget`` seconds, reports under ``out``."""

    def __init__(self, options: Options, budget: float, out: Path, groups: Sequence[Group]) -> None:
        self.options, self.budget, self.out, self.groups = options, budget, out, list(groups)
        self.state = report.RunState(options, budget, [group.name for group in self.groups])
        self.clock = compiles.CompileClock()
        self.began = time.perf_counter()
        self.cuda_lost = ""  # the check whose crash left the CUDA device unusable
        self.count = compiles.count()
        shares = sum(group.share for group in self.groups)
        self.reserved = {group.name: budget * group.share / shares for group in self.groups}
        self.carried = 0.0  # seconds earlier groups left of their allowance

    def _write(self, markdown_too: bool = True) -> tuple[Path, Path]:
        began = time.perf_counter()
        self.state.seconds = began - self.began
        self.state.compile_seconds = self.clock.seconds
        paths = report.write_reports(self.state, self.out, markdown_too)
        self.state.write_seconds += time.perf_counter() - began
        return paths

    def _next(self, group: str, check: Check, allowance: float, group_began: float) -> Result:
        """Run ``check`` unless the budget or the group's ``allowance`` is spent, or the device lost."""
        if self.cuda_lost:
            detail = f"the CUDA device is unusable since {self.cuda_lost} crashed"
            return not_run(group, check.name, "crash", detail)
        now = time.perf_counter()
        if now - self.began >= self.budget:
            return not_run(group, check.name, "budget", f"the {self.budget:g} s budget was spent")
        if now - group_began >= allowance:
            detail = f"the group's {allowance:.1f} s of the {self.budget:g} s budget were spent"
            return not_run(group, check.name, "budget", detail)
        self.state.in_progress = {"group": group, "name": check.name}
        self._write(markdown_too=False)  # a process killed in the check leaves its name in the JSON
        result = run_check(group, check, self.clock)
        if result.status == "error" and not _cuda_usable(self.options):
            self.cuda_lost = f"{group}: {check.name}"
        return result

    def _run_group(self, group: Group) -> None:
        record = report.GroupRecord(group.summary)
        self.state.groups[group.name] = record
        count, keys = compiles.count(), compiles.keys()
        compile_began, began = self.clock.seconds, time.perf_counter()
        allowance = self.reserved[group.name] + self.carried
        record.allowance = round(allowance, 3)
        try:
            checks = group.plan(self.options)
        except Exception as error:  # the group could not even list its checks
            checks = [Check("plan", _raising(error))]
        for check in checks:
            result = self._next(group.name, check, allowance, began)
            self.state.add(result)
            report.print_result(result)
            self.state.in_progress = None
            record.compile_seconds = self.clock.seconds - compile_began
            record.seconds = time.perf_counter() - began - record.compile_seconds
            record.compiles = compiles.difference(count, compiles.count())
            after = compiles.keys()
            record.compile_keys = None if keys is None or after is None else sorted(after - keys)
            self.state.compiles = compiles.difference(self.count, compiles.count())
            self._write()
        self.carried = max(allowance - (time.perf_counter() - began), 0.0)
        report.print_group(group.name, record, self.state.results)

    def run(self) -> int:
        """Every group in order; the final reports; 0 when no check failed or crashed, else 1."""
        with self.clock.installed():
            self.began = time.perf_counter()  # the budget starts after the launch layer's import
            for group in self.groups:
                self._run_group(group)
        self.state.compiles = compiles.difference(self.count, compiles.count())
        self.state.finished = True
        paths = self._write()
        report.print_summary(self.state, paths)
        return 0 if report.summary(self.state.results)["ok"] else 1


def run(options: Options, budget: float, out: Path, groups: Sequence[Group]) -> int:
    """Run ``groups`` on ``options.device`` within ``budget`` seconds, reports under ``out``; the exit
    code."""
    return Runner(options, budget, out, groups).run()
