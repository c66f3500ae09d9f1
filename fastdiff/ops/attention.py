"""QKV attention and flash attention: public functions and their ops (``fastdiff::*``, see ``registry``).

``qkv_attention`` reads q, k, v as strided views of the UNet's ``[B, 3*H*D, T]`` tensor and writes the
output and the qkv gradient in that layout, so no reshape or copy surrounds the kernel.

Where ``auto`` resolves to ``native`` (a CUDA call the Triton kernels cannot serve, see
``backend.resolve_attention``), both functions run ``F.scaled_dot_product_attention`` with PyTorch's own
autograd instead of a ``fastdiff::`` op; where it resolves to ``math`` (a CPU where the flash kernel is
the slower, see ``cpu_policy``), they run ``math_attention``: matmul, fp32 softmax, matmul.
"""

import math

import torch
import torch.nn.functional as F

from fastdiff.ops import backend as backends
from fastdiff.ops import registry
from fastdiff.ops.reference import compute_dtype
from fastdiff.ops.validate import (
    check_attention_shapes,
    check_float_tensor,
    check_positive_int,
    check_same_device,
)

Tensor = torch.Tensor

ORDERS = ("legacy", "split")


def qkv_views(qkv: Tensor, num_heads: int, order: str) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as ``[B, H, T, D]`` views (no copy) of a contiguous qkv ``[B, 3*H*D, T]``.

    ``legacy``: channels are grouped by head, then q/k/v (improved-diffusion's QKVAttention).
    ``split``: channels are grouped q/k/v, then by head (guided-diffusion's QKVAttention).
    """
    b, width, t = qkv.shape
    d = width // (3 * num_heads)
    if order == "legacy":
        parts = qkv.view(b, num_heads, 3, d, t).unbind(2)
    else:
        parts = qkv.view(b, 3, num_heads, d, t).unbind(1)
    return tuple(p.transpose(-1, -2) for p in parts)


def _heads_view(x: Tensor, num_heads: int) -> Tensor:
    """``[B, H*D, T]`` -> ``[B, H, T, D]`` view."""
    b, width, t = x.shape
    return x.view(b, num_heads, width // num_heads, t).transpose(-1, -2)


def _lse_like(q: Tensor) -> Tensor:
    return q.new_empty(q.shape[:-1], dtype=compute_dtype(q.dtype))


# --- qkv layout ----------------------------------------------------------------------------------


def _qkv_attention_fwd_kernel(qkv: Tensor, num_heads: int, order: str, backend: str) -> tuple[Tensor, Tensor]:
    b, width, t = qkv.shape
    out = qkv.new_empty((b, width // 3, t))
    q, k, v = qkv_views(qkv, num_heads, order)
    if qkv.numel() == 0:
        return out, _lse_like(q)
    _, lse = backends.implementation(backend).attention_forward(
        q, k, v, q.shape[-1] ** -0.5, out=_heads_view(out, num_heads)
    )
    return out, lse.to(compute_dtype(qkv.dtype)).contiguous()


def _qkv_attention_fwd_fake(qkv, num_heads, order, backend):
    b, width, t = qkv.shape
    return qkv.new_empty((b, width // 3, t)), qkv.new_empty((b, num_heads, t), dtype=compute_dtype(qkv.dtype))


_qkv_attention_fwd = registry.define(
    "qkv_attention_fwd(Tensor qkv, int num_heads, str order, str backend) -> (Tensor, Tensor)",
    _qkv_attention_fwd_kernel,
    _qkv_attention_fwd_fake,
)


def _qkv_attention_bwd_kernel(
    dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int, order: str, backend: str
) -> Tensor:
    dqkv = torch.empty_like(qkv)
    if qkv.numel() == 0:
        return dqkv
    q, k, v = qkv_views(qkv, num_heads, order)
    dq, dk, dv = qkv_views(dqkv, num_heads, order)
    backends.implementation(backend).attention_backward(
        _heads_view(dout, num_heads),
        q,
        k,
        v,
        _heads_view(out, num_heads),
        lse,
        q.shape[-1] ** -0.5,
        dq,
        dk,
        dv,
    )
    return dqkv


def _qkv_attention_bwd_fake(dout, qkv, out, lse, num_heads, order, backend):
    return torch.empty_like(qkv)


_qkv_attention_bwd = registry.define(
    "qkv_attention_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse, int num_heads, str order, "
    "str backend) -> Tensor",
    _qkv_attention_bwd_kernel,
    _qkv_attention_bwd_fake,
)


class _QKVAttentionFunction(torch.autograd.Function):
    """Autograd of ``fastdiff::qkv_attention_fwd``: the backward is ``fastdiff::qkv_attention_bwd``."""

    @staticmethod
    def forward(ctx, qkv, num_heads, order, backend):
        out, lse = _qkv_attention_fwd.below_autograd(qkv, num_heads, order, backend)
        ctx.save_for_backward(qkv, out, lse)
        ctx.num_heads, ctx.order, ctx.backend = num_heads, order, backend
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        qkv, out, lse = ctx.saved_tensors
        if dout is None:
            return None, None, None, None
        dqkv = _qkv_attention_bwd(dout.contiguous(), qkv, out, lse, ctx.num_heads, ctx.order, ctx.backend)
        return dqkv, None, None, None


_qkv_attention_fwd.register_autograd(_QKVAttentionFunction)


def qkv_attention(qkv: Tensor, num_heads: int, order: str = "legacy") -> Tensor:
    """Multi-head attention over the UNet's qkv tensor: ``[B, 3*H*D, T]`` -> ``[B, H*D, T]``.

    Scale ``1/sqrt(D)``, softmax in fp32, output in qkv's dtype; the T x T matrix is never stored on the
    fast backends. ``order`` is ``"legacy"`` (improved-diffusion) or ``"split"`` (guided-diffusion's
    ``use_new_attention_order``).
    """
    check_float_tensor("qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be [B, 3*H*D, T], got shape {tuple(qkv.shape)}")
    check_positive_int("num_heads", num_heads)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    width = qkv.shape[1]
    if width == 0 or width % (3 * num_heads):
        raise ValueError(f"qkv width {width} must be a positive multiple of 3 * num_heads = {3 * num_heads}")
    backend = backends.resolve_attention(qkv, width // (3 * num_heads))
    if backend == backends.NATIVE:
        return native_qkv_attention(qkv, num_heads, order)
    if backend == backends.MATH:
        return math_qkv_attention(qkv, num_heads, order)
    out, _ = _qkv_attention_fwd(qkv.contiguous(), num_heads, order, backend)
    return out


def native_qkv_attention(qkv: Tensor, num_heads: int, order: str = "legacy") -> Tensor:
    """``qkv_attention`` from PyTorch's own ``F.scaled_dot_product_attention`` under plain autograd:
    ``[B, 3*H*D, T]`` -> ``[B, H*D, T]`` in qkv's dtype. What ``auto`` runs where it resolves ``native``."""
    b, width, t = qkv.shape
    q, k, v = qkv_views(qkv.contiguous(), num_heads, order)
    return F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, width // 3, t)


def _math_weights(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``softmax(scale * q k^T)`` ``[B, H, Tq, Tk]`` in q's dtype, the softmax in the compute dtype."""
    weights = torch.matmul(q * scale, k.transpose(-1, -2))
    return torch.softmax(weights, dim=-1, dtype=compute_dtype(q.dtype)).to(q.dtype)


def math_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax(scale * q k^T) v`` from PyTorch's matmul and a float32 (float64) softmax, plain autograd.

    q ``[B, H, Tq, D]``, k and v ``[B, H, Tk, D]`` -> ``[B, H, Tq, D]``, all in q's dtype (autocast off): the
    scores and weights round to that dtype between the matmuls, as in improved-diffusion's attention, and
    the ``[B, H, Tq, Tk]`` weights are stored for the backward. What ``auto`` runs where it resolves
    ``math`` (see ``cpu_policy``).
    """
    with torch.autocast(q.device.type, enabled=False):
        return torch.matmul(_math_weights(q, k, scale), v)


def math_qkv_attention(qkv: Tensor, num_heads: int, order: str = "legacy") -> Tensor:
    """``qkv_attention`` by ``math_attention``'s formula: ``[B, 3*H*D, T]`` -> ``[B, H*D, T]``. The output
    is computed as ``v^T w^T`` straight into the qkv layout (no transposing copy)."""
    b, width, t = qkv.shape
    q, k, v = qkv_views(qkv.contiguous(), num_heads, order)
    with torch.autocast(qkv.device.type, enabled=False):
        out = torch.matmul(v.transpose(-1, -2), _math_weights(q, k, q.shape[-1] ** -0.5).transpose(-1, -2))
    return out.reshape(b, width // 3, t)


# --- separate q, k, v ----------------------------------------------------------------------------


def _attention_fwd_kernel(
    q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out, _lse_like(q)
    _, lse = backends.implementation(backend).attention_forward(q, k, v, scale, out=out)
    return out, lse.to(compute_dtype(q.dtype)).contiguous()


def _attention_fwd_fake(q, k, v, scale, backend):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), _lse_like(q)


_attention_fwd = registry.define(
    "attention_fwd(Tensor q, Tensor k, Tensor v, float scale, str backend) -> (Tensor, Tensor)",
    _attention_fwd_kernel,
    _attention_fwd_fake,
)


def _attention_bwd_kernel(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    if q.numel() == 0:  # no query reads any key (Tq = 0) or nothing at all
        return torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    backends.implementation(backend).attention_backward(dout, q, k, v, out, lse, scale, dq, dk, dv)
    return dq, dk, dv


def _attention_bwd_fake(dout, q, k, v, out, lse, scale, backend):
    return tuple(torch.empty_like(t) for t in (q, k, v))


_attention_bwd = registry.define(
    "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
    "str backend) -> (Tensor, Tensor, Tensor)",
    _attention_bwd_kernel,
    _attention_bwd_fake,
)


class _AttentionFunction(torch.autograd.Function):
    """Autograd of ``fastdiff::attention_fwd``: the backward is ``fastdiff::attention_bwd``."""

    @staticmethod
    def forward(ctx, q, k, v, scale, backend):
        out, lse = _attention_fwd.below_autograd(q, k, v, scale, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.backend = scale, backend
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            return None, None, None, None, None
        dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.backend)
        return dq, dk, dv, None, None


_attention_fwd.register_autograd(_AttentionFunction)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Non-causal attention ``softmax(scale * q k^T) v`` per (batch, head), inputs of any strides.

    q: ``[B, H, Tq, D]``; k, v: ``[B, H, Tk, D]`` (Tk may differ from Tq: cross-attention), one dtype and
    device. ``scale`` defaults to ``1/sqrt(D)``. Softmax in fp32; returns ``[B, H, Tq, D]`` in q's dtype.
    Tk = 0 with Tq > 0 is a ValueError (a softmax over zero keys is undefined).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t)
    check_attention_shapes(q, k, v)
    check_same_device("q", q, k=k, v=v)
    if k.shape[2] == 0 and q.numel() > 0:
        raise ValueError(
            f"k has no keys (Tk = 0, shape {tuple(k.shape)}): a softmax over zero keys is undefined"
        )
    head_dim = q.shape[-1]
    if scale is None:
        scale = head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    backend = backends.resolve_attention(q, head_dim, keys=k.shape[2], grad=grad)
    if backend == backends.NATIVE:
        return F.scaled_dot_product_attention(q, k, v, scale=float(scale))
    if backend == backends.MATH:
        return math_attention(q, k, v, float(scale))
    out, _ = _attention_fwd(q, k, v, float(scale), backend)
    return out
