"""pytest setup of the benchmark suite: options, the shared ``bench`` fixture, and the summary at the end.

    pytest benchmarks/ --benchmark-only              # the timed run; writes benchmarks/results/latest.*
    pytest benchmarks/ --benchmark-disable -q        # smoke: every path once; summary in a temp folder

Options (``--bench-*``) set the device, how many shapes per model, dtypes, rounds, DDIM steps, whether
``torch.compile`` competes, and how the compile report is obtained; defaults depend on the device.
"""

import pytest
import torch

from benchmarks.compile_summary import MODES
from benchmarks.report import write_summary
from benchmarks.session import BenchRun, BenchSettings, default_device, results_dir

_RUN = pytest.StashKey[BenchRun]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastdiff benchmarks")
    group.addoption(
        "--bench-device", choices=("cpu", "cuda"), help="device to benchmark (default: cuda if present)"
    )
    group.addoption(
        "--bench-shapes", type=int, help="heaviest shapes per model and op (default: cpu 1, cuda 2)"
    )
    group.addoption(
        "--bench-dtypes",
        help="comma-separated kernel dtypes: fp32,bf16,fp16 (default: cpu fp32, cuda fp32,bf16)",
    )
    group.addoption(
        "--bench-kernel-rounds",
        type=int,
        help="interleaved rounds per kernel group (default: cpu 5, cuda 20)",
    )
    group.addoption(
        "--bench-e2e-rounds",
        type=int,
        help="interleaved rounds per end-to-end group (default: cpu 5, cuda 10)",
    )
    group.addoption(
        "--bench-sampling-steps", type=int, default=5, help="DDIM steps of the sampling benchmark"
    )
    group.addoption(
        "--bench-no-compile", action="store_true", help="leave torch.compile out of the kernel groups"
    )
    group.addoption("--bench-no-profile", action="store_true", help="skip the torch.profiler breakdown")
    group.addoption(
        "--bench-compile-report",
        choices=MODES,
        help="compile report: cached (reuse the cache if the kernel sources match, else compile: minutes; "
        "the default), cached-only (else skip; the default of smoke runs), fresh, or skip",
    )
    group.addoption("--bench-results", help="folder for latest.json/md/png (default: benchmarks/results)")


def _settings(config: pytest.Config) -> BenchSettings:
    option = config.getoption
    device = torch.device(option("bench_device") or default_device().type)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: torch sees no CUDA device here")
    cuda = device.type == "cuda"
    smoke = bool(option("benchmark_disable", default=False))
    dtypes = tuple((option("bench_dtypes") or ("fp32,bf16" if cuda else "fp32")).split(","))
    return BenchSettings(
        device=device,
        shapes_per_config=option("bench_shapes") or (2 if cuda else 1),
        dtypes=dtypes,
        kernel_rounds=option("bench_kernel_rounds") or (20 if cuda else 5),
        kernel_min_round_s=0.05 if cuda else 0.02,
        e2e_rounds=option("bench_e2e_rounds") or (10 if cuda else 5),
        sampling_steps=option("bench_sampling_steps"),
        compile_contestant=not option("bench_no_compile"),
        compile_report=option("bench_compile_report") or ("cached-only" if smoke else "cached"),
        profile=not option("bench_no_profile"),
        results_dir=results_dir(option("bench_results"), smoke),
        smoke=smoke,
    )


def pytest_configure(config: pytest.Config) -> None:
    settings = _settings(config)
    unknown = [d for d in settings.dtypes if d not in ("fp32", "bf16", "fp16")]
    if unknown:
        raise pytest.UsageError(f"--bench-dtypes takes fp32, bf16 and fp16, got {unknown}")
    # Every kernel group compiles its own shapes; the default limit of 8 recompiles per function would
    # silently fall back to eager after a few groups.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    run = BenchRun(settings)
    config.stash[_RUN] = run
    config.pluginmanager.register(_SummaryPlugin(run), "fastdiff-bench-summary")


def bench_run(config: pytest.Config) -> BenchRun:
    return config.stash[_RUN]


@pytest.fixture(scope="session")
def bench(pytestconfig: pytest.Config) -> BenchRun:
    """The run's settings and collected results."""
    return bench_run(pytestconfig)


class _SummaryPlugin:
    """Records skip reasons and writes the summary when the session ends."""

    def __init__(self, run: BenchRun) -> None:
        self.run = run

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and report.when in ("setup", "call"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.run.data["skipped"].append(
                {"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")}
            )

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.run.has_results:
            return
        paths = write_summary(self.run.finish(), self.run.settings.results_dir)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("fastdiff benchmark summary: " + ", ".join(str(p) for p in paths))
