"""apply_fastdiff on diffusers' AutoencoderKL: its encoder's and decoder's ResnetBlock2Ds (temb=None), the
mid-block attention, the attention GroupNorm, and conv_norm_out + conv_act fused; reported, exact against
float64 as diffusers' own run is, and undone by remove_fastdiff.

The VAE is small and random (``small_vae``), saved with ``save_pretrained`` and read back with ``load_vae``.
"""

import copy
import warnings
from collections import Counter

import pytest
import torch
from conftest import require_backend
from error_bounds import assert_no_worse
from torch import nn

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import Decoder
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D
from small_vae import save_small_vae, small_vae_config
from test_diffusers_patch import FastdiffOpLog

from fastdiff import ops
from fastdiff.integrations import diffusers as integration
from fastdiff.integrations.diffusers import (
    FastdiffAttnProcessor,
    FastdiffResnetBlock2D,
    apply_fastdiff,
    remove_fastdiff,
)
from fastdiff.latents import decode_latents, encode_images, load_vae
from fastdiff.nn import GroupNorm32, GroupNorm32SiLU
from fastdiff.patch import NothingToPatchWarning, patches

pytestmark = pytest.mark.usefixtures("quiet_diffusers")


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    return save_small_vae(tmp_path_factory.mktemp("vae") / "vae", seed=5)


def images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.rand(batch, 3, height, width) * 2 - 1


def parts(vae: nn.Module) -> dict[str, list[str]]:
    """Paths of the VAE's ResnetBlock2Ds, attentions, attention GroupNorms and coders (encoder/decoder)."""
    modules = dict(vae.named_modules())
    attention = [p for p, m in modules.items() if isinstance(m, Attention)]
    return {
        "resnets": [p for p, m in modules.items() if isinstance(m, ResnetBlock2D)],
        "attention": attention,
        "attention_norms": [f"{p}.group_norm" for p in attention],
        "coders": ["encoder", "decoder"],
    }


def test_report_lists_every_vae_block_and_skips_none(vae_folder):
    vae = load_vae(vae_folder)
    found = parts(vae)
    report = apply_fastdiff(vae)

    assert {c.path: c.kind for c in report.changes} == {
        **dict.fromkeys(found["resnets"], "norm1+silu, norm2+silu"),
        **dict.fromkeys(found["attention"], "flash_attention"),
        **dict.fromkeys(found["attention_norms"], "group_norm"),
        **{f"{c}.conv_norm_out": "group_norm_silu" for c in found["coders"]},
        **{f"{c}.conv_act": "silu_fused_into_previous" for c in found["coders"]},
    }
    # encoder: 1 per down block + 2 mid; decoder: layers_per_block + 1 per up block + 2 mid
    assert len(found["resnets"]) == 4 + 6 and len(found["attention"]) == 2
    assert report.skipped == [] and report.already_patched == []
    assert all(type(vae.get_submodule(p)) is FastdiffResnetBlock2D for p in found["resnets"])
    assert all(type(vae.get_submodule(p).processor) is FastdiffAttnProcessor for p in found["attention"])
    assert all(type(vae.get_submodule(p)) is GroupNorm32 for p in found["attention_norms"])
    for coder in (vae.encoder, vae.decoder):
        assert type(coder.conv_norm_out) is GroupNorm32SiLU and type(coder.conv_act) is nn.Identity

    with pytest.warns(NothingToPatchWarning, match="already use fastdiff"):
        again = apply_fastdiff(vae)
    assert again.empty and "encoder.conv_norm_out" in again.already_patched and patches(vae) == [report]


RELATIVE_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

CASES = [("torch", torch.float32), ("cpp", torch.float32), ("triton", torch.float32)]
CASES += [("torch", torch.bfloat16), ("cpp", torch.bfloat16)]
"""Backend and dtype. Triton runs on CPU tensors under its interpreter, about a second per GroupNorm call
here on a loaded 2-core machine: float32 and one image only; its bf16 kernels are checked by the kernel and
UNet patch tests."""


def forced(name: str):
    require_backend(name)
    return ops.use_backend(name)


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_patched_encode_and_decode_are_no_worse_than_diffusers_against_float64(vae_folder, name, dtype):
    reference = load_vae(vae_folder).double()
    vae = load_vae(vae_folder).to(dtype)
    x = images(1 if name == "triton" else 3, 12, 8)  # the interpreter runs each (sample, group) in Python
    expected = encode_images(reference, x.double())
    decoded_expected = decode_latents(reference, expected.double())
    with forced(name):
        before = encode_images(vae, x)
        decoded_before = decode_latents(vae, expected)
        report = apply_fastdiff(vae)
        after = encode_images(vae, x)
        decoded_after = decode_latents(vae, expected)

    assert not report.empty and report.skipped == []
    bounds = dict(factor=2.0, floor=RELATIVE_FLOOR[dtype])  # at most twice diffusers' own error
    assert_no_worse([after], [before], [expected], **bounds, what="latents")
    assert_no_worse([decoded_after], [decoded_before], [decoded_expected], **bounds, what="images")


def decoder_run(vae: nn.Module, z: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    """The decoder's output and the gradients of ``z`` and every decoder parameter, for the upstream ``dy``
    (training through the decoder, e.g. with a perceptual loss on decoded images)."""
    z = z.detach().requires_grad_(True)
    params = [p.requires_grad_(True) for p in vae.decoder.parameters()]
    out = vae.decode(z).sample
    return [out.detach(), *torch.autograd.grad(out, [z, *params], dy.to(out.dtype))]


@pytest.mark.parametrize("name", ["torch", "cpp"])  # Triton's backward: the kernel and UNet patch tests
def test_patched_decoder_gradients_are_no_worse_than_diffusers_against_float64(vae_folder, name):
    reference = load_vae(vae_folder).double()
    vae = load_vae(vae_folder)
    z, dy = torch.randn(2, 4, 5, 3), torch.randn(2, 3, 10, 6)
    expected = decoder_run(reference, z.double(), dy.double())
    with forced(name):
        before = decoder_run(vae, z, dy)
        apply_fastdiff(vae)
        after = decoder_run(vae, z, dy)
    assert_no_worse(after[:1], before[:1], expected[:1], factor=2.0, floor=1e-5, what="output")
    assert_no_worse(after[1:], before[1:], expected[1:], factor=2.0, floor=1e-5, what="gradient")


@pytest.fixture
def fastdiff_kernels():
    """The cpp backend forced, so every patched module calls a fastdiff op that the log can count."""
    require_backend("cpp")
    with ops.use_backend("cpp"):
        yield


def test_patched_vae_runs_fastdiff_ops_and_remove_restores_it(vae_folder, fastdiff_kernels):
    vae = load_vae(vae_folder)
    x = images(2, 8, 8)
    modules = dict(vae.named_modules())
    with FastdiffOpLog() as log:
        latents = encode_images(vae, x)
        decoded = decode_latents(vae, latents)
    assert not log.calls

    report = apply_fastdiff(vae)
    with FastdiffOpLog() as log:
        encode_images(vae, x)
    # encoder: norm1/norm2 of 4 ResnetBlock2Ds and conv_norm_out fused with SiLU; the attention norm
    assert log.calls == Counter(group_norm_silu=2 * 4 + 1, group_norm=1, attention_fwd=1)
    with FastdiffOpLog() as log:
        decode_latents(vae, latents)
    assert log.calls == Counter(group_norm_silu=2 * 6 + 1, group_norm=1, attention_fwd=1)

    assert remove_fastdiff(vae) == [report] and patches(vae) == []
    assert dict(vae.named_modules()) == modules  # the same objects at the same paths
    assert type(vae.decoder.conv_act) is nn.SiLU and type(vae.decoder.conv_norm_out) is nn.GroupNorm
    with FastdiffOpLog() as log:
        assert torch.equal(encode_images(vae, x), latents)
        assert torch.equal(decode_latents(vae, latents), decoded)
    assert not log.calls


def test_vae_blocks_it_cannot_serve_are_skipped_with_reasons(monkeypatch):
    hooked = AutoencoderKL(**small_vae_config())
    hooked.encoder.conv_act.register_forward_hook(lambda module, inputs, output: output)
    replaced = AutoencoderKL(**small_vae_config())
    replaced.decoder.forward = replaced.decoder.forward  # an instance forward, which may run anything
    gelu = AutoencoderKL(**small_vae_config())
    gelu.encoder.conv_act = nn.GELU()  # diffusers builds both coders' conv_act as SiLU, whatever act_fn
    spatial = Decoder(
        in_channels=4,
        block_out_channels=(32, 64),
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_type="spatial",
    )
    models = nn.ModuleDict({"hooked": hooked, "replaced": replaced, "gelu": gelu, "spatial": spatial})
    report = apply_fastdiff(models)

    reasons = {s.path: s.reason for s in report.skipped if s.path.endswith("conv_norm_out")}
    assert reasons == {
        "hooked.encoder.conv_norm_out": "not fused with conv_act: conv_act has hooks, which the fused norm "
        "would bypass",
        "replaced.decoder.conv_norm_out": "not fused with conv_act: its forward was replaced on the instance",
        "gelu.encoder.conv_norm_out": "not fused with conv_act: conv_act is GELU; the fused kernel "
        "applies SiLU",
        "spatial.conv_norm_out": "not fused with conv_act: conv_norm_out is SpatialNorm, not a GroupNorm",
    }
    # a norm not fused with its activation still runs fastdiff's GroupNorm, its activation left in place
    assert type(hooked.encoder.conv_norm_out) is GroupNorm32 and type(hooked.encoder.conv_act) is nn.SiLU
    assert type(hooked.decoder.conv_norm_out) is GroupNorm32SiLU  # the other coder is served
    assert type(gelu.encoder.conv_act) is nn.GELU and type(gelu.encoder.conv_norm_out) is GroupNorm32
    assert type(spatial.conv_norm_out.norm_layer) is GroupNorm32  # SpatialNorm's own GroupNorm
    skipped = {s.path for s in report.skipped}
    conditioned = [p for p, m in spatial.named_modules() if isinstance(m, ResnetBlockCondNorm2D)]
    assert conditioned and all(f"spatial.{p}" in skipped for p in conditioned)


def test_unknown_encoder_and_decoder_code_is_reported_not_fused(monkeypatch, vae_folder):
    for name in ("Encoder.forward", "Decoder.forward"):
        function, _ = integration.MIRRORED_CODE[name]
        monkeypatch.setitem(
            integration.MIRRORED_CODE, name, (function, {"0000000000000000": "diffusers 0.0"})
        )
    vae = load_vae(vae_folder)
    x = images(1, 8, 8)
    expected = decode_latents(vae, encode_images(vae, x))
    report = apply_fastdiff(vae)

    reasons = {s.path: s.reason for s in report.skipped}
    assert set(reasons) == {"encoder.conv_norm_out", "decoder.conv_norm_out"}
    assert "Encoder.forward" in reasons["encoder.conv_norm_out"]
    assert "Decoder.forward" in reasons["decoder.conv_norm_out"]
    assert all("is not the code fastdiff mirrors (diffusers 0.0)" in r for r in reasons.values())
    assert type(vae.encoder.conv_norm_out) is GroupNorm32 and type(vae.encoder.conv_act) is nn.SiLU
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = decode_latents(vae, encode_images(vae, x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_patching_keeps_the_vae_state_dict_and_a_copy_patches_alike(vae_folder):
    vae = load_vae(vae_folder)
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    twin = copy.deepcopy(vae)
    apply_fastdiff(vae)
    assert vae.state_dict().keys() == state.keys()
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in state.items())
    twin.load_state_dict(vae.state_dict())  # checkpoints load across patched and unpatched models
    vae.load_state_dict(twin.state_dict())
