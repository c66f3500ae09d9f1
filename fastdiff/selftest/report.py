"""The selftest's outputs: versions, ``selftest.json``, ``selftest.md`` and the printed summary."""

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fastdiff import ops
from fastdiff.ops import backend as backends
from fastdiff.ops import cpu_policy
from fastdiff.selftest.records import BASELINE_SLACK, ERROR_FACTOR, FLOOR_ULPS, STATUSES, Options, Result

SCHEMA = "fastdiff.selftest/1"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions(options: Options) -> dict[str, Any]:
    """torch, triton, CUDA, the GPU (name, architecture, memory) and fastdiff's backends."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "device": str(options.device),
        "fastdiff_backends": ops.available_backends(),
        "triton_interpreter": backends.TRITON_INTERPRET,
        "cpp_extension": "built" if backends.cpp_extension is not None else backends.CPP_IMPORT_ERROR,
        "cpu_threads": torch.get_num_threads(),
        "cpu_model": cpu_policy.cpu_model(),
        "cpu_auto": cpu_policy.describe(),
    }
    if options.is_cuda:
        props = torch.cuda.get_device_properties(options.device)
        info["gpu"] = {
            "name": props.name,
            "arch": f"sm_{props.major}{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
        }
    return info


def check_versions(options: Options) -> list[Result]:
    info = versions(options)
    gpu = info.get("gpu")
    where = f"CPU {info['cpu_model']} ({info['cpu_auto']['isa']}), {info['cpu_threads']} threads"
    if gpu:
        where = f"{gpu['name']} ({gpu['arch']}, {gpu['memory_gib']} GiB)"
    detail = (
        f"{where}; torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}; "
        f"backends {', '.join(info['fastdiff_backends'])}"
    )
    return [Result("versions", "versions", "info", detail, info)]


def summary(results: list[Result]) -> dict[str, Any]:
    counts = {status: sum(r.status == status for r in results) for status in STATUSES}
    failed = [r.name for r in results if r.status == "fail"]
    return {"counts": counts, "failed": failed, "ok": not failed}


def write_reports(
    results: list[Result], options: Options, seconds: float, group_seconds: dict[str, float], out: Path
) -> tuple[Path, Path]:
    """``selftest.json`` (schema ``SCHEMA``) and ``selftest.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "schema": SCHEMA,
        "options": {"device": str(options.device), "quick": options.quick},
        "seconds": round(seconds, 2),
        "group_seconds": {group: round(s, 2) for group, s in group_seconds.items()},
        "summary": summary(results),
        "results": [vars(r) for r in results],
    }
    json_path, md_path = out / "selftest.json", out / "selftest.md"
    json_path.write_text(json.dumps(document, indent=1, default=str) + "\n")
    md_path.write_text(markdown(results, options, seconds))
    return json_path, md_path


def markdown(results: list[Result], options: Options, seconds: float) -> str:
    verdict = summary(results)
    lines = [
        f"# fastdiff selftest on {options.device}{' (--quick)' if options.quick else ''}",
        "",
        f"{'PASSED' if verdict['ok'] else 'FAILED'} in {seconds:.0f} s: "
        + ", ".join(f"{n} {s}" for s, n in verdict["counts"].items()),
        "",
        f"Accuracy bound: max |kernel - float64| <= {ERROR_FACTOR:g} x the torch backend's error in the same "
        f"dtype + k x unit roundoff x max |float64| (k = {FLOOR_ULPS[torch.float32]:g} for float32, "
        f"{FLOOR_ULPS[torch.bfloat16]:g} for float16 and bfloat16); the torch backend itself must be within "
        f"one unit roundoff + {BASELINE_SLACK:.3g} x max |float64|.",
        "",
    ]
    for group in dict.fromkeys(r.group for r in results):
        lines += [f"## {group}", "", "| status | check | detail |", "|---|---|---|"]
        mine = [r for r in results if r.group == group]
        lines += [f"| {r.status} | {r.name} | {r.detail.replace('|', '/')} |" for r in mine]
        lines.append("")
    return "\n".join(lines)


def print_summary(results: list[Result], seconds: float, paths: tuple[Path, Path]) -> None:
    """One line per group (plus every info figure and every failure), then the verdict."""
    verdict = summary(results)
    for group in dict.fromkeys(r.group for r in results):
        mine = [r for r in results if r.group == group]
        counts = ", ".join(f"{n} {s}" for s in STATUSES if (n := sum(r.status == s for r in mine)))
        print(f"{group}: {counts}")
        for r in mine:
            if r.status in ("fail", "info") or (r.status == "skip" and group != "accuracy"):
                print(f"  {r.status.upper():4} {r.name}: {r.detail}")
    print(f"reports: {paths[0]}, {paths[1]}")
    if verdict["ok"]:
        print(f"selftest PASSED in {seconds:.0f} s")
    else:
        print(f"selftest FAILED in {seconds:.0f} s: {len(verdict['failed'])} failed check(s):")
        for name in verdict["failed"]:
            print(f"  {name}")
