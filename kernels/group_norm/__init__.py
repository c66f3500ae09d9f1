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

Files: ``device.py`` (the ``@triton.jit`` kernels), ``configs.py`` (config lists, tuning, fixed rules,
registration with the launch layer), ``host.py`` (host launch: ``group_norm_forward``,
``group_norm_backward``, ``launch_path``), ``specs.py`` (compile specs for the compile report).
"""

from .configs import (
    BWD_FUSED,
    BWD_PARTIAL_SUMS,
    BWD_SPLIT_APPLY,
    DEFAULT_TUNING,
    ELEMENTS_PER_THREAD,
    FUSED_CONFIGS,
    FWD_FUSED,
    FWD_PARTIAL_STATS,
    FWD_SPLIT_APPLY,
    KERNELS,
    MAX_GRID_Y,
    SPLIT_CONFIGS,
    SUPPORTED_DTYPES,
    GroupNormTuning,
)
from .host import group_norm_backward, group_norm_forward, launch_path
from .specs import compile_specs

__all__ = [
    "BWD_FUSED",
    "BWD_PARTIAL_SUMS",
    "BWD_SPLIT_APPLY",
    "DEFAULT_TUNING",
    "ELEMENTS_PER_THREAD",
    "FUSED_CONFIGS",
    "FWD_FUSED",
    "FWD_PARTIAL_STATS",
    "FWD_SPLIT_APPLY",
    "KERNELS",
    "MAX_GRID_Y",
    "SPLIT_CONFIGS",
    "SUPPORTED_DTYPES",
    "GroupNormTuning",
    "compile_specs",
    "group_norm_backward",
    "group_norm_forward",
    "launch_path",
]
