"""The image rules shared by every data source: channel conversion, non-square resize + crop, bad files."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fastdiff.data.images import (
    ImageDataError,
    check_channels,
    image_size_of,
    load_image,
    to_model_range,
)


def _png_bytes(width: int, height: int, bit_depth: int, colour_type: int, pixels: np.ndarray) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB): unfiltered rows of big-endian samples."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + row.astype(">u2" if bit_depth == 16 else "u1").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _save(path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def test_sizes_and_channels_are_checked():
    assert image_size_of(64) == (64, 64)
    assert image_size_of((48, 64)) == (48, 64)
    for bad in (0, -3, (48,), (48, 0), (1, 2, 3), (4.0, 4)):
        with pytest.raises(ValueError, match="positive integer or \\(height, width\\)"):
            image_size_of(bad)
    for bad in (0, 2, 5):
        with pytest.raises(ValueError, match="1 \\(grey\\), 3 \\(RGB\\) or 4 \\(RGBA\\)"):
            check_channels(bad)


def test_grey_is_luma_and_rgb_repeats_grey(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path = _save(tmp_path / "colour.png", rgb)
    grey = load_image(path, 16, channels=1)
    assert grey.shape == (16, 16, 1) and grey.dtype == np.uint8
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(grey[..., 0].astype(np.float64) - luma).max() <= 1.0

    flat = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    grey_path = _save(tmp_path / "grey.png", flat)
    as_rgb = load_image(grey_path, 16, channels=3)
    assert as_rgb.shape == (16, 16, 3)
    for channel in range(3):
        np.testing.assert_array_equal(as_rgb[..., channel], flat)
    np.testing.assert_array_equal(load_image(grey_path, 16, channels=1)[..., 0], flat)


def test_rgba_keeps_alpha_and_opaque_images_get_255(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    path = _save(tmp_path / "alpha.png", rgba)
    np.testing.assert_array_equal(load_image(path, 8, channels=4), rgba)
    np.testing.assert_array_equal(load_image(path, 8, channels=3), rgba[..., :3])  # alpha dropped

    rgb_path = _save(tmp_path / "opaque.png", rgba[..., :3].copy())
    out = load_image(rgb_path, 8, channels=4)
    np.testing.assert_array_equal(out[..., :3], rgba[..., :3])
    assert (out[..., 3] == 255).all()


def test_non_square_target_keeps_aspect_and_centre_crops(tmp_path):
    # 96 wide x 24 high: three 32-wide bands; target 12 high x 16 wide -> scale 1/2, crop the middle 16 of 48.
    array = np.zeros((24, 96, 3), np.uint8)
    array[:, :32] = (255, 0, 0)
    array[:, 32:64] = (0, 255, 0)
    array[:, 64:] = (0, 0, 255)
    out = load_image(_save(tmp_path / "wide.png", array), (12, 16))
    assert out.shape == (12, 16, 3)
    np.testing.assert_array_equal(out[:, 2:14], np.broadcast_to(np.array([0, 255, 0], np.uint8), (12, 12, 3)))

    # 40 wide x 100 high to 48 high x 16 wide: the width decides the scale (16/40), the height is cropped.
    tall = np.zeros((100, 40, 3), np.uint8)
    tall[:30] = 200
    out = load_image(_save(tmp_path / "tall.png", tall), (16, 16))
    assert out.shape == (16, 16, 3) and (out[-4:] == 0).all()
    out = load_image(_save(tmp_path / "tall2.png", tall), (48, 16))
    assert out.shape == (48, 16, 3)


def test_square_targets_match_improved_diffusion_preprocessing(tmp_path):
    rng = np.random.default_rng(2)
    array = rng.integers(0, 256, (70, 135, 3), dtype=np.uint8)
    path = _save(tmp_path / "photo.png", array)
    image = Image.open(path).convert("RGB")
    while min(*image.size) >= 2 * 32:  # improved-diffusion's image_datasets.py, step by step
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = 32 / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    reference = np.asarray(image)
    top, left = (reference.shape[0] - 32) // 2, (reference.shape[1] - 32) // 2
    np.testing.assert_array_equal(load_image(path, 32), reference[top : top + 32, left : left + 32])


def test_too_small_on_either_side_is_named(tmp_path):
    path = _save(tmp_path / "short.png", np.zeros((20, 100, 3), np.uint8))
    assert load_image(path, (16, 64)).shape == (16, 64, 3)
    with pytest.raises(ImageDataError, match=r"short\.png.*100x20.*training size 64x24"):
        load_image(path, (24, 64))
    with pytest.raises(ImageDataError, match=r"short\.png.*100x20.*training size 128x16"):
        load_image(path, (16, 128))


@pytest.mark.parametrize("colour_type, samples", [(0, 1), (2, 3)])
def test_sixteen_bit_png_is_refused(tmp_path, colour_type, samples):
    pixels = np.arange(4 * 4 * samples, dtype=np.uint16).reshape(4, 4 * samples) * 1000
    path = tmp_path / f"deep{samples}.png"
    path.write_bytes(_png_bytes(4, 4, 16, colour_type, pixels))
    with pytest.raises(ImageDataError, match=rf"deep{samples}\.png.*more than 8 bits"):
        load_image(str(path), 4)
    eight_bit = tmp_path / "eight.png"
    eight_bit.write_bytes(_png_bytes(4, 4, 8, colour_type, (pixels % 256).astype(np.uint8)))
    assert load_image(str(eight_bit), 4, channels=samples if samples == 3 else 1).shape == (4, 4, samples)


def test_open_file_sources_use_the_given_name(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    buffer.seek(0)
    assert (load_image(buffer, 8, name="inside.zip/a.png") == np.array([1, 2, 3], np.uint8)).all()
    with pytest.raises(ImageDataError, match=r"inside\.zip/b\.png"):
        load_image(io.BytesIO(b"not an image"), 8, name="inside.zip/b.png")


def test_model_range_is_channels_first():
    array = np.array([[[0, 255]], [[127, 128]]], np.uint8)  # [H=2, W=1, C=2]
    out = to_model_range(array)
    assert out.shape == (2, 2, 1)
    np.testing.assert_allclose(
        out[:, :, 0].numpy(), [[-1.0, 127 / 127.5 - 1], [1.0, 128 / 127.5 - 1]], atol=1e-7
    )
