"""The two reports that need no GPU: Triton memory traffic (interpreter) and the compile report.

Each is a benchmark of one round (the time to produce the report); the rows go into the run's summary and
the targets of DESIGN.md section 5 into ``extra_info``. Neither asserts its targets: they are reported.
"""

import importlib.util
import time

import pytest

from benchmarks.compile_summary import StaleCache, compile_rows, family_summary
from benchmarks.session import RESULTS_DIR, BenchRun, cpu_count
from benchmarks.traffic_report import traffic_rows

requires_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


@requires_triton
def test_traffic_report(benchmark, bench: BenchRun):
    benchmark.group = "reports"
    start = time.perf_counter()
    rows = benchmark.pedantic(traffic_rows, kwargs={"jobs": cpu_count()}, rounds=1, iterations=1)
    bench.data["traffic"] = {"rows": rows, "seconds": time.perf_counter() - start}
    checked = [r for r in rows if r["floor_target_met"] is not None or r["eager_target_met"] is not None]
    missed = [
        f"{r['kernel']} {r['pass']} {r['dtype']} {r['case']}"
        for r in checked
        if r["floor_target_met"] is False or r["eager_target_met"] is False
    ]
    benchmark.extra_info.update(rows=len(rows), rows_with_targets=len(checked), targets_missed=missed)


@requires_triton
def test_compile_report(benchmark, bench: BenchRun):
    mode = bench.settings.compile_report
    if mode == "skip":
        pytest.skip("compile report skipped (--bench-compile-report skip)")
    benchmark.group = "reports"
    try:
        result = benchmark.pedantic(compile_rows, args=(mode, RESULTS_DIR), rounds=1, iterations=1)
    except StaleCache as error:
        pytest.skip(f"{error} (--bench-compile-report cached-only; use cached or fresh to compile, minutes)")
    bench.data["compile"] = result
    rows = result["rows"]
    benchmark.extra_info.update(
        source=result["source"],
        compiles=len(rows),
        failed=sum(1 for r in rows if r.get("error")),
        spilling=sum(1 for r in rows if not r.get("error") and r["spills"]),
        families=family_summary(rows),
    )
