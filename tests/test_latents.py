"""fastdiff.latents: loading a saved AutoencoderKL, its fingerprint, encoding and decoding, LatentInfo.

Every VAE is small, randomly initialised and saved to a temporary folder (``small_vae``); nothing is
downloaded. Encodings are checked against diffusers' own VAE run in float64.
"""

import copy
import json
import math
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file
from small_vae import save_small_vae, small_vae

from fastdiff.integrations.diffusers import apply_fastdiff
from fastdiff.latents import (
    LatentInfo,
    LatentScaling,
    check_vae_matches,
    decode_latents,
    downsampling_factor,
    encode_images,
    load_vae,
    vae_fingerprint,
)

WEIGHTS = "diffusion_pytorch_model.safetensors"


pytestmark = pytest.mark.usefixtures("quiet_diffusers")


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    return save_small_vae(tmp_path_factory.mktemp("vae") / "vae", seed=1)


def tiny_unet() -> UNet2DModel:
    return UNet2DModel(
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def images(batch: int, height: int, width: int) -> torch.Tensor:
    """Fresh random images in [-1, 1], as uint8 pixels map there (p / 127.5 - 1)."""
    return torch.randint(0, 256, (batch, 3, height, width)).float() / 127.5 - 1


# --- loading and fingerprints ------------------------------------------------------------------------


def test_load_vae_reads_the_saved_model_and_its_fingerprint_is_stable(vae_folder):
    original = small_vae(seed=1)
    first, second = load_vae(vae_folder), load_vae(vae_folder)

    assert not first.training and not any(p.requires_grad for p in first.parameters())
    assert first.state_dict().keys() == original.state_dict().keys()
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), original.state_dict().values(), strict=True)
    )
    fingerprint = vae_fingerprint(first)
    assert re_hex(fingerprint) and fingerprint == vae_fingerprint(second) == vae_fingerprint(original)
    assert first.config._name_or_path == str(vae_folder)


def re_hex(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def test_fingerprint_changes_with_one_weight_its_dtype_and_the_encoding_config(vae_folder):
    vae = load_vae(vae_folder)
    reference = vae_fingerprint(vae)
    weight = vae.decoder.up_blocks[1].resnets[0].conv2.weight
    index = tuple(torch.randint(0, n, ()).item() for n in weight.shape)
    value = weight[index].clone()
    with torch.no_grad():  # one float32 unit in one of 9216 weights
        weight[index] = torch.nextafter(value, torch.tensor(math.inf))
    assert weight[index] != value and vae_fingerprint(vae) != reference
    with torch.no_grad():
        weight[index] = value
    assert vae_fingerprint(vae) == reference

    assert vae_fingerprint(copy.deepcopy(vae).to(torch.bfloat16)) != reference
    for field, new in (("scaling_factor", 0.5), ("shift_factor", 0.1), ("latents_mean", [0.0] * 4)):
        changed = copy.deepcopy(vae)
        changed.register_to_config(**{field: new})
        assert vae_fingerprint(changed) != reference, field

    report = apply_fastdiff(vae)  # keeps the state dict: the same VAE
    assert not report.empty and vae_fingerprint(vae) == reference
    with pytest.raises(TypeError, match="vae must be a diffusers AutoencoderKL, got UNet2DModel"):
        vae_fingerprint(tiny_unet())


def test_load_vae_refuses_what_is_not_a_saved_autoencoder_kl(tmp_path, vae_folder):
    expected = "expected a folder holding a diffusers AutoencoderKL"
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"VAE folder {missing} does not exist; {expected}"):
        load_vae(missing)
    with pytest.raises(NotADirectoryError, match=f"is a file, not a folder; {expected}"):
        load_vae(vae_folder / "config.json")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty} is not a diffusers model folder: it has no config.json;"):
        load_vae(empty)
    pipeline = tmp_path / "pipeline"
    shutil.copytree(vae_folder, pipeline / "vae")
    (pipeline / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match=f"diffusers pipeline: pass its VAE folder, {pipeline / 'vae'}"):
        load_vae(pipeline)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not a readable JSON file"):
        load_vae(broken)
    (broken / "config.json").write_text(json.dumps({"latent_channels": 4}))
    with pytest.raises(ValueError, match=r"names no diffusers model class \(_class_name\)"):
        load_vae(broken)

    unet = tmp_path / "unet"
    tiny_unet().save_pretrained(unet)
    with pytest.raises(ValueError, match=f"{unet} holds a diffusers UNet2DModel, not an AutoencoderKL"):
        load_vae(unet)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(vae_folder / "config.json", no_weights / "config.json")
    with pytest.raises(ValueError, match=r"has a config\.json but no weights"):
        load_vae(no_weights)


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_load_vae_refuses_weights_that_do_not_fill_the_model(tmp_path, vae_folder, change):
    folder = tmp_path / change
    shutil.copytree(vae_folder, folder)
    state = load_file(folder / WEIGHTS)
    if change == "missing":
        del state["decoder.conv_out.bias"]
        message = "weights missing from the file: decoder.conv_out.bias"
    else:
        state["decoder.extra.weight"] = torch.zeros(2)
        message = "weights the model does not have: decoder.extra.weight"
    save_file(state, folder / WEIGHTS)
    with pytest.raises(ValueError, match=f"the weights in {folder} do not fill its AutoencoderKL: {message}"):
        load_vae(folder)


# --- encoding and decoding ---------------------------------------------------------------------------

SCALINGS = {
    "default": {},  # scaling_factor 0.18215, no shift
    "shift": dict(scaling_factor=0.7, shift_factor=0.3),
    "mean_std": dict(
        scaling_factor=0.5, latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0)
    ),
}


def normalised(z: torch.Tensor, config: dict) -> torch.Tensor:
    """diffusers' pipelines' normalisation, written out in float64: (z - shift) * scaling / std."""
    scaling = config.get("scaling_factor", 0.18215)
    mean = torch.tensor(
        config.get("latents_mean", [config.get("shift_factor", 0.0)] * 4), dtype=torch.float64
    )
    std = torch.tensor(config.get("latents_std", [1.0] * 4), dtype=torch.float64)
    return (z - mean.view(-1, 1, 1)) * scaling / std.view(-1, 1, 1)


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_encode_is_the_normalised_posterior_mean_and_decode_inverts_the_normalisation(tmp_path, scaling):
    config = SCALINGS[scaling]
    vae = load_vae(save_small_vae(tmp_path / "vae", seed=2, **config))
    reference = copy.deepcopy(vae).double()
    x = images(3, 10, 14)  # non-square, odd batch over batches of 2

    latents = encode_images(vae, x, batch_size=2)
    mean = reference.encode(x.double()).latent_dist.mean
    expected = normalised(mean, config)
    assert latents.shape == (3, 4, 5, 7) and latents.dtype == torch.float32
    assert (latents.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(encode_images(vae, x, batch_size=2), latents)  # the mean: no random draw

    decoded = decode_latents(vae, latents, batch_size=2)
    scaled_back = normalised(torch.zeros(1, 4, 1, 1, dtype=torch.float64), config)  # -shift * s / std
    z = (latents.double() - scaled_back) / (
        normalised(torch.ones(1, 4, 1, 1, dtype=torch.float64), config) - scaled_back
    )
    expected_images = reference.decode(z).sample.clamp(-1, 1)
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert (decoded.double() - expected_images).abs().max() <= 1e-5


def test_encode_and_decode_in_bfloat16_return_float32_near_the_float32_results(vae_folder):
    vae = load_vae(vae_folder)
    x = images(2, 8, 12)
    latents, decoded = encode_images(vae, x), decode_latents(vae, encode_images(vae, x))
    low = copy.deepcopy(vae).to(torch.bfloat16)

    low_latents = encode_images(low, x)
    low_decoded = decode_latents(low, latents)
    assert low_latents.dtype == low_decoded.dtype == torch.float32
    assert low_latents.device == x.device
    # bf16 rounding through the random decoder: relative RMS error 0.024 (at most 0.030 over 300 draws) and
    # largest error 0.030 of the largest value (at most 0.048); encoding 0.009 (0.011) and 0.011 (0.022).
    # A tight RMS bound, and a loose bound on the largest error for a wrong corner or channel.
    assert relative_rms(low_latents, latents) <= 0.025
    assert relative_rms(low_decoded, decoded) <= 0.05
    assert (low_latents - latents).abs().max() <= 0.05 * latents.abs().max()
    assert (low_decoded - decoded).abs().max() <= 0.1 * max(decoded.abs().max().item(), 0.1)


def relative_rms(value: torch.Tensor, reference: torch.Tensor) -> float:
    """RMS of ``value - reference`` over the RMS of ``reference``."""
    return ((value - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()


def test_bad_images_and_latents_are_refused_naming_what_was_expected(vae_folder):
    vae = load_vae(vae_folder)
    good = images(2, 8, 8)
    with pytest.raises(
        ValueError, match=r"images must be a batch of images \[B, 3, H, W\], got shape \[2, 1, 8, 8\]"
    ):
        encode_images(vae, good[:, :1])
    with pytest.raises(ValueError, match=r"got shape \[3, 8, 8\]"):
        encode_images(vae, good[0])
    with pytest.raises(TypeError, match=r"images must be a floating-point tensor, got torch\.uint8"):
        encode_images(vae, good.to(torch.uint8))
    with pytest.raises(ValueError, match=r"values in \[-1, 1\] .* got values in \[0, 255\]"):
        encode_images(vae, torch.full((1, 3, 8, 8), 255.0).index_fill_(2, torch.tensor([0]), 0.0))
    with pytest.raises(ValueError, match="images holds NaN or infinite values"):
        encode_images(vae, good.index_fill(3, torch.tensor([2]), math.nan))
    with pytest.raises(ValueError, match="image size 8x7 does not divide by the VAE's downsampling factor 2"):
        encode_images(vae, images(1, 8, 7))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        encode_images(vae, good, batch_size=0)
    with pytest.raises(TypeError, match="vae must be a diffusers AutoencoderKL, got Linear"):
        encode_images(torch.nn.Linear(2, 2), good)
    with pytest.raises(
        ValueError, match=r"latents must be a batch of latents \[B, 4, H, W\], got shape \[2, 3, 4, 4\]"
    ):
        decode_latents(vae, torch.randn(2, 3, 4, 4))


def test_a_vae_that_overflows_is_an_error_not_a_clamped_image(vae_folder):
    vae = load_vae(vae_folder)
    latents = encode_images(vae, images(1, 8, 8))
    with torch.no_grad():
        vae.decoder.conv_out.bias[1] = math.inf
    with pytest.raises(FloatingPointError, match=r"decoding holds NaN or infinite values .* torch\.float32"):
        decode_latents(vae, latents)
    with torch.no_grad():
        vae.encoder.conv_out.bias[0] = math.nan
    with pytest.raises(FloatingPointError, match="encoding holds NaN or infinite values"):
        encode_images(vae, images(1, 8, 8))


# --- LatentInfo and the match check ------------------------------------------------------------------


def test_latent_info_round_trips_through_json_and_describes_the_vae(tmp_path):
    vae = load_vae(save_small_vae(tmp_path / "vae", seed=3, **SCALINGS["mean_std"]))
    info = LatentInfo.from_vae(vae)
    assert (
        info.fingerprint == vae_fingerprint(vae) and info.downsampling_factor == downsampling_factor(vae) == 2
    )
    assert (
        info.latent_channels == 4 and info.latents_std == (1.5, 0.5, 2.0, 1.0) and info.shift_factor is None
    )
    assert info.latent_shape(10, 14) == (4, 5, 7)
    with pytest.raises(
        ValueError, match="image size 10x15 does not divide by the VAE's downsampling factor 2"
    ):
        info.latent_shape(10, 15)

    path = tmp_path / "latents.json"
    path.write_text(info.to_json())
    again = LatentInfo.from_json(path.read_text(), str(path))
    assert again == info and again.to_dict() == info.to_dict()
    assert json.loads(path.read_text())["format"] == "fastdiff.latent_info"
    z = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(info.scaling.denormalise(info.scaling.normalise(z)), z)


def test_latent_info_from_a_file_refuses_bad_fields_naming_the_file_and_field(vae_folder):
    good = LatentInfo.from_vae(load_vae(vae_folder)).to_dict()
    source = "data/latents.json"
    cases = {
        "scaling_factor": ("0.18", "field 'scaling_factor' must be a finite number"),
        "latent_channels": (0, "field 'latent_channels' must be a positive integer"),
        "downsampling_factor": (6, "field 'downsampling_factor' must be a power of two, got 6"),
        "fingerprint": ("abc", "field 'fingerprint' must be 64 lowercase hex digits"),
        "latents_std": ([1.0] * 4, "field 'latents_std' is given without 'latents_mean'"),
        "latents_mean": ([0.0] * 3, "field 'latents_mean' has 3 values for 4 latent channels"),
        "version": (2, "latent info version 2 is not the version this fastdiff reads"),
        "format": ("other", "field 'format' must be 'fastdiff.latent_info'"),
    }
    for field, (value, message) in cases.items():
        with pytest.raises(ValueError, match=f"{source}: {message}"):
            LatentInfo.from_dict({**good, field: value}, source)
    with pytest.raises(ValueError, match=f"{source}: missing latent info field\\(s\\) fingerprint"):
        LatentInfo.from_dict({k: v for k, v in good.items() if k != "fingerprint"}, source)
    with pytest.raises(ValueError, match=f"{source}: unknown latent info field\\(s\\) extra"):
        LatentInfo.from_dict({**good, "extra": 1}, source)
    with pytest.raises(ValueError, match=f"{source}: latent info is not valid JSON"):
        LatentInfo.from_json("{", source)
    with pytest.raises(ValueError, match="both 'shift_factor' and 'latents_mean' are set"):
        LatentScaling(latent_channels=2, scaling_factor=1.0, shift_factor=0.1, latents_mean=(0.0, 0.0))
    with pytest.raises(ValueError, match="field 'scaling_factor' must not be 0"):
        LatentScaling(latent_channels=2, scaling_factor=0.0)


def test_check_vae_matches_refuses_another_vae_naming_both_fingerprints(tmp_path, vae_folder):
    vae = load_vae(vae_folder)
    info = LatentInfo.from_vae(vae)
    check_vae_matches(load_vae(vae_folder), info, "data/latents.json")  # the same weights, loaded again
    patched = load_vae(vae_folder)
    apply_fastdiff(patched)
    check_vae_matches(patched, info, "data/latents.json")

    other_folder = save_small_vae(tmp_path / "other", seed=4)
    other = load_vae(other_folder)
    ours, theirs = info.fingerprint[:16], vae_fingerprint(other)[:16]
    message = (
        f"the VAE {other_folder} \\(fingerprint {theirs}\\) is not the VAE data/latents.json was encoded "
        f"with \\(fingerprint {ours}\\)"
    )
    with pytest.raises(ValueError, match=message):
        check_vae_matches(other, info, "data/latents.json")

    edited = LatentInfo.from_dict({**info.to_dict(), "scaling_factor": 0.25}, "run/latents.json")
    with pytest.raises(
        ValueError, match=r"run: the latent info disagrees .* scaling_factor 0.25 \(the VAE's: 0.18215\)"
    ):
        check_vae_matches(vae, edited, "run")
    with pytest.raises(TypeError, match="info must be a LatentInfo, got dict"):
        check_vae_matches(vae, info.to_dict(), "run")


def test_downsampling_factor_counts_the_encoder_levels_that_downsample():
    three_levels = small_vae(
        seed=6,
        block_out_channels=(32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    )
    assert downsampling_factor(three_levels) == 4  # diffusers: every level but the last halves the size
    latents = encode_images(three_levels, images(1, 12, 20))
    assert latents.shape == (1, 4, 3, 5)
    assert decode_latents(three_levels, latents).shape == (1, 3, 12, 20)
    with pytest.raises(
        ValueError, match="image size 12x18 does not divide by the VAE's downsampling factor 4"
    ):
        encode_images(three_levels, images(1, 12, 18))
