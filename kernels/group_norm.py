"""Triton kernels of the GroupNorm family: GroupNorm, GroupNorm+SiLU and scale-shift GroupNorm+SiLU.

    y = act(((x - mean_g) * rstd_g * weight[c] + bias[c]) * (1 + scale[n, c]) + shift[n, c])

for x ``[N, C, *spatial]`` (0 to 3 spatial dims), act = SiLU or identity. Every kernel sees x as
``[N, C, S]`` with one stride per axis, so contiguous and channels_last(_3d) tensors are read in place.
Statistics and arithmetic run in fp32 whatever the storage dtype (values are cast to fp32 right after
each load, which also keeps bf16 right under the Triton interpreter).

Two paths per direction, picked by the padded group size and the number of (sample, group) programs
(``launch_path`` tells which one a shape takes):

* fused: one program holds a whole group ``[BLOCK_C, BLOCK_S]`` in registers; x (and dy) are read
  once. Forward statistics are two-pass in registers (mean, then the sum of squared deviations).
* split: a group is cut into chunks of spatial positions, one program per (sample, group, chunk).
  Forward: chunks write (count, mean, M2) partials, which every apply program merges with Chan's
  formula in a fixed order, then normalises its chunk. Backward: chunks write per-channel partial sums,
  which the apply programs add in a fixed order. x (and dy) are read twice.

No float atomics anywhere: results are bitwise reproducible for a given launch configuration. Kernels
are launched through ``launch`` (the launch layer): by default a fixed rule picks each configuration from
the shape (``_fused_rule``, ``_split_rule``), so every process gives the same bits; CUDA autotuning is
opt-in (``FASTDIFF_AUTOTUNE=1``) with its picks persisted on disk. CPU tensors run under Triton's
interpreter.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from . import launch
from .compile_spec import CompileSpec

Tensor = torch.Tensor
OptTensor = Tensor | None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Triton before 3.9 (seen with 3.6) asserts in its OptimizeThreadLocality pass when the result of a
# reduction accumulated in a loop has two uses; such a result then goes through one select first.
_ONE_USE_LOOP_REDUCTIONS = tl.constexpr(tuple(map(int, triton.__version__.split(".")[:2])) < (3, 9))


# Launch configurations, kept as data: the CUDA autotuner and the compile report walk the same lists.
# Limits found with the compile report (sm_80 and sm_90, every block shape and layout): at 16 warps ptxas
# caps a thread at 64 to 128 registers and large tiles spill, so fused kernels use at most 8 warps with at
# most 32 (forward) or 16 (backward: x and dy) tile elements per thread, and split kernels at most 8.
FUSED_CONFIGS: tuple[launch.Config, ...] = tuple(launch.Config(num_warps=w) for w in (1, 2, 4, 8))
SPLIT_CONFIGS: tuple[launch.Config, ...] = tuple(
    launch.Config(num_warps=warps, tiles={"TILE": tile}) for tile, warps in ((512, 2), (1024, 4), (2048, 8))
)
FUSED_FORWARD_ELEMENTS_PER_THREAD = 32
FUSED_BACKWARD_ELEMENTS_PER_THREAD = 16
SPLIT_ELEMENTS_PER_THREAD = 8
MAX_WARPS = max(c.num_warps for c in FUSED_CONFIGS)
MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis (chunks of a group)


@dataclass(frozen=True)
class GroupNormTuning:
    """How problems are cut into programs (tile sizes count elements after padding each axis to a power of 2).

    A group whose padded tile has at most ``fused_always`` elements is always held by one program; up to
    ``fused_max_forward`` / ``fused_max_backward`` elements only when there are at least
    ``min_fused_programs`` (sample, group) programs to fill the GPU; larger groups are split.
    Split programs cover between ``min_chunk_elements`` and ``chunk_elements`` elements, aiming at
    ``target_programs`` programs in all. ``max_block_c``: widest channel block of the split kernels;
    ``block_p``: partials merged per step; ``split_tile``: elements per split tile (None: autotuned on
    CUDA, 2048 elsewhere).
    """

    fused_always: int = 4096
    fused_max_forward: int = FUSED_FORWARD_ELEMENTS_PER_THREAD * 32 * MAX_WARPS
    fused_max_backward: int = FUSED_BACKWARD_ELEMENTS_PER_THREAD * 32 * MAX_WARPS
    min_fused_programs: int = 128
    chunk_elements: int = 8192
    min_chunk_elements: int = 2048
    target_programs: int = 512
    max_block_c: int = 32
    block_p: int = 32
    split_tile: int | None = None

    def __post_init__(self) -> None:
        for name in ("fused_always", "fused_max_forward", "fused_max_backward", "max_block_c", "block_p"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"GroupNormTuning.{name} must be a power of two, got {value}")
        if self.split_tile is not None and (self.split_tile < 1 or self.split_tile & (self.split_tile - 1)):
            raise ValueError(
                f"GroupNormTuning.split_tile must be a power of two or None, got {self.split_tile}"
            )
        for name in ("min_fused_programs", "chunk_elements", "min_chunk_elements", "target_programs"):
            if getattr(self, name) < 1:
                raise ValueError(f"GroupNormTuning.{name} must be positive, got {getattr(self, name)}")
        if self.fused_max_forward > FUSED_FORWARD_ELEMENTS_PER_THREAD * 32 * MAX_WARPS:
            raise ValueError("GroupNormTuning.fused_max_forward exceeds what 8 warps hold without spilling")
        if self.fused_max_backward > FUSED_BACKWARD_ELEMENTS_PER_THREAD * 32 * MAX_WARPS:
            raise ValueError("GroupNormTuning.fused_max_backward exceeds what 8 warps hold without spilling")
        if self.max_block_c > min(c.meta["TILE"] for c in SPLIT_CONFIGS):
            raise ValueError("GroupNormTuning.max_block_c must not exceed the smallest split tile")


DEFAULT_TUNING = GroupNormTuning()


# ----------------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _channel_affine(
    weight_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    n,
    ch,
    ch_mask,
    stride_scale_n,
    stride_scale_c,
    stride_shift_n,
    stride_shift_c,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE_SHIFT: tl.constexpr,
):
    """Per-channel (mult, offset) [BLOCK_C] fp32 with z = xhat * mult + offset; zero on masked channels."""
    if HAS_WEIGHT:
        mult = tl.load(weight_ptr + ch, mask=ch_mask, other=0.0).to(tl.float32)
    else:
        mult = tl.where(ch_mask, 1.0, 0.0)
    if HAS_BIAS:
        offset = tl.load(bias_ptr + ch, mask=ch_mask, other=0.0).to(tl.float32)
    else:
        offset = tl.zeros_like(mult)
    if HAS_SCALE_SHIFT:
        scale = tl.load(scale_ptr + n * stride_scale_n + ch * stride_scale_c, mask=ch_mask, other=0.0)
        shift = tl.load(shift_ptr + n * stride_shift_n + ch * stride_shift_c, mask=ch_mask, other=0.0)
        scale1 = 1.0 + scale.to(tl.float32)
        mult = mult * scale1
        offset = offset * scale1 + shift.to(tl.float32)
    return mult, offset


@triton.jit
def _activation(z, SILU: tl.constexpr):
    if SILU:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _activation_grad(dout, z, SILU: tl.constexpr):
    """d act(z) / dz * dout, with SiLU' = s * (1 + z * (1 - s)), s = sigmoid(z)."""
    if SILU:
        s = tl.sigmoid(z)
        dout = dout * (s * (1.0 + z * (1.0 - s)))
    return dout


@triton.jit
def _group_pivot(x_base, first_channel, stride_xc):
    """The group's first element in fp32. Statistics are taken of x - pivot: with |mean| >> std (say 1e3
    and 1) a plain fp32 sum of x would carry an error of ~1e-4 std into the mean, x - pivot does not."""
    return tl.load(x_base + first_channel * stride_xc).to(tl.float32)


# ----------------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _gn_fwd_fused_kernel(
    x_ptr,
    y_ptr,
    weight_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    num_groups,
    group_channels,
    spatial,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_yn,
    stride_yc,
    stride_ys,
    stride_scale_n,
    stride_scale_c,
    stride_shift_n,
    stride_shift_c,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program per (n, g): the group [group_channels, spatial] fits one [BLOCK_C, BLOCK_S] tile."""
    pid = tl.program_id(0)
    n = pid // num_groups
    g = pid % num_groups
    c = tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    c_mask = c < group_channels
    mask = c_mask[:, None] & (s < spatial)[None, :]
    ch = g * group_channels + c

    x_offsets = ch[:, None] * stride_xc + s[None, :] * stride_xs
    x_base = x_ptr + n.to(tl.int64) * stride_xn
    x = tl.load(x_base + x_offsets, mask=mask, other=0.0).to(tl.float32)
    pivot = _group_pivot(x_base, g * group_channels, stride_xc)
    count = group_channels * spatial * 1.0
    shifted = tl.where(mask, x - pivot, 0.0)
    shifted_mean = tl.sum(shifted) / count
    centered = tl.where(mask, shifted - shifted_mean, 0.0)
    mean = pivot + shifted_mean
    rstd = tl.rsqrt(tl.sum(centered * centered) / count + eps)

    mult, offset = _channel_affine(
        weight_ptr, bias_ptr, scale_ptr, shift_ptr, n, ch, c_mask,
        stride_scale_n, stride_scale_c, stride_shift_n, stride_shift_c,
        HAS_WEIGHT, HAS_BIAS, HAS_SCALE_SHIFT,
    )  # fmt: skip
    z = centered * (mult * rstd)[:, None] + offset[:, None]
    y = _activation(z, SILU)
    y_offsets = ch[:, None] * stride_yc + s[None, :] * stride_ys
    tl.store(y_ptr + n.to(tl.int64) * stride_yn + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)


@triton.jit
def _gn_fwd_partial_stats_kernel(
    x_ptr,
    part_count_ptr,
    part_mean_ptr,
    part_m2_ptr,
    num_groups,
    group_channels,
    spatial,
    chunk_spatial,
    num_chunks,
    stride_xn,
    stride_xc,
    stride_xs,
    BLOCK_C: tl.constexpr,
    TILE: tl.constexpr,
):
    """Program (n*G + g, p): (count, mean, M2) of x - pivot over chunk p, i.e. spatial positions
    [p * chunk_spatial, (p + 1) * chunk_spatial) of all the group's channels.

    Tiles are merged with Chan's formula in loop order; each tile's M2 is taken about the tile's mean.
    """
    BLOCK_S: tl.constexpr = TILE // BLOCK_C
    pid_ng = tl.program_id(0)
    p = tl.program_id(1)
    n = pid_ng // num_groups
    g = pid_ng % num_groups
    s_start = p * chunk_spatial
    s_end = tl.minimum(s_start + chunk_spatial, spatial)
    x_base = x_ptr + n.to(tl.int64) * stride_xn
    pivot = _group_pivot(x_base, g * group_channels, stride_xc)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, group_channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < group_channels
        ch = g * group_channels + c
        for s0 in range(s_start, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = c_mask[:, None] & (s < s_end)[None, :]
            x_offsets = ch[:, None] * stride_xc + s[None, :] * stride_xs
            x = tl.load(x_base + x_offsets, mask=mask, other=0.0).to(tl.float32)
            shifted = tl.where(mask, x - pivot, 0.0)
            tile_count = tl.minimum(group_channels - c0, BLOCK_C) * tl.minimum(s_end - s0, BLOCK_S) * 1.0
            tile_mean = tl.sum(shifted) / tile_count
            centered = tl.where(mask, shifted - tile_mean, 0.0)
            tile_m2 = tl.sum(centered * centered)
            total = count + tile_count
            delta = tile_mean - mean
            mean = mean + delta * (tile_count / total)
            m2 = m2 + tile_m2 + delta * delta * (count * tile_count / total)
            count = total
    slot = pid_ng * num_chunks + p
    tl.store(part_count_ptr + slot, count)
    tl.store(part_mean_ptr + slot, mean)
    tl.store(part_m2_ptr + slot, m2)


@triton.jit
def _merged_group_stats(
    part_count_ptr, part_mean_ptr, part_m2_ptr, first_slot, num_chunks, BLOCK_P: tl.constexpr
):
    """(mean, M2, count) of a group from its num_chunks partials, merged in a fixed order.

    The mean is accumulated relative to chunk 0's mean so that a large common offset does not cancel.
    """
    pivot = tl.load(part_mean_ptr + first_slot)
    count = 0.0
    shifted = 0.0
    for p0 in range(0, num_chunks, BLOCK_P):
        q = p0 + tl.arange(0, BLOCK_P)
        q_mask = q < num_chunks
        part_count = tl.load(part_count_ptr + first_slot + q, mask=q_mask, other=0.0)
        part_mean = tl.load(part_mean_ptr + first_slot + q, mask=q_mask, other=0.0)
        count += tl.sum(part_count)
        shifted += tl.sum(part_count * (part_mean - pivot))
    mean = pivot + shifted / count
    m2 = 0.0
    for p0 in range(0, num_chunks, BLOCK_P):
        q = p0 + tl.arange(0, BLOCK_P)
        q_mask = q < num_chunks
        part_count = tl.load(part_count_ptr + first_slot + q, mask=q_mask, other=0.0)
        part_mean = tl.load(part_mean_ptr + first_slot + q, mask=q_mask, other=0.0)
        part_m2 = tl.load(part_m2_ptr + first_slot + q, mask=q_mask, other=0.0)
        delta = part_mean - mean
        m2 += tl.sum(part_m2 + part_count * delta * delta)
    return mean, m2, count


@triton.jit
def _gn_fwd_split_apply_kernel(
    x_ptr,
    y_ptr,
    weight_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    part_count_ptr,
    part_mean_ptr,
    part_m2_ptr,
    num_groups,
    group_channels,
    spatial,
    chunk_spatial,
    num_chunks,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_yn,
    stride_yc,
    stride_ys,
    stride_scale_n,
    stride_scale_c,
    stride_shift_n,
    stride_shift_c,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    TILE: tl.constexpr,
):
    """Program (n*G + g, p): merge the group's partials (of x - pivot), normalise chunk p; chunk 0 stores
    mean and rstd."""
    BLOCK_S: tl.constexpr = TILE // BLOCK_C
    pid_ng = tl.program_id(0)
    p = tl.program_id(1)
    n = pid_ng // num_groups
    g = pid_ng % num_groups
    shifted_mean, m2, count = _merged_group_stats(
        part_count_ptr, part_mean_ptr, part_m2_ptr, pid_ng * num_chunks, num_chunks, BLOCK_P
    )
    x_base = x_ptr + n.to(tl.int64) * stride_xn
    pivot = _group_pivot(x_base, g * group_channels, stride_xc)
    rstd = tl.rsqrt(m2 / count + eps)
    tl.store(mean_ptr + pid_ng, pivot + shifted_mean, mask=p == 0)
    tl.store(rstd_ptr + pid_ng, rstd, mask=p == 0)

    s_start = p * chunk_spatial
    s_end = tl.minimum(s_start + chunk_spatial, spatial)
    y_base = y_ptr + n.to(tl.int64) * stride_yn
    for c0 in range(0, group_channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < group_channels
        ch = g * group_channels + c
        mult, offset = _channel_affine(
            weight_ptr, bias_ptr, scale_ptr, shift_ptr, n, ch, c_mask,
            stride_scale_n, stride_scale_c, stride_shift_n, stride_shift_c,
            HAS_WEIGHT, HAS_BIAS, HAS_SCALE_SHIFT,
        )  # fmt: skip
        mult = mult * rstd
        for s0 in range(s_start, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = c_mask[:, None] & (s < s_end)[None, :]
            x_offsets = ch[:, None] * stride_xc + s[None, :] * stride_xs
            x = tl.load(x_base + x_offsets, mask=mask, other=0.0).to(tl.float32)
            y = _activation(((x - pivot) - shifted_mean) * mult[:, None] + offset[:, None], SILU)
            y_offsets = ch[:, None] * stride_yc + s[None, :] * stride_ys
            tl.store(y_base + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Backward kernels
#
# With xhat = (x - mean) * rstd, z = xhat * mult + offset (mult = weight * (1 + scale),
# offset = bias * (1 + scale) + shift) and dz = act'(z) * dy, per (n, c):
#   A = sum_s dz * xhat,  B = sum_s dz
# and per group of M elements: c1 = sum_c mult * A, c2 = sum_c mult * B,
#   dx = rstd * (dz * mult - (c2 + xhat * c1) / M).
# The host turns A and B [N, C] into dweight, dbias, dscale, dshift.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _gn_bwd_fused_kernel(
    dy_ptr,
    x_ptr,
    dx_ptr,
    weight_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    sum_a_ptr,
    sum_b_ptr,
    num_groups,
    group_channels,
    spatial,
    stride_dyn,
    stride_dyc,
    stride_dys,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_dxn,
    stride_dxc,
    stride_dxs,
    stride_scale_n,
    stride_scale_c,
    stride_shift_n,
    stride_shift_c,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    WRITE_DX: tl.constexpr,
    WRITE_SUMS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program per (n, g): dx of the group, and A, B [N, C] for the parameter gradients."""
    pid = tl.program_id(0)
    n = pid // num_groups
    g = pid % num_groups
    c = tl.arange(0, BLOCK_C)
    s = tl.arange(0, BLOCK_S)
    c_mask = c < group_channels
    mask = c_mask[:, None] & (s < spatial)[None, :]
    ch = g * group_channels + c
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)

    x_offsets = ch[:, None] * stride_xc + s[None, :] * stride_xs
    dy_offsets = ch[:, None] * stride_dyc + s[None, :] * stride_dys
    x = tl.load(x_ptr + n.to(tl.int64) * stride_xn + x_offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + n.to(tl.int64) * stride_dyn + dy_offsets, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mean) * rstd
    mult, offset = _channel_affine(
        weight_ptr, bias_ptr, scale_ptr, shift_ptr, n, ch, c_mask,
        stride_scale_n, stride_scale_c, stride_shift_n, stride_shift_c,
        HAS_WEIGHT, HAS_BIAS, HAS_SCALE_SHIFT,
    )  # fmt: skip
    dz = _activation_grad(dy, xhat * mult[:, None] + offset[:, None], SILU)
    sum_a = tl.sum(dz * xhat, axis=1)
    sum_b = tl.sum(dz, axis=1)
    if WRITE_SUMS:
        C = num_groups * group_channels
        tl.store(sum_a_ptr + n * C + ch, sum_a, mask=c_mask)
        tl.store(sum_b_ptr + n * C + ch, sum_b, mask=c_mask)
    if WRITE_DX:
        count = group_channels * spatial * 1.0
        c1 = tl.sum(sum_a * mult) / count
        c2 = tl.sum(sum_b * mult) / count
        dx = rstd * (dz * mult[:, None] - (c2 + xhat * c1))
        dx_offsets = ch[:, None] * stride_dxc + s[None, :] * stride_dxs
        tl.store(dx_ptr + n.to(tl.int64) * stride_dxn + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_partial_sums_kernel(
    dy_ptr,
    x_ptr,
    weight_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    part_a_ptr,
    part_b_ptr,
    num_groups,
    group_channels,
    spatial,
    chunk_spatial,
    num_chunks,
    stride_dyn,
    stride_dyc,
    stride_dys,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_scale_n,
    stride_scale_c,
    stride_shift_n,
    stride_shift_c,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TILE: tl.constexpr,
):
    """Program (n*G + g, p): per-channel A, B over chunk p, stored at [(n*C + c) * num_chunks + p]."""
    BLOCK_S: tl.constexpr = TILE // BLOCK_C
    pid_ng = tl.program_id(0)
    p = tl.program_id(1)
    n = pid_ng // num_groups
    g = pid_ng % num_groups
    mean = tl.load(mean_ptr + pid_ng)
    rstd = tl.load(rstd_ptr + pid_ng)
    s_start = p * chunk_spatial
    s_end = tl.minimum(s_start + chunk_spatial, spatial)
    x_base = x_ptr + n.to(tl.int64) * stride_xn
    dy_base = dy_ptr + n.to(tl.int64) * stride_dyn
    C = num_groups * group_channels
    for c0 in range(0, group_channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < group_channels
        ch = g * group_channels + c
        mult, offset = _channel_affine(
            weight_ptr, bias_ptr, scale_ptr, shift_ptr, n, ch, c_mask,
            stride_scale_n, stride_scale_c, stride_shift_n, stride_shift_c,
            HAS_WEIGHT, HAS_BIAS, HAS_SCALE_SHIFT,
        )  # fmt: skip
        acc_a = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(s_start, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = c_mask[:, None] & (s < s_end)[None, :]
            x_offsets = ch[:, None] * stride_xc + s[None, :] * stride_xs
            dy_offsets = ch[:, None] * stride_dyc + s[None, :] * stride_dys
            x = tl.load(x_base + x_offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_base + dy_offsets, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            dz = _activation_grad(dy, xhat * mult[:, None] + offset[:, None], SILU)
            acc_a += tl.sum(dz * xhat, axis=1)
            acc_b += tl.sum(dz, axis=1)
        slots = (n * C + ch) * num_chunks + p
        tl.store(part_a_ptr + slots, acc_a, mask=c_mask)
        tl.store(part_b_ptr + slots, acc_b, mask=c_mask)


@triton.jit
def _gn_bwd_split_apply_kernel(
    dy_ptr,
    x_ptr,
    dx_ptr,
    weight_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    part_a_ptr,
    part_b_ptr,
    sum_a_ptr,
    sum_b_ptr,
    num_groups,
    group_channels,
    spatial,
    chunk_spatial,
    num_chunks,
    stride_dyn,
    stride_dyc,
    stride_dys,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_dxn,
    stride_dxc,
    stride_dxs,
    stride_scale_n,
    stride_scale_c,
    stride_shift_n,
    stride_shift_c,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    WRITE_DX: tl.constexpr,
    WRITE_SUMS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    TILE: tl.constexpr,
):
    """Program (n*G + g, p): add the group's partial A, B in a fixed order, then dx of chunk p.

    Chunk 0 stores the totals A, B [N, C] when WRITE_SUMS.
    """
    BLOCK_S: tl.constexpr = TILE // BLOCK_C
    pid_ng = tl.program_id(0)
    p = tl.program_id(1)
    n = pid_ng // num_groups
    g = pid_ng % num_groups
    mean = tl.load(mean_ptr + pid_ng)
    rstd = tl.load(rstd_ptr + pid_ng)
    C = num_groups * group_channels
    c1 = 0.0
    c2 = 0.0
    for c0 in range(0, group_channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < group_channels
        ch = g * group_channels + c
        mult, offset = _channel_affine(
            weight_ptr, bias_ptr, scale_ptr, shift_ptr, n, ch, c_mask,
            stride_scale_n, stride_scale_c, stride_shift_n, stride_shift_c,
            HAS_WEIGHT, HAS_BIAS, HAS_SCALE_SHIFT,
        )  # fmt: skip
        total_a = tl.zeros([BLOCK_C], dtype=tl.float32)
        total_b = tl.zeros([BLOCK_C], dtype=tl.float32)
        for p0 in range(0, num_chunks, BLOCK_P):
            q = p0 + tl.arange(0, BLOCK_P)
            q_mask = c_mask[:, None] & (q < num_chunks)[None, :]
            slots = (n * C + ch)[:, None] * num_chunks + q[None, :]
            total_a += tl.sum(tl.load(part_a_ptr + slots, mask=q_mask, other=0.0), axis=1)
            total_b += tl.sum(tl.load(part_b_ptr + slots, mask=q_mask, other=0.0), axis=1)
        if _ONE_USE_LOOP_REDUCTIONS:  # same values: masked lanes hold 0
            total_a = tl.where(c_mask, total_a, 0.0)
            total_b = tl.where(c_mask, total_b, 0.0)
        c1 += tl.sum(total_a * mult)
        c2 += tl.sum(total_b * mult)
        if WRITE_SUMS:
            # a vector compare: the interpreter rejects a scalar bool combined with a vector mask
            first = c_mask & (c * 0 + p == 0)
            tl.store(sum_a_ptr + n * C + ch, total_a, mask=first)
            tl.store(sum_b_ptr + n * C + ch, total_b, mask=first)

    if WRITE_DX:
        count = group_channels * spatial * 1.0
        c1 = c1 / count
        c2 = c2 / count
        s_start = p * chunk_spatial
        s_end = tl.minimum(s_start + chunk_spatial, spatial)
        x_base = x_ptr + n.to(tl.int64) * stride_xn
        dy_base = dy_ptr + n.to(tl.int64) * stride_dyn
        dx_base = dx_ptr + n.to(tl.int64) * stride_dxn
        for c0 in range(0, group_channels, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_mask = c < group_channels
            ch = g * group_channels + c
            mult, offset = _channel_affine(
                weight_ptr, bias_ptr, scale_ptr, shift_ptr, n, ch, c_mask,
                stride_scale_n, stride_scale_c, stride_shift_n, stride_shift_c,
                HAS_WEIGHT, HAS_BIAS, HAS_SCALE_SHIFT,
            )  # fmt: skip
            for s0 in range(s_start, s_end, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                mask = c_mask[:, None] & (s < s_end)[None, :]
                x_offsets = ch[:, None] * stride_xc + s[None, :] * stride_xs
                dy_offsets = ch[:, None] * stride_dyc + s[None, :] * stride_dys
                x = tl.load(x_base + x_offsets, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_base + dy_offsets, mask=mask, other=0.0).to(tl.float32)
                xhat = (x - mean) * rstd
                dz = _activation_grad(dy, xhat * mult[:, None] + offset[:, None], SILU)
                dx = rstd * (dz * mult[:, None] - (c2 + xhat * c1))
                dx_offsets = ch[:, None] * stride_dxc + s[None, :] * stride_dxs
                tl.store(dx_base + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launching: registration with the launch layer (configs, fixed rule, argument types)
# ----------------------------------------------------------------------------------------------------

_AFFINE_POINTERS = ("weight_ptr", "bias_ptr", "scale_ptr", "shift_ptr")
_SHAPE_ARGS = ("num_groups", "group_channels", "spatial")
_CHUNK_ARGS = ("chunk_spatial", "num_chunks")
_AFFINE_STRIDES = ("stride_scale_n", "stride_scale_c", "stride_shift_n", "stride_shift_c")


def _strides(*names: str) -> tuple[str, ...]:
    """The [N, C, S] stride arguments of the named activation tensors, e.g. ``stride_xn``."""
    return tuple(f"stride_{name}{axis}" for name in names for axis in "ncs")


def _tile_elements(problem: launch.Problem, config: launch.Config) -> int:
    """Elements of one register tile: TILE for split kernels, BLOCK_C * BLOCK_S for fused ones."""
    meta = {**problem.constexprs, **config.meta}
    return meta["TILE"] if "TILE" in meta else meta["BLOCK_C"] * meta["BLOCK_S"]


def _budget(elements_per_thread: int):
    """Autotune pruning: a config may hold at most ``elements_per_thread`` tile elements per thread."""

    def fits(problem: launch.Problem, config: launch.Config) -> bool:
        return _tile_elements(problem, config) <= elements_per_thread * 32 * config.num_warps

    return fits


def _fused_rule(elements_per_thread: int):
    """Fixed warps for a fused kernel (one program per (sample, group), the whole group in registers).

    Not measured (no GPU was at hand when it was written): a group of ``tile`` padded elements is spread
    over warps so that each thread holds 8 elements when there are fewer programs than two per SM of an
    H100 (``launch.TARGET_SMS``; latency-bound, so more threads per group help) and 16 when there are
    more (the SMs are full, fewer warps per program keep more programs resident), never above the
    kernel's register budget ``elements_per_thread`` and never above 8 warps. The same rule serves
    sm_80 and sm_90.
    """

    def rule(problem: launch.Problem) -> launch.Config:
        tile = problem.sizes["tile"]
        per_thread = 8 if problem.sizes["programs"] < 2 * launch.TARGET_SMS else 16
        warps = max(1, tile // (32 * per_thread), -(-tile // (32 * elements_per_thread)))
        warps = min(MAX_WARPS, triton.next_power_of_2(warps))
        return next(c for c in FUSED_CONFIGS if c.num_warps == warps)

    return rule


def _split_rule(problem: launch.Problem) -> launch.Config:
    """Fixed tile for a split kernel: the largest TILE that does not exceed the chunk's padded elements
    (BLOCK_C x next power of 2 of the chunk's positions), so that few tile elements are masked.

    The split grid (N * G programs times the chunks) already fills the GPU by itself: chunks are cut so
    that there are about ``GroupNormTuning.target_programs`` programs, about four per SM of an H100, so the
    tile only sets how much of the chunk one loop step covers. Not measured (no GPU was at hand).
    """
    chunk = problem.constexprs["BLOCK_C"] * triton.next_power_of_2(problem.sizes["chunk_spatial"])
    fitting = [c for c in SPLIT_CONFIGS if c.meta["TILE"] <= chunk]
    return max(fitting, key=lambda c: c.meta["TILE"]) if fitting else SPLIT_CONFIGS[0]


_FWD_FUSED_TYPES = launch.arg_types(
    _gn_fwd_fused_kernel,
    storage=("x_ptr", "y_ptr"),
    fp32_pointers=(*_AFFINE_POINTERS, "mean_ptr", "rstd_ptr"),
    i32=(*_SHAPE_ARGS, *_strides("x", "y"), *_AFFINE_STRIDES),
    fp32=("eps",),
)
_FWD_PARTIAL_STATS_TYPES = launch.arg_types(
    _gn_fwd_partial_stats_kernel,
    storage=("x_ptr",),
    fp32_pointers=("part_count_ptr", "part_mean_ptr", "part_m2_ptr"),
    i32=(*_SHAPE_ARGS, *_CHUNK_ARGS, *_strides("x")),
)
_FWD_SPLIT_APPLY_TYPES = launch.arg_types(
    _gn_fwd_split_apply_kernel,
    storage=("x_ptr", "y_ptr"),
    fp32_pointers=(
        *_AFFINE_POINTERS,
        "mean_ptr",
        "rstd_ptr",
        "part_count_ptr",
        "part_mean_ptr",
        "part_m2_ptr",
    ),
    i32=(*_SHAPE_ARGS, *_CHUNK_ARGS, *_strides("x", "y"), *_AFFINE_STRIDES),
    fp32=("eps",),
)
_BWD_FUSED_TYPES = launch.arg_types(
    _gn_bwd_fused_kernel,
    storage=("dy_ptr", "x_ptr", "dx_ptr"),
    fp32_pointers=(*_AFFINE_POINTERS, "mean_ptr", "rstd_ptr", "sum_a_ptr", "sum_b_ptr"),
    i32=(*_SHAPE_ARGS, *_strides("dy", "x", "dx"), *_AFFINE_STRIDES),
)
_BWD_PARTIAL_SUMS_TYPES = launch.arg_types(
    _gn_bwd_partial_sums_kernel,
    storage=("dy_ptr", "x_ptr"),
    fp32_pointers=(*_AFFINE_POINTERS, "mean_ptr", "rstd_ptr", "part_a_ptr", "part_b_ptr"),
    i32=(*_SHAPE_ARGS, *_CHUNK_ARGS, *_strides("dy", "x"), *_AFFINE_STRIDES),
)
_BWD_SPLIT_APPLY_TYPES = launch.arg_types(
    _gn_bwd_split_apply_kernel,
    storage=("dy_ptr", "x_ptr", "dx_ptr"),
    fp32_pointers=(
        *_AFFINE_POINTERS,
        "mean_ptr",
        "rstd_ptr",
        "part_a_ptr",
        "part_b_ptr",
        "sum_a_ptr",
        "sum_b_ptr",
    ),
    i32=(*_SHAPE_ARGS, *_CHUNK_ARGS, *_strides("dy", "x", "dx"), *_AFFINE_STRIDES),
)


def _register(name: str, fn, fused: bool, elements_per_thread: int, types: dict[str, str]) -> launch.Kernel:
    return launch.register(
        name,
        family="group_norm",
        fn=fn,
        configs=FUSED_CONFIGS if fused else SPLIT_CONFIGS,
        rule=_fused_rule(elements_per_thread) if fused else _split_rule,
        arg_types=types,
        fits=_budget(elements_per_thread),
    )


FWD_FUSED = _register(
    "gn_fwd_fused", _gn_fwd_fused_kernel, True, FUSED_FORWARD_ELEMENTS_PER_THREAD, _FWD_FUSED_TYPES
)
FWD_PARTIAL_STATS = _register(
    "gn_fwd_partial_stats",
    _gn_fwd_partial_stats_kernel,
    False,
    SPLIT_ELEMENTS_PER_THREAD,
    _FWD_PARTIAL_STATS_TYPES,
)
FWD_SPLIT_APPLY = _register(
    "gn_fwd_split_apply", _gn_fwd_split_apply_kernel, False, SPLIT_ELEMENTS_PER_THREAD, _FWD_SPLIT_APPLY_TYPES
)
BWD_FUSED = _register(
    "gn_bwd_fused", _gn_bwd_fused_kernel, True, FUSED_BACKWARD_ELEMENTS_PER_THREAD, _BWD_FUSED_TYPES
)
BWD_PARTIAL_SUMS = _register(
    "gn_bwd_partial_sums",
    _gn_bwd_partial_sums_kernel,
    False,
    SPLIT_ELEMENTS_PER_THREAD,
    _BWD_PARTIAL_SUMS_TYPES,
)
BWD_SPLIT_APPLY = _register(
    "gn_bwd_split_apply", _gn_bwd_split_apply_kernel, False, SPLIT_ELEMENTS_PER_THREAD, _BWD_SPLIT_APPLY_TYPES
)
KERNELS = (FWD_FUSED, FWD_PARTIAL_STATS, FWD_SPLIT_APPLY, BWD_FUSED, BWD_PARTIAL_SUMS, BWD_SPLIT_APPLY)
ELEMENTS_PER_THREAD = {
    FWD_FUSED: FUSED_FORWARD_ELEMENTS_PER_THREAD,
    BWD_FUSED: FUSED_BACKWARD_ELEMENTS_PER_THREAD,
    **{
        k: SPLIT_ELEMENTS_PER_THREAD
        for k in (FWD_PARTIAL_STATS, FWD_SPLIT_APPLY, BWD_PARTIAL_SUMS, BWD_SPLIT_APPLY)
    },
}


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

    Offsets inside one sample are 32-bit in the kernels (the sample index is 64-bit).
    """
    if sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True)) >= 2**31:
        raise ValueError(f"offsets inside one sample must stay below 2**31, got shape {tuple(t.shape)}")
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


def _check_dtype(name: str, t: OptTensor) -> None:
    if t is not None and t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton kernels, got {t.dtype}")


@dataclass(frozen=True)
class _Geometry:
    """How one (N, G, Cg, S) problem is cut into programs."""

    fused: bool
    block_c: int
    block_s: int
    chunk_spatial: int
    num_chunks: int


def _geometry(
    num_programs: int, group_channels: int, spatial: int, fused_max: int, tuning: GroupNormTuning
) -> _Geometry:
    """Fused or split launch geometry for ``num_programs`` = N * G groups of [group_channels, spatial]."""
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
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift)):
        _check_dtype(name, t)
    launch.check_same_device(x=x, weight=weight, bias=bias, scale=scale, shift=shift)
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must both be tensors [N, C] or both be None")
    n, channels = x.shape[:2]
    group_channels = channels // num_groups
    spatial = math.prod(x.shape[2:])
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        mean.zero_()
        rstd.fill_(float(eps) ** -0.5 if eps > 0 else math.inf)
        return torch.empty_like(x), mean, rstd

    x, x_strides = _in_place_view(x)
    y = torch.empty_like(x)
    y_strides = _collapsed_strides(y)
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    scale, *scale_strides = _matrix_strides(scale, n, channels)
    shift, *shift_strides = _matrix_strides(shift, n, channels)
    placeholder = x  # the pointer passed for an absent optional input; never dereferenced
    params = tuple(placeholder if t is None else t for t in (weight, bias, scale, shift))
    flags = {
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "HAS_SCALE_SHIFT": scale is not None,
        "SILU": bool(silu),
    }
    geometry = _geometry(n * num_groups, group_channels, spatial, tuning.fused_max_forward, tuning)
    eps32 = float(torch.tensor(eps, dtype=torch.float32))
    shape_args = (num_groups, group_channels, spatial)
    if geometry.fused:
        args = (
            x, y, *params, mean, rstd, *shape_args, *x_strides, *y_strides, *scale_strides,
            *shift_strides, eps32,
        )  # fmt: skip
        meta = {**flags, "BLOCK_C": geometry.block_c, "BLOCK_S": geometry.block_s}
        _launch(FWD_FUSED, (n * num_groups,), args, meta, x, tuning, geometry)
        return y, mean, rstd

    chunks = (geometry.chunk_spatial, geometry.num_chunks)
    partials = torch.empty((3, n * num_groups * geometry.num_chunks), device=x.device, dtype=torch.float32)
    grid = (n * num_groups, geometry.num_chunks)
    stats_args = (x, *partials, *shape_args, *chunks, *x_strides)
    _launch(FWD_PARTIAL_STATS, grid, stats_args, {"BLOCK_C": geometry.block_c}, x, tuning, geometry)
    apply_args = (
        x, y, *params, mean, rstd, *partials, *shape_args, *chunks, *x_strides, *y_strides,
        *scale_strides, *shift_strides, eps32,
    )  # fmt: skip
    meta = {**flags, "BLOCK_C": geometry.block_c, "BLOCK_P": tuning.block_p}
    _launch(FWD_SPLIT_APPLY, grid, apply_args, meta, x, tuning, geometry)
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
    for name, t in (
        ("dy", dy),
        ("x", x),
        ("weight", weight),
        ("bias", bias),
        ("scale", scale),
        ("shift", shift),
    ):
        _check_dtype(name, t)
    launch.check_same_device(
        dy=dy, x=x, weight=weight, bias=bias, scale=scale, shift=shift, mean=mean, rstd=rstd
    )
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
    group_channels = channels // num_groups
    spatial = math.prod(x.shape[2:])
    x, x_strides = _in_place_view(x)
    dy, dy_strides = _in_place_view(dy)
    dx = torch.empty_like(x) if need_dx else None
    dx_view, dx_strides = (x, (0, 0, 0)) if dx is None else (dx, _collapsed_strides(dx))
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    scale, *scale_strides = _matrix_strides(scale, n, channels)
    shift, *shift_strides = _matrix_strides(shift, n, channels)
    placeholder = x  # the pointer passed for an absent optional input; never dereferenced
    params = tuple(placeholder if t is None else t for t in (weight, bias, scale, shift))
    stats = (mean.float().contiguous(), rstd.float().contiguous())
    flags = {
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "HAS_SCALE_SHIFT": scale is not None,
        "SILU": bool(silu),
    }
    writes = {"WRITE_DX": dx is not None, "WRITE_SUMS": need_sums}
    shape_args = (num_groups, group_channels, spatial)
    geometry = _geometry(n * num_groups, group_channels, spatial, tuning.fused_max_backward, tuning)
    if geometry.fused:
        args = (
            dy, x, dx_view, *params, *stats, sums[0], sums[1], *shape_args, *dy_strides, *x_strides,
            *dx_strides, *scale_strides, *shift_strides,
        )  # fmt: skip
        meta = {**flags, **writes, "BLOCK_C": geometry.block_c, "BLOCK_S": geometry.block_s}
        _launch(BWD_FUSED, (n * num_groups,), args, meta, x, tuning, geometry)
        return dx

    chunks = (geometry.chunk_spatial, geometry.num_chunks)
    partials = torch.empty((2, n * channels * geometry.num_chunks), device=x.device, dtype=torch.float32)
    grid = (n * num_groups, geometry.num_chunks)
    reduce_args = (
        dy, x, *params, *stats, *partials, *shape_args, *chunks, *dy_strides, *x_strides, *scale_strides,
        *shift_strides,
    )  # fmt: skip
    _launch(BWD_PARTIAL_SUMS, grid, reduce_args, {**flags, "BLOCK_C": geometry.block_c}, x, tuning, geometry)
    apply_args = (
        dy, x, dx_view, *params, *stats, *partials, sums[0], sums[1], *shape_args, *chunks, *dy_strides,
        *x_strides, *dx_strides, *scale_strides, *shift_strides,
    )  # fmt: skip
    meta = {**flags, **writes, "BLOCK_C": geometry.block_c, "BLOCK_P": tuning.block_p}
    apply_grid = grid if dx is not None else (n * num_groups, 1)
    _launch(BWD_SPLIT_APPLY, apply_grid, apply_args, meta, x, tuning, geometry)
    return dx


# ----------------------------------------------------------------------------------------------------
# Compile specs: every kernel x storage dtype x configuration, for the compile report
# ----------------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Channel block widths compiled for the report: the typical one (C=512 or C=128 with 32 groups) in every
# dtype and layout, and the extremes (one channel per group; the widest block) in bf16.
_TYPICAL_BLOCK_C = {"fused": 16, "split": 4}
_EXTREME_BLOCK_C = (1, 32)


def _unit_strides(kernel: launch.Kernel, layout: str) -> tuple[str, ...]:
    """Stride arguments a launch specialises to 1: spatial (contiguous) or channel (channels_last) strides of
    the activations, and the channel strides of contiguous scale and shift [N, C]."""
    axis = "s" if layout == "contiguous" else "c"
    names = [name for name, kind in kernel.arg_types.items() if kind == "i32"]
    unit = [
        n
        for n in names
        if n.startswith(("stride_x", "stride_y", "stride_dy", "stride_dx")) and n.endswith(axis)
    ]
    return (*unit, *(n for n in ("stride_scale_c", "stride_shift_c") if n in names))


def _representative_meta(
    kernel: launch.Kernel, config: launch.Config, block_c: int, tuning: GroupNormTuning
) -> dict[str, Any]:
    """Constexprs of the largest tile ``config`` serves with ``block_c`` channels per block, every optional
    input and SiLU enabled."""
    names = launch.constexpr_names(kernel.fn)
    meta: dict[str, Any] = {"HAS_WEIGHT": True, "HAS_BIAS": True, "HAS_SCALE_SHIFT": True, "SILU": True}
    meta["BLOCK_C"] = block_c
    if "BLOCK_S" in names:
        fused_max = tuning.fused_max_forward if kernel is FWD_FUSED else tuning.fused_max_backward
        tile = min(fused_max, ELEMENTS_PER_THREAD[kernel] * 32 * config.num_warps)
        meta["BLOCK_S"] = max(1, tile // block_c)
    if "BLOCK_P" in names:
        meta["BLOCK_P"] = tuning.block_p
    if "WRITE_DX" in names:
        meta.update(WRITE_DX=True, WRITE_SUMS=True)
    return {k: v for k, v in meta.items() if k in names}


def compile_specs(tuning: GroupNormTuning = DEFAULT_TUNING) -> list[CompileSpec]:
    """Every GroupNorm kernel x storage dtype x configuration at its largest tile, with parameters and
    statistics in fp32: the typical channel block in fp32, fp16 and bf16 (contiguous) and bf16
    channels_last, plus one channel per block and the widest block in bf16, both layouts."""
    specs = []
    for kernel in KERNELS:
        kind = "fused" if "BLOCK_S" in launch.constexpr_names(kernel.fn) else "split"
        typical = _TYPICAL_BLOCK_C[kind]
        variants = [(dtype, "contiguous", typical) for dtype in SUPPORTED_DTYPES]
        variants += [(torch.bfloat16, "channels_last", typical)]
        variants += [
            (torch.bfloat16, layout, c)
            for c in _EXTREME_BLOCK_C
            for layout in ("contiguous", "channels_last")
        ]
        for config in kernel.configs:
            for dtype, layout, block_c in variants:
                meta = _representative_meta(kernel, config, block_c, tuning)
                storage = _TRITON_DTYPES[dtype]
                blocks = ",".join(
                    f"{k}={v}" for k, v in {**meta, **config.meta}.items() if k.startswith(("BLOCK", "TILE"))
                )
                name = f"{kernel.name}[{storage},{layout},{blocks},w{config.num_warps}]"
                specs.append(
                    launch.compile_spec(kernel, name, storage, config, meta, _unit_strides(kernel, layout))
                )
    return specs
