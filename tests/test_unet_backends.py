"""The UNet on every backend: outputs and gradients equal the torch reference; torch.compile traces it."""

import pytest
import torch
from conftest import require_backend
from small_unet import small_config

from fastdiff import ops
from fastdiff.unet import UNetModel


def small_unet(**overrides) -> UNetModel:
    """An 8x8 UNet touching every fused op: scale-shift, plain GN+SiLU, attention (both orders), GN alone."""
    return UNetModel(**small_config(**{"num_head_channels": 16, "num_classes": 3, **overrides}))


def forward_backward(model, x, t, y, dtype=None):
    """Output and every parameter gradient (plus the input's), fp32 or under autocast ``dtype``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = model(x, t, y=y)
    out.float().square().mean().backward()
    grads = {"x": x.grad} | {name: p.grad for name, p in model.named_parameters()}
    return out.float(), grads


# The interpreter is slow: triton runs the UNet once here (split order); its kernel tests cover both orders.
@pytest.mark.parametrize(("name", "new_order"), [("cpp", False), ("cpp", True), ("triton", True)])
def test_unet_matches_torch_backend(name, new_order):
    require_backend(name)
    model = small_unet(use_new_attention_order=new_order)
    for p in model.parameters():  # zero-initialised output convs would hide gradient errors
        torch.nn.init.normal_(p, std=0.2)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    with ops.use_backend("torch"):
        expected, expected_grads = forward_backward(model, x, t, y)
    with ops.use_backend(name):
        out, grads = forward_backward(model, x, t, y)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[key], rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_unet_bf16_autocast_close_to_torch_backend(name):
    require_backend(name)
    model = small_unet(use_checkpoint=True).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    t, y = torch.tensor([10, 500]), torch.tensor([1, 1])
    with ops.use_backend("torch"):
        expected, _ = forward_backward(model, x, t, y, torch.bfloat16)
    with ops.use_backend(name):
        out, grads = forward_backward(model, x, t, y, torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_compile_fullgraph_traces_the_unet(name):
    """No graph break anywhere in the UNet's forward and backward (opaque custom ops)."""
    require_backend(name)
    model = small_unet(channel_mult=(1,), attention_resolutions=(1,), image_size=4)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, t, y = torch.randn(2, 3, 4, 4), torch.tensor([1, 900]), torch.tensor([0, 1])
    with ops.use_backend(name):
        expected, expected_grads = forward_backward(model, x, t, y)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out, grads = forward_backward(compiled, x, t, y)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[key.replace("_orig_mod.", "")], rtol=1e-4, atol=1e-5)
