"""The eager baselines (improved-diffusion's formulation of each op, and ``eager_modules``), kept in
``fastdiff.selftest.eager`` so that the installed selftest has them too."""

from fastdiff.selftest.eager import (
    eager_modules,
    group_norm32,
    group_norm32_scale_shift_silu,
    group_norm32_silu,
    qkv_attention,
)

__all__ = [
    "eager_modules",
    "group_norm32",
    "group_norm32_scale_shift_silu",
    "group_norm32_silu",
    "qkv_attention",
]
