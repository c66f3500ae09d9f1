"""Attention on CPU tensors through PyTorch's fused C++ flash-attention kernel (ATen).

Same host API as ``fastdiff.kernels.attention``: it saves one logsumexp per row instead of the T x T
weights, so the backward's memory stays O(T).

The ATen kernel (torch 2.13) gives wrong results when the head dim is not the unit-stride axis, as in
views of the UNet's ``[B, 3*H*D, T]`` qkv tensor; such inputs are copied to a unit-stride layout first.
"""

import torch

from fastdiff.ops.reference import deliver

Tensor = torch.Tensor
OptTensor = Tensor | None

_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _unit_stride(t: Tensor) -> Tensor:
    """``t`` with its last (head) dim of stride 1, as the ATen kernel requires."""
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, out: OptTensor = None
) -> tuple[Tensor, Tensor]:
    """softmax(scale * q k^T) v for q, k, v ``[B, H, T, D]``; returns (out, lse ``[B, H, T]``)."""
    o, lse = _forward(_unit_stride(q), _unit_stride(k), _unit_stride(v), 0.0, False, scale=scale)
    return deliver((o,), (out,), (q,))[0], lse


def attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    dq: OptTensor = None,
    dk: OptTensor = None,
    dv: OptTensor = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. q, k, v, written into ``dq``/``dk``/``dv`` when given."""
    q, k, v, dout, out = (_unit_stride(t) for t in (q, k, v, dout, out))
    grads = _backward(dout, q, k, v, out, lse, 0.0, False, scale=scale)
    return deliver(grads, (dq, dk, dv), (q, k, v))
