"""Triton GroupNorm kernels (fastdiff.kernels.group_norm) against a float64 reference written here.

Every kernel test runs twice through the ``kernel_device`` fixture (tests/conftest.py): on CPU tensors
under Triton's interpreter, and compiled on CUDA tensors (skipped, with the reason, without a GPU).
Every buffer the host code allocates is filled with NaN first, so an element a kernel forgets to write
(or a workspace slot it reads before writing) fails. References are float64 on the CPU.
"""

import math
import os

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    if os.environ.get("FASTDIFF_REQUIRE_BACKENDS") == "1":
        raise
    pytest.skip("triton is not installed", allow_module_level=True)

from fastdiff.kernels import group_norm as gn
from fastdiff.kernels import launch
from fastdiff.kernels.group_norm import host as gn_host
from fastdiff.kernels.traffic import count_traffic

from fastdiff import ops

# The interpreter evaluates SiLU's exp(-z) in numpy, which warns when it overflows to inf (the right value).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Max error allowed, relative to max(1, max |reference|), by the dtype the result is stored in.
TOLERANCE = {F32: 1e-4, F16: 4e-3, BF16: 3e-2}
ALL_GRADS = (True, True, True, True, True)
# Tiny split geometry: several channel blocks per group, several tiles per chunk, many chunks per
# group and several partial blocks per merge, so every loop of the split kernels runs more than once.
TINY_SPLIT = gn.GroupNormTuning(
    fused_always=1, fused_max_forward=1, fused_max_backward=1, chunk_elements=24, min_chunk_elements=24,
    target_programs=1, max_block_c=4, block_p=2, split_tile=8,
)  # fmt: skip


class _PoisonedTorch:
    """``torch`` as seen by the kernel module, with ``empty``/``empty_like`` returning NaN-filled tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(math.nan) if t.is_floating_point() else t

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def _poison_allocations(monkeypatch) -> None:
    monkeypatch.setattr(gn_host, "torch", _PoisonedTorch())


# ------------------------------------------------------------------------------------------------
# float64 reference
# ------------------------------------------------------------------------------------------------


def reference_forward(x, num_groups, weight, bias, scale, shift, eps, silu):
    """float64 (y, mean [N, G], rstd [N, G]); differentiable w.r.t. every tensor argument."""
    n, c = x.shape[:2]
    groups = x.double().reshape(n, num_groups, -1)
    mean = groups.mean(-1)
    var = ((groups - mean[..., None]) ** 2).mean(-1)
    rstd = 1.0 / torch.sqrt(var + eps)
    y = ((groups - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    channel_shape = (1, c) + (1,) * (x.dim() - 2)
    sample_shape = (n, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(channel_shape)
    if bias is not None:
        y = y + bias.double().reshape(channel_shape)
    if scale is not None:
        y = y * (1 + scale.double().reshape(sample_shape)) + shift.double().reshape(sample_shape)
    if silu:
        y = y * torch.sigmoid(y)
    return y, mean, rstd


def reference_grads(dy, x, num_groups, weight, bias, scale, shift, eps, silu):
    """float64 gradients w.r.t. (x, weight, bias, scale, shift); None for absent inputs."""
    leaves = [
        None if t is None else t.detach().double().requires_grad_() for t in (x, weight, bias, scale, shift)
    ]
    y, _, _ = reference_forward(*leaves[:1], num_groups, *leaves[1:], eps, silu)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, dy.double()))
    return [None if t is None else next(grads) for t in leaves]


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert not torch.isnan(actual).any().item(), f"{what}: NaN (an element was not written)"
    error = (actual.double().cpu() - expected).abs().max().item()
    bound = TOLERANCE[dtype] * max(1.0, expected.abs().max().item())
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)
    if layout == "spatial_transposed":  # spatial dims that cannot share one stride: copied once
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t.contiguous()


def make_inputs(
    shape,
    dtype,
    layout="contiguous",
    affine=True,
    scale_shift=True,
    param_dtypes=None,
    loc=0.0,
    std=1.0,
    device="cpu",
):
    """x in ``dtype`` and ``layout``; random weight, bias (not 1/0) and scale, shift [N, C]; on ``device``."""
    n, c = shape[:2]
    w_dtype, b_dtype, s_dtype, t_dtype = param_dtypes or (F32, F32, dtype, dtype)
    x = to_layout((torch.randn(shape, dtype=torch.float64) * std + loc).to(dtype), layout)
    weight = (1 + 0.5 * torch.randn(c)).to(w_dtype) if affine else None
    bias = (0.5 * torch.randn(c)).to(b_dtype) if affine else None
    scale = (0.5 * torch.randn(n, c)).to(s_dtype) if scale_shift else None
    shift = (0.5 * torch.randn(n, c)).to(t_dtype) if scale_shift else None
    return tuple(None if t is None else t.to(device) for t in (x, weight, bias, scale, shift))


def cpu(*tensors):
    """The tensors on the CPU (None stays None), for the float64 references."""
    return [None if t is None else t.cpu() for t in tensors]


def check_against_reference(
    shape,
    groups,
    dtype,
    layout,
    silu,
    affine,
    scale_shift,
    *,
    tuning=gn.DEFAULT_TUNING,
    param_dtypes=None,
    loc=0.0,
    std=1.0,
    dy_layout=None,
    device="cpu",
):
    x, weight, bias, scale, shift = make_inputs(
        shape, dtype, layout, affine, scale_shift, param_dtypes, loc, std, device
    )
    eps = 1e-5
    y, mean, rstd = gn.group_norm_forward(x, groups, weight, bias, scale, shift, eps, silu, tuning=tuning)
    ref_y, ref_mean, ref_rstd = reference_forward(
        *cpu(x), groups, *cpu(weight, bias, scale, shift), eps, silu
    )
    assert_matches(y, ref_y, dtype, "y")
    layout_strides = x.contiguous().stride() if layout == "spatial_transposed" else x.stride()
    assert y.stride() == layout_strides, "y must have x's memory format"
    assert_matches(mean, ref_mean, F32, "mean")
    assert rstd.dtype == F32 and rstd.shape == ref_rstd.shape
    torch.testing.assert_close(rstd.double().cpu(), ref_rstd, rtol=1e-4, atol=0)

    dy = to_layout(torch.randn(shape, dtype=torch.float64).to(dtype), dy_layout or layout).to(device)
    grads = gn.group_norm_backward(
        dy, x, groups, weight, bias, scale, shift, mean, rstd, silu, ALL_GRADS, tuning=tuning
    )
    expected = reference_grads(*cpu(dy, x), groups, *cpu(weight, bias, scale, shift), eps, silu)
    names = ("dx", "dweight", "dbias", "dscale", "dshift")
    for name, grad, ref, like in zip(names, grads, expected, (x, weight, bias, scale, shift), strict=True):
        if like is None:
            assert grad is None, f"{name} must be None for an absent input"
            continue
        assert_matches(grad, ref, like.dtype, name)
    assert grads[0].stride() == layout_strides, "dx must have x's memory format"


# ------------------------------------------------------------------------------------------------
# numerics
# ------------------------------------------------------------------------------------------------

# (shape, groups, dtype, layout, silu, affine, scale_shift)
CASES = [
    ((2, 6, 7, 7), 3, F32, "contiguous", True, True, True),
    ((2, 6, 7, 7), 3, BF16, "channels_last", True, True, True),
    ((3, 8, 33), 4, F16, "contiguous", True, True, False),
    ((2, 4), 2, F32, "contiguous", False, True, True),
    ((2, 8, 3, 4, 5), 2, BF16, "channels_last", True, True, True),
    ((2, 8, 3, 4, 5), 4, F32, "contiguous", False, False, False),
    ((1, 6, 1, 1), 3, F16, "channels_last", True, True, True),
    ((2, 4, 5, 6), 2, F16, "spatial_transposed", True, False, True),
    ((2, 4, 48, 48), 2, F32, "contiguous", True, True, True),  # default tuning takes the split path
    ((1, 32, 40, 40), 2, BF16, "contiguous", True, True, True),  # split, 16 channels in 4-channel tiles
    ((2, 32, 16, 16), 32, BF16, "channels_last", False, True, False),  # one channel per group
]


@pytest.mark.parametrize(("shape", "groups", "dtype", "layout", "silu", "affine", "scale_shift"), CASES)
def test_matches_float64_reference(shape, groups, dtype, layout, silu, affine, scale_shift, kernel_device):
    check_against_reference(shape, groups, dtype, layout, silu, affine, scale_shift, device=kernel_device)


@pytest.mark.parametrize(
    ("shape", "groups", "dtype", "layout"),
    [
        ((1, 12, 5, 7), 2, F32, "contiguous"),
        ((1, 12, 3, 5), 2, BF16, "channels_last"),
        ((1, 6, 37), 3, F16, "contiguous"),
    ],
)
def test_split_groups_match_float64_reference(shape, groups, dtype, layout, kernel_device):
    geometry = gn_host._geometry(shape[0] * groups, shape[1] // groups, math.prod(shape[2:]), 1, TINY_SPLIT)
    assert not geometry.fused and geometry.num_chunks > TINY_SPLIT.block_p
    check_against_reference(
        shape, groups, dtype, layout, True, True, True, tuning=TINY_SPLIT, device=kernel_device
    )


def test_split_tiles_of_contiguous_x_take_one_shape_whatever_the_channels_per_group():
    """Fewer kernels to compile: where S is the unit stride, every split launch of the default tuning
    takes 4-channel tiles and chunks that hold whole tiles; channels_last keeps channel-wide tiles."""
    widest = max(c.meta["TILE"] for c in gn.SPLIT_CONFIGS)
    for group_channels in (4, 8, 12, 16, 24, 32):
        for spatial in (2048, 4096, 65536):
            geometry = gn_host._geometry(4096, group_channels, spatial, 4096, gn.DEFAULT_TUNING, True)
            assert not geometry.fused and geometry.block_c == 4
            assert geometry.chunk_spatial * geometry.block_c >= widest
            assert (geometry.num_chunks - 1) * geometry.chunk_spatial < spatial
            channels_last = gn_host._geometry(4096, group_channels, spatial, 4096, gn.DEFAULT_TUNING)
            assert channels_last.block_c == min(32, 1 << (group_channels - 1).bit_length())
    with pytest.raises(ValueError, match="max_block_c_spatial_major"):
        gn.GroupNormTuning(max_block_c_spatial_major=3)


def test_independent_parameter_dtypes(kernel_device):
    """x fp16 with weight bf16, bias fp32, scale fp32, shift bf16: each gradient in its input's dtype."""
    dtypes = (BF16, F32, F32, BF16)
    check_against_reference(
        (2, 6, 5, 5), 3, F16, "contiguous", True, True, True, param_dtypes=dtypes, device=kernel_device
    )


def test_dy_layout_differs_from_x(kernel_device):
    for dtype, layout, dy_layout in (
        (BF16, "channels_last", "contiguous"),
        (F32, "contiguous", "channels_last"),
    ):
        check_against_reference(
            (2, 6, 5, 7), 3, dtype, layout, True, True, True, dy_layout=dy_layout, device=kernel_device
        )


@pytest.mark.parametrize("tuning", [gn.DEFAULT_TUNING, TINY_SPLIT], ids=["fused", "split"])
def test_large_mean_keeps_precision(tuning, kernel_device):
    """mean 1e3, std 1: a one-pass E[x^2] - E[x]^2 loses every digit of the variance here."""
    check_against_reference(
        (2, 6, 6, 6), 3, F32, "contiguous", True, True, True, tuning=tuning, loc=1e3, device=kernel_device
    )


@pytest.mark.parametrize("tuning", [gn.DEFAULT_TUNING, TINY_SPLIT], ids=["fused", "split"])
def test_fp16_values_whose_squares_overflow_fp16(tuning, kernel_device):
    check_against_reference(
        (2, 4, 6, 6), 2, F16, "contiguous", True, True, True, tuning=tuning, std=3000.0, device=kernel_device
    )


def test_empty_batch(kernel_device):
    x, weight, bias, scale, shift = make_inputs((0, 6, 4, 4), BF16, device=kernel_device)
    y, mean, rstd = gn.group_norm_forward(x, 3, weight, bias, scale, shift, 1e-5, True)
    assert y.shape == x.shape and y.dtype == BF16
    assert mean.shape == (0, 3) and rstd.shape == (0, 3) and mean.dtype == F32
    grads = gn.group_norm_backward(
        torch.empty_like(x), x, 3, weight, bias, scale, shift, mean, rstd, True, ALL_GRADS
    )
    assert grads[0].shape == x.shape
    for grad, like in zip(grads[1:], (weight, bias, scale, shift), strict=True):
        assert grad.shape == like.shape and grad.dtype == like.dtype and not grad.any().item()


def test_only_requested_gradients(kernel_device):
    x, weight, bias, scale, shift = make_inputs((2, 6, 5, 5), F32, device=kernel_device)
    _, mean, rstd = gn.group_norm_forward(x, 3, weight, bias, scale, shift, 1e-5, True)
    dy = torch.randn_like(x)
    expected = reference_grads(*cpu(dy, x), 3, *cpu(weight, bias, scale, shift), 1e-5, True)
    for needs in [(True, False, False, False, False), (False, True, False, False, True), (False,) * 5]:
        grads = gn.group_norm_backward(dy, x, 3, weight, bias, scale, shift, mean, rstd, True, needs)
        for need, grad, ref in zip(needs, grads, expected, strict=True):
            if need:
                assert_matches(grad, ref, F32, "gradient")
            else:
                assert grad is None


@pytest.mark.parametrize("tuning", [gn.DEFAULT_TUNING, TINY_SPLIT], ids=["fused", "split"])
def test_bitwise_deterministic(tuning, kernel_device):
    x, weight, bias, scale, shift = make_inputs((1, 6, 5, 7), BF16, "channels_last", device=kernel_device)
    dy = torch.randn_like(x)
    runs = []
    for _ in range(2):
        y, mean, rstd = gn.group_norm_forward(x, 3, weight, bias, scale, shift, 1e-5, True, tuning=tuning)
        grads = gn.group_norm_backward(
            dy, x, 3, weight, bias, scale, shift, mean, rstd, True, ALL_GRADS, tuning=tuning
        )
        runs.append((y, mean, rstd, *grads))
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first.contiguous().view(torch.uint8), second.contiguous().view(torch.uint8))


@pytest.mark.parametrize("kernel", gn.KERNELS, ids=lambda k: k.name)
def test_fixed_rule_picks_from_the_list_within_the_register_budget(kernel):
    """The fixed rule's config is one of the kernel's list and holds at most the per-thread element budget
    the compile report proved spill-free, for every tile the host can ask for, with few and many programs."""
    fused = "BLOCK_S" in launch.launch_constexprs(kernel)
    limit = (
        gn.DEFAULT_TUNING.fused_max_forward
        if kernel is gn.FWD_FUSED
        else gn.DEFAULT_TUNING.fused_max_backward
    )
    for programs in (1, 64, 100_000):
        if fused:
            cases = [({"BLOCK_C": c, "BLOCK_S": limit // c}, {"tile": limit}) for c in (1, 4, 32)]
            cases += [
                ({"BLOCK_C": 1, "BLOCK_S": 1}, {"tile": 1}),
                ({"BLOCK_C": 2, "BLOCK_S": 8}, {"tile": 16}),
            ]
        else:
            cases = [({"BLOCK_C": c}, {"chunk_spatial": s}) for c in (1, 4, 32) for s in (1, 7, 64, 2048)]
        for constexprs, sizes in cases:
            problem = launch.Problem({**sizes, "programs": programs}, constexprs, BF16, (9, 0))
            config = kernel.rule(problem)
            assert config in kernel.configs
            assert kernel.fits(problem, config), (constexprs, sizes, config)


def test_a_fused_backward_takes_a_warp_per_eight_channels():
    """Triton 3.6 spilled the fused backward's [32 channels x 32 positions] tile at 2 warps: the rule gives
    a fused backward program at least BLOCK_C / 8 warps (the forward keeps 1), however many programs fill
    the GPU, and autotuning prunes the configs below that."""
    for programs in (1, 100_000):
        for block_c, block_s in ((32, 32), (32, 1), (16, 16), (8, 8), (1, 64)):
            sizes = {"tile": block_c * block_s, "programs": programs}
            problem = launch.Problem(sizes, {"BLOCK_C": block_c, "BLOCK_S": block_s}, BF16, (8, 0))
            backward = gn.BWD_FUSED.rule(problem)
            assert backward.num_warps >= max(1, block_c // 8), (block_c, block_s, programs, backward)
            assert gn.FWD_FUSED.rule(problem).num_warps <= backward.num_warps
            too_few = [c for c in gn.FUSED_CONFIGS if c.num_warps < block_c // 8]
            assert not any(gn.BWD_FUSED.fits(problem, c) for c in too_few)
    tiny = launch.Problem({"tile": 1024, "programs": 100_000}, {"BLOCK_C": 32, "BLOCK_S": 32}, BF16, (8, 0))
    assert gn.BWD_FUSED.rule(tiny).num_warps == 4 and gn.FWD_FUSED.rule(tiny).num_warps == 2


# TINY_SPLIT without its tile override, so that the launch layer's choice (or force_config) sets TILE.
TINY_SPLIT_LISTED_TILES = gn.GroupNormTuning(
    fused_always=1, fused_max_forward=1, fused_max_backward=1, chunk_elements=24, min_chunk_elements=24,
    target_programs=1, max_block_c=4, block_p=2,
)  # fmt: skip


@pytest.mark.parametrize("kernel", gn.KERNELS, ids=lambda k: k.name)
def test_every_config_of_every_list_runs(kernel, kernel_device):
    """Each entry of the kernel's config list, forced in turn, gives float64-close outputs and gradients
    (fused kernels at a fused shape, split kernels at a split shape)."""
    fused = kernel in (gn.FWD_FUSED, gn.BWD_FUSED)
    tuning = gn.DEFAULT_TUNING if fused else TINY_SPLIT_LISTED_TILES
    shape = (1, 4, 3, 5)
    assert gn.launch_path(shape, 2, kernel is gn.BWD_FUSED, tuning) == ("fused" if fused else "split")
    for config in kernel.configs:
        with launch.force_config(kernel.name, config):
            check_against_reference(
                shape, 2, BF16, "channels_last", True, True, True, tuning=tuning, device=kernel_device
            )
        assert launch.last_config(kernel.name) == config


@pytest.mark.parametrize("spatial", [2**20, 2**30, 2**31 - 1])
def test_huge_groups_fit_the_grid(spatial):
    """Chunks grow rather than outnumber a CUDA grid axis (65535), and still cover every position."""
    for group_channels in (1, 3):
        geometry = gn_host._geometry(2, group_channels, spatial, 1, gn.DEFAULT_TUNING)
        assert not geometry.fused and 1 <= geometry.num_chunks <= gn.MAX_GRID_Y
        assert (geometry.num_chunks - 1) * geometry.chunk_spatial < spatial
        assert geometry.num_chunks * geometry.chunk_spatial >= spatial


def test_rejects_unsupported_dtypes():
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailableError, match="float64"):
        ops.group_norm(x, 2, None, None)
    weight = torch.ones(4, dtype=torch.float64)
    with (
        ops.use_backend("triton"),
        pytest.raises(ops.BackendUnavailableError, match=r"parameters, got torch\.float64"),
    ):
        ops.group_norm(x.float(), 2, weight, None)
    with pytest.raises(AssertionError, match="float32, float16 or bfloat16"):  # the kernels' own invariant
        gn.group_norm_forward(x, 2, None, None, None, None, 1e-5, False)
    with pytest.raises(ValueError, match="split_tile"):
        gn.GroupNormTuning(split_tile=12)
    with pytest.raises(ValueError, match="fused_max_backward"):
        gn.GroupNormTuning(fused_max_backward=2 * gn.DEFAULT_TUNING.fused_max_backward)


# ------------------------------------------------------------------------------------------------
# memory traffic (bytes are deterministic under the interpreter)
# ------------------------------------------------------------------------------------------------


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.mark.parametrize(
    ("path", "tuning", "forward_bound", "backward_bound"),
    [
        ("fused", gn.DEFAULT_TUNING, 1.05, 1.1),
        (
            "split",
            gn.GroupNormTuning(fused_always=256, chunk_elements=512, min_chunk_elements=512),
            1.55,
            1.75,
        ),
    ],
)
def test_traffic_near_floor(path, tuning, forward_bound, backward_bound):
    """Floor: each input read once, each output written once. The split path reads x (and dy) twice."""
    shape = (2, 8, 16, 16)
    assert gn.launch_path(shape, 2, False, tuning) == gn.launch_path(shape, 2, True, tuning) == path
    x, weight, bias, scale, shift = make_inputs(shape, BF16)
    with count_traffic() as forward:
        y, mean, rstd = gn.group_norm_forward(x, 2, weight, bias, scale, shift, 1e-5, True, tuning=tuning)
    dy = torch.randn_like(x)
    with count_traffic() as backward:
        grads = gn.group_norm_backward(
            dy, x, 2, weight, bias, scale, shift, mean, rstd, True, ALL_GRADS, tuning=tuning
        )
    forward_floor = _bytes(x, weight, bias, scale, shift, y, mean, rstd)
    backward_floor = _bytes(dy, x, weight, bias, scale, shift, mean, rstd, *grads)
    assert forward_floor <= forward.bytes_total <= forward_bound * forward_floor
    # The kernels write per-(n, c) fp32 sums in place of the four parameter gradients (reduced by torch).
    assert backward_floor * 0.99 <= backward.bytes_total <= backward_bound * backward_floor


def test_traffic_counter_counts_active_lanes_only():
    x = torch.randn(3, 5, 7)  # fp32; 35 elements per group of one sample
    with count_traffic() as traffic:
        y, mean, rstd = gn.group_norm_forward(x, 1, None, None, None, None, 1e-5, False)
    assert traffic.bytes_read == (x.numel() + 3) * 4  # x, and each group's first element once more (pivot)
    assert traffic.bytes_written == (y.numel() + mean.numel() + rstd.numel()) * 4
    with pytest.raises(RuntimeError, match="nested"), count_traffic(), count_traffic():
        pass
