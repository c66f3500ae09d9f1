"""Flash attention in Triton: forward and backward over tensors of any strides.

``q`` is ``[B, H, Tq, D]``, ``k, v`` are ``[B, H, Tk, D]`` (Tk >= 1, Tq and Tk independent: self- and
cross-attention), ``out`` is shaped like q; all may be views. The UNet passes views of its
``qkv: [B, 3*H*D, T]`` activation, where T is the contiguous axis. Every tile is therefore loaded as
``[BLOCK_D, BLOCK_T]`` (consecutive lanes walk T) and transposed in registers where a dot wants
``[BLOCK_T, BLOCK_D]``; a K tile loaded that way is already K^T. When D is the unit stride instead (plain
``[B, H, T, D]`` tensors) Triton's specialisation of unit strides lets its coalescing pass order the lanes
along D. Head dims up to ``MAX_HEAD_DIM`` = 256 are padded to the next power of two (the bucket).

Forward: online softmax in base 2 with fp32 accumulators; one fp32 natural-log logsumexp per row is
saved for the backward. Backward: ``delta = rowsum(dO * O)``, then one kernel per key block for
dK/dV (loop over queries) and one per query block for dQ (loop over keys): no atomics, so gradients
are bitwise reproducible. fp32 inputs run every dot in IEEE fp32 (``input_precision="ieee"``, FMAs on
the CUDA cores): TF32 would lose about three decimal digits, which fp32 attention is asked not to.

Launches go through ``fastdiff.kernels.launch``: each kernel is registered once per precision ("half"
for fp16/bf16, "fp32") and head-dim bucket, e.g. ``attention_fwd[half,d64]``, with its config list
(``FORWARD_CONFIGS``, ``DKDV_CONFIGS``, ``DQ_CONFIGS``, ``DELTA_CONFIGS``) and a fixed rule
(``_rule``); autotuning, when asked for, keys on the kernel name, every constexpr and the layout. In
the backward lists only the block owned by a program and the warps/stages vary; the block the loop
steps over is fixed per list, so the summation order, and with it every bit of the gradients, does not
depend on which config runs.

Files: ``device.py`` (the ``@triton.jit`` kernels), ``configs.py`` (config lists, the fixed rule,
registration with the launch layer), ``host.py`` (host launch: ``attention_forward``,
``attention_backward``), ``specs.py`` (compile specs for the compile report).
"""

from ..limits import MAX_HEAD_DIM
from .configs import (
    DELTA_CONFIGS,
    DKDV_CONFIGS,
    DQ_CONFIGS,
    FORWARD_CONFIGS,
    HEAD_DIM_BUCKETS,
    KERNELS,
    PRECISIONS,
    head_dim_bucket,
    kernel_name,
)
from .host import attention_backward, attention_forward
from .specs import LAYOUTS, compile_specs

__all__ = [
    "DELTA_CONFIGS",
    "DKDV_CONFIGS",
    "DQ_CONFIGS",
    "FORWARD_CONFIGS",
    "HEAD_DIM_BUCKETS",
    "KERNELS",
    "LAYOUTS",
    "MAX_HEAD_DIM",
    "PRECISIONS",
    "attention_backward",
    "attention_forward",
    "compile_specs",
    "head_dim_bucket",
    "kernel_name",
]
