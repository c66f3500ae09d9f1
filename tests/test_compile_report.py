"""Compile report: every Triton kernel configuration builds for sm_80 and sm_90 without register spills.

Compiling needs no GPU (Triton targets ``GPUTarget("cuda", arch, 32)``) but real ``@triton.jit``
functions, so under TRITON_INTERPRET=1 the report runs in subprocesses without it.
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest

try:
    import triton  # noqa: F401
except ImportError:
    if os.environ.get("FASTDIFF_REQUIRE_BACKENDS") == "1":
        raise
    pytest.skip("triton is not installed", allow_module_level=True)

from fastdiff.kernels import report

from benchmarks.compile_summary import (
    KNOWN_SPILLS,
    OTHER_TRITONS,
    REFERENCE_TRITON,
    cache_name,
    committed_reports,
)

ARCHS = (80, 90)
RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _kernel_modules() -> list[str]:
    return [name for name in report.KERNEL_MODULES if importlib.util.find_spec(name) is not None]


@pytest.mark.slow
@pytest.mark.parametrize("module", _kernel_modules())
def test_every_spec_compiles_without_spills(module):
    rows = report.compile_report(ARCHS, jobs=2, modules=[module])
    specs = report.collect_specs([module])
    assert specs, f"{module}.compile_specs() is empty"
    assert len(rows) == len(specs) * len(ARCHS)
    assert {(row["kernel"], row["arch"]) for row in rows} == {
        (spec.name, f"sm_{arch}") for spec in specs for arch in ARCHS
    }, "spec names must be unique and every (spec, arch) reported"
    failed = [f"{row['kernel']} {row['arch']}: {row['error']}" for row in rows if row["error"]]
    assert not failed, "\n".join(failed)
    spilled = [f"{row['kernel']} {row['arch']}: {row['spills']} bytes" for row in rows if row["spills"]]
    assert not spilled, "register spills:\n" + "\n".join(spilled)
    for row in rows:
        assert 0 < row["registers"] <= 255
        assert row["registers"] == row["ptxas_registers"], "ptxas -v must describe the cubin Triton built"
        assert row["local"] == 0 and row["shared"] >= 0


def test_group_norm_specs_cover_every_kernel_dtype_and_config():
    from fastdiff.kernels import group_norm as gn

    specs = gn.compile_specs()
    for kernel in gn.KERNELS:
        names = [spec.name for spec in specs if spec.name.startswith(f"{kernel.name}[")]
        for dtype in ("fp32", "fp16", "bf16"):
            for config in kernel.configs:
                marker = f"w{config.num_warps}]"
                tile = f"TILE={config.meta['TILE']}" if "TILE" in config.meta else ""
                assert any(f"[{dtype}," in n and n.endswith(marker) and tile in n for n in names), (
                    f"{kernel.name}: no spec for {dtype} {config}"
                )
    for spec in specs:
        assert set(spec.signature) == set(spec.fn.arg_names), spec.name
        assert all(spec.signature[k] == "constexpr" for k in spec.constexprs), spec.name


def test_parsers_read_tool_output():
    cuobjdump = (
        "Resource usage:\n Common:\n  GLOBAL:0\n Function k:\n"
        "  REG:40 STACK:8 SHARED:16 LOCAL:4 CONSTANT[0]:392 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
    )
    assert report._parse_cuobjdump(cuobjdump) == {"reg": 40, "stack": 8, "shared": 16, "local": 4}
    ptxas = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "    8 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    assert report._parse_ptxas(ptxas) == {
        "ptxas_registers": 255,
        "stack_frame": 8,
        "spill_stores": 12,
        "spill_loads": 20,
    }
    with pytest.raises(RuntimeError):
        report._parse_ptxas("ptxas fatal: unsupported PTX version")


def test_table_lists_every_row():
    ok = {
        "kernel": "a",
        "arch": "sm_80",
        "num_warps": 4,
        "registers": 32,
        "spills": 0,
        "shared": 0,
        "local": 0,
    }
    failed = {"kernel": "b", "arch": "sm_90", "num_warps": 8, "error": "PTXASError: boom"}
    table = report.format_table([{**ok, "error": None}, failed]).splitlines()
    assert len(table) == 4
    assert table[2].split() == ["a", "sm_80", "4", "32", "0", "0", "0"]
    assert "FAILED: PTXASError: boom" in table[3]


@pytest.mark.parametrize("version", [REFERENCE_TRITON, *OTHER_TRITONS])
def test_committed_report_builds_every_current_spec_without_spills(version):
    """The committed report of each Triton (the newest, and the one GPU machines carry) covers today's
    specs for sm_80 and sm_90 with no failure and no spill or local memory beyond ``KNOWN_SPILLS`` (none
    under the newest). Regenerate a report under its Triton with
    ``benchmarks.compile_summary.compile_rows("fresh", "benchmarks/results")``."""
    stored = json.loads(committed_reports(RESULTS_DIR)[version].read_text())
    assert stored["key"]["triton"].startswith(f"{version}."), stored["key"]
    assert stored["key"]["archs"] == list(ARCHS)
    rows = stored["rows"]
    expected = {(spec.name, f"sm_{arch}") for spec in report.collect_specs() for arch in ARCHS}
    assert {(row["kernel"], row["arch"]) for row in rows} == expected, "the report is older than the specs"
    assert len(rows) == len(expected)
    failed = [f"{row['kernel']} {row['arch']}: {row['error'][:200]}" for row in rows if row["error"]]
    assert not failed, f"triton {version} rejects:\n" + "\n".join(failed)
    spilled = {f"{row['kernel']} {row['arch']}" for row in rows if row["spills"] or row["local"]}
    known = KNOWN_SPILLS.get(version, frozenset())
    assert spilled == known, (
        f"triton {version}: new spills {sorted(spilled - known)}, fixed {sorted(known - spilled)}"
    )
    for row in rows:
        assert 0 < row["registers"] <= 255, row


def test_each_triton_minor_has_its_own_report_file():
    assert cache_name("3.9.0") == "compile_report.json" == cache_name(f"{REFERENCE_TRITON}.1")
    assert cache_name("3.6.0") == "compile_report_triton3.6.json"
    assert committed_reports(RESULTS_DIR)[REFERENCE_TRITON].name == "compile_report.json"
    assert len(set(committed_reports(RESULTS_DIR).values())) == 1 + len(OTHER_TRITONS)
    for bad in ("3", "x.y", ""):
        with pytest.raises(ValueError, match="triton version must look like"):
            cache_name(bad)


class _FakeShard:
    """A finished ``python -m fastdiff.kernels.report --shard`` process: writes ``rows`` (unless None)
    to its --json path and exits with ``code``."""

    def __init__(self, command, env, rows, code):
        if rows is not None:
            Path(command[command.index("--json") + 1]).write_text(json.dumps(rows))
        self.code = code

    def wait(self):
        return self.code


@pytest.mark.parametrize(
    ("code", "writes", "keeps_rows"), [(1, True, True), (1, False, False), (2, True, False)]
)
def test_a_shard_with_a_failed_kernel_still_gives_its_rows(monkeypatch, code, writes, keeps_rows):
    """Exit 1 with a JSON file means "a kernel failed to compile": a finding to report, not a lost run."""
    row = {"kernel": "k[x]", "arch": "sm_80", "num_warps": 1, "error": "PTXASError: boom"}
    monkeypatch.setattr(
        report.subprocess, "Popen", lambda cmd, env: _FakeShard(cmd, env, [row] if writes else None, code)
    )
    if keeps_rows:
        assert report._compile_in_subprocesses([80], 1, []) == [row]
    else:
        with pytest.raises(RuntimeError, match=f"exit codes \\[{code}\\]"):
            report._compile_in_subprocesses([80], 1, [])
