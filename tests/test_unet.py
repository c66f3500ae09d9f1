"""fastdiff.UNetModel: outputs of OpenAI's own code, checkpointing, layouts, dims, gradients, bad input."""

import os

import pytest
import torch
from small_unet import small_config

from fastdiff import UNetModel, ops
from fastdiff.unet import AttentionBlock, ResBlock, SuperResModel

FIXTURES = os.path.join(os.path.dirname(__file__), "data", "unet_reference.pt")


def load_fixtures() -> dict:
    return torch.load(FIXTURES, weights_only=True)["fixtures"]


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random non-zero weights everywhere (the UNet zero-initialises its output convolutions)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


def inputs(config: dict, batch: int = 2, seed: int = 1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    size = config["image_size"]
    spatial = {1: (size,), 2: (size, size), 3: (2, size, size)}[config.get("dims", 2)]
    x = torch.randn((batch, config["in_channels"], *spatial), generator=generator, dtype=dtype)
    t = torch.rand(batch, generator=generator) * 1000
    y = None
    if config.get("num_classes") is not None:
        y = torch.randint(0, config["num_classes"], (batch,), generator=generator)
    return x, t, y


# --- compatibility with the reference implementations ---------------------------------------------


@pytest.mark.parametrize("name", sorted(load_fixtures()))
def test_reference_checkpoint_loads_strict_and_matches(name):
    fixture = load_fixtures()[name]
    model = UNetModel(**fixture["config"]).eval()
    model.load_state_dict(fixture["state_dict"], strict=True)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in fixture["state_dict"].items()
    }
    with torch.no_grad():
        out = model(fixture["x"], fixture["t"], fixture["y"])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fixture["output"], rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("name", ["guided_updown_new_order", "improved_basic"])
def test_reference_fixture_detects_wrong_attention_order(name):
    """Negative control: the fixtures are sensitive to the attention layout, not just the convolutions."""
    fixture = load_fixtures()[name]
    config = dict(fixture["config"])
    config["use_new_attention_order"] = not config.get("use_new_attention_order", False)
    config["num_head_channels"] = 16
    model = UNetModel(**config).eval()
    model.load_state_dict(fixture["state_dict"], strict=True)
    with torch.no_grad():
        out = model(fixture["x"], fixture["t"], fixture["y"])
    assert (out - fixture["output"]).abs().max() > 1e-2


def test_module_layout_keeps_reference_indices():
    model = UNetModel(**small_config(resblock_updown=True, num_classes=4))
    keys = set(model.state_dict())
    for key in [
        "time_embed.0.weight",
        "time_embed.2.weight",
        "label_emb.weight",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight",
        "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.0.out_layers.0.bias",
        "input_blocks.1.0.out_layers.3.weight",
        "input_blocks.2.0.in_layers.0.weight",  # the down ResBlock
        "input_blocks.3.0.skip_connection.weight",
        "input_blocks.3.1.norm.weight",
        "input_blocks.3.1.qkv.weight",
        "input_blocks.3.1.proj_out.weight",
        "middle_block.1.qkv.bias",
        "output_blocks.0.0.skip_connection.weight",
        "output_blocks.1.2.in_layers.0.weight",  # the up ResBlock
        "out.0.weight",
        "out.2.weight",
    ]:
        assert key in keys, key
    assert model.input_blocks[1][0].emb_layers[1].out_features == 2 * 32  # scale and shift


@pytest.mark.parametrize(("scale_shift", "new_order"), [(True, False), (False, True)])
def test_every_norm_and_attention_is_one_fused_op(monkeypatch, scale_shift, new_order):
    calls: dict[str, list] = {}
    for name in ("group_norm", "group_norm_silu", "group_norm_scale_shift_silu", "qkv_attention"):
        original = getattr(ops, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls.setdefault(_name, []).append(kwargs.get("order"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)

    def no_torch_group_norm(*args, **kwargs):
        raise AssertionError("torch's group_norm was called")

    monkeypatch.setattr(torch.nn.functional, "group_norm", no_torch_group_norm)
    config = small_config(use_scale_shift_norm=scale_shift, use_new_attention_order=new_order)
    model = UNetModel(**config)
    x, t, _ = inputs(config)
    model(x, t)
    res_blocks, attention_blocks = 2 + 2 + 4, 1 + 1 + 2
    gn_silu = 1 + (res_blocks if scale_shift else 2 * res_blocks)
    assert len(calls["group_norm_silu"]) == gn_silu
    assert len(calls.get("group_norm_scale_shift_silu", [])) == (res_blocks if scale_shift else 0)
    assert len(calls["group_norm"]) == attention_blocks
    assert calls["qkv_attention"] == ["split" if new_order else "legacy"] * attention_blocks


# --- checkpointing, layouts, dtypes ------------------------------------------------------------------


def forward_backward(model, x, t, y=None, seed=123):
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x, t, y)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out.float() * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.detach(), x.grad.clone(), grads


def assert_same_results(a, b, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(a[1], b[1], rtol=rtol, atol=atol)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=rtol, atol=atol, msg=name)


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_checkpointing_gives_same_outputs_and_gradients(dropout):
    config = small_config(dropout=dropout, num_classes=3)
    plain = randomize(UNetModel(**config)).train()
    checkpointed = UNetModel(**config, use_checkpoint=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x, t, y = inputs(config)
    reference = forward_backward(plain, x, t, y)
    conv = checkpointed.input_blocks[1][0].in_layers[2]
    attention_conv = checkpointed.middle_block[1].qkv
    calls, attention_calls = count_calls(conv), count_calls(attention_conv)
    assert_same_results(forward_backward(checkpointed, x, t, y), reference)
    assert calls[0] == 2 and attention_calls[0] == 2  # recomputed in backward
    if dropout:  # dropout is live: another seed gives other masks
        other = forward_backward(plain, x, t, y, seed=7)
        assert not torch.allclose(other[0], reference[0])


def test_checkpointing_only_while_training_with_grad():
    config = small_config()
    model = UNetModel(**config, use_checkpoint=True)
    calls = count_calls(model.input_blocks[1][0].in_layers[2])
    x, t, _ = inputs(config)
    model.eval()
    model(x, t).sum().backward()
    model.train()
    with torch.no_grad():
        model(x, t)
    assert calls[0] == 2


def test_channels_last_gives_same_outputs_and_gradients():
    config = small_config(resblock_updown=True, num_head_channels=32, use_new_attention_order=True)
    model = randomize(UNetModel(**config)).train()
    x, t, _ = inputs(config)
    reference = forward_backward(model, x, t)
    model_cl = UNetModel(**config).train()
    model_cl.load_state_dict(model.state_dict())
    model_cl = model_cl.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    result = forward_backward(model_cl, x_cl, t)
    grads = {k: v.contiguous() for k, v in result[2].items()}
    assert_same_results((result[0], result[1], grads), reference, rtol=1e-4, atol=1e-5)


def test_channels_last_3d_input():
    config = small_config(dims=3, channel_mult=(1, 1))
    model = randomize(UNetModel(**config)).eval()
    x, t, _ = inputs(config)
    with torch.no_grad():
        expected = model(x, t)
        model = model.to(memory_format=torch.channels_last_3d)
        out = model(x.contiguous(memory_format=torch.channels_last_3d), t)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_gradients_match_finite_differences(dims):
    """Directional derivatives of a float64 model (input and parameters) against central differences."""
    size = 8
    config = small_config(dims=dims, image_size=size, channel_mult=(1, 1), num_heads=1)
    model = randomize(UNetModel(**config)).double().eval()
    x, t, _ = inputs(config, dtype=torch.float64)
    if dims == 3:
        x = x[:, :, :1]
    x.requires_grad_(True)
    params = list(model.parameters())
    out = model(x, t)
    assert out.shape == (2, 6, *x.shape[2:]) and out.dtype == torch.float64
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    generator = torch.Generator().manual_seed(9)
    directions = [torch.randn(p.shape, dtype=torch.float64, generator=generator) for p in params]
    dx = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    analytic = sum((p.grad * d).sum() for p, d in zip(params, directions, strict=True)) + (x.grad * dx).sum()
    eps = 1e-6  # central-difference truncation error ~ eps**2 (7e-4 at 1e-5, 8e-6 at 1e-6)

    def loss_at(step: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, directions, strict=True):
                p.add_(d, alpha=step)
            value = (model(x + step * dx, t) * weights).sum().item()
            for p, d in zip(params, directions, strict=True):
                p.sub_(d, alpha=step)
        return value

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert abs(analytic.item() - numeric) <= 1e-6 * max(1.0, abs(numeric))


def test_bfloat16_autocast_and_whole_model_cast():
    config = small_config(num_classes=3)
    model = randomize(UNetModel(**config)).eval()
    x, t, y = inputs(config)
    with torch.no_grad():
        expected = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_out = model(x, t, y)
        cast_out = model.to(torch.bfloat16)(x, t, y)
        bf16_in_out = model(x.to(torch.bfloat16), t, y)
    assert autocast_out.dtype == torch.float32 and cast_out.dtype == torch.float32
    assert bf16_in_out.dtype == torch.bfloat16
    scale = expected.abs().max()
    for out in (autocast_out, cast_out, bf16_in_out.float()):
        assert torch.isfinite(out).all()
        assert (out - expected).abs().max() < 0.1 * scale


def test_feature_vectors_feed_the_output_head():
    config = small_config(num_res_blocks=2)
    model = randomize(UNetModel(**config)).eval()
    x, t, _ = inputs(config)
    with torch.no_grad():
        features = model.get_feature_vectors(x, t)
        out = model(x, t)
    assert len(features["down"]) == len(model.input_blocks)
    assert len(features["up"]) == len(model.output_blocks)
    assert features["middle"].shape == (2, 64, 4, 4)
    torch.testing.assert_close(model.out(features["up"][-1]), out)


def test_super_res_model_stacks_upsampled_low_res():
    config = small_config()
    model = randomize(SuperResModel(**config)).eval()
    assert model.in_channels == 6
    x, t, _ = inputs(config)
    low_res = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        out = model(x, t, low_res=low_res)
        upsampled = torch.nn.functional.interpolate(low_res, (8, 8), mode="bilinear")
        expected = UNetModel.forward(model, torch.cat([x, upsampled], dim=1), t)
    assert out.shape == (2, 6, 8, 8)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="low_res"):
        model(x, t)


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(model_channels=48), r"channel_mult\[0\]"),
        (dict(channel_mult=(1, 1.5)), r"channel_mult\[1\]"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(attention_resolutions=(3,)), "attention_resolutions entry 3 .* must divide image_size=8"),
        (dict(attention_resolutions=(4,)), "attention_resolutions entry 4 is not a downsample factor"),
        (dict(attention_resolutions="16,8"), "attention_resolutions"),
        (dict(image_size=9, attention_resolutions=()), "image_size=9 must be divisible by"),
        (dict(num_heads=3), "num_heads=3"),
        (dict(num_heads_upsample=5), "num_heads_upsample=5"),
        (dict(num_head_channels=24), "num_head_channels=24"),
        (dict(dims=4), "dims"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_res_blocks=-1), "num_res_blocks"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_bad_construction_arguments_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNetModel(**small_config(**overrides))


def test_image_size_none_skips_size_checks():
    model = UNetModel(**small_config(image_size=None))
    assert model.image_size is None


def test_bad_forward_inputs_are_named():
    config = small_config()
    model = UNetModel(**config)
    conditional = UNetModel(**small_config(num_classes=4))
    x, t, _ = inputs(config)
    y = torch.tensor([0, 3])
    cases = [
        (lambda: model(x[0], t), "x must be"),
        (lambda: model(x[:, :2], t), "in_channels=3"),
        (lambda: model(x.to(torch.uint8), t), "x must be a floating-point tensor"),
        (lambda: model(x[..., :7, :6], t), "divisible by"),
        (lambda: model(x, t[:1]), "timesteps"),
        (lambda: model(x, t, y), "y must be None"),
        (lambda: conditional(x, t), "y .* is required"),
        (lambda: conditional(x, t, y[:1]), "y must be an integer tensor"),
        (lambda: conditional(x, t, y.float()), "y must be an integer tensor"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_blocks_are_usable_alone():
    block = randomize(ResBlock(32, 16, 0.0, out_channels=64, use_scale_shift_norm=True, down=True))
    assert block(torch.randn(2, 32, 8, 8), torch.randn(2, 16)).shape == (2, 64, 4, 4)
    attention = randomize(AttentionBlock(64, num_head_channels=32, use_new_attention_order=True))
    assert attention.attention.num_heads == 2 and attention.attention.order == "split"
    assert attention(torch.randn(2, 64, 3, 5)).shape == (2, 64, 3, 5)
