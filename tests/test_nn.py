"""fastdiff.nn: drop-in GroupNorm modules and QKVAttention against torch's modules and the reference math."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.nn import (
    FlashAttention,
    GroupNorm32,
    GroupNorm32SiLU,
    QKVAttention,
    ScaleShiftGroupNormSiLU,
    avg_pool_nd,
    conv_nd,
    timestep_embedding,
    zero_module,
)

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def random_group_norm(groups: int, channels: int, affine: bool = True, eps: float = 1e-5) -> nn.GroupNorm:
    module = nn.GroupNorm(groups, channels, eps=eps, affine=affine)
    if affine:
        with torch.no_grad():
            module.weight.copy_(1 + 0.5 * torch.randn(channels))
            module.bias.copy_(0.5 * torch.randn(channels))
    return module


def reference_group_norm(module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """improved-diffusion's GroupNorm32: torch's GroupNorm on float32, cast back."""
    return module(x.float()).to(x.dtype)


SHAPES = [(3, 64), (2, 64, 7), (2, 64, 5, 3), (2, 64, 3, 2, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_group_norm_modules_match_torch(shape, dtype):
    torch.manual_seed(0)
    source = random_group_norm(32, 64, eps=1e-4)
    x = (3 * torch.randn(shape) + 2).to(dtype)
    expected = reference_group_norm(source, x)
    for fused, post in ((GroupNorm32, lambda y: y), (GroupNorm32SiLU, F.silu)):
        module = fused.from_module(source)
        out = module(x)
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out.float(), post(expected.float()), **TOLERANCE[dtype])

    scale, shift = torch.randn(shape[0], 64), torch.randn(shape[0], 64)
    trailing = (1,) * (len(shape) - 2)
    scale_b, shift_b = scale.reshape(*scale.shape, *trailing), shift.reshape(*shift.shape, *trailing)
    ss = ScaleShiftGroupNormSiLU.from_module(source)
    formula = F.silu(source(x.float()) * (1 + scale_b) + shift_b)
    torch.testing.assert_close(ss(x, scale.to(dtype), shift.to(dtype)).float(), formula, **TOLERANCE[dtype])
    torch.testing.assert_close(
        ss(x, scale_b, shift_b).float(),
        formula,
        **TOLERANCE[dtype],
    )


def test_group_norm_gradients_match_torch():
    torch.manual_seed(1)
    source = random_group_norm(8, 32)
    x = torch.randn(2, 32, 5, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    source = source.double()
    dy = torch.randn(2, 32, 5, 3, dtype=torch.float64)

    def grads(out, leaves):
        return torch.autograd.grad(out, leaves, dy)

    plain = GroupNorm32.from_module(source)
    leaves = [x, source.weight, source.bias]
    for ours, theirs in zip(grads(plain(x), leaves), grads(source(x), leaves), strict=True):
        torch.testing.assert_close(ours, theirs)
    fused = ScaleShiftGroupNormSiLU.from_module(source)
    leaves = [x, source.weight, source.bias, scale, shift]
    expected = F.silu(source(x) * (1 + scale[..., None, None]) + shift[..., None, None])
    for ours, theirs in zip(grads(fused(x, scale, shift), leaves), grads(expected, leaves), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_group_norm_channels_last_in_place():
    torch.manual_seed(2)
    source = random_group_norm(32, 64)
    x = torch.randn(2, 64, 6, 5)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    module = GroupNorm32SiLU.from_module(source)
    out = module(x_cl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, F.silu(source(x)), rtol=1e-5, atol=1e-5)


def test_from_module_shares_parameters_and_settings():
    source = random_group_norm(4, 16, eps=1e-3).to(torch.float64).eval()
    module = GroupNorm32SiLU.from_module(source)
    assert module.weight is source.weight and module.bias is source.bias
    assert (module.num_groups, module.num_channels, module.eps, module.affine) == (4, 16, 1e-3, True)
    assert module.weight.dtype == torch.float64 and not module.training
    free = GroupNorm32.from_module(nn.GroupNorm(4, 16, affine=False))
    assert free.weight is None and free.bias is None and not free.affine
    x = torch.randn(2, 16, 3)
    torch.testing.assert_close(free(x), F.group_norm(x, 4, eps=1e-5))
    with pytest.raises(TypeError, match="module"):
        GroupNorm32.from_module(nn.BatchNorm2d(16))


def test_group_norm_loads_torch_state_dict():
    source = random_group_norm(32, 64)
    module = ScaleShiftGroupNormSiLU(32, 64)
    module.load_state_dict(source.state_dict(), strict=True)
    assert set(module.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(module.weight, source.weight)


def legacy_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """improved-diffusion: heads folded into the batch, then q, k, v split, each scaled by D**-0.25."""
    b, width, t = qkv.shape
    d = width // (3 * heads)
    q, k, v = qkv.double().reshape(b * heads, 3 * d, t).split(d, dim=1)
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * d**-0.25, k * d**-0.25), dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, t)


def split_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """guided-diffusion's QKVAttention: q, k, v split first, then heads."""
    b, width, t = qkv.shape
    d = width // (3 * heads)
    q, k, v = (part.reshape(b * heads, d, t) for part in qkv.double().chunk(3, dim=1))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, t)


@pytest.mark.parametrize(("order", "reference"), [("legacy", legacy_attention), ("split", split_attention)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_attention_orders(order, reference, dtype):
    torch.manual_seed(3)
    qkv = torch.randn(2, 3 * 3 * 8, 19).to(dtype)
    module = QKVAttention(3, order)
    out = module(qkv)
    assert out.shape == (2, 24, 19) and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(qkv, 3), **TOLERANCE[dtype])
    assert "order='" + order in repr(module)


def test_qkv_attention_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        QKVAttention(2, "new")
    with pytest.raises(ValueError, match="num_heads"):
        QKVAttention(0)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.5, 999.0])
    emb = timestep_embedding(t, 7)
    half = 3
    freqs = torch.tensor([10000 ** (-i / half) for i in range(half)], dtype=torch.float64)
    args = t.double()[:, None] * freqs
    expected = torch.cat([args.cos(), args.sin(), torch.zeros(3, 1, dtype=torch.float64)], dim=1)
    assert emb.shape == (3, 7) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.double(), expected, rtol=0, atol=1e-4)
    assert timestep_embedding(torch.arange(4), 8).shape == (4, 8)
    with pytest.raises(ValueError, match="timesteps"):
        timestep_embedding(torch.zeros(2, 1), 8)
    with pytest.raises(ValueError, match="dim"):
        timestep_embedding(t, 0)


def test_layer_helpers():
    assert isinstance(conv_nd(1, 2, 3, 1), nn.Conv1d)
    assert isinstance(conv_nd(3, 2, 3, 1), nn.Conv3d)
    assert isinstance(avg_pool_nd(2, kernel_size=2), nn.AvgPool2d)
    with pytest.raises(ValueError, match="dims"):
        conv_nd(4, 2, 3, 1)
    with pytest.raises(ValueError, match="dims"):
        avg_pool_nd(0, kernel_size=2)
    conv = zero_module(nn.Conv2d(2, 3, 3))
    assert all((p == 0).all() for p in conv.parameters())


def test_flash_attention_module_matches_softmax_attention():
    q, k, v = (torch.randn(2, 3, 11, 24, dtype=torch.float64) for _ in range(3))
    for scale in (None, 0.3):
        out = FlashAttention(scale)(q, k, v)
        used = 24**-0.5 if scale is None else scale
        expected = torch.softmax(q @ k.transpose(-1, -2) * used, dim=-1) @ v
        torch.testing.assert_close(out, expected)
    assert "scale=0.3" in repr(FlashAttention(0.3))


@pytest.mark.parametrize("module_type", [GroupNorm32, GroupNorm32SiLU])
def test_group_norm_modules_refuse_input_on_another_device(module_type):
    """Parameters on one device and x on another: a ValueError naming both, on every backend."""
    module = module_type(2, 4)
    with pytest.raises(ValueError, match=r"weight is on cpu but x is on meta"):
        module(torch.randn(2, 4, 3, device="meta"))
    scale_shift = ScaleShiftGroupNormSiLU(2, 4)
    scale = torch.zeros(2, 4, device="meta")
    with pytest.raises(ValueError, match=r"is on (cpu|meta) but x is on (meta|cpu)"):
        scale_shift(torch.randn(2, 4, 3), scale, scale)
