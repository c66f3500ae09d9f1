"""Drop-in modules built on :mod:`fastdiff.ops`, and the small layer helpers the UNet is made of.

The GroupNorm modules subclass :class:`torch.nn.GroupNorm`: same constructor, same parameters and
state-dict keys (``weight``, ``bias``), so a model's checkpoint loads into them unchanged. Each can be
made from an existing ``nn.GroupNorm`` with ``from_module``, which shares its parameters. Statistics run
in float32 whatever the input dtype (like improved-diffusion's ``GroupNorm32``); the output has the
input's dtype and memory format (contiguous or channels_last).
"""

import math
from collections import Counter
from typing import TypeVar

import torch
from torch import nn

from fastdiff import ops

Tensor = torch.Tensor
GroupNormT = TypeVar("GroupNormT", bound="GroupNorm32")

ATTENTION_ORDERS = ("legacy", "split")


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics: ``x [N, C, *spatial] -> [N, C, *spatial]`` in x's dtype.

    Replaces ``nn.GroupNorm`` (and improved-diffusion's ``GroupNorm32``) one for one.
    """

    @classmethod
    def from_module(cls: type[GroupNormT], module: nn.GroupNorm) -> GroupNormT:
        """A ``cls`` with ``module``'s groups, channels, eps and affine flag, sharing its parameters.

        The parameters are the same ``nn.Parameter`` objects (same dtype, device and values), so an
        optimizer that holds them keeps working after the swap.
        """
        if not isinstance(module, nn.GroupNorm):
            raise TypeError(f"module must be a torch.nn.GroupNorm, got {type(module).__name__}")
        new = cls(module.num_groups, module.num_channels, eps=module.eps, affine=module.affine, device="meta")
        if module.affine:
            new.weight = module.weight
            new.bias = module.bias
        new.train(module.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, eps=self.eps)


class GroupNorm32SiLU(GroupNorm32):
    """``silu(group_norm(x))`` in one fused op: replaces ``nn.Sequential(nn.GroupNorm(...), nn.SiLU())``.

    ``x [N, C, *spatial] -> [N, C, *spatial]``; parameters and state-dict keys are the GroupNorm's.
    """

    def forward(self, x: Tensor) -> Tensor:
        return ops.group_norm_silu(x, self.num_groups, self.weight, self.bias, eps=self.eps)


class ScaleShiftGroupNormSiLU(GroupNorm32):
    """``silu(group_norm(x) * (1 + scale) + shift)`` in one fused op (FiLM conditioning, as in a
    ResBlock with ``use_scale_shift_norm``).

    ``forward(x [N, C, *spatial], scale [N, C], shift [N, C]) -> [N, C, *spatial]``; ``scale`` and
    ``shift`` may carry trailing singleton dims (``[N, C, 1, 1]``). Parameters are the GroupNorm's.
    """

    def forward(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:  # type: ignore[override]
        return ops.group_norm_scale_shift_silu(
            x, self.num_groups, self.weight, self.bias, scale, shift, eps=self.eps
        )


class QKVAttention(nn.Module):
    """Multi-head self-attention over a packed ``qkv [B, 3 * H * D, T] -> [B, H * D, T]``; no parameters.

    ``order="legacy"``: improved-diffusion's ``QKVAttention`` with heads folded into the batch (guided-
    diffusion's ``QKVAttentionLegacy``): the channels are ``[H, 3, D]``. ``order="split"``: guided-
    diffusion's ``QKVAttention``: the channels are ``[3, H, D]``. Scale ``1/sqrt(D)``, softmax in float32.
    """

    def __init__(self, num_heads: int, order: str = "legacy") -> None:
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if order not in ATTENTION_ORDERS:
            raise ValueError(f"order must be one of {ATTENTION_ORDERS}, got {order!r}")
        self.num_heads = num_heads
        self.order = order

    def forward(self, qkv: Tensor) -> Tensor:
        return ops.qkv_attention(qkv, self.num_heads, order=self.order)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, order={self.order!r}"


class FlashAttention(nn.Module):
    """Non-causal attention ``softmax(scale * q k^T) v`` over ``[B, H, T, D]`` q, k, v; no parameters.

    A module form of :func:`fastdiff.ops.flash_attention` for models that hold attention as a module;
    ``scale=None`` means ``1/sqrt(D)``.
    """

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return ops.flash_attention(q, k, v, scale=self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


OP_OF_MODULE: dict[type[nn.Module], str] = {
    GroupNorm32: "group_norm",
    GroupNorm32SiLU: "group_norm_silu",
    ScaleShiftGroupNormSiLU: "group_norm_scale_shift_silu",
    QKVAttention: "qkv_attention",
}
"""The ``fastdiff.ops`` op each drop-in module calls."""


def count_op_calls(model: nn.Module, *args, **kwargs) -> Counter:
    """One forward ``model(*args, **kwargs)`` (torch backend, no grad), counting the op calls of its
    drop-in modules by ``(op name, per-sample input shape, num_groups or num_heads)``, in first-call order.

    Build the model and inputs on the ``meta`` device to count without allocating or computing anything.
    """
    seen: Counter = Counter()

    def record(module: nn.Module, inputs: tuple) -> None:
        groups = module.num_heads if isinstance(module, QKVAttention) else module.num_groups
        seen[(OP_OF_MODULE[type(module)], tuple(inputs[0].shape[1:]), groups)] += 1

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if type(m) in OP_OF_MODULE]
    try:
        with ops.use_backend("torch"), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _check_dims(dims: int) -> int:
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    return dims


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` for ``dims`` 1, 2 or 3, with the given arguments."""
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[_check_dims(dims) - 1](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.AvgPool1d``, ``nn.AvgPool2d`` or ``nn.AvgPool3d`` for ``dims`` 1, 2 or 3."""
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[_check_dims(dims) - 1](*args, **kwargs)


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def zero_module(module: ModuleT) -> ModuleT:
    """Sets every parameter of ``module`` to zero in place and returns the module."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embeddings of (possibly fractional) timesteps: ``[N] -> [N, dim]`` float32.

    Channel ``i < dim // 2`` is ``cos(t * f_i)`` and channel ``dim // 2 + i`` is ``sin(t * f_i)`` with
    ``f_i = max_period ** (-i / (dim // 2))``; an odd ``dim`` gets a trailing zero channel.
    """
    if not isinstance(timesteps, Tensor) or timesteps.dim() != 1:
        shape = tuple(timesteps.shape) if isinstance(timesteps, Tensor) else type(timesteps).__name__
        raise ValueError(f"timesteps must be a 1-D tensor [N], got {shape}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * steps / half)  # this rounding order is the reference's
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding
