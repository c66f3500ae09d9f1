"""The launch layer (fastdiff.kernels.launch): configs, config choice, autotune cache, device guard."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

try:
    import triton
except ImportError:
    if os.environ.get("FASTDIFF_REQUIRE_BACKENDS") == "1":
        raise
    pytest.skip("triton is not installed", allow_module_level=True)

from fastdiff.kernels import group_norm as gn
from fastdiff.kernels import launch
from fastdiff.kernels.group_norm import configs as gn_configs
from fastdiff.kernels.group_norm import device as gn_device
from fastdiff.kernels.group_norm import host as gn_host

ROOT = Path(__file__).resolve().parents[1]


def test_config_is_data():
    config = launch.Config(num_warps=4, tiles={"TILE": 1024, "BLOCK_C": 8})
    assert config.tiles == (("BLOCK_C", 8), ("TILE", 1024))
    assert config.meta == {"BLOCK_C": 8, "TILE": 1024}
    assert config.tag == "BLOCK_C=8,TILE=1024,w4,s1"
    assert launch.Config.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert hash(config) == hash(launch.Config(4, 1, {"TILE": 1024, "BLOCK_C": 8}))
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        launch.Config(num_warps=3)
    with pytest.raises(ValueError, match="num_stages"):
        launch.Config(num_stages=0)


def test_config_lists_hold_every_group_norm_kernel():
    lists = launch.config_lists()
    for kernel in gn.KERNELS:
        assert lists[kernel.name] == list(kernel.configs)
        assert launch.kernels("group_norm").count(kernel) == 1


def test_group_norm_devices_are_checked_once_at_the_op_and_asserted_by_the_kernels():
    """The op boundary names both arguments; the kernel host only asserts its invariant."""
    from fastdiff import ops

    x = torch.randn(2, 4, 3)
    weight = torch.ones(4, device="meta")
    with ops.use_backend("triton"), pytest.raises(ValueError, match=r"weight is on meta but x is on cpu"):
        ops.group_norm(x, 2, weight, None)
    with pytest.raises(AssertionError, match="one device"):
        gn.group_norm_forward(x, 2, weight, None, None, None, 1e-5, False)
    mean, rstd = torch.zeros(2, 2), torch.ones(2, 2)
    with pytest.raises(AssertionError, match="one device"):
        gn.group_norm_backward(x.to("meta"), x, 2, None, None, None, None, mean, rstd, False, (True,) * 5)


def test_device_guard_makes_the_tensors_device_current(monkeypatch):
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with launch.device_guard(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    with launch.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)], "no CUDA guard for CPU tensors"


def test_run_launches_inside_the_guard_of_like_device(monkeypatch):
    """run() enters device_guard(like.device) around the launch itself (a fake kernel records it)."""
    events = []

    @contextlib.contextmanager
    def guard(device):
        events.append(("enter", device))
        yield
        events.append(("exit", device))

    class FakeKernelFn:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: events.append(("launch", grid, kwargs["num_warps"]))

    config = launch.Config(num_warps=2)
    fake = launch.Kernel("fake", "test", FakeKernelFn(), (config,), lambda p: config, {})
    monkeypatch.setattr(launch, "device_guard", guard)
    monkeypatch.setattr(launch, "interprets", lambda t: False)
    like = torch.zeros(1)
    assert launch.run(fake, (3,), (), {}, like=like) == config
    assert events == [("enter", like.device), ("launch", (3,), 2), ("exit", like.device)]
    assert launch.last_config("fake") == config


def test_compile_counter_counts_distinct_binaries_of_compiled_and_interpreted_launches():
    x = torch.randn(2, 8, 5, 3)
    weight = torch.rand(8) + 0.5
    launch.reset_compile_count()
    assert launch.compile_count() == 0 and launch.compile_keys() == []
    for _ in range(2):  # the same binary twice, then with other inputs of the same specialisation
        gn.group_norm_forward(x, 4, weight, None, None, None, 1e-5, False)
    gn.group_norm_forward(torch.randn(2, 8, 5, 3), 4, torch.rand(8), None, None, None, 1e-3, False)
    assert launch.compile_count() == 1
    (key,) = launch.compile_keys()
    assert key.startswith("cuda|") and "_gn_fwd_kernel" in key and "PASS=fused" in key and "SILU=False" in key
    gn.group_norm_forward(x, 4, weight, None, None, None, 1e-5, True)  # SiLU: another binary
    gn.group_norm_forward(x.half(), 4, weight, None, None, None, 1e-5, False)  # another dtype
    gn.group_norm_forward(torch.randn(2, 8, 4, 4), 4, weight, None, None, None, 1e-5, False)  # S = 16
    assert launch.compile_count() == 4
    assert len(set(launch.compile_keys())) == 4 and launch.compile_keys()[0] == key
    launch.reset_compile_count()
    assert launch.compile_count() == 0


def test_meta_launches_are_counted_and_not_run(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a meta launch must not run")

    monkeypatch.setattr(launch, "_launch_one", fail)
    launch.reset_compile_count()
    x = torch.empty(4, 64, 16, 16, device="meta", dtype=torch.bfloat16)
    y, mean, _ = gn.group_norm_forward(x, 32, None, None, None, None, 1e-5, True)
    assert y.device.type == "meta" and y.shape == x.shape and mean.shape == (4, 32)
    assert launch.compile_count() == 1 and "bfloat16" in launch.compile_keys()[0]
    assert launch.last_config(gn.FWD_FUSED.name) is not None
    assert not launch.interprets(x)  # a meta launch stands for the compiled one


def test_compile_key_follows_triton_specialisation():
    kernel = gn.FWD_PARTIAL_STATS
    config = kernel.configs[0]
    cpu, cuda1 = torch.device("cpu"), torch.device("cuda", 1)
    base = torch.zeros(64)
    key = launch.compile_key(kernel, (base, 16, 1, 7), {"BLOCK_C": 4}, config, cpu)
    assert key.split("|")[0] == "cuda"
    assert launch.compile_key(kernel, (base, 32, 1, 9), {"BLOCK_C": 4}, config, cpu) == key
    assert launch.compile_key(kernel, (base, 16, 1, 7), {"BLOCK_C": 4}, config, cuda1) != key
    for args in ((base, 17, 1, 7), (base, 16, 2, 7), (base, 16, 1, 2**33), (base[1:], 16, 1, 7)):
        assert launch.compile_key(kernel, args, {"BLOCK_C": 4}, config, cpu) != key, args
    assert launch.compile_key(kernel, (base, 16, 1, 7), {"BLOCK_C": 8}, config, cpu) != key
    assert launch.compile_key(kernel, (base, 16, 1, 7), {"BLOCK_C": 4}, kernel.configs[1], cpu) != key


def test_compile_key_leaves_out_what_the_kernel_does_not_specialise():
    """GroupNorm kernels are not specialised on the channels per group (one binary for 12 and 16)."""
    kernel = gn.FWD_FUSED
    assert "group_channels" in kernel.fn.do_not_specialize
    x = torch.zeros(64)

    def key(group_channels: int) -> str:
        args = tuple(
            group_channels if name == "group_channels" else (x if name.endswith("_ptr") else 32)
            for name in kernel.arg_types
        )
        return launch.compile_key(kernel, args, {"SILU": True}, kernel.configs[0], torch.device("cpu"))

    assert key(12) == key(16) == key(1)
    assert key(2**33) != key(16)  # a 64-bit integer is another binary


def test_force_config_overrides_the_rule_and_is_checked():
    kernel = gn.FWD_SPLIT_APPLY
    x = torch.randn(1, 4, 6, 6)
    split = gn.GroupNormTuning(fused_always=1, fused_max_forward=1, chunk_elements=32, min_chunk_elements=32)
    geometry = gn_host._geometry(2, 2, 36, 1, split)
    assert not geometry.fused and geometry.num_chunks > 1
    for config in kernel.configs:
        with launch.force_config(kernel.name, config):
            gn.group_norm_forward(x, 2, None, None, None, None, 1e-5, True, tuning=split)
            assert launch.last_config(kernel.name) == config
    gn.group_norm_forward(x, 2, None, None, None, None, 1e-5, True, tuning=split)
    sizes = {"chunk_spatial": geometry.chunk_spatial, "programs": 2 * geometry.num_chunks}
    problem = launch.Problem(sizes, {"BLOCK_C": geometry.block_c}, x.dtype, None)
    assert launch.last_config(kernel.name) == kernel.rule(problem)
    with pytest.raises(ValueError, match="no kernel named"), launch.force_config("nope", kernel.configs[0]):
        pass
    not_listed = launch.Config(num_warps=1, tiles={"TILE": 8})
    with (
        pytest.raises(ValueError, match="not in the config list"),
        launch.force_config(kernel.name, not_listed),
    ):
        pass


def test_autotune_switches(monkeypatch):
    monkeypatch.delenv(launch.AUTOTUNE_ENV, raising=False)
    launch.set_autotune(None)
    assert not launch.autotune_enabled()
    monkeypatch.setenv(launch.AUTOTUNE_ENV, "1")
    assert launch.autotune_enabled()
    launch.set_autotune(False)
    assert not launch.autotune_enabled()
    launch.set_autotune(True)
    try:
        torch.use_deterministic_algorithms(True)
        assert not launch.autotune_enabled(), "deterministic algorithms always get the fixed rule"
    finally:
        torch.use_deterministic_algorithms(False)
        launch.set_autotune(None)


def test_autotune_key_holds_what_changes_the_kernel():
    x = torch.randn(2, 8, 16)
    base = launch.autotune_key(gn.FWD_FUSED, (x, 8, 1), {"SILU": True, "BLOCK_C": 4}, {"tile": 100})
    variants = [
        launch.autotune_key(gn.FWD_FUSED, (x, 8, 1), {"SILU": False, "BLOCK_C": 4}, {"tile": 100}),
        launch.autotune_key(gn.FWD_FUSED, (x.half(), 8, 1), {"SILU": True, "BLOCK_C": 4}, {"tile": 100}),
        launch.autotune_key(gn.FWD_FUSED, (x, 8, 16), {"SILU": True, "BLOCK_C": 4}, {"tile": 100}),  # layout
        launch.autotune_key(gn.FWD_FUSED, (x, 8, 1), {"SILU": True, "BLOCK_C": 4}, {"tile": 200}),
        launch.autotune_key(gn.BWD_FUSED, (x, 8, 1), {"SILU": True, "BLOCK_C": 4}, {"tile": 100}),
    ]
    assert len({base, *variants}) == 6
    same_bucket = launch.autotune_key(gn.FWD_FUSED, (x, 8, 1), {"BLOCK_C": 4, "SILU": True}, {"tile": 120})
    assert same_bucket == base


def test_autotune_cache_persists_and_survives_bad_files(tmp_path):
    path = tmp_path / "autotune" / "GPU-triton.json"
    configs = [launch.Config(num_warps=w) for w in (1, 2, 4)]
    timings = {1: 3.0, 2: 1.0, 4: 2.0}
    measured = []

    def measure(config):
        measured.append(config)
        return timings[config.num_warps]

    cache = launch.AutotuneCache("GPU A", path)
    assert cache.pick("k", configs, measure) == configs[1]
    assert len(measured) == 3
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")], "atomic write leaves no temp"
    # a new process reuses the pick without measuring
    assert launch.AutotuneCache("GPU A", path).pick("k", configs, measure) == configs[1]
    assert len(measured) == 3
    # another GPU's file: ignored with a warning, then replaced
    with pytest.warns(UserWarning, match="written for GPU 'GPU A'"):
        other = launch.AutotuneCache("GPU B", path)
    assert other.get("k") is None
    # a corrupt file: ignored with a warning, never a crash
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable autotune cache"):
        corrupt = launch.AutotuneCache("GPU A", path)
    assert corrupt.pick("k", configs, measure) == configs[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert launch.AutotuneCache("GPU A", path).get("k") == configs[1]


def test_autotune_cache_path_is_per_gpu_and_triton(monkeypatch, tmp_path):
    monkeypatch.setenv(launch.CACHE_DIR_ENV, str(tmp_path))
    path = launch.autotune_cache_path("NVIDIA H100 80GB HBM3")
    assert path.parent == tmp_path / "autotune"
    assert path.name == f"NVIDIA_H100_80GB_HBM3-triton{triton.__version__}.json"


def test_arg_types_are_explicit_and_complete():
    with pytest.raises(ValueError, match="must list exactly its runtime arguments"):
        launch.arg_types(gn_device._gn_fwd_kernel, storage=("x_ptr",))
    with pytest.raises(ValueError, match="listed twice"):
        launch.arg_types(gn_device._gn_fwd_kernel, storage=("x_ptr",), i32=("x_ptr",))
    spec = launch.compile_spec(
        gn.FWD_PARTIAL_STATS, "t", "bf16", gn.SPLIT_CONFIGS[0], {"BLOCK_C": 4}, ("stride_xs",)
    )
    assert spec.signature["x_ptr"] == "*bf16" and spec.signature["part_m2_ptr"] == "*fp32"
    assert spec.signature["stride_xs"] == "constexpr" and spec.constexprs["stride_xs"] == 1
    assert spec.signature["TILE"] == "constexpr" and spec.constexprs["TILE"] == 512
    assert spec.num_warps == gn.SPLIT_CONFIGS[0].num_warps


def test_a_registration_pins_constexprs_that_every_launch_takes():
    """GroupNorm's six launch-layer kernels are passes of two device bodies: each pins its PASS (and
    neutral values for what the pass does not read); a launch gives the rest, and the compile spec and key
    carry the pins."""
    assert gn.FWD_FUSED.fn is gn.FWD_SPLIT_APPLY.fn is gn.FWD_PARTIAL_STATS.fn
    assert gn.BWD_FUSED.fn is gn.BWD_SPLIT_APPLY.fn is gn.BWD_PARTIAL_SUMS.fn
    passes = {k.name: k.constexprs["PASS"] for k in gn.KERNELS}
    assert passes == {
        "gn_fwd_fused": "fused",
        "gn_fwd_partial_stats": "partial",
        "gn_fwd_split_apply": "apply",
        "gn_bwd_fused": "fused",
        "gn_bwd_partial_sums": "partial",
        "gn_bwd_split_apply": "apply",
    }
    assert launch.launch_constexprs(gn.FWD_PARTIAL_STATS) == ["BLOCK_C", "TILE"]
    assert launch.launch_constexprs(gn.BWD_FUSED) == [
        "HAS_WEIGHT", "HAS_BIAS", "HAS_SCALE_SHIFT", "SILU", "WRITE_DX", "WRITE_SUMS", "BLOCK_C", "BLOCK_S"
    ]  # fmt: skip
    flags = dict.fromkeys(("HAS_WEIGHT", "HAS_BIAS", "HAS_SCALE_SHIFT", "SILU"), True)
    meta = {**flags, "BLOCK_C": 4, "BLOCK_S": 8}
    spec = launch.compile_spec(gn.FWD_FUSED, "t", "fp32", gn.FUSED_CONFIGS[0], meta)
    assert spec.constexprs["PASS"] == "fused" and spec.constexprs["TILE"] == 1
    with pytest.raises(ValueError, match="not constexprs: \\['eps'\\]"):
        launch.register(
            "pins_a_runtime_argument", family="test", fn=gn.FWD_FUSED.fn, configs=gn.FUSED_CONFIGS,
            rule=lambda problem: gn.FUSED_CONFIGS[0], arg_types=gn.FWD_FUSED.arg_types,
            constexprs={"eps": 1.0},
        )  # fmt: skip


# The runtime parameters of the six GroupNorm kernels before they became passes of two bodies (commit
# d33450f), in order; each pass's binary must keep them (unit strides may be specialised away).
_PARAMETERS_BEFORE_THE_MERGE = {
    "gn_fwd_fused": (
        "x_ptr y_ptr weight_ptr bias_ptr scale_ptr shift_ptr mean_ptr rstd_ptr num_groups group_channels "
        "spatial stride_xn stride_xc stride_xs stride_yn stride_yc stride_ys stride_scale_n stride_scale_c "
        "stride_shift_n stride_shift_c eps"
    ),
    "gn_fwd_partial_stats": (
        "x_ptr part_count_ptr part_mean_ptr part_m2_ptr num_groups group_channels spatial chunk_spatial "
        "num_chunks stride_xn stride_xc stride_xs"
    ),
    "gn_bwd_fused": (
        "dy_ptr x_ptr dx_ptr weight_ptr bias_ptr scale_ptr shift_ptr mean_ptr rstd_ptr sum_a_ptr sum_b_ptr "
        "num_groups group_channels spatial stride_dyn stride_dyc stride_dys stride_xn stride_xc stride_xs "
        "stride_dxn stride_dxc stride_dxs stride_scale_n stride_scale_c stride_shift_n stride_shift_c"
    ),
    "gn_bwd_partial_sums": (
        "dy_ptr x_ptr weight_ptr bias_ptr scale_ptr shift_ptr mean_ptr rstd_ptr part_a_ptr part_b_ptr "
        "num_groups group_channels spatial chunk_spatial num_chunks stride_dyn stride_dyc stride_dys "
        "stride_xn stride_xc stride_xs stride_scale_n stride_scale_c stride_shift_n stride_shift_c"
    ),
}


def test_a_pass_binary_has_only_the_parameters_it_reads():
    """A GroupNorm pass launches the arguments it does not read as None, which Triton compiles as a
    constexpr: its binary's parameters are those of the kernel it replaced, in the same order (with the
    unread ones as parameters, ptxas allocated the fused forward's registers differently on sm_90)."""
    for kernel in gn.KERNELS:
        unread = gn_configs.unread_args(kernel)
        named = {name: f"<{name}>" for name in kernel.arg_types if name not in unread}
        args = gn_configs.pass_args(kernel, **named)
        assert args == tuple(named.get(name) for name in kernel.arg_types), kernel.name
        assert all(args[i] is None for i, name in enumerate(kernel.arg_types) if name in unread)
        with pytest.raises(KeyError, match="x_ptr"):
            gn_configs.pass_args(kernel, **{k: v for k, v in named.items() if k != "x_ptr"})
        before = _PARAMETERS_BEFORE_THE_MERGE.get(kernel.name, " ".join(kernel.arg_types)).split()
        specs = [s for s in gn.compile_specs() if s.name.startswith(f"{kernel.name}[")]
        assert specs, kernel.name
        for spec in specs:
            runtime = [name for name, kind in spec.signature.items() if kind != "constexpr"]
            assert runtime == [name for name in before if name in runtime], spec.name
            assert set(before) - set(runtime) <= {n for n in before if n.startswith("stride_")}, spec.name
            assert all(spec.constexprs[name] is None for name in unread), spec.name


def test_a_split_pass_compiles_one_binary_for_every_variant():
    """The partial passes read no weight, bias, scale/shift or SiLU: GroupNorm, +SiLU and +scale-shift
    share their binary (what the apply passes read still tells theirs apart)."""
    split = gn.GroupNormTuning(fused_always=1, fused_max_forward=1, fused_max_backward=1)
    x = torch.randn(2, 8, 6, 5)
    w, b, scale, shift = torch.randn(8), torch.randn(8), torch.randn(2, 8), torch.randn(2, 8)
    keys = {}
    for variant, args in {
        "group_norm": (None, None, False),
        "silu": (None, None, True),
        "scale_shift_silu": (scale, shift, True),
    }.items():
        launch.reset_compile_count()
        scale_arg, shift_arg, silu = args
        gn.group_norm_forward(x, 4, w, b, scale_arg, shift_arg, 1e-5, silu, tuning=split)
        keys[variant] = launch.compile_keys()
    partial = {variant: found[0] for variant, found in keys.items()}
    apply = {variant: found[1] for variant, found in keys.items()}
    assert all("PASS=partial" in k for k in partial.values()) and len(set(partial.values())) == 1
    assert all("PASS=apply" in k for k in apply.values()) and len(set(apply.values())) == 3


def test_compiled_and_interpreted_kernels_coexist_without_triton_interpret():
    """In a process without TRITON_INTERPRET (as on a GPU machine) the kernels are JITFunctions and CPU
    tensors run their interpreted twins: results match float64, tl's jit functions are restored after."""
    script = textwrap.dedent(
        """
        import torch
        from triton.runtime.jit import JITFunction
        import triton.language as tl
        from fastdiff.kernels import group_norm as gn
        from fastdiff.kernels.group_norm import device as gn_device
        assert isinstance(gn.FWD_FUSED.fn, JITFunction)
        split = gn.GroupNormTuning(fused_always=1, fused_max_forward=1, fused_max_backward=1,
                                   chunk_elements=24, min_chunk_elements=24, target_programs=1,
                                   max_block_c=4, block_p=2, split_tile=8)
        for tuning in (gn.DEFAULT_TUNING, split):
            x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
            w, b, s, t = torch.randn(6), torch.randn(6), torch.randn(2, 6), torch.randn(2, 6)
            y, mean, rstd = gn.group_norm_forward(x.float(), 3, w, b, s, t, 1e-5, True, tuning=tuning)
            xd = x.requires_grad_()
            g = xd.reshape(2, 3, -1)
            z = ((g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt())
            z = z.reshape(x.shape) * w.double()[:, None, None] + b.double()[:, None, None]
            z = z * (1 + s.double()[..., None, None]) + t.double()[..., None, None]
            ref = z * torch.sigmoid(z)
            assert (y.double() - ref).abs().max() < 1e-4, (y.double() - ref).abs().max()
            dy = torch.randn_like(y)
            dx = gn.group_norm_backward(dy, x.float().detach(), 3, w, b, s, t, mean, rstd, True,
                                        (True, False, False, False, False), tuning=tuning)[0]
            (ref_dx,) = torch.autograd.grad(ref, xd, dy.double())
            assert (dx.double() - ref_dx).abs().max() < 1e-3 * max(1, ref_dx.abs().max())
        assert isinstance(tl.sum, JITFunction) and isinstance(gn_device._channel_affine, JITFunction)
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_run_autotunes_on_cuda_only_when_asked(monkeypatch, tmp_path):
    """The CUDA path of run() with a fake kernel and a fake stopwatch: the fastest fitting config wins, is
    cached on disk and reused without timing; deterministic algorithms get the fixed rule."""
    import triton.testing

    configs = tuple(launch.Config(num_warps=w) for w in (1, 2, 4, 8))
    times = {1: 4.0, 2: 3.0, 4: 1.0, 8: 0.5}
    launched, timed = [], []

    class FakeKernelFn:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(kwargs["num_warps"])

    def fake_bench(fn, **kwargs):
        fn()
        timed.append(launched[-1])
        return times[launched[-1]]

    fake = launch.Kernel(
        "fake_tuned",
        "test",
        FakeKernelFn(),
        configs,
        rule=lambda p: configs[0],
        arg_types={},
        fits=lambda p, c: c.num_warps <= 4,  # 8 warps never tried
    )
    cache = launch.AutotuneCache("Fake GPU", tmp_path / "fake.json")
    monkeypatch.setattr(launch, "interprets", lambda t: False)
    monkeypatch.setattr(launch, "_cache_for", lambda device: cache)
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    like = torch.zeros(4)

    launch.set_autotune(False)
    try:
        assert launch.run(fake, (1,), (like,), {"SILU": True}, like=like, sizes={"n": 4}) == configs[0]
        assert timed == []
        launch.set_autotune(True)
        assert launch.run(fake, (1,), (like,), {"SILU": True}, like=like, sizes={"n": 4}) == configs[2]
        assert sorted(timed) == [1, 2, 4]
        assert launch.run(fake, (1,), (like,), {"SILU": True}, like=like, sizes={"n": 3}) == configs[2]
        assert len(timed) == 3, "same key (sizes bucketed): the cached pick, no timing"
        assert launch.AutotuneCache("Fake GPU", tmp_path / "fake.json").picks, "persisted"
        torch.use_deterministic_algorithms(True)
        try:
            assert launch.run(fake, (1,), (like,), {"SILU": True}, like=like, sizes={"n": 4}) == configs[0]
        finally:
            torch.use_deterministic_algorithms(False)
        assert launch.run(fake, (1,), (like,), {"SILU": False}, like=like, sizes={"n": 4}) == configs[2]
        assert len(timed) == 6, "SILU changes the key: timed again"
    finally:
        launch.set_autotune(None)
    assert launched[-1] == 4


def test_train_flag_autotune_goes_through_the_backend(monkeypatch):
    """``--autotune True`` calls fastdiff.runtime.backends.check_autotune -> backend.set_autotune."""
    from fastdiff.ops import backend as backends
    from fastdiff.runtime.backends import check_autotune

    monkeypatch.delenv(launch.AUTOTUNE_ENV, raising=False)
    try:
        check_autotune(True)
        assert launch.autotune_enabled()
        check_autotune(False)
        assert not launch.autotune_enabled()
        monkeypatch.setattr(backends, "HAS_TRITON", False)
        with pytest.raises(ValueError, match="autotuning needs the Triton kernels: triton is not installed"):
            check_autotune(True)
        check_autotune(False)  # nothing to turn off
    finally:
        launch.set_autotune(None)
