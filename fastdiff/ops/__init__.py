"""fastdiff's functional ops: the contract every backend (triton | cpp | torch) serves.

    group_norm(x, num_groups, weight, bias, eps=1e-5)
    group_norm_silu(x, num_groups, weight, bias, eps=1e-5)
    group_norm_scale_shift_silu(x, num_groups, weight, bias, scale, shift, eps=1e-5)
    qkv_attention(qkv, num_heads, order="legacy")     # [B, 3*H*D, T] -> [B, H*D, T]
    flash_attention(q, k, v, scale=None)              # [B, H, T, D] each -> [B, H, T, D]
    use_backend(name)                                 # context manager; env FASTDIFF_BACKEND

Each is a ``torch.library`` op (``fastdiff::...``, defined in ``registry``) with a fake implementation
and autograd, so ``torch.compile(fullgraph=True)`` traces models that use them.
"""

from fastdiff.ops.attention import flash_attention, qkv_attention
from fastdiff.ops.backend import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from fastdiff.ops.group_norm import group_norm, group_norm_scale_shift_silu, group_norm_silu

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "flash_attention",
    "get_backend",
    "group_norm",
    "group_norm_scale_shift_silu",
    "group_norm_silu",
    "qkv_attention",
    "set_backend",
    "use_backend",
]
