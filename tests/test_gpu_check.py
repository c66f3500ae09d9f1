"""tools/gpu_check.sh, the prepared script for a lent GPU machine, run here on a CPU (the selftest on CPU
tensors, the CUDA tier's few CPU tests), and the test sharding it relies on (FASTDIFF_TEST_SHARD)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import parse_shard

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _env(**values: str) -> dict[str, str]:
    """This environment with this interpreter first on PATH (the script calls ``python``)."""
    env = {name: value for name, value in os.environ.items() if name != "FASTDIFF_TEST_SHARD"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **values}


def _collected(*args: str, shard: str | None = None) -> subprocess.CompletedProcess:
    env = _env() if shard is None else _env(FASTDIFF_TEST_SHARD=shard)
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _ids(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_shards_split_the_selection_after_k():
    selection = ("tests/test_launch.py", "tests/test_ops.py", "-k", "not cuda and not slow")
    everything = _ids(_collected(*selection))
    shards = [_ids(_collected(*selection, shard=f"{index}/3")) for index in range(3)]
    assert len(everything) > 30
    # every test once, none twice
    assert sorted(node for shard in shards for node in shard) == sorted(everything)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all("cuda" not in node for node in everything)


@pytest.mark.parametrize("value", ["3/3", "a/2", "1", "-1/2", "1/0", "0/2/3", ""])
def test_a_bad_shard_is_refused_naming_the_variable(value):
    expected = f"FASTDIFF_TEST_SHARD: expected i/n with 0 <= i < n, got {value!r}"
    with pytest.raises(pytest.UsageError, match=re.escape(expected)):
        parse_shard(value)


def test_a_bad_shard_stops_pytest_before_any_test():
    result = _collected("tests/test_launch.py", shard="2/2")
    assert result.returncode == 4  # pytest's usage error
    assert "FASTDIFF_TEST_SHARD: expected i/n with 0 <= i < n, got '2/2'" in result.stdout + result.stderr


def _gpu_check(out: Path, **settings: str) -> subprocess.CompletedProcess:
    """The script on this CPU: the selftests --quick on CPU tensors, one shard unless ``settings`` say."""
    defaults = {"SELFTEST_ARGS": "--device cpu --quick", "TIER_SHARDS": "1", "GPU_CHECK_INSTALL": "0"}
    env = _env(**{**defaults, "OUT": str(out), "GPU_CACHE": str(out / "cache"), **settings})
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_gpu_check_runs_both_phases_and_keeps_the_results(tmp_path):
    result = _gpu_check(
        tmp_path,
        CHECK_GROUPS="versions,determinism",
        SPEED_GROUPS="kernel_timing",
        TIER_ARGS="tests/test_launch.py tests/test_ops.py -k cuda",
        TIER_SHARDS="2",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (tmp_path / "summary.md").read_text()
    for name, groups in (
        ("selftest_correctness", {"versions", "determinism"}),
        ("selftest_speed", {"kernel_timing"}),
    ):
        assert f"- {name}: exit 0 after " in summary
        report = json.loads((tmp_path / name / "selftest.json").read_text())
        assert {check["group"] for check in report["results"]} == groups
        assert report["verdict"] == "PASSED"
        assert all(check["status"] in ("pass", "info") for check in report["results"])
    for shard in (0, 1):
        assert f"  - shard {shard}: exit 0, 1 passed, " in summary
        assert (tmp_path / "tier" / f"shard{shard}.xml").is_file()
    assert "- failures and errors: 0" in summary
    assert "python 3." in (tmp_path / "machine.txt").read_text()


def test_gpu_check_unpacks_precompiled_kernels_into_tritons_cache(tmp_path):
    pytest.importorskip("triton")
    from fastdiff.selftest import cold, precompile
    from fastdiff.selftest.cases import OpCase

    with precompile.compile_only(90, tmp_path / "compiled"):
        cold.launches(cold.case_steps([OpCase("group_norm", (2, 64, 5, 7), torch.float32)]))
    packed = tmp_path / "kernels.tar.xz"
    subprocess.run(["tar", "-cJf", str(packed), "-C", str(tmp_path / "compiled"), "."], check=True)
    out = tmp_path / "out"
    settings = {
        "CHECK_GROUPS": "versions",
        "SPEED_GROUPS": "versions",
        "TIER_ARGS": "tests/test_launch.py -k cuda",
    }
    result = _gpu_check(out, PRECOMPILED=str(packed), **settings)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (out / "summary.md").read_text()
    assert f"- Triton's cache holds 2 kernels, precompiled ones from {packed} unpacked" in summary
    assert "- Triton's cache holds 2 kernels at the end" in summary
    assert len(list((out / "cache" / "triton").glob("*/*.cubin"))) == 2


def test_gpu_check_reports_what_its_limits_cut_and_fails(tmp_path):
    result = _gpu_check(tmp_path, CHECK_SECONDS="3", SPEED_SECONDS="1", GRACE="0")
    assert result.returncode == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "- selftest_correctness: exit 124 after " in summary
    assert "  - shard 0: exit 124, " in summary
    assert "- selftest_speed: exit 124 after " in summary


def test_gpu_check_refuses_an_unknown_argument():
    result = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "usage: tools/gpu_check.sh [--wheels | --precompile]" in result.stderr
