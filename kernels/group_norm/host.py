"""Host launch of the GroupNorm kernels: cut a problem into programs (fused or split), view the tensors as
``[N, C, S]`` in place, launch through the launch layer and turn the kernels' per-channel sums into the
parameter gradients.

Inputs are checked once, at the op boundary (``fastdiff.ops``); these functions only assert what the kernels
themselves rely on (dtypes they were compiled for, one device, 32-bit offsets inside one sample).
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
import triton

from .. import launch
from ..limits import MAX_SAMPLE_ELEMENTS
from .configs import (
    BWD_FUSED,
    BWD_PARTIAL_SUMS,
    BWD_SPLIT_APPLY,
    DEFAULT_TUNING,
    FWD_FUSED,
    FWD_PARTIAL_STATS,
    FWD_SPLIT_APPLY,
    MAX_GRID_Y,
    MAX_WARPS,
    SPLIT_CONFIGS,
    SUPPORTED_DTYPES,
    GroupNormTuning,
    pass_args,
)

Tensor = torch.Tensor
OptTensor = Tensor | None


def _launch(
    kernel: launch.Kernel,
    grid: tuple[int, ...],
    args: tuple,
    meta: dict[str, Any],
    like: Tensor,
    tuning: GroupNormTuning,
    geometry: "_Geometry",
) -> None:
    """Run ``kernel`` through the launch layer; a ``tuning.split_tile`` override fixes the split TILE."""
    sizes = {"programs": grid[0] * (grid[1] if len(grid) > 1 else 1)}
    if "BLOCK_S" in meta:
        sizes["tile"] = meta["BLOCK_C"] * meta["BLOCK_S"]
    else:
        sizes["chunk_spatial"] = geometry.chunk_spatial
    config = None
    if "BLOCK_S" not in meta and tuning.split_tile is not None:
        tile = tuning.split_tile
        config = launch.Config(num_warps=min(MAX_WARPS, max(1, tile // 256)), tiles={"TILE": tile})
    launch.run(kernel, grid, args, meta, like=like, sizes=sizes, config=config)


# ----------------------------------------------------------------------------------------------------
# Host API
# ----------------------------------------------------------------------------------------------------


def _collapsed_strides(t: Tensor) -> tuple[int, int, int] | None:
    """(stride_n, stride_c, stride_s) viewing ``t`` [N, C, *spatial] as [N, C, S].

    None when the spatial dims cannot be walked with one stride."""
    sizes, strides = t.shape[2:], t.stride()[2:]
    stride_s = None
    expected = None
    for size, stride in zip(reversed(sizes), reversed(strides), strict=True):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return None
        if stride_s is None:
            stride_s = stride
        expected = stride * size
    return t.stride(0), t.stride(1), 1 if stride_s is None else stride_s


def _in_place_view(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """``t`` (one contiguous copy when its spatial dims cannot share one stride) and its [N, C, S] strides.

    Offsets inside one sample are 32-bit in the kernels (the sample index is 64-bit): the op boundary
    keeps dense samples below ``MAX_SAMPLE_ELEMENTS``.
    """
    span = sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))
    assert span < MAX_SAMPLE_ELEMENTS, f"offsets inside one sample reach {span}"
    strides = _collapsed_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _collapsed_strides(t)
    return t, strides


def _matrix_strides(t: OptTensor, n: int, c: int) -> tuple[OptTensor, int, int]:
    """``t`` viewed as [N, C] (a trailing 1, 1 is dropped) with its two strides; (None, 0, 0) for None."""
    if t is None:
        return None, 0, 0
    t = t.reshape(n, c)
    return t, t.stride(0), t.stride(1)


def _affine_args(
    placeholder: Tensor,
    weight: OptTensor,
    bias: OptTensor,
    scale: OptTensor,
    shift: OptTensor,
    scale_strides: list[int],
    shift_strides: list[int],
) -> dict[str, Any]:
    """The kernels' affine arguments by name; ``placeholder`` (never dereferenced) stands for an absent
    optional input."""
    params = (placeholder if t is None else t for t in (weight, bias, scale, shift))
    strides = (*scale_strides, *shift_strides)
    return {
        **dict(zip(("weight_ptr", "bias_ptr", "scale_ptr", "shift_ptr"), params, strict=True)),
        **dict(
            zip(
                ("stride_scale_n", "stride_scale_c", "stride_shift_n", "stride_shift_c"), strides, strict=True
            )
        ),
    }


def _shape_args(num_groups: int, group_channels: int, spatial: int, geometry: "_Geometry") -> dict[str, int]:
    """The kernels' problem-size arguments by name."""
    return {
        "num_groups": num_groups,
        "group_channels": group_channels,
        "spatial": spatial,
        "chunk_spatial": geometry.chunk_spatial,
        "num_chunks": geometry.num_chunks,
    }


def _shared_args(
    x: Tensor,
    x_strides: tuple[int, int, int],
    num_groups: int,
    weight: OptTensor,
    bias: OptTensor,
    scale: OptTensor,
    shift: OptTensor,
    fused_max: int,
    tuning: GroupNormTuning,
) -> tuple[dict[str, Any], "_Geometry"]:
    """What the forward and the backward launches share: the affine and problem-size arguments by name
    and the launch geometry, for x ``[N, C, *spatial]`` read in place with ``x_strides`` (its [N, C, S]
    strides); weight, bias ``[C]``, scale, shift ``[N, C]`` or None. ``fused_max``: the direction's
    largest fused tile (``tuning.fused_max_forward`` or ``fused_max_backward``)."""
    n, channels = x.shape[:2]
    group_channels, spatial = channels // num_groups, math.prod(x.shape[2:])
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    scale, *scale_strides = _matrix_strides(scale, n, channels)
    shift, *shift_strides = _matrix_strides(shift, n, channels)
    spatial_major = x_strides[2] == 1 and x_strides[1] != 1
    geometry = _geometry(n * num_groups, group_channels, spatial, fused_max, tuning, spatial_major)
    args = {
        **_affine_args(x, weight, bias, scale, shift, scale_strides, shift_strides),
        **_shape_args(num_groups, group_channels, spatial, geometry),
    }
    return args, geometry


def _stride_args(name: str, strides: tuple[int, int, int]) -> dict[str, int]:
    """``stride_<name>n``, ``stride_<name>c``, ``stride_<name>s`` of an [N, C, S] view."""
    return dict(zip((f"stride_{name}{axis}" for axis in "ncs"), strides, strict=True))


def _flags(weight: OptTensor, bias: OptTensor, scale: OptTensor, silu: bool) -> dict[str, bool]:
    """The variant constexprs: which optional inputs are given, and SiLU."""
    return {
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "HAS_SCALE_SHIFT": scale is not None,
        "SILU": bool(silu),
    }


def _assert_inputs(**tensors: OptTensor) -> None:
    """The kernels' own invariants: every given tensor of a dtype they were compiled for, on one device."""
    given = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    assert len(devices) == 1, f"one device expected, got {devices}"
    dtypes = {name: t.dtype for name, t in given.items() if t.dtype not in SUPPORTED_DTYPES}
    assert not dtypes, f"the Triton kernels take float32, float16 or bfloat16, got {dtypes}"


@dataclass(frozen=True)
class _Geometry:
    """How one (N, G, Cg, S) problem is cut into programs."""

    fused: bool
    block_c: int
    block_s: int
    chunk_spatial: int
    num_chunks: int


def _geometry(
    num_programs: int,
    group_channels: int,
    spatial: int,
    fused_max: int,
    tuning: GroupNormTuning,
    spatial_major: bool = False,
) -> _Geometry:
    """Fused or split launch geometry for ``num_programs`` = N * G groups of [group_channels, spatial].

    ``spatial_major``: the spatial axis is x's unit stride; split tiles then take at most
    ``tuning.max_block_c_spatial_major`` channels and a chunk spans at least one widest tile along S, so
    the tile shape does not depend on the channels per group (fewer kernels to compile)."""
    block_c = triton.next_power_of_2(group_channels)
    block_s = triton.next_power_of_2(spatial)
    tile = block_c * block_s
    if tile <= tuning.fused_always or (tile <= fused_max and num_programs >= tuning.min_fused_programs):
        return _Geometry(True, block_c, block_s, spatial, 1)
    total = num_programs * group_channels * spatial
    chunk_elements = min(
        tuning.chunk_elements, max(tuning.min_chunk_elements, total // tuning.target_programs)
    )
    chunk_spatial = max(1, chunk_elements // group_channels)
    if spatial_major:
        block_c = min(block_c, tuning.max_block_c_spatial_major)
        widest = tuning.split_tile or max(c.meta["TILE"] for c in SPLIT_CONFIGS)
        chunk_spatial = max(chunk_spatial, widest // block_c)
    if chunk_spatial >= 32:
        chunk_spatial -= chunk_spatial % 16
    chunk_spatial = min(chunk_spatial, spatial)
    num_chunks = triton.cdiv(spatial, chunk_spatial)
    if num_chunks > MAX_GRID_Y:  # larger chunks rather than more than a grid axis holds
        chunk_spatial = triton.cdiv(triton.cdiv(spatial, MAX_GRID_Y), 16) * 16
        num_chunks = triton.cdiv(spatial, chunk_spatial)
    block_c = min(block_c, tuning.max_block_c, tuning.split_tile or tuning.max_block_c)
    return _Geometry(False, block_c, 0, chunk_spatial, num_chunks)


def launch_path(
    x_shape: tuple[int, ...],
    num_groups: int,
    backward: bool = False,
    tuning: GroupNormTuning = DEFAULT_TUNING,
) -> str:
    """``"fused"`` (one program per group, x read once) or ``"split"`` (x, and dy, read twice): the path
    ``group_norm_forward`` (or ``group_norm_backward``) takes for x of shape ``x_shape`` [N, C, *spatial]."""
    n, channels = x_shape[:2]
    fused_max = tuning.fused_max_backward if backward else tuning.fused_max_forward
    geometry = _geometry(n * num_groups, channels // num_groups, math.prod(x_shape[2:]), fused_max, tuning)
    return "fused" if geometry.fused else "split"


def group_norm_forward(
    x: Tensor,
    num_groups: int,
    weight: OptTensor,
    bias: OptTensor,
    scale: OptTensor,
    shift: OptTensor,
    eps: float,
    silu: bool,
    *,
    tuning: GroupNormTuning = DEFAULT_TUNING,
) -> tuple[Tensor, Tensor, Tensor]:
    """y = act(((x - mean_g) * rstd_g * weight + bias) * (1 + scale) + shift), act = SiLU if ``silu``.

    x ``[N, C, *spatial]`` fp32/fp16/bf16 (contiguous or channels_last, read in place); weight, bias ``[C]``
    or None; scale, shift ``[N, C]`` or both None; any float dtypes. Returns y (x's dtype, shape and memory
    format), mean ``[N, G]`` and rstd ``[N, G]`` in fp32.
    """
    _assert_inputs(x=x, weight=weight, bias=bias, scale=scale, shift=shift)
    assert (scale is None) == (shift is None), "scale and shift come together"
    n = x.shape[0]
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        mean.zero_()
        rstd.fill_(float(eps) ** -0.5 if eps > 0 else math.inf)
        return torch.empty_like(x), mean, rstd

    x, x_strides = _in_place_view(x)
    y = torch.empty_like(x)
    shared, geometry = _shared_args(
        x, x_strides, num_groups, weight, bias, scale, shift, tuning.fused_max_forward, tuning
    )
    named = {
        "x_ptr": x,
        "y_ptr": y,
        **shared,
        "mean_ptr": mean,
        "rstd_ptr": rstd,
        **_stride_args("x", x_strides),
        **_stride_args("y", _collapsed_strides(y)),
        "eps": float(torch.tensor(eps, dtype=torch.float32)),
    }
    flags = _flags(weight, bias, scale, silu)
    if geometry.fused:
        args = pass_args(FWD_FUSED, **named)
        meta = {**flags, "BLOCK_C": geometry.block_c, "BLOCK_S": geometry.block_s}
        _launch(FWD_FUSED, (n * num_groups,), args, meta, x, tuning, geometry)
        return y, mean, rstd

    partials = torch.empty((3, n * num_groups * geometry.num_chunks), device=x.device, dtype=torch.float32)
    named.update(zip(("part_count_ptr", "part_mean_ptr", "part_m2_ptr"), partials, strict=True))
    grid = (n * num_groups, geometry.num_chunks)
    stats_args = pass_args(FWD_PARTIAL_STATS, **named)
    _launch(FWD_PARTIAL_STATS, grid, stats_args, {"BLOCK_C": geometry.block_c}, x, tuning, geometry)
    meta = {**flags, "BLOCK_C": geometry.block_c, "BLOCK_P": tuning.block_p}
    _launch(FWD_SPLIT_APPLY, grid, pass_args(FWD_SPLIT_APPLY, **named), meta, x, tuning, geometry)
    return y, mean, rstd


def group_norm_backward(
    dy: Tensor,
    x: Tensor,
    num_groups: int,
    weight: OptTensor,
    bias: OptTensor,
    scale: OptTensor,
    shift: OptTensor,
    mean: Tensor,
    rstd: Tensor,
    silu: bool,
    needs_input_grad: tuple[bool, bool, bool, bool, bool],
    *,
    tuning: GroupNormTuning = DEFAULT_TUNING,
) -> tuple[OptTensor, OptTensor, OptTensor, OptTensor, OptTensor]:
    """Gradients w.r.t. (x, weight, bias, scale, shift) given dy (x's shape, any of the two layouts).

    mean, rstd ``[N, G]`` are the forward's statistics; SiLU is recomputed from them and x. Each gradient
    is None when its flag is False or its input is None, else in its input's dtype and shape (dx also in
    x's memory format).
    """
    _assert_inputs(dy=dy, x=x, weight=weight, bias=bias, scale=scale, shift=shift)
    assert mean.device == rstd.device == x.device, "the statistics live on x's device"
    inputs = (x, weight, bias, scale, shift)
    need_dx, need_weight, need_bias, need_scale, need_shift = (
        bool(flag) and t is not None for flag, t in zip(needs_input_grad, inputs, strict=True)
    )
    need_sums = need_weight or need_bias or need_scale or need_shift
    if not (need_dx or need_sums):
        return (None,) * 5
    n, channels = x.shape[:2]
    if x.numel() == 0:
        sums = torch.zeros((2, n, channels), device=x.device, dtype=torch.float32)
        dx = torch.empty_like(x) if need_dx else None
    else:
        sums = torch.empty((2, n, channels), device=x.device, dtype=torch.float32)
        dx = _backward_kernels(
            dy, x, need_dx, num_groups, weight, bias, scale, shift, mean, rstd, silu, sums, need_sums, tuning
        )
    sum_a, sum_b = sums[0], sums[1]
    one_plus_scale = None if scale is None else 1.0 + scale.reshape(n, channels).float()
    grads: list[OptTensor] = [dx, None, None, None, None]
    if need_weight:
        grads[1] = (sum_a if one_plus_scale is None else sum_a * one_plus_scale).sum(0).to(weight.dtype)
    if need_bias:
        grads[2] = (sum_b if one_plus_scale is None else sum_b * one_plus_scale).sum(0).to(bias.dtype)
    if need_scale:
        dscale = sum_a if weight is None else sum_a * weight.float()
        if bias is not None:
            dscale = dscale + sum_b * bias.float()
        grads[3] = dscale.to(scale.dtype).reshape(scale.shape)
    if need_shift:
        grads[4] = sum_b.to(shift.dtype).reshape(shift.shape)
    return tuple(grads)


def _backward_kernels(
    dy: Tensor,
    x: Tensor,
    need_dx: bool,
    num_groups: int,
    weight: OptTensor,
    bias: OptTensor,
    scale: OptTensor,
    shift: OptTensor,
    mean: Tensor,
    rstd: Tensor,
    silu: bool,
    sums: Tensor,
    need_sums: bool,
    tuning: GroupNormTuning,
) -> OptTensor:
    """Launch the backward kernels: fills ``sums`` [2, N, C] (A, B) when ``need_sums``; returns dx or None.

    dx has x's layout, or is contiguous when x's spatial dims cannot share one stride.
    """
    n, channels = x.shape[:2]
    x, x_strides = _in_place_view(x)
    dy, dy_strides = _in_place_view(dy)
    dx = torch.empty_like(x) if need_dx else None
    dx_view, dx_strides = (x, (0, 0, 0)) if dx is None else (dx, _collapsed_strides(dx))
    shared, geometry = _shared_args(
        x, x_strides, num_groups, weight, bias, scale, shift, tuning.fused_max_backward, tuning
    )
    named = {
        "dy_ptr": dy,
        "x_ptr": x,
        "dx_ptr": dx_view,
        **shared,
        "mean_ptr": mean.float().contiguous(),
        "rstd_ptr": rstd.float().contiguous(),
        "sum_a_ptr": sums[0],
        "sum_b_ptr": sums[1],
        **_stride_args("dy", dy_strides),
        **_stride_args("x", x_strides),
        **_stride_args("dx", dx_strides),
    }
    flags = _flags(weight, bias, scale, silu)
    writes = {"WRITE_DX": dx is not None, "WRITE_SUMS": need_sums}
    if geometry.fused:
        args = pass_args(BWD_FUSED, **named)
        meta = {**flags, **writes, "BLOCK_C": geometry.block_c, "BLOCK_S": geometry.block_s}
        _launch(BWD_FUSED, (n * num_groups,), args, meta, x, tuning, geometry)
        return dx

    partials = torch.empty((2, n * channels * geometry.num_chunks), device=x.device, dtype=torch.float32)
    named.update(part_a_ptr=partials[0], part_b_ptr=partials[1])
    grid = (n * num_groups, geometry.num_chunks)
    reduce_args = pass_args(BWD_PARTIAL_SUMS, **named)
    _launch(BWD_PARTIAL_SUMS, grid, reduce_args, {**flags, "BLOCK_C": geometry.block_c}, x, tuning, geometry)
    meta = {**flags, **writes, "BLOCK_C": geometry.block_c, "BLOCK_P": tuning.block_p}
    apply_grid = grid if dx is not None else (n * num_groups, 1)
    _launch(BWD_SPLIT_APPLY, apply_grid, pass_args(BWD_SPLIT_APPLY, **named), meta, x, tuning, geometry)
    return dx


# ----------------------------------------------------------------------------------------------------
