"""The baselines: the same ops written as improved-diffusion writes them, in eager PyTorch (the selftest's
and the benchmarks' contestants).

* GroupNorm32: ``F.group_norm`` on ``x.float()``, cast back to x's dtype.
* GroupNorm32 + SiLU: that, then ``F.silu`` (the reference's ``nn.SiLU`` module).
* scale-shift: ``silu(norm(h) * (1 + scale) + shift)`` with ``scale, shift`` as ``[N, C, 1, 1]``.
* QKV attention: heads folded into the batch, q and k each scaled by ``D ** -0.25``, two einsums, softmax
  in fp32, the ``T x T`` weights materialised.

``torch.compile`` of these functions is the third contestant. ``eager_modules(model)`` runs a fastdiff UNet
with these functions in place of its fused modules: improved-diffusion's model, same weights.
"""

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.nn import GroupNorm32, GroupNorm32SiLU, QKVAttention, ScaleShiftGroupNormSiLU

Tensor = torch.Tensor


def group_norm32(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """GroupNorm in fp32 of x ``[N, C, *spatial]``; output in x's dtype."""
    return F.group_norm(x.float(), num_groups, weight, bias, eps).type(x.dtype)


def group_norm32_silu(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """SiLU after GroupNorm32, as two modules: ``[N, C, *spatial]`` -> same."""
    return F.silu(group_norm32(x, num_groups, weight, bias, eps))


def group_norm32_scale_shift_silu(
    x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-5
) -> Tensor:
    """``silu(gn(x) * (1 + scale) + shift)``; x ``[N, C, H, W]``, scale/shift ``[N, C]``."""
    trailing = (1,) * (x.dim() - 2)
    scale = scale.reshape(*scale.shape[:2], *trailing)
    shift = shift.reshape(*shift.shape[:2], *trailing)
    return F.silu(group_norm32(x, num_groups, weight, bias, eps) * (1 + scale) + shift)


def qkv_attention(qkv: Tensor, num_heads: int) -> Tensor:
    """improved-diffusion's attention: ``qkv [B, 3*H*D, T]`` (channels ``[H, 3, D]``) -> ``[B, H*D, T]``."""
    batch, width, tokens = qkv.shape
    head_dim = width // (3 * num_heads)
    q, k, v = qkv.reshape(batch * num_heads, 3 * head_dim, tokens).split(head_dim, dim=1)
    factor = head_dim**-0.25
    weights = torch.einsum("bct,bcs->bts", q * factor, k * factor)
    weights = torch.softmax(weights.float(), dim=-1).type(weights.dtype)
    out = torch.einsum("bts,bcs->bct", weights, v)
    return out.reshape(batch, num_heads * head_dim, tokens)


def _eager_forward(module: nn.Module):
    """The eager replacement of one fastdiff module's forward (it keeps the module's parameters)."""
    if isinstance(module, QKVAttention):
        if module.order != "legacy":
            raise ValueError(f"the eager baseline implements the legacy qkv order only, got {module.order!r}")
        return functools.partial(qkv_attention, num_heads=module.num_heads)
    norm = {
        ScaleShiftGroupNormSiLU: group_norm32_scale_shift_silu,
        GroupNorm32SiLU: group_norm32_silu,
        GroupNorm32: group_norm32,
    }[type(module)]

    def forward(x: Tensor, *scale_shift: Tensor) -> Tensor:
        return norm(x, module.num_groups, module.weight, module.bias, *scale_shift, eps=module.eps)

    return forward


def make_eager(model: nn.Module) -> list[nn.Module]:
    """From now on ``model``'s fused norm and attention modules compute with the eager functions (for a
    model kept eager, e.g. one given to ``torch.compile``); returns the modules swapped."""
    swapped = [m for m in model.modules() if isinstance(m, (GroupNorm32, QKVAttention))]
    for module in swapped:
        module.forward = _eager_forward(module)
    return swapped


@contextlib.contextmanager
def eager_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``model``'s fused norm and attention modules compute with the eager functions."""
    swapped = make_eager(model)
    try:
        yield model
    finally:
        for module in swapped:
            del module.forward
