"""GroupNorm, GroupNorm+SiLU and scale-shift GroupNorm+SiLU: public functions and their custom ops.

One pair of ops in the ``fastdiff`` library (``fastdiff::group_norm_fwd`` / ``fastdiff::group_norm_bwd``,
see ``registry``) serves all three; the backend name is resolved in Python before the call, so
``torch.compile`` sees it as a constant and the ops stay opaque to the tracer. In plain eager mode on the
``cpp`` backend a call is instead one C++ autograd node (``fastdiff._C.group_norm_autograd``) running
the same kernels. Where Triton cannot serve a CUDA call under ``auto``, the ``native`` fallback runs
PyTorch's own kernels (``F.group_norm``, then scale-shift and SiLU) under plain autograd.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastdiff.ops import backend as backends
from fastdiff.ops import registry
from fastdiff.ops.reference import compute_dtype, memory_format
from fastdiff.ops.validate import check_float_tensor, check_positive_int, check_same_device

Tensor = torch.Tensor
OptTensor = Tensor | None


def _in_layout_of(like: Tensor, t: Tensor) -> Tensor:
    """``t`` with exactly ``like``'s strides (what the fake implementation promises)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


def _stats_like(x: Tensor, num_groups: int) -> Tensor:
    return x.new_empty((x.shape[0], num_groups), dtype=compute_dtype(x.dtype))


def _group_norm_fwd_kernel(
    x: Tensor,
    num_groups: int,
    weight: OptTensor,
    bias: OptTensor,
    scale: OptTensor,
    shift: OptTensor,
    eps: float,
    silu: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    if x.numel() == 0:
        return torch.empty_like(x), _stats_like(x, num_groups), _stats_like(x, num_groups)
    y, mean, rstd = backends.implementation(backend).group_norm_forward(
        x, num_groups, weight, bias, scale, shift, eps, silu
    )
    dtype = compute_dtype(x.dtype)
    return _in_layout_of(x, y), mean.to(dtype), rstd.to(dtype)


def _group_norm_fwd_fake(x, num_groups, weight, bias, scale, shift, eps, silu, backend):
    return torch.empty_like(x), _stats_like(x, num_groups), _stats_like(x, num_groups)


_group_norm_fwd = registry.define(
    "group_norm_fwd(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, "
    "float eps, bool silu, str backend) -> (Tensor, Tensor, Tensor)",
    _group_norm_fwd_kernel,
    _group_norm_fwd_fake,
)


def _empty_unless(needed: bool, like: OptTensor, fallback: Tensor) -> Tensor:
    return torch.empty_like(like) if needed and like is not None else fallback.new_empty(0)


def _group_norm_bwd_kernel(
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
    needs_input_grad: Sequence[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    inputs = (x, weight, bias, scale, shift)
    needs = tuple(bool(n) and t is not None for n, t in zip(needs_input_grad, inputs, strict=True))
    if x.numel() == 0:
        return tuple(
            (torch.zeros_like(t) if t is not x else torch.empty_like(t)) if need else x.new_empty(0)
            for need, t in zip(needs, inputs, strict=True)
        )
    grads = backends.implementation(backend).group_norm_backward(
        dy, x, num_groups, weight, bias, scale, shift, mean, rstd, silu, needs
    )
    return tuple(
        _in_layout_of(t, g.to(t.dtype)) if need else x.new_empty(0)
        for need, t, g in zip(needs, inputs, grads, strict=True)
    )


def _group_norm_bwd_fake(
    dy, x, num_groups, weight, bias, scale, shift, mean, rstd, silu, needs_input_grad, backend
):
    inputs = (x, weight, bias, scale, shift)
    return tuple(_empty_unless(bool(n), t, x) for n, t in zip(needs_input_grad, inputs, strict=True))


_group_norm_bwd = registry.define(
    "group_norm_bwd(Tensor dy, Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, "
    "Tensor? shift, Tensor mean, Tensor rstd, bool silu, bool[] needs_input_grad, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _group_norm_bwd_kernel,
    _group_norm_bwd_fake,
)


class _GroupNormFunction(torch.autograd.Function):
    """Autograd of ``fastdiff::group_norm_fwd``: the backward is ``fastdiff::group_norm_bwd``."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, scale, shift, eps, silu, backend):
        y, mean, rstd = _group_norm_fwd.below_autograd(
            x, num_groups, weight, bias, scale, shift, eps, silu, backend
        )
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.num_groups, ctx.silu, ctx.backend = num_groups, silu, backend
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        return y, mean, rstd

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        needs = [ctx.needs_input_grad[i] for i in (0, 2, 3, 4, 5)]
        if dy is None:
            dy = torch.zeros_like(x)
        dy = dy.contiguous(memory_format=memory_format(x))
        grads = _group_norm_bwd(
            dy, x, ctx.num_groups, weight, bias, scale, shift, mean, rstd, ctx.silu, needs, ctx.backend
        )
        dx, dweight, dbias, dscale, dshift = (
            g if need else None for g, need in zip(grads, needs, strict=True)
        )
        return dx, None, dweight, dbias, dscale, dshift, None, None, None


_group_norm_fwd.register_autograd(_GroupNormFunction)


def _dense(x: Tensor) -> Tensor:
    """``x`` itself when contiguous or channels_last(_3d); otherwise one contiguous copy."""
    if x.is_contiguous() or memory_format(x) != torch.contiguous_format:
        return x
    return x.contiguous()


def _check_affine(name: str, t: OptTensor, channels: int) -> OptTensor:
    if t is None:
        return None
    check_float_tensor(name, t)
    if t.shape != (channels,):
        raise ValueError(f"{name} must have shape [C] = [{channels}], got {tuple(t.shape)}")
    return t.contiguous()


def _check_scale_shift(name: str, t: object, x: Tensor) -> Tensor:
    check_float_tensor(name, t)
    n, c = x.shape[:2]
    trailing = t.shape[2:]
    if t.shape[:2] != (n, c) or len(trailing) > x.dim() - 2 or any(s != 1 for s in trailing):
        raise ValueError(
            f"{name} must have shape [N, C] = [{n}, {c}] (or [N, C, 1, ...]), got {tuple(t.shape)}"
        )
    return t.reshape(n, c).contiguous()


def _group_norm(
    x: Tensor,
    num_groups: int,
    weight: OptTensor,
    bias: OptTensor,
    scale: OptTensor,
    shift: OptTensor,
    eps: float,
    silu: bool,
) -> Tensor:
    check_float_tensor("x", x)
    if not 2 <= x.dim() <= 5:
        raise ValueError(f"x must be [N, C, *spatial] with 0 to 3 spatial dims, got shape {tuple(x.shape)}")
    check_positive_int("num_groups", num_groups)
    channels = x.shape[1]
    if channels % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the channel count C={channels} of x")
    if x.shape[0] > 0 and any(s == 0 for s in x.shape[1:]):
        raise ValueError(f"x must have non-empty channel and spatial dims, got shape {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite non-negative float, got {eps!r}")
    weight = _check_affine("weight", weight, channels)
    bias = _check_affine("bias", bias, channels)
    if scale is not None:
        scale = _check_scale_shift("scale", scale, x)
        shift = _check_scale_shift("shift", shift, x)
    check_same_device("x", x, weight=weight, bias=bias, scale=scale, shift=shift)
    backend = backends.resolve_group_norm(x, weight, bias, scale, shift)
    if backend == backends.NATIVE:
        return native_group_norm(x, num_groups, weight, bias, scale, shift, float(eps), silu)
    args = (_dense(x), num_groups, weight, bias, scale, shift, float(eps), silu)
    if backend == "cpp" and registry.plain_eager(args):
        # one C++ autograd node: no Python in the backward, ~70 us less per call than the op's Function
        return backends.cpp_extension.group_norm_autograd(*args)
    y, _, _ = _group_norm_fwd(*args, backend)
    return y


def native_group_norm(
    x: Tensor,
    num_groups: int,
    weight: OptTensor,
    bias: OptTensor,
    scale: OptTensor,
    shift: OptTensor,
    eps: float,
    silu: bool,
) -> Tensor:
    """The GroupNorm family from PyTorch's own kernels: ``F.group_norm``, then ``* (1 + scale) + shift``
    and SiLU, each in x's dtype (statistics are fp32 inside ``F.group_norm``); differentiable by plain
    autograd. Output in x's dtype and memory format. The CUDA fallback of ``auto`` (see ``backend``)."""
    with torch.autocast(x.device.type, enabled=False):
        weight, bias = (None if t is None else t.to(x.dtype) for t in (weight, bias))
        y = F.group_norm(x, num_groups, weight, bias, eps)
        if scale is not None:
            per_sample = x.shape[:2] + (1,) * (x.dim() - 2)
            y = y * (1 + scale.to(x.dtype).reshape(per_sample)) + shift.to(x.dtype).reshape(per_sample)
        if silu:
            y = F.silu(y)
    return y.contiguous(memory_format=memory_format(x))


def group_norm(x: Tensor, num_groups: int, weight: OptTensor, bias: OptTensor, eps: float = 1e-5) -> Tensor:
    """GroupNorm of x ``[N, C, *spatial]`` over ``num_groups`` groups; fp32 statistics, output in x's dtype.

    ``weight``/``bias``: ``[C]`` or None (no affine). Same function as ``torch.nn.functional.group_norm``
    computed on ``x.float()``.
    """
    return _group_norm(x, num_groups, weight, bias, None, None, eps, silu=False)


def group_norm_silu(
    x: Tensor, num_groups: int, weight: OptTensor, bias: OptTensor, eps: float = 1e-5
) -> Tensor:
    """SiLU(GroupNorm(x)) in one pass; x ``[N, C, *spatial]``, output in x's dtype."""
    return _group_norm(x, num_groups, weight, bias, None, None, eps, silu=True)


def group_norm_scale_shift_silu(
    x: Tensor,
    num_groups: int,
    weight: OptTensor,
    bias: OptTensor,
    scale: Tensor,
    shift: Tensor,
    eps: float = 1e-5,
) -> Tensor:
    """SiLU(GroupNorm(x) * (1 + scale) + shift) in one pass: the ResBlock's ``use_scale_shift_norm`` path.

    x ``[N, C, *spatial]``; ``scale``/``shift`` ``[N, C]`` (a trailing ``1, 1`` is accepted).
    """
    if scale is None or shift is None:
        raise ValueError("scale and shift must both be tensors of shape [N, C]")
    return _group_norm(x, num_groups, weight, bias, scale, shift, eps, silu=True)
