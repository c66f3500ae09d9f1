"""PyTorch reference implementations: the executable spec every kernel is tested against.

Same host API as the Triton kernels (``fastdiff.kernels``) and the C++ extension (``fastdiff._C``).
Math runs in float32 (float64 for float64 inputs); outputs come back in the input's dtype and memory
format. Backward passes recompute the forward under autograd, so they are exactly the gradient of the
forward written here.
"""

import torch

Tensor = torch.Tensor
OptTensor = Tensor | None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other float dtype."""
    return torch.promote_types(dtype, torch.float32)


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last(_3d) when ``x`` is laid out so (and not also contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _group_norm_math(
    x: Tensor,
    num_groups: int,
    weight: OptTensor,
    bias: OptTensor,
    scale: OptTensor,
    shift: OptTensor,
    eps: float,
    silu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm(+scale-shift)(+SiLU) in the compute dtype: (y, mean [N, G], rstd [N, G])."""
    n, c = x.shape[:2]
    dtype = compute_dtype(x.dtype)
    grouped = x.to(dtype).reshape(n, num_groups, -1)
    var, mean = torch.var_mean(grouped, dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)
    y = ((grouped - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    channel = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(dtype).reshape(channel)
    if bias is not None:
        y = y + bias.to(dtype).reshape(channel)
    if scale is not None:
        per_sample = (n, c) + (1,) * (x.dim() - 2)
        y = y * (1 + scale.to(dtype).reshape(per_sample)) + shift.to(dtype).reshape(per_sample)
    if silu:
        y = torch.nn.functional.silu(y)
    return y, mean, rstd


def group_norm_forward(
    x: Tensor,
    num_groups: int,
    weight: OptTensor,
    bias: OptTensor,
    scale: OptTensor,
    shift: OptTensor,
    eps: float,
    silu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """y = act(((x - mean) * rstd * weight + bias) * (1 + scale) + shift) for x ``[N, C, *spatial]``.

    Returns y (x's dtype and memory format), mean and rstd ``[N, G]`` in the compute dtype.
    """
    y, mean, rstd = _group_norm_math(x, num_groups, weight, bias, scale, shift, eps, silu)
    return y.to(x.dtype).contiguous(memory_format=memory_format(x)), mean, rstd


def group_norm_backward(
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
    needs_input_grad: tuple[bool, bool, bool, bool, bool],
) -> tuple[OptTensor, OptTensor, OptTensor, OptTensor, OptTensor]:
    """Gradients w.r.t. (x, weight, bias, scale, shift) from the saved ``mean``/``rstd`` ``[N, G]``.

    With xhat = (x - mean) * rstd, z = xhat * w + b, u = z * (1 + scale) + shift, y = act(u):
    du = dy * act'(u); dshift = sum_hw du; dscale = sum_hw du * z; dz = du * (1 + scale);
    dbias = sum_{n,hw} dz; dweight = sum_{n,hw} dz * xhat; with g = dz * w per group of M elements,
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)). None where not needed.
    """
    n, c = x.shape[:2]
    dtype = compute_dtype(x.dtype)
    grouped_shape = (n, num_groups, -1)
    per_channel = (1, c) + (1,) * (x.dim() - 2)
    per_sample = (n, c) + (1,) * (x.dim() - 2)
    spatial = tuple(range(2, x.dim()))
    xhat = (x.to(dtype).reshape(grouped_shape) - mean.to(dtype)[..., None]) * rstd.to(dtype)[..., None]
    xhat = xhat.reshape(x.shape)
    w = weight.to(dtype).reshape(per_channel) if weight is not None else None
    z = xhat if w is None else xhat * w
    if bias is not None:
        z = z + bias.to(dtype).reshape(per_channel)
    du = dy.to(dtype)
    if silu:
        u = (
            z
            if scale is None
            else z * (1 + scale.to(dtype).reshape(per_sample)) + shift.to(dtype).reshape(per_sample)
        )
        sig = torch.sigmoid(u)
        du = du * sig * (1 + u * (1 - sig))
    dz = du if scale is None else du * (1 + scale.to(dtype).reshape(per_sample))
    need_x, need_w, need_b, need_scale, need_shift = needs_input_grad
    reduce_n_hw = (0, *spatial)
    dweight = (dz * xhat).sum(reduce_n_hw) if need_w and weight is not None else None
    dbias = dz.sum(reduce_n_hw) if need_b and bias is not None else None
    dscale = (du * z).sum(spatial) if need_scale and scale is not None else None
    dshift = du.sum(spatial) if need_shift and shift is not None else None
    dx = None
    if need_x:
        g = (dz if w is None else dz * w).reshape(grouped_shape)
        xh = xhat.reshape(grouped_shape)
        dx = rstd.to(dtype)[..., None] * (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True))
        dx = dx.reshape(x.shape).to(x.dtype).contiguous(memory_format=memory_format(x))
    return dx, dweight, dbias, dscale, dshift


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, out: OptTensor = None
) -> tuple[Tensor, Tensor]:
    """softmax(scale * q k^T) v for q, k, v ``[B, H, T, D]``; returns (out, lse ``[B, H, T]``).

    Writes into ``out`` when given. The T x T matrix is materialised: this is the spec, not the fast path.
    """
    o, lse = _attention_math(q, k, v, scale)
    return deliver((o,), (out,), (q,))[0], lse


def _attention_math(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    dtype = compute_dtype(q.dtype)
    logits = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    lse = torch.logsumexp(logits, dim=-1)
    o = torch.matmul(torch.exp(logits - lse[..., None]), v.to(dtype))
    return o, lse


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
    """Gradients w.r.t. q, k, v, written into ``dq``/``dk``/``dv`` when given.

    P = exp(scale * q k^T - lse); dV = P^T dO; dS = P * (dO V^T - rowsum(dO * O)); dQ = scale * dS K;
    dK = scale * dS^T Q.
    """
    dtype = compute_dtype(q.dtype)
    qf, kf, vf, dof = (t.to(dtype) for t in (q, k, v, dout))
    p = torch.exp(torch.matmul(qf, kf.transpose(-1, -2)) * scale - lse.to(dtype)[..., None])
    delta = (dof * out.to(dtype)).sum(-1, keepdim=True)
    ds = p * (torch.matmul(dof, vf.transpose(-1, -2)) - delta)
    grads = (
        torch.matmul(ds, kf) * scale,
        torch.matmul(ds.transpose(-1, -2), qf) * scale,
        torch.matmul(p.transpose(-1, -2), dof),
    )
    return deliver(grads, (dq, dk, dv), (q, k, v))


def deliver(
    results: tuple[Tensor, ...], destinations: tuple[OptTensor, ...], likes: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    """Each result copied into its destination when one is given, else returned in its ``like``'s dtype."""
    delivered = []
    for result, destination, like in zip(results, destinations, likes, strict=True):
        if destination is None:
            delivered.append(result.to(like.dtype))
        else:
            destination.copy_(result)
            delivered.append(destination)
    return tuple(delivered)
