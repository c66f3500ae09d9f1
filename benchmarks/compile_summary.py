"""The compile report of ``fastdiff.kernels.report`` for the benchmark summary, cached on disk.

Compiling every Triton kernel configuration for sm_80 and sm_90 takes minutes on a small CPU, more than the
benchmark run's budget. The rows are therefore kept in ``compile_report.json`` beside the summary, keyed by
a hash of the kernel sources, the Triton version and the architectures; a run reuses them while the key
matches and recompiles (in ``os.cpu_count()`` processes) when it does not.

Each Triton minor version has its own file: ``compile_report.json`` for ``REFERENCE_TRITON`` (the Triton
CI installs) and ``compile_report_triton<major.minor>.json`` for the others (``OTHER_TRITONS``: what GPU
machines carry), so running under another Triton never overwrites the reference report. The tests check
every file in ``committed_reports``.
"""

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CACHE_NAME = "compile_report.json"
REFERENCE_TRITON = "3.9"
"""The Triton whose report is ``CACHE_NAME``: the one torch 2.13 (CI's) brings."""
OTHER_TRITONS: tuple[str, ...] = ("3.6",)
"""Older Tritons with a committed report of their own, which the tests check: 3.6 is torch 2.11's, what the
GPU machines in reach carry."""
KNOWN_SPILLS: dict[str, frozenset[str]] = {}
"""``kernel arch`` of the configurations that spill under an older Triton (none under ``REFERENCE_TRITON``),
listed so that the tests fail on any new spill and on any of these that is fixed (then drop it here); see
docs/install.md, "Known limits of older stacks"."""
MODES = ("cached", "cached-only", "fresh", "skip")
"""cached: reuse a matching cache, else compile; cached-only: reuse a matching cache, else skip;
fresh: always compile; skip: no compile report."""


def minor_version(version: str) -> str:
    """``"3.6.0"`` -> ``"3.6"``."""
    parts = version.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ValueError(f"triton version must look like MAJOR.MINOR[.PATCH], got {version!r}")
    return ".".join(parts[:2])


def cache_name(triton_version: str) -> str:
    """The report file for ``triton_version``: ``CACHE_NAME`` for ``REFERENCE_TRITON``, else
    ``compile_report_triton<major.minor>.json``."""
    minor = minor_version(triton_version)
    return CACHE_NAME if minor == REFERENCE_TRITON else f"compile_report_triton{minor}.json"


def committed_reports(results_dir: Path) -> dict[str, Path]:
    """``{minor version: report path}`` for ``REFERENCE_TRITON`` and every one of ``OTHER_TRITONS``."""
    return {v: Path(results_dir, cache_name(v)) for v in (REFERENCE_TRITON, *OTHER_TRITONS)}


class StaleCache(LookupError):
    """``cached-only`` found no cache matching the current kernel sources."""


def cache_key(archs: Sequence[int]) -> dict[str, Any]:
    """What the report depends on: the kernel sources' SHA-256, the Triton version and the architectures."""
    import fastdiff.kernels
    import triton

    digest = hashlib.sha256()
    root = Path(fastdiff.kernels.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return {"kernel_sources_sha256": digest.hexdigest(), "triton": triton.__version__, "archs": list(archs)}


def compile_rows(
    mode: str, cache_dir: Path, archs: Sequence[int] = (80, 90), jobs: int | None = None
) -> dict[str, Any]:
    """``{"rows": [...], "source": how they were obtained, "key": cache key, "seconds": compile time}``.

    ``mode``: ``cached`` reuses a matching cache file (else compiles), ``cached-only`` reuses it (else raises
    :class:`StaleCache`), ``fresh`` always compiles. Compiling rewrites the cache.
    """
    if mode not in MODES or mode == "skip":
        raise ValueError(f"mode must be 'cached', 'cached-only' or 'fresh', got {mode!r}")
    from fastdiff.kernels.report import compile_report

    key = cache_key(archs)
    cache = Path(cache_dir, cache_name(key["triton"]))
    if mode in ("cached", "cached-only") and cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            generated = stored.get("generated", "?")
            return {
                **stored,
                "source": f"from {cache.name} (compiled {generated}; kernel sources unchanged since)",
            }
    if mode == "cached-only":
        raise StaleCache(
            f"no compile report in {cache} matches the current kernel sources and triton version"
        )
    start = time.perf_counter()
    rows = compile_report(archs, jobs=jobs or os.cpu_count() or 1)
    result = {
        "key": key,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=1))
    return {**result, "source": f"compiled now ({result['seconds']} s)"}


def family_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per kernel family (name before '[') and architecture: configs, failures, max registers, spills,
    shared memory and local memory."""
    families: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["kernel"].split("[")[0], row["arch"])
        entry = families.setdefault(
            key,
            {
                "family": key[0],
                "arch": key[1],
                "configs": 0,
                "failed": 0,
                "max_registers": 0,
                "max_spill_bytes": 0,
                "with_spills": 0,
                "max_shared_bytes": 0,
                "max_local_bytes": 0,
            },
        )
        entry["configs"] += 1
        if row.get("error"):
            entry["failed"] += 1
            continue
        entry["max_registers"] = max(entry["max_registers"], row["registers"])
        entry["max_spill_bytes"] = max(entry["max_spill_bytes"], row["spills"])
        entry["with_spills"] += 1 if row["spills"] else 0
        entry["max_shared_bytes"] = max(entry["max_shared_bytes"], row["shared"])
        entry["max_local_bytes"] = max(entry["max_local_bytes"], row["local"])
    return list(families.values())
