"""fastdiff.selftest.precompile: the selftest's Triton kernels compiled for a GPU on a machine without one,
into a Triton cache directory (what tools/gpu_check.sh --precompile packs for a lent GPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch

try:
    import triton
except ImportError:
    if os.environ.get("FASTDIFF_REQUIRE_BACKENDS") == "1":
        raise
    pytest.skip("triton is not installed", allow_module_level=True)

from fastdiff.kernels import launch

from fastdiff.selftest import cold, precompile
from fastdiff.selftest.cases import OpCase


def _metadata(cache_dir) -> list[dict]:
    return [json.loads(path.read_text()) for path in cache_dir.glob("*/*.json") if "__grp__" not in path.name]


@pytest.mark.parametrize("arch", [90, 80])
def test_meta_launches_compile_their_kernels_for_the_target_and_nothing_more(tmp_path, arch):
    workload = cold.case_steps([OpCase("group_norm_silu", (2, 64, 9, 9), torch.bfloat16)])
    previous = os.environ.get("TRITON_CACHE_DIR")
    with precompile.compile_only(arch, tmp_path):
        keys = cold.launches(workload)
    assert len(keys) == 2 and precompile.cache_entries(tmp_path) == 2  # one kernel per distinct launch
    metadata = _metadata(tmp_path)
    assert {entry["name"] for entry in metadata} == {"_gn_fwd_kernel", "_gn_bwd_kernel"}
    assert all(entry["target"] == {"backend": "cuda", "arch": arch, "warp_size": 32} for entry in metadata)
    assert len(list(tmp_path.glob("*/*.cubin"))) == 2
    # the block leaves nothing behind: the environment, the launch mode, the kernels built for its target
    assert os.environ.get("TRITON_CACHE_DIR") == previous and not launch._COMPILING_META
    jit_functions = {getattr(kernel.fn, "fn", kernel.fn) for kernel in launch.kernels("group_norm")}
    assert all(not getattr(fn, "device_caches", {}) for fn in jit_functions)
    # a launch on meta tensors outside the block compiles nothing
    cold.launches(workload)
    assert precompile.cache_entries(tmp_path) == 2


def test_stack_users_names_kernels_whose_cubin_spills(tmp_path, monkeypatch):
    from fastdiff.kernels import report

    with precompile.compile_only(90, tmp_path):
        cold.launches(cold.case_steps([OpCase("group_norm", (2, 64, 5, 7), torch.float32)]))
    assert precompile.stack_users(tmp_path) == []  # what cuobjdump reads from the two real cubins
    fake = tmp_path / "ABCDEFGHIJKLMNOP" / "_attn_bwd_dq_kernel.cubin"
    fake.parent.mkdir()
    fake.write_bytes(b"spills")
    real = report.resource_usage
    usage = {"reg": 80, "stack": 16, "shared": 0, "local": 0}
    monkeypatch.setattr(report, "resource_usage", lambda cubin: usage if cubin == b"spills" else real(cubin))
    expected = "_attn_bwd_dq_kernel (ABCDEFGHIJKL): REG 80, STACK 16, LOCAL 0"
    assert precompile.stack_users(tmp_path) == [expected]


@pytest.mark.parametrize("value", ["9", "sm_90", "", "300", "x.y"])
def test_a_bad_arch_is_refused(value):
    with pytest.raises(Exception, match=r"expected a CUDA compute capability such as 90 or 8\.0"):
        precompile.parse_arch(value)


def test_arch_spellings():
    assert precompile.parse_arch("90") == precompile.parse_arch("9.0") == 90
    assert precompile.parse_arch("8.6") == 86


def test_an_out_directory_that_cannot_be_made_is_refused_before_compiling(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    command = [sys.executable, "-m", "fastdiff.selftest.precompile", "--out", str(blocker / "cache")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"argument --out: cannot create '{blocker / 'cache'}'" in result.stderr


def _language_attributes() -> dict[tuple[str, str], object]:
    modules = [(name, module) for name, module in sys.modules.items() if name.startswith("triton.language")]
    owners = [*modules, ("tensor", triton.language.core.tensor)]
    return {(name, key): value for name, owner in owners if owner for key, value in vars(owner).items()}


def test_kernels_compile_after_interpreted_launches_in_the_same_process(tmp_path):
    """Triton's interpreter leaves ``triton.language`` patched after a device function call; the launch
    layer puts it back, or every later compile in the process fails (the CUDA tier runs after the
    interpreter tier in one pytest process)."""
    from fastdiff import ops

    before = _language_attributes()
    x = torch.randn(2, 8, 5, 3, requires_grad=True)
    scale, shift = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    qkv = torch.randn(2, 3 * 2 * 16, 7, requires_grad=True)
    with ops.use_backend("triton"):
        y = ops.group_norm_scale_shift_silu(x, 4, None, None, scale, shift)
        out = ops.qkv_attention(qkv, 2)
        (y.square().sum() + out.square().sum()).backward()
    after = _language_attributes()
    assert [key for key, value in before.items() if after.get(key, None) is not value] == []
    with precompile.compile_only(90, tmp_path):
        cold.launches(cold.case_steps([OpCase("group_norm_silu", (2, 32, 6, 6), torch.float16)]))
    assert precompile.cache_entries(tmp_path) == 2
