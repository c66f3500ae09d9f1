"""Compile specs of the GroupNorm kernels: every kernel x storage dtype x configuration, for the compile
report (``fastdiff.kernels.report``)."""

from typing import Any

import torch

from .. import launch
from ..compile_spec import CompileSpec
from .configs import (
    BACKWARD_CHANNELS_PER_WARP,
    BWD_FUSED,
    DEFAULT_TUNING,
    ELEMENTS_PER_THREAD,
    FWD_FUSED,
    KERNELS,
    SUPPORTED_DTYPES,
    GroupNormTuning,
    unread_args,
)

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
    unread = unread_args(kernel)
    names = [name for name, kind in kernel.arg_types.items() if kind == "i32" and name not in unread]
    unit = [
        n
        for n in names
        if n.startswith(("stride_x", "stride_y", "stride_dy", "stride_dx")) and n.endswith(axis)
    ]
    return (*unit, *(n for n in ("stride_scale_c", "stride_shift_c") if n in names))


def _representative_meta(
    kernel: launch.Kernel, config: launch.Config, block_c: int, tuning: GroupNormTuning
) -> dict[str, Any]:
    """Constexprs of the largest tile ``config`` serves with ``block_c`` channels per block (fewer channels
    where a fused backward launch gives the config no more, ``min_fused_warps``), every optional input and
    SiLU enabled (those the kernel's pass reads)."""
    names = launch.launch_constexprs(kernel)
    meta: dict[str, Any] = {"HAS_WEIGHT": True, "HAS_BIAS": True, "HAS_SCALE_SHIFT": True, "SILU": True}
    if kernel is BWD_FUSED:
        block_c = min(block_c, BACKWARD_CHANNELS_PER_WARP * config.num_warps)
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
    channels_last, plus one channel per block and the widest block a launch takes in bf16, both layouts
    (a contiguous split launch takes at most ``max_block_c_spatial_major`` channels per tile)."""
    specs = []
    for kernel in KERNELS:
        kind = "fused" if "BLOCK_S" in launch.launch_constexprs(kernel) else "split"
        typical = _TYPICAL_BLOCK_C[kind]
        variants = [(dtype, "contiguous", typical) for dtype in SUPPORTED_DTYPES]
        variants += [(torch.bfloat16, "channels_last", typical)]
        for c in _EXTREME_BLOCK_C:
            for layout in ("contiguous", "channels_last"):
                spatial_major = kind == "split" and layout == "contiguous"  # few channels per tile
                variants.append(
                    (torch.bfloat16, layout, min(c, tuning.max_block_c_spatial_major) if spatial_major else c)
                )
        for config in kernel.configs:
            seen = set()
            for dtype, layout, block_c in variants:
                meta = _representative_meta(kernel, config, block_c, tuning)
                if (dtype, layout, meta["BLOCK_C"]) in seen:  # the same tile as a variant before
                    continue
                seen.add((dtype, layout, meta["BLOCK_C"]))
                storage = _TRITON_DTYPES[dtype]
                blocks = ",".join(
                    f"{k}={v}" for k, v in {**meta, **config.meta}.items() if k.startswith(("BLOCK", "TILE"))
                )
                name = f"{kernel.name}[{storage},{layout},{blocks},w{config.num_warps}]"
                unread = dict.fromkeys(unread_args(kernel))  # None, as ``pass_args`` launches them
                specs.append(
                    launch.compile_spec(
                        kernel, name, storage, config, {**meta, **unread}, _unit_strides(kernel, layout)
                    )
                )
    return specs
