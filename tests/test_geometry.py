"""Any channel count and non-square images: the flags, the UNet, the data, the writers and readers, and a
grey non-square run through train, sample, nll and evaluate."""

import copy
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_inception import require_inception
from tiny_run import one_thread, tiny_loop  # noqa: F401 (one_thread: an autouse fixture)

from fastdiff import dist_util, evaluate, nll, ops, sample
from fastdiff.builders import build_diffusion, build_model
from fastdiff.config import (
    RUN_CONFIG_VERSION,
    ConfigError,
    ModelConfig,
    RunConfig,
    SampleCommand,
    load_run_config,
    parse_image_size,
    write_run_config,
)
from fastdiff.data import BatchStream, ImageFolderDataset, build_dataset, render_shape
from fastdiff.evaluation.inception import as_rgb, preprocess
from fastdiff.evaluation.sources import load_images
from fastdiff.evaluation.stats import ReferenceStats, load_stats
from fastdiff.runtime.image_grid import grid_array, save_image_grid, to_uint8_nhwc
from fastdiff.runtime.precision import resolve_precision
from fastdiff.training.preview import SamplePreview
from fastdiff.training.quality import TrainingEvaluation, reference_filename
from fastdiff.unet import UNetModel

SMALL = dict(num_channels=32, num_res_blocks=1, channel_mult="1,2", num_heads=2)
"""A 2-level UNet (total downsampling 2)."""


def _sides(rng: random.Random, factor: int = 4) -> tuple[int, int]:
    """A fresh non-square (height, width), both multiples of ``factor``."""
    height = factor * rng.randint(2, 6)
    width = height + factor * rng.randint(1, 3)
    return (height, width) if rng.random() < 0.5 else (width, height)


# ---------------------------------------------------------------------------------------------- flags


def test_image_size_parses_a_side_or_height_width():
    rng = random.Random(torch.initial_seed())
    height, width = _sides(rng)
    assert parse_image_size(f"{height},{width}") == (height, width)
    assert parse_image_size(f" {height} , {width} ") == (height, width)
    assert parse_image_size([height, width]) == parse_image_size((height, width)) == (height, width)
    assert parse_image_size(str(height)) == parse_image_size(height) == height
    assert parse_image_size(f"{width},{width}") == width, "a square pair is one side"
    for bad in ("0", "-8", "48x64", "48,64,3", "a,b", "", "48,", 48.0, True, (48, 0), [48, 64, 2]):
        with pytest.raises(ValueError, match=r"positive integer .* HEIGHT,WIDTH"):
            parse_image_size(bad)


def test_model_flags_round_trip_through_run_config_json(tmp_path):
    rng = random.Random(torch.initial_seed())
    height, width = _sides(rng)
    channels = rng.choice([1, 2, 4, 5])
    flags = dict(image_size=f"{height},{width}", in_channels=channels, channel_mult="1,2,2", lr=0.25)
    config = RunConfig().with_flags(flags)
    assert (config.model.image_size, config.model.image_hw, config.model.in_channels) == (
        (height, width),
        (height, width),
        channels,
    )
    path = write_run_config(config, str(tmp_path))
    with open(path) as handle:
        data = json.load(handle)
    assert data["version"] == RUN_CONFIG_VERSION and data["model"]["image_size"] == [height, width]
    assert load_run_config(path) == config
    square = RunConfig().with_flags({"image_size": "32,32"})
    assert square.model.image_size == 32 and square.to_dict()["model"]["image_size"] == 32, (
        "squares stay ints"
    )
    assert SampleCommand().with_flags(config.model_flags()).model == config.model, "read by sample"


def test_earlier_run_config_files_load_as_rgb(tmp_path):
    data = RunConfig().with_flags({"image_size": 32}).to_dict()
    del data["model"]["in_channels"]
    data["version"] = 1
    (tmp_path / "run_config.json").write_text(json.dumps(data))
    config = load_run_config(str(tmp_path / "run_config.json"))
    assert (config.model.image_size, config.model.in_channels) == (32, 3)
    data["version"] = 2
    (tmp_path / "run_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"missing field\(s\) model\.in_channels"):
        load_run_config(str(tmp_path / "run_config.json"))
    (tmp_path / "model_flags.json").write_text(json.dumps({"model_and_diffusion": {"image_size": 16}}))
    legacy = load_run_config(str(tmp_path / "model_flags.json"))
    assert (legacy.model.image_size, legacy.model.in_channels) == (16, 3)


def test_bad_sizes_and_channels_name_the_flag():
    with pytest.raises(ValueError, match="--image_size must be a positive integer"):
        RunConfig().with_flags({"image_size": "48x64"})
    with pytest.raises(ValueError, match="--in_channels must be positive, got 0"):
        RunConfig().with_flags({"in_channels": 0})
    message = r"--image_size 20,24: both sides must be divisible .* = 8 \(channel_mult 1,2,2,2\); 20 is not"
    with pytest.raises(ValueError, match=message):
        RunConfig().with_flags({"image_size": "20,24", "channel_mult": "1,2,2,2"})
    # A default channel_mult is checked when the model is built (its flags are then complete).
    config = RunConfig().with_flags({"image_size": "60,64"})
    with pytest.raises(ConfigError, match=r"--image_size 60,64: .* = 8 \(channel_mult 1,2,3,4\); 60 is not"):
        build_model(config.model, config.diffusion)
    config = RunConfig().with_flags({"image_size": "16,24"})
    with pytest.raises(ConfigError, match=r"--channel_mult no default .* longer side of 16,24"):
        build_model(config.model, config.diffusion)
    config = RunConfig().with_flags({"image_size": "16,24", "channel_mult": "1,2,2"})
    message = r"--attention_resolutions entry 16 .* longer side of image_size=24"
    with pytest.raises(ConfigError, match=message):
        build_model(config.model, config.diffusion)
    with pytest.raises(ValueError, match="--image_size must be a positive integer"):
        sample.parse_args(["--image_size", "16,-24"])


def test_non_square_defaults_follow_the_longer_side():
    assert ModelConfig(image_size=(48, 64)).geometry() == ((1, 2, 3, 4), (4, 8))
    assert ModelConfig(image_size=(64, 48)).geometry() == ModelConfig(image_size=64).geometry()
    assert ModelConfig(image_size=(32, 64), attention_resolutions="32").geometry() == ((1, 2, 3, 4), (2,))


# ----------------------------------------------------------------------------------------------- UNet


def _small_model(image_size, channels: int, learn_sigma: bool = False, **flags) -> UNetModel:
    config = RunConfig().with_flags(
        {**SMALL, "image_size": image_size, "in_channels": channels, "learn_sigma": learn_sigma, **flags}
    )
    model = build_model(config.model, config.diffusion).double().eval()
    generator = torch.Generator().manual_seed(torch.initial_seed())
    for param in model.parameters():  # the zero-initialised output layers too, so outputs depend on x
        param.data = torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.05
    return model


@pytest.mark.parametrize("channels", [1, 4])
def test_unet_on_non_square_inputs_with_one_or_four_channels(channels):
    rng = random.Random(torch.initial_seed())
    height, width = _sides(rng, 2)
    model = _small_model(f"{height},{width}", channels, learn_sigma=True, attention_resolutions="")
    assert (model.in_channels, model.out_channels) == (channels, 2 * channels)
    x = torch.randn(3, channels, height, width, dtype=torch.float64)
    t = torch.tensor([3.0, 400.0, 999.0], dtype=torch.float64)
    with torch.no_grad(), ops.use_backend("torch"):
        out = model(x, t)
        each = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(3)])
    assert out.shape == (3, 2 * channels, height, width)
    torch.testing.assert_close(out, each, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=f"in_channels={channels} channels"):
        model(torch.randn(1, 3, height, width, dtype=torch.float64), t[:1])
    with pytest.raises(ValueError, match="must be divisible by 2"):
        model(torch.randn(1, channels, height + 1, width, dtype=torch.float64), t[:1])


def _transposed(model: UNetModel) -> UNetModel:
    """The same UNet with every 2-D convolution kernel transposed (rows <-> columns)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data = module.weight.data.transpose(-1, -2).contiguous()
    return twin


def test_unet_height_and_width_are_not_confused():
    """Transposing the image and every kernel transposes the output: holds only if no layer (attention's
    reshapes, resampling, the skips) mixes up the two sides."""
    rng = random.Random(torch.initial_seed())
    height, width = _sides(rng, 2)
    model = _small_model(f"{height},{width}", 3, attention_resolutions=str(max(height, width) // 2))
    assert any(ds == 2 for ds in model.attention_resolutions), "attention at the downsampled level"
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    t = torch.tensor([10.0, 700.0], dtype=torch.float64)
    with torch.no_grad(), ops.use_backend("torch"):
        out = model(x, t)
        flipped = _transposed(model)(x.transpose(-1, -2).contiguous(), t)
    torch.testing.assert_close(flipped, out.transpose(-1, -2), rtol=0, atol=1e-12)


def test_unet_checks_both_sides_against_its_downsampling():
    args = dict(in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1, channel_mult=(1, 2, 2))
    with pytest.raises(
        ValueError, match=r"image_size=\(18, 24\) must be divisible by .* = 4, .*\(--image_size\): 18 is not"
    ):
        UNetModel((18, 24), attention_resolutions=(), **args)
    with pytest.raises(ValueError, match=r"entry 4 .* must divide image_size=\(6, 8\) on both sides"):
        UNetModel((6, 8), attention_resolutions=(4,), **args)
    assert UNetModel((8, 12), attention_resolutions=(2,), **args).image_size == (8, 12)


# ----------------------------------------------------------------------------------------------- data


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of uint8 ``[..., 3]`` in float64."""
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def test_shapes_render_any_size_and_channel_count():
    rng = random.Random(torch.initial_seed())
    height, width = _sides(rng)
    index = rng.randrange(1000)
    rgb, label = render_shape(index, (height, width))
    grey, grey_label = render_shape(index, (height, width), channels=1)
    rgba, _ = render_shape(index, (height, width), channels=4)
    assert rgb.shape == (height, width, 3) and grey.shape == (height, width, 1) and rgba.shape[-1] == 4
    assert label == grey_label == index % 4
    assert np.abs(grey[..., 0] - _luma(rgb)).max() <= 1.0, "grey is the luma of the RGB drawing"
    assert np.array_equal(rgba[..., :3], rgb) and (rgba[..., 3] == 255).all(), "RGBA is opaque"
    dataset = build_dataset("", (height, width), 1)
    image, _ = dataset[index]
    assert image.shape == (1, height, width)
    assert torch.equal(image, torch.from_numpy(grey).permute(2, 0, 1).float() / 127.5 - 1.0)


def test_non_square_shapes_keep_their_form_and_fill_the_width():
    """Discs stay round in a wide image, and their centres spread over all of it."""
    height, width = 32, 64
    centres = []
    for index in range(0, 160, 4):  # class 0: discs
        image, _ = render_shape(index, (height, width))
        background = image[0, 0]  # a disc never reaches the border
        inside = np.abs(image.astype(int) - background.astype(int)).sum(-1) > 60
        rows, cols = np.nonzero(inside)
        assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 2, "a disc is round"
        centres.append(cols.mean())
    assert min(centres) < width / 4 and max(centres) > 3 * width / 4


def test_folders_load_by_the_channel_flag(tmp_path):
    rng = np.random.default_rng(torch.initial_seed())
    pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).convert("RGBA").save(tmp_path / "b.png")
    for channels in (1, 3, 4):
        dataset = build_dataset(str(tmp_path), (20, 30), channels)
        assert isinstance(dataset, ImageFolderDataset)
        images, _ = next(BatchStream(dataset, 2, shuffle=False))
        assert images.shape == (2, channels, 20, 30), "batches are [B, C, H, W]"
    grey = build_dataset(str(tmp_path), (20, 30), 1)[0][0][0].add(1).mul(127.5).round().numpy()
    assert np.abs(grey - _luma(pixels)).max() <= 1.0
    for bad in (2, 5, True):
        with pytest.raises(ValueError, match=f"--in_channels {bad}: the image folder .* 1 .* 3 .* 4"):
            build_dataset(str(tmp_path), 20, bad)
    with pytest.raises(ValueError, match="--in_channels 2: the embedded shapes dataset"):
        build_dataset("", 16, 2)


# -------------------------------------------------------------------------------- writers and readers


@pytest.mark.parametrize(("channels", "mode"), [(1, "L"), (3, "RGB"), (4, "RGBA")])
def test_grids_keep_the_channels_and_non_square_tiles(tmp_path, channels, mode):
    rng = random.Random(torch.initial_seed())
    height, width = _sides(rng)
    samples = torch.rand(5, channels, height, width) * 2.2 - 1.1  # float32, some outside [-1, 1]
    images = to_uint8_nhwc(samples).numpy()
    assert images.shape == (5, height, width, channels)
    scaled = (samples.numpy() + np.float32(1)) * np.float32(127.5)  # the same float32 operations
    expected = np.clip(np.floor(scaled), 0, 255).transpose(0, 2, 3, 1)
    assert np.array_equal(images, expected.astype(np.uint8))
    save_image_grid(images, str(tmp_path / "grid.png"), columns=3, min_side=1)
    with Image.open(tmp_path / "grid.png") as picture:
        assert picture.mode == mode
        grid = np.asarray(picture).reshape(picture.height, picture.width, channels)
    assert grid.shape == (2 * (height + 2) + 2, 3 * (width + 2) + 2, channels)
    for index in range(5):
        row, column = divmod(index, 3)
        top, left = 2 + row * (height + 2), 2 + column * (width + 2)
        assert np.array_equal(grid[top : top + height, left : left + width], images[index])
    if channels == 4:
        assert (grid[0, :, 3] == 255).all(), "the padding is opaque"
    with pytest.raises(ValueError, match="C 1, 3 or 4"):
        grid_array(np.zeros((2, 4, 4, 2), np.uint8))


def test_the_feature_network_sees_grey_repeated_and_rgba_without_alpha():
    rng = np.random.default_rng(torch.initial_seed())
    rgba = torch.from_numpy(rng.integers(0, 256, (2, 9, 13, 4), dtype=np.uint8))
    grey = rgba[..., :1]
    assert torch.equal(as_rgb(grey), grey.repeat(1, 1, 1, 3))
    assert torch.equal(preprocess(grey, 17), preprocess(grey.repeat(1, 1, 1, 3), 17))
    assert torch.equal(preprocess(rgba, 17), preprocess(rgba[..., :3].contiguous(), 17))
    with pytest.raises(ValueError, match="C 1, 3 or 4"):
        as_rgb(rgba[..., :2])


def test_readers_keep_channels_and_non_square_sizes(tmp_path):
    rng = np.random.default_rng(torch.initial_seed())
    grey = rng.integers(0, 256, (3, 8, 12), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", grey)
    found = load_images(str(tmp_path / "grey.npz"), "--samples")
    assert found.images.shape == (3, 8, 12, 1) and found.image_size == (8, 12) and found.channels == 1
    shapes = load_images("shapes", "--ref", (8, 12), 4, channels=4)
    assert shapes.images.shape == (4, 8, 12, 4)
    stats = ReferenceStats(rng.standard_normal((6, 3)), None, (8, 12), "abc", channels=1)
    stats.save(str(tmp_path / "stats.npz"))
    assert load_stats(str(tmp_path / "stats.npz"), "abc", (8, 12), 1).image_size == (8, 12)
    with pytest.raises(ValueError, match=r"for 8x12 images, the samples are 12x8: .*--image_size 12,8"):
        load_stats(str(tmp_path / "stats.npz"), "abc", (12, 8))
    with pytest.raises(ValueError, match="1-channel images, the samples have 3"):
        load_stats(str(tmp_path / "stats.npz"), "abc", (8, 12), 3)
    with np.load(tmp_path / "stats.npz") as data:  # as written before sizes had two sides
        old = {name: data[name] for name in data.files if name != "channels"}
    np.savez(tmp_path / "old.npz", **{**old, "image_size": np.array(16)})
    assert load_stats(str(tmp_path / "old.npz"), "abc", 16, 3).image_size == (16, 16)
    assert reference_filename((3, 16, 16), 256) == "fid_reference_16px_256.npz"
    assert reference_filename((1, 16, 24), 8) == "fid_reference_16x24px_1ch_8.npz"


def test_in_training_evaluation_refuses_channels_the_feature_network_cannot_score():
    dataset = [(torch.zeros(2, 8, 12), 0)] * 8
    with pytest.raises(ValueError, match=r"training data has 2 channels \(--in_channels\)"):
        TrainingEvaluation(
            model=None, sampling_diffusion=None, sampling={}, dataset=dataset, interval=1, num_samples=4,
            num_ref=4, num_classes=None, seed=0, precision=None, ctx=None, log_dir="", ema_rate=0.9,
        )  # fmt: skip


# -------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ctx():
    context = dist_util.setup_dist("cpu")
    yield context
    dist_util.cleanup_dist()


GREY_WIDE = dict(image_size="8,12", in_channels=1, attention_resolutions="6")
"""The tiny model on grey 8x12 shapes; attention at 4x6 (the longer side 12 / 6: downsample factor 2)."""


def test_a_grey_non_square_run_trains_samples_scores_and_evaluates(ctx, tmp_path, capsys):
    log_dir = tmp_path / "run"
    loop = tiny_loop(ctx, log_dir, max_steps=2, save_interval=2, **GREY_WIDE)
    assert loop.model.in_channels == 1 and loop.model.out_channels == 1
    images, _ = next(loop.data)
    assert images.shape == (4, 1, 8, 12)
    assert loop.run() == 2
    saved = load_run_config(str(log_dir / "run_config.json"))
    assert (saved.model.image_size, saved.model.in_channels) == ((8, 12), 1)
    checkpoint = str(log_dir / "ema_0.9_000002.pt")

    common = ["--precision", "fp32", "--timestep_respacing", "4"]
    argv = ["--model_path", checkpoint, "--num_samples", "5", "--batch_size", "3", "--out_dir", str(tmp_path)]
    assert sample.main([*argv, *common]) == 0
    arrays = np.load(tmp_path / "samples_5x8x12x1.npz")
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (5, 8, 12, 1)
    assert arrays["arr_0"].std() > 0 and arrays.files == ["arr_0"]
    with Image.open(tmp_path / "samples_5x8x12x1.png") as grid:
        assert grid.mode == "L" and grid.width > grid.height, "3 wide tiles per row, 2 rows"

    argv = ["--model_path", checkpoint, "--num_samples", "4", "--batch_size", "2", "--out_dir", str(tmp_path)]
    assert nll.main([*argv, "--precision", "fp32"]) == 0
    bpd = float(capsys.readouterr().out.split("bits/dim ")[1].split()[0])
    assert np.isfinite(bpd) and bpd > 0
    assert np.load(tmp_path / "vb_terms.npz")["arr_0"].shape == (50,), "one term per trained step"

    preview = SamplePreview(
        loop.model, build_diffusion(loop.config.diffusion, "3"), (1, 8, 12), 6, None, 0,
        resolve_precision("fp32", ctx.device), {"sampler": "ddim"},
    )  # fmt: skip
    path = preview.write(loop.ema, str(log_dir), 2)
    with Image.open(path) as picture:
        assert picture.mode == "L"

    require_inception()
    argv = ["--ref", "shapes", "--num_ref", "4", "--samples", checkpoint, "--num_samples", "3"]
    argv += ["--batch_size", "3", "--kid_subsets", "2", "--feature_batch_size", "8", "--pr_k", "1"]
    assert evaluate.main([*argv, *common]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["num_samples"], result["num_ref"]) == (3, 4) and result["fid"] > 0
    np.savez(tmp_path / "rgb.npz", np.zeros((4, 8, 12, 3), np.uint8))
    with pytest.raises(ValueError, match=r"holds 3-channel images but the samples .* have 1"):
        evaluate.main(
            ["--ref", str(tmp_path / "rgb.npz"), "--samples", str(tmp_path / "samples_5x8x12x1.npz")]
        )
