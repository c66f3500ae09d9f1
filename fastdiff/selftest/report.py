"""The selftest's outputs: ``selftest.json`` and ``selftest.md``, rewritten atomically after every check
(a temporary file in the same directory, then ``os.replace``), and the printed summary."""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastdiff.selftest.records import BASELINE_SLACK, ERROR_FACTOR, FLOOR_ULPS, STATUSES, Options, Result

SCHEMA = "fastdiff.selftest/2"
JSON_NAME, MD_NAME = "selftest.json", "selftest.md"


@dataclass
class GroupRecord:
    """One group's totals: wall ``seconds`` (compiles excluded), ``compile_seconds``, distinct Triton
    ``compiles`` and the new ``compile_keys`` (None: the launch layer cannot count them), and the
    ``allowance`` of the budget it had (its share plus what earlier groups left)."""

    summary: str
    seconds: float = 0.0
    compile_seconds: float = 0.0
    compiles: int | None = None
    compile_keys: list[str] | None = None
    allowance: float | None = None


@dataclass
class RunState:
    """Everything the reports hold, as it stands after the latest check."""

    options: Options
    budget: float
    selected: list[str]
    results: list[Result] = field(default_factory=list)
    groups: dict[str, GroupRecord] = field(default_factory=dict)
    seconds: float = 0.0
    compile_seconds: float = 0.0
    compiles: int | None = None
    in_progress: dict[str, str] | None = None
    finished: bool = False
    write_seconds: float = 0.0
    json_rows: list[str] = field(default_factory=list)
    md_rows: list[str] = field(default_factory=list)

    def add(self, result: Result) -> None:
        """Append ``result``, rendered once for each report (a rewrite then costs a join, not a render of
        every result so far)."""
        self.results.append(result)
        self.json_rows.append(json.dumps(asdict(result), default=str))
        detail = result.detail.replace("|", "/").replace("\n", " ")
        times = f"{result.seconds:.2f} | {result.compile_seconds:.2f}"
        self.md_rows.append(f"| {result.status} | {result.name} | {detail} | {times} |")


def summary(results: list[Result]) -> dict[str, Any]:
    """Counts per status, the failed or crashed checks (``group: name``), ``ok`` (none failed) and how
    many were not run for lack of budget."""
    counts = {status: sum(r.status == status for r in results) for status in STATUSES}
    failed = [f"{r.group}: {r.name}" for r in results if r.status in ("fail", "error")]
    cut = sum(r.status == "not run" and r.data.get("reason") == "budget" for r in results)
    return {"counts": counts, "failed": failed, "ok": not failed, "not_run_budget": cut}


def verdict(results: list[Result]) -> str:
    """FAILED (a check failed or crashed), INCOMPLETE (none failed, the budget cut some), or PASSED."""
    found = summary(results)
    return "FAILED" if not found["ok"] else "INCOMPLETE" if found["not_run_budget"] else "PASSED"


def document(state: RunState) -> str:
    """The JSON document (schema ``SCHEMA``): the run's header, then ``results``, one line each."""
    header = json.dumps(_header(state), indent=1, default=str)
    rows = ",\n  ".join(state.json_rows)
    return header.removesuffix("\n}") + f',\n "results": [\n  {rows}\n ]\n}}\n'


def _header(state: RunState) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "options": {
            "device": str(state.options.device),
            "quick": state.options.quick,
            "budget_s": state.budget,
            "groups": state.selected,
        },
        "finished": state.finished,
        "in_progress": state.in_progress,
        "verdict": verdict(state.results),
        "seconds": round(state.seconds, 3),
        "compile_seconds": round(state.compile_seconds, 3),
        "compiles": state.compiles,
        "report_write_seconds": round(state.write_seconds, 3),
        "groups": {name: asdict(record) for name, record in state.groups.items()},
        "summary": summary(state.results),
    }


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: readers (and a process killed mid-write) see the old file or
    the new one, never a part."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_reports(state: RunState, out: Path, markdown_too: bool = True) -> tuple[Path, Path]:
    """Rewrite ``selftest.json`` and (with ``markdown_too``) ``selftest.md`` under ``out`` from ``state``."""
    json_path, md_path = out / JSON_NAME, out / MD_NAME
    _replace(json_path, document(state))
    if markdown_too:
        _replace(md_path, markdown(state))
    return json_path, md_path


def _count(value: int | None) -> str:
    return "unavailable" if value is None else str(value)


def markdown(state: RunState) -> str:
    results, options = state.results, state.options
    found = summary(results)
    status = verdict(results) if state.finished else "RUNNING (or killed)"
    lines = [
        f"# fastdiff selftest on {options.device}{' (--quick)' if options.quick else ''}",
        "",
        f"{status} after {state.seconds:.0f} s of a {state.budget:.0f} s budget "
        f"({state.compile_seconds:.0f} s compiling, distinct Triton compiles: {_count(state.compiles)}): "
        + ", ".join(f"{n} {s}" for s, n in found["counts"].items()),
        "",
    ]
    if state.in_progress:
        lines += [f"Running: {state.in_progress['group']}: {state.in_progress['name']}", ""]
    lines += [
        f"Accuracy bound: max |kernel - float64| <= {ERROR_FACTOR:g} x the torch backend's error in the same "
        f"dtype + k x unit roundoff x max |float64| (k = {FLOOR_ULPS[torch.float32]:g} for float32, "
        f"{FLOOR_ULPS[torch.bfloat16]:g} for float16 and bfloat16); the torch backend itself must be within "
        f"one unit roundoff + {BASELINE_SLACK:.3g} x max |float64|. A check marked `not run` was not run "
        "(never a pass); its detail says why.",
        "",
        "| group | checks | seconds | compile s | compiles |",
        "|---|---|---|---|---|",
    ]
    for name, record in state.groups.items():
        counts = ", ".join(
            f"{n} {s}" for s in STATUSES if (n := sum(r.group == name and r.status == s for r in results))
        )
        lines.append(
            f"| {name} | {counts} | {record.seconds:.1f} | {record.compile_seconds:.1f} | "
            f"{_count(record.compiles)} |"
        )
    lines.append("")
    for name, record in state.groups.items():
        lines += [f"## {name}", "", record.summary, "", "| status | check | detail | s | compile s |"]
        lines.append("|---|---|---|---|---|")
        lines += [row for r, row in zip(results, state.md_rows, strict=True) if r.group == name]
        lines.append("")
    return "\n".join(lines)


def print_group(name: str, record: GroupRecord, results: list[Result]) -> None:
    """One line for a finished group: counts, seconds, compile seconds, compiles."""
    mine = [r for r in results if r.group == name]
    counts = ", ".join(f"{n} {s}" for s in STATUSES if (n := sum(r.status == s for r in mine)))
    print(
        f"[{name}: {counts or 'no checks'}; {record.seconds:.1f} s + {record.compile_seconds:.1f} s "
        f"compiling; compiles {_count(record.compiles)}]",
        flush=True,
    )


def print_result(result: Result) -> None:
    """Failures, errors and figures as they happen (passes are counted per group)."""
    if result.status in ("fail", "error", "info"):
        print(f"  {result.status.upper():5} {result.group}: {result.name}: {result.detail}", flush=True)


def print_summary(state: RunState, paths: tuple[Path, Path]) -> None:
    """The verdict, the failed checks, and what the budget left out."""
    found = summary(state.results)
    print(f"reports: {paths[0]}, {paths[1]}")
    print(
        f"compile seconds {state.compile_seconds:.1f} of {state.seconds:.1f} s; "
        f"distinct Triton compiles {_count(state.compiles)}"
    )
    word = verdict(state.results)
    if word == "FAILED":
        print(f"selftest FAILED in {state.seconds:.0f} s: {len(found['failed'])} failed check(s):")
        for name in found["failed"]:
            print(f"  {name}")
    elif word == "INCOMPLETE":
        print(
            f"selftest INCOMPLETE in {state.seconds:.0f} s: nothing failed, {found['not_run_budget']} "
            f"check(s) not run: the {state.budget:g} s budget was spent (rerun with a larger --budget "
            "or --only GROUPS)"
        )
    else:
        reasons = [r.data.get("reason", "") for r in state.results if r.status == "not run"]
        left = ", ".join(f"{reasons.count(reason)} {reason}" for reason in dict.fromkeys(reasons))
        print(
            f"selftest PASSED in {state.seconds:.0f} s"
            + (f" ({len(reasons)} not run: {left})" if left else "")
        )
