"""python -m fastdiff.selftest: the --quick run on the CPU, its reports, the exit code of a failed
check, and the errors for bad flags."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff import ops
from fastdiff.selftest import numerics
from fastdiff.selftest.__main__ import main
from fastdiff.selftest.cases import NORM_OPS, OpCase, as_float64, forward_backward
from fastdiff.selftest.records import STATUSES, Options, Result, compare
from fastdiff.selftest.report import SCHEMA, check_versions
from fastdiff.selftest.run import run

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("versions", "accuracy", "determinism", "train_step", "kernel_timing", "large", "all_configs")


def test_quick_run_on_cpu_writes_its_reports(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "fastdiff.selftest", "--quick", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "selftest PASSED" in done.stdout
    document = json.loads((tmp_path / "selftest.json").read_text())
    assert document["schema"] == SCHEMA
    assert document["options"] == {"device": "cpu", "quick": True}
    assert document["summary"]["ok"] and document["summary"]["failed"] == []
    results = document["results"]
    assert {r["group"] for r in results} == set(GROUPS)
    for r in results:
        assert set(r) == {"group", "name", "status", "detail", "data"} and r["status"] in STATUSES
    assert sum(document["summary"]["counts"].values()) == len(results)
    assert set(document["group_seconds"]) == set(GROUPS) and document["seconds"] > 0
    versions = next(r for r in results if r["group"] == "versions")["data"]
    assert versions["torch"] == torch.__version__ and {"cpp", "triton"} <= set(versions["fastdiff_backends"])
    accuracy = [r["name"] for r in results if r["group"] == "accuracy" and r["status"] == "pass"]
    for backend in ("cpp", "triton"):
        for op in (*NORM_OPS, "qkv_attention", "flash_attention"):
            for dtype in ("float32", "float16", "bfloat16"):
                assert any(n.startswith(f"{backend} {op} {dtype} ") for n in accuracy), (backend, op, dtype)
        for layout in ("contiguous", "channels_last", "bthd"):
            assert any(n.startswith(backend) and layout in n for n in accuracy), (backend, layout)
    errors = [r["data"]["errors"] for r in results if r["group"] == "accuracy" and r["status"] == "pass"]
    assert all(0 <= e["error"] <= e["bound"] for case in errors for e in case.values())
    determinism = [r for r in results if r["group"] == "determinism"]
    assert determinism and all(r["status"] == "pass" and r["data"]["runs"] == 3 for r in determinism)
    configs = [r for r in results if r["group"] == "configs"]
    assert any(r["name"].startswith("gn_fwd_fused[0]") and r["status"] == "pass" for r in configs)
    step = next(r for r in results if r["group"] == "train_step" and r["status"] == "pass")
    assert step["data"]["grad_rel_error"] <= step["data"]["bounds"]["grad"]
    markdown = (tmp_path / "selftest.md").read_text()
    assert "PASSED" in markdown and all(f"## {group}" in markdown for group in GROUPS)


def _norm_check(wrong: str = ""):
    """A check comparing the cpp GroupNorm+SiLU with float64; ``wrong``: "reference" perturbs the float64
    reference, "kernel" the kernel's output (the test hooks that must make the check fail)."""

    def accuracy_with_reference(options):
        case = OpCase("group_norm_silu", (2, 8, 3, 5), torch.float32, 4)
        inputs = case.inputs(options.device, torch.Generator().manual_seed(0))
        expected = forward_backward(case, as_float64(inputs), "torch")
        actual, baseline = forward_backward(case, inputs, "cpp"), forward_backward(case, inputs, "torch")
        if wrong == "reference":
            expected["grad_weight"] = expected["grad_weight"] + 0.01
        if wrong == "kernel":
            actual["grad_x"] = actual["grad_x"] * (1 + 1e-4)
        yield compare(
            "accuracy",
            f"group_norm_silu, {wrong or 'nothing'} wrong",
            actual,
            expected,
            baseline,
            torch.float32,
        )

    return accuracy_with_reference


def _crashes(options):
    yield Result("accuracy", "before the crash", "pass")
    raise RuntimeError("kernel exploded")


def test_a_failed_check_exits_nonzero_and_is_named(tmp_path, capsys):
    cpu = torch.device("cpu")
    assert run(cpu, True, tmp_path, [("versions", check_versions), ("accuracy", _norm_check())]) == 0
    checks = [
        ("accuracy", _norm_check("reference")),
        ("accuracy", _norm_check("kernel")),
        ("accuracy", _crashes),
    ]
    assert run(cpu, True, tmp_path, checks) == 1
    printed = capsys.readouterr().out
    assert "selftest FAILED" in printed and "kernel exploded" in printed
    assert "grad_weight: the torch backend is 0.01 from the float64 reference" in printed
    assert "grad_x error" in printed
    document = json.loads((tmp_path / "selftest.json").read_text())
    assert document["summary"]["failed"] == [
        "group_norm_silu, reference wrong",
        "group_norm_silu, kernel wrong",
        "accuracy: _crashes crashed",
    ]
    assert document["summary"]["counts"] == {"pass": 1, "fail": 3, "skip": 0, "info": 0}
    assert "FAILED" in (tmp_path / "selftest.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quick=yes"], "argument --quick: ignored explicit argument 'yes'"),
        (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
        (["--device", "cpu:1"], "argument --device: expected cpu, cuda or cuda:N, got 'cpu:1'"),
        (["--device"], "argument --device: expected one argument"),
        (["--out", __file__], "argument --out: cannot create directory"),
    ],
)
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    """Each names its flag and exits 2 before any check runs."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_an_argparse_error(device, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", device])
    assert exit_info.value.code == 2
    assert f"argument --device: {device!r}: no CUDA device is available" in capsys.readouterr().err


def test_no_kernel_backend_is_a_failure_not_an_empty_pass(monkeypatch):
    monkeypatch.setattr(ops, "available_backends", lambda: ["auto", "torch"])
    results = list(numerics.check_accuracy(Options(torch.device("cpu"), quick=True)))
    assert [(r.status, r.name) for r in results] == [("fail", "fastdiff kernels on cpu")]
    assert "no kernel backend" in results[0].detail
