"""python -m fastdiff.selftest: the budget (checks it cuts are not run, never passed), the reports rewritten
after every check (a crash or a killed process keeps what was done), --only/--skip, the compile counter,
the --quick run on the CPU, and the errors for bad input."""

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastdiff import ops
from fastdiff.ops import backend as backends
from fastdiff.selftest import accuracy, compiles, run, timing
from fastdiff.selftest.__main__ import main
from fastdiff.selftest.cases import NORM_OPS, OpCase, as_float64, forward_backward
from fastdiff.selftest.groups import NAMES, select
from fastdiff.selftest.records import STATUSES, Check, Options, Result, compare
from fastdiff.selftest.report import SCHEMA

ROOT = Path(__file__).resolve().parents[1]
CPU = Options(torch.device("cpu"), quick=True)


@dataclass(frozen=True)
class Planned:
    """A group for the runner with fixed checks (what ``groups.Group`` gives after planning)."""

    name: str
    checks: tuple[Check, ...]
    summary: str = "a test group"
    share: float = 1.0

    def plan(self, options: Options) -> list[Check]:
        return list(self.checks)


def _passing(name: str = "") -> Result:
    return Result("", name, "pass", "fine")


def _load(out: Path) -> dict:
    return json.loads((out / "selftest.json").read_text())


def _statuses(document: dict) -> list[tuple[str, str, str]]:
    return [(r["group"], r["name"], r["status"]) for r in document["results"]]


# --- the budget ------------------------------------------------------------------------------------


def test_checks_past_the_budget_are_not_run_never_passed(tmp_path):
    def slow() -> Result:
        time.sleep(0.3)
        return _passing()

    ran = []
    groups = [
        Planned("a", (Check("slow", slow), Check("late", lambda: ran.append("late") or _passing()))),
        Planned("b", (Check("later", lambda: ran.append("later") or _passing()),)),
    ]
    assert run.run(CPU, 0.2, tmp_path, groups) == 0  # nothing failed ...
    document = _load(tmp_path)
    assert ran == []  # ... and nothing started after the budget was spent
    assert _statuses(document) == [("a", "slow", "pass"), ("a", "late", "not run"), ("b", "later", "not run")]
    cut = [r for r in document["results"] if r["status"] == "not run"]
    assert all(r["data"]["reason"] == "budget" and "0.2 s budget" in r["detail"] for r in cut)
    assert document["verdict"] == "INCOMPLETE" and document["finished"] is True
    assert document["summary"]["not_run_budget"] == 2 and document["summary"]["counts"]["pass"] == 1
    markdown = (tmp_path / "selftest.md").read_text()
    assert (
        markdown.startswith("# fastdiff selftest")
        and "INCOMPLETE" in markdown
        and "| not run | later |" in markdown
    )


def test_a_slow_group_cannot_starve_the_groups_after_it(tmp_path):
    def slow() -> Result:
        time.sleep(0.4)
        return _passing()

    groups = [
        Planned("a", (Check("slow", slow), Check("more", _passing)), share=0.25),
        Planned("b", (Check("own share", _passing),), share=0.75),
    ]
    run.run(CPU, 1.0, tmp_path, groups)
    document = _load(tmp_path)
    assert _statuses(document) == [
        ("a", "slow", "pass"),
        ("a", "more", "not run"),
        ("b", "own share", "pass"),
    ]
    assert "the group's 0.2 s of the 1 s budget were spent" in document["results"][1]["detail"]
    assert document["groups"]["a"]["allowance"] == 0.25 and document["groups"]["b"]["allowance"] == 0.75


def test_time_a_group_leaves_goes_to_the_next(tmp_path):
    def slow() -> Result:
        time.sleep(0.3)
        return _passing()

    groups = [
        Planned("fast", (Check("quick", _passing),), share=0.8),
        Planned("b", (Check("slow", slow), Check("after", _passing)), share=0.2),
    ]
    run.run(CPU, 1.0, tmp_path, groups)
    document = _load(tmp_path)
    # b's own 0.2 s are spent by the slow check; what "fast" left (~0.8 s) lets the next one start
    assert _statuses(document)[1:] == [("b", "slow", "pass"), ("b", "after", "pass")]
    assert 0.9 < document["groups"]["b"]["allowance"] <= 1.0


def test_a_tiny_budget_lists_every_group_as_not_run(tmp_path, capsys):
    assert main(["--device", "cpu", "--quick", "--budget", "1e-9", "--out", str(tmp_path)]) == 0
    document = _load(tmp_path)
    assert [g for g in document["groups"]] == list(NAMES)
    assert document["results"] and all(r["status"] == "not run" for r in document["results"])
    assert {r["group"] for r in document["results"]} == set(NAMES)  # every group planned its checks
    assert "selftest INCOMPLETE" in capsys.readouterr().out


# --- reports after every check, crashes, a killed process -------------------------------------------


def test_reports_are_rewritten_after_every_check(tmp_path):
    seen = []

    def look() -> Result:  # what is on disk while the second check runs
        document = _load(tmp_path)
        seen.append((_statuses(document), document["in_progress"], document["finished"]))
        return _passing()

    assert run.run(CPU, 60, tmp_path, [Planned("g", (Check("first", _passing), Check("second", look)))]) == 0
    assert seen == [([("g", "first", "pass")], {"group": "g", "name": "second"}, False)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selftest.json", "selftest.md"]  # no temp files


def test_a_crash_is_an_error_and_keeps_what_came_before(tmp_path, capsys):
    def crash() -> Result:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def wrong() -> Result:
        case = OpCase("group_norm_silu", (2, 8, 3, 5), torch.float32, 4)
        inputs = case.inputs(CPU.device, torch.Generator().manual_seed(0))
        expected = forward_backward(case, as_float64(inputs), "torch")
        actual, baseline = forward_backward(case, inputs, "cpp"), forward_backward(case, inputs, "torch")
        actual["grad_x"] = actual["grad_x"] * (1 + 1e-4)  # a kernel off by 1e-4: the bound must catch it
        return compare("", "", actual, expected, baseline, torch.float32)

    groups = [
        Planned("a", (Check("before", _passing), Check("crash", crash), Check("after", _passing))),
        Planned("b", (Check("wrong", wrong),)),
    ]
    assert run.run(CPU, 60, tmp_path, groups) == 1
    document = _load(tmp_path)
    assert _statuses(document) == [
        ("a", "before", "pass"),
        ("a", "crash", "error"),
        ("a", "after", "pass"),
        ("b", "wrong", "fail"),
    ]
    crashed = document["results"][1]
    assert crashed["detail"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert document["summary"]["failed"] == ["a: crash", "b: wrong"] and document["verdict"] == "FAILED"
    assert "grad_x error" in document["results"][3]["detail"]
    printed = capsys.readouterr().out
    assert "selftest FAILED" in printed and "illegal memory access" in printed


def test_a_lost_cuda_device_stops_the_checks_after_the_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "_cuda_usable", lambda options: False)  # a sticky fault: syncing raises again

    def fault() -> Result:
        raise RuntimeError("CUDA error: unspecified launch failure")

    ran = []
    groups = [
        Planned("a", (Check("ok", _passing), Check("fault", fault))),
        Planned("b", (Check("next", lambda: ran.append(1) or _passing()),)),
    ]
    assert run.run(CPU, 60, tmp_path, groups) == 1
    document = _load(tmp_path)
    assert ran == [] and _statuses(document)[-1] == ("b", "next", "not run")
    last = document["results"][-1]
    assert last["data"]["reason"] == "crash" and "since a: fault crashed" in last["detail"]


def test_a_group_whose_planning_crashes_is_one_error(tmp_path):
    class Broken(Planned):
        def plan(self, options):
            raise ValueError("cannot list checks")

    groups = [Planned("a", (Check("ok", _passing),)), Broken("b", ())]
    assert run.run(CPU, 60, tmp_path, groups) == 1
    assert _statuses(_load(tmp_path)) == [("a", "ok", "pass"), ("b", "plan", "error")]


def test_a_killed_process_leaves_the_reports_of_the_checks_before(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        import torch
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_selftest import Planned, _passing
        from fastdiff.selftest import run
        from fastdiff.selftest.records import Check, Options

        def die():
            os._exit(9)  # no exception, no cleanup: as a kernel fault or the OOM killer ends a process

        groups = [Planned("a", (Check("done", _passing), Check("dies", die), Check("never", _passing)))]
        run.run(Options(torch.device("cpu"), True), 60, Path({str(tmp_path)!r}), groups)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 9, done.stderr[-2000:]
    document = _load(tmp_path)
    assert _statuses(document) == [("a", "done", "pass")]
    assert document["in_progress"] == {"group": "a", "name": "dies"} and document["finished"] is False
    assert "| pass | done |" in (tmp_path / "selftest.md").read_text()


# --- timing and compile counts ----------------------------------------------------------------------


def test_compile_seconds_are_reported_apart_from_run_seconds(tmp_path):
    def compiling() -> Result:
        time.sleep(0.05)
        compiles.add_compile_seconds(0.2)  # what a torch.compile first call reports
        return _passing()

    run.run(CPU, 60, tmp_path, [Planned("g", (Check("c", compiling),))])
    document = _load(tmp_path)
    result = document["results"][0]
    assert result["compile_seconds"] == pytest.approx(0.2)
    assert result["seconds"] == 0.0  # the wall time (0.05 s) less the 0.2 s declared compiling, floored
    assert document["groups"]["g"]["compile_seconds"] == pytest.approx(0.2)
    assert document["compile_seconds"] == pytest.approx(0.2)


def test_compile_counts_come_from_the_launch_layer_when_it_counts(tmp_path, monkeypatch):
    launch = compiles.launch_layer()
    assert launch is not None
    keys: list[str] = []
    monkeypatch.setattr(launch, "compile_count", lambda: len(keys), raising=False)
    monkeypatch.setattr(launch, "compile_keys", lambda: list(keys), raising=False)

    def compiling(*new: str):
        return lambda: keys.extend(new) or _passing()

    groups = [
        Planned("a", (Check("two", compiling("k1", "k2")), Check("none", compiling()))),
        Planned("b", (Check("one", compiling("k3")),)),
    ]
    run.run(CPU, 60, tmp_path, groups)
    document = _load(tmp_path)
    assert [r["compiles"] for r in document["results"]] == [2, 0, 1]
    assert document["groups"]["a"]["compiles"] == 2 and document["groups"]["a"]["compile_keys"] == [
        "k1",
        "k2",
    ]
    assert document["groups"]["b"]["compile_keys"] == ["k3"] and document["compiles"] == 3


def test_a_first_call_is_compile_time_counted_once():
    """A ``torch.compile`` first call is compile time; Triton compiles inside it are not counted twice."""
    clock = compiles.CompileClock()

    def first_call() -> None:
        compiles.add_compile_seconds(0.1)  # a Triton compile inside, counted by the launch clock
        time.sleep(0.15)

    with clock.installed():
        assert timing.compiled_first_call(first_call, torch.device("cpu")) >= 0.15
    assert clock.seconds == pytest.approx(0.15, abs=0.04)
    compiles.add_compile_seconds(1.0)  # outside a runner: counted nowhere
    assert clock.seconds == pytest.approx(0.15, abs=0.04)


@pytest.mark.parametrize("counted", [False, True])
def test_the_compile_clock_times_the_launches_that_compile(monkeypatch, counted):
    """A launch that compiles spends its time on the host before it returns; one that does not returns at
    once. Which launches compiled: the launch layer's counter (``counted``), else the first launch of each
    compile key. CPU (interpreted) launches never compile."""
    built: set[tuple] = set()

    def run(kernel, grid, args, constexprs, *, like, config=None):
        key = (kernel.name, tuple(constexprs.items()), like.device.type)
        if like.device.type == "cuda" and key not in built:
            built.add(key)
            time.sleep(0.05)  # the compile
        return "config"

    fake = SimpleNamespace(run=run)
    if counted:
        fake.compile_count = lambda: len(built)
    monkeypatch.setattr(compiles, "launch_layer", lambda: fake)
    cuda, cpu = SimpleNamespace(device=torch.device("cuda", 0)), SimpleNamespace(device=torch.device("cpu"))
    kernel = SimpleNamespace(name="gn_fwd")
    clock = compiles.CompileClock()
    with clock.installed():
        for like, block, compiled in [
            (cuda, 64, True),
            (cuda, 64, False),
            (cuda, 128, True),
            (cpu, 256, False),
        ]:
            before = clock.seconds
            assert fake.run(kernel, (1,), (3,), {"BLOCK": block}, like=like) == "config"
            assert (clock.seconds - before >= 0.05) == compiled
    assert fake.run is run  # restored
    assert clock.seconds == pytest.approx(0.1, abs=0.05)


def test_compile_counts_are_unavailable_without_the_counter(tmp_path, monkeypatch):
    launch = compiles.launch_layer()
    for name in ("compile_count", "compile_keys"):
        monkeypatch.delattr(launch, name, raising=False)
    run.run(CPU, 60, tmp_path, [Planned("g", (Check("c", _passing),))])
    document = _load(tmp_path)
    assert document["compiles"] is None and document["results"][0]["compiles"] is None
    assert document["groups"]["g"]["compiles"] is None
    assert "compiles: unavailable" in (tmp_path / "selftest.md").read_text()


# --- --only / --skip --------------------------------------------------------------------------------


def test_only_and_skip_select_groups_in_priority_order():
    assert [g.name for g in select(None, None)] == list(NAMES)
    assert [g.name for g in select(["large", "versions"], None)] == ["versions", "large"]
    assert [g.name for g in select(None, ["all_configs", "large"])] == list(NAMES[:5])
    assert [g.name for g in select(["accuracy", "large"], ["large"])] == ["accuracy"]


@pytest.mark.parametrize("quick", [True, False])
def test_every_group_plans_uniquely_named_checks(quick):
    """Names are what --only reruns and what the reports key on; planning runs nothing."""
    options = Options(torch.device("cpu"), quick)
    for group in select(None, None):
        names = [check.name for check in group.plan(options)]
        assert names and len(set(names)) == len(names), group.name


def test_only_reruns_one_group(tmp_path):
    assert main(["--device", "cpu", "--quick", "--only", "versions", "--out", str(tmp_path)]) == 0
    document = _load(tmp_path)
    assert document["options"]["groups"] == ["versions"] and list(document["groups"]) == ["versions"]
    assert {r["group"] for r in document["results"]} == {"versions"}
    versions = document["results"][0]["data"]
    assert versions["torch"] == torch.__version__ and versions["python"] == ".".join(
        map(str, sys.version_info[:3])
    )


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--budget", "0"], "--budget must be positive and finite, got 0.0"),
        (["--budget", "-5"], "--budget must be positive and finite, got -5.0"),
        (["--budget", "ten"], "argument --budget: invalid float value: 'ten'"),
        (["--budget", "nan"], "--budget must be positive and finite, got nan"),
        (["--budget", "inf"], "--budget must be positive and finite, got inf"),
        (["--only", "speed"], "argument --only: no group named 'speed'; the groups are versions, accuracy,"),
        (["--only", "versions,timing"], "argument --only: no group named 'timing'; the groups are"),
        (["--skip", ""], "argument --skip: no group named ''; the groups are"),
        (["--only", "large", "--skip", "large"], "arguments --only/--skip: no group left to run"),
        (["--quick=maybe"], "argument --quick: boolean value expected"),
        (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
        (["--device", "cpu:1"], "argument --device: expected cpu, cuda or cuda:N, got 'cpu:1'"),
        (["--device"], "argument --device: expected one argument"),
    ],
)
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    """Each names its flag and exits 2 before any check runs."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error, error


def test_an_out_directory_that_cannot_be_written_fails_before_any_check(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker, blocker / "reports"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--device", "cpu", "--quick", "--out", str(out)])
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        assert f"argument --out: cannot write reports in directory {str(out)!r}" in captured.err
        assert captured.out == ""  # no check ran
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_out_directory_fails_before_any_check(tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(SystemExit):
            main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    finally:
        tmp_path.chmod(0o700)
    assert "argument --out: cannot write reports" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_an_argparse_error(device, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", device])
    assert exit_info.value.code == 2
    assert f"argument --device: {device!r}: no CUDA device is available" in capsys.readouterr().err


def test_a_triton_too_old_is_one_message_and_the_cpu_backends_still_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(backends, "TRITON_VERSION", (3, 3))
    assert "triton" not in ops.available_backends() and compiles.launch_layer() is None
    argv = ["--device", "cpu", "--quick", "--only", "versions,accuracy,all_configs", "--out", str(tmp_path)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    too_old = "triton 3.3 is too old: the kernels need triton >= 3.4"
    assert captured.err.count(too_old) == 1 and "the Triton kernels are not checked" in captured.err
    results = _load(tmp_path)["results"]
    triton = next(r for r in results if r["name"] == "triton kernels")
    assert triton["status"] == "not run" and too_old in triton["detail"]
    checked = [r for r in results if r["group"] == "accuracy"]
    assert checked and all(r["status"] == "pass" and r["name"].startswith("cpp ") for r in checked)
    configs = [r for r in results if r["group"] == "all_configs"]
    assert [(r["status"], r["data"]["reason"]) for r in configs] == [("not run", "unavailable")]


def test_no_kernel_backend_is_a_failure_not_an_empty_pass(monkeypatch):
    monkeypatch.setattr(ops, "available_backends", lambda: ["auto", "torch"])
    checks = accuracy.plan(CPU)
    assert [check.name for check in checks] == ["fastdiff kernels on cpu"]
    result = checks[0].run()
    assert result.status == "fail" and "no kernel backend" in result.detail


# --- the --quick run on the CPU ---------------------------------------------------------------------


@pytest.mark.slow
def test_quick_run_on_cpu_writes_its_reports(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    # a budget no shared CI machine runs out of: this test is about what --quick checks, not its time
    flags = ["--quick", "--device", "cpu", "--budget", "3000", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "fastdiff.selftest", *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "selftest PASSED" in done.stdout
    document = _load(tmp_path)
    assert document["schema"] == SCHEMA and document["finished"] and document["verdict"] == "PASSED"
    assert document["options"] == {"device": "cpu", "quick": True, "budget_s": 3000.0, "groups": list(NAMES)}
    results = document["results"]
    assert [g for g in document["groups"]] == list(NAMES) and {r["group"] for r in results} == set(NAMES)
    for r in results:
        assert r["status"] in STATUSES and r["seconds"] >= 0 and r["compile_seconds"] == 0.0  # no compiles
        assert r["status"] != "not run" or r["data"]["reason"] in ("device", "quick")
    assert sum(document["summary"]["counts"].values()) == len(results)
    accuracy_passed = [r["name"] for r in results if r["group"] == "accuracy" and r["status"] == "pass"]
    for backend in ("cpp", "triton"):
        for op in (*NORM_OPS, "qkv_attention", "flash_attention"):
            for dtype in ("float32", "float16", "bfloat16"):
                assert any(n.startswith(f"{backend} {op} {dtype} ") for n in accuracy_passed), (
                    backend,
                    op,
                    dtype,
                )
        for layout in ("contiguous", "channels_last", "bthd"):
            assert any(n.startswith(backend) and layout in n for n in accuracy_passed), (backend, layout)
    determinism = [r for r in results if r["group"] == "determinism"]
    assert determinism and all(r["status"] == "pass" and r["data"]["runs"] == 3 for r in determinism)
    configs = [r for r in results if r["group"] == "all_configs"]
    assert any(r["name"].startswith("gn_fwd_fused[0]") and r["status"] == "pass" for r in configs)
    steps = {r["name"].split(",")[0] + r["name"][-5:]: r for r in results if r["group"] == "train_step"}
    assert steps["fastdiff vs eager agreement fp32"]["status"] == "pass"
    agreement = steps["fastdiff vs eager agreement bf16"]
    assert agreement["status"] == "pass"
    errors, bounds = agreement["data"]["errors"]["fastdiff"], agreement["data"]["bounds"]
    assert all(0 <= errors[key] <= bounds[key] for key in ("loss", "grad"))
    for name in ("fastdiff vs torch.compile(eager) bf16", "torch.compile(fastdiff) fullgraph vs eager bf16"):
        assert steps[name]["status"] == "not run" and "no CUDA device" in steps[name]["detail"]
    timed = steps["fastdiff vs eager step time and peak memory bf16"]["data"]
    assert set(timed["step_seconds"]) == {"fastdiff", "eager"} and timed["step_speedup"]["eager"] > 0
    timing = [r for r in results if r["group"] == "kernel_timing"]
    assert all(r["status"] == "info" and math.isfinite(r["data"].get("GBps", 0.0)) for r in timing)
    markdown = (tmp_path / "selftest.md").read_text()
    assert "PASSED" in markdown and all(f"## {group}" in markdown for group in NAMES)
