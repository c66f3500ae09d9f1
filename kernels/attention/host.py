"""Host launch of flash attention: output buffers in the layout of the inputs, the launch of each kernel
through the launch layer (precision class and head-dim bucket pick the registered config list), and the
backward's order: delta, then dK/dV, then dQ.

Inputs are checked once, at the op boundary (``fastdiff.ops``); these functions only assert what the kernels
rely on.
"""

import torch
import triton
import triton.language as tl

from .. import launch
from ..limits import DTYPES
from .configs import _OWNED_BLOCK, KERNELS, _precision_class, head_dim_bucket
from .device import _LOG2E


def _dot_dtype(x: torch.Tensor) -> tl.dtype:
    """Operand dtype of every tl.dot: the input's, except bf16 under the interpreter (raw uint16 there)."""
    if x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and launch.interprets(x)):
        return tl.float32
    return tl.float16 if x.dtype == torch.float16 else tl.bfloat16


def _launch(kind: str, like: torch.Tensor, t_q: int, t_k: int, args: tuple, **constexprs) -> None:
    """Run the ``kind`` kernel of ``like``'s precision and head-dim bucket (``BLOCK_D``) over B * H rows
    of ceil(Tq or Tk / owned block) programs each; ``like`` [B, H, T, D] also gives the layout."""
    bucket = constexprs["BLOCK_D"]
    kernel = KERNELS[(kind, "" if kind == "bwd_delta" else _precision_class(like.dtype), bucket)]
    owned = _OWNED_BLOCK[kind]
    rows = like.shape[0] * like.shape[1]
    owned_length = t_k if kind == "bwd_dkdv" else t_q
    # Triton specialises unit strides, so the layout is in the autotune key already; named here too
    t_unit_stride = int(like.stride(2) == 1 and like.shape[3] > 1)
    launch.run(
        kernel,
        lambda config: (rows * triton.cdiv(owned_length, config.meta[owned]),),
        args,
        constexprs,
        like=like,
        sizes={
            "rows": rows,
            "owned_length": owned_length,
            "T_Q": t_q,
            "T_K": t_k,
            "t_unit_stride": t_unit_stride,
        },
    )


def _assert_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *others: torch.Tensor | None) -> None:
    """The kernels' own invariants (the op boundary checks the inputs): q [B, H, Tq, D], k and v
    [B, H, Tk, D] of one dtype the kernels take, Tk >= 1 unless there are no queries, one device."""
    assert q.dim() == k.dim() == v.dim() == 4 and k.shape == v.shape, (q.shape, k.shape, v.shape)
    assert q.shape[:2] == k.shape[:2] and q.shape[3] == k.shape[3], (q.shape, k.shape)
    assert q.dtype == k.dtype == v.dtype and q.dtype in DTYPES, (q.dtype, k.dtype, v.dtype)
    assert k.shape[2] > 0 or q.numel() == 0, "a softmax over zero keys is undefined"
    devices = {t.device for t in (q, k, v, *others) if t is not None}
    assert len(devices) == 1, f"one device expected, got {devices}"


def _assert_buffer(buf: torch.Tensor, like: torch.Tensor, name: str) -> None:
    """A destination given by the caller has ``like``'s shape, dtype and device."""
    assert buf.shape == like.shape and buf.dtype == like.dtype and buf.device == like.device, (
        f"{name} must be a {like.dtype} tensor of shape {tuple(like.shape)} on {like.device}, "
        f"got {buf.dtype} {tuple(buf.shape)} on {buf.device}"
    )


def _empty_in_layout_of(x: torch.Tensor) -> torch.Tensor:
    """A new [B, H, T, D] tensor whose unit-stride axis is T when x's is (the qkv layout), else D."""
    if x.stride(2) == 1 and x.stride(3) != 1:
        B, H, T, D = x.shape
        return torch.empty((B, H, D, T), dtype=x.dtype, device=x.device).transpose(2, 3)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal ``softmax(scale * q k^T) v`` per (batch, head).

    q: [B, H, Tq, D]; k, v: [B, H, Tk, D] with Tk >= 1; one dtype (fp16/bf16/fp32) and device,
    D <= MAX_HEAD_DIM, any strides (read in place). The op boundary (``fastdiff.ops``) checks all that.
    out: optional [B, H, Tq, D] destination of any strides.
    Returns (out [B, H, Tq, D], lse [B, H, Tq] fp32, the natural-log logsumexp of scale * q.k over keys).
    """
    _assert_inputs(q, k, v, out)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    bucket = head_dim_bucket(D)
    if out is None:
        out = _empty_in_layout_of(q)
    else:
        _assert_buffer(out, q, "out")
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    args = (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), H, Tq, Tk, D)
    _launch("fwd", q, Tq, Tk, (*args, float(scale) * _LOG2E.value), BLOCK_D=bucket, DOT_DTYPE=_dot_dtype(q))
    return out, lse


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of ``attention_forward`` given dout = dL/dout.

    dout, out: [B, H, Tq, D]; q [B, H, Tq, D]; k, v [B, H, Tk, D]; any strides; lse: [B, H, Tq] fp32
    from the forward. dq, dk, dv: optional destinations shaped like q, k, v, of any strides (e.g. views
    of one [B, 3*H*D, T]). Deterministic: each gradient element is written by one program in a fixed
    summation order.
    """
    _assert_inputs(q, k, v, dout, out, lse, dq, dk, dv)
    _, H, Tq, D = q.shape
    Tk = k.shape[2]
    bucket = head_dim_bucket(D)
    grads = []
    for name, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if buf is None:
            buf = _empty_in_layout_of(like)
        else:
            _assert_buffer(buf, like, name)
        grads.append(buf)
    dq, dk, dv = grads
    if q.numel() == 0:
        if k.numel() > 0:  # no query reads any key
            dk.zero_()
            dv.zero_()
        return dq, dk, dv
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    delta_args = (out, dout, delta, *out.stride(), *dout.stride(), H, Tq, D)
    _launch("bwd_delta", out, Tq, 0, delta_args, BLOCK_D=bucket)
    scale = float(scale)
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    sizes_and_scales = (H, Tq, Tk, D, scale * _LOG2E.value, scale)
    constexprs = {"BLOCK_D": bucket, "DOT_DTYPE": _dot_dtype(q)}
    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(), *sizes_and_scales)
    _launch("bwd_dkdv", q, Tq, Tk, dkdv_args, **constexprs)
    dq_args = (q, k, v, dout, lse, delta, dq, *common, *dq.stride(), *sizes_and_scales)
    _launch("bwd_dq", q, Tq, Tk, dq_args, **constexprs)
    return dq, dk, dv
