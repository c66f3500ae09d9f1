"""One image file -> a training array: decode, convert to the model's channel count, resize, centre-crop.

Sizes are ``(height, width)``. The rules, the same for image folders, dataset ZIPs and ``prepare_data``:

* **Decoding.** JPEG, PNG, WebP and anything else Pillow reads, at 8 bits per channel. A 16-bit or
  floating-point image (16-bit PNG, 32-bit TIFF) is refused, naming the file: Pillow would silently drop
  the low byte of a 16-bit RGB PNG, so convert such files to 8 bits yourself.
* **Channels** (``channels`` 1, 3 or 4). 1: Pillow's ``"L"`` luma (ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B).
  3: ``"RGB"`` (a grey image repeats its one channel). 4: ``"RGBA"`` (an image without transparency gets an
  opaque alpha, 255). Converting to 1 or 3 channels drops the alpha channel: transparent pixels keep the
  colour stored under them. Palette, CMYK and grey-with-alpha images convert by the same rule, so a folder
  may mix them.
* **Size.** An image smaller than the training size on either side is refused, naming the file. Otherwise
  it is halved (box filter) while both sides are at least twice the target, resized (bicubic) keeping its
  aspect ratio so it just covers the target, and centre-cropped: for square targets exactly
  improved-diffusion's preprocessing.
"""

from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
"""Pillow mode for each supported channel count."""

ImageSize = tuple[int, int]
"""(height, width) in pixels."""


class ImageDataError(ValueError):
    """An image cannot serve as training data (unreadable, 16-bit, too small, ...); names the file."""


def image_size_of(size: int | Sequence[int]) -> ImageSize:
    """``64`` -> ``(64, 64)``; ``(48, 64)`` -> ``(48, 64)``; raises ValueError for anything else."""
    sides = (size, size) if isinstance(size, int) else tuple(size)
    if len(sides) != 2 or not all(isinstance(side, int) and side > 0 for side in sides):
        raise ValueError(f"image size must be a positive integer or (height, width), got {size!r}")
    return int(sides[0]), int(sides[1])


def check_channels(channels: int) -> int:
    """``channels`` if it is 1, 3 or 4; raises ValueError otherwise."""
    if channels not in CHANNEL_MODES:
        raise ValueError(f"image channels must be 1 (grey), 3 (RGB) or 4 (RGBA), got {channels!r}")
    return channels


def _is_high_depth(image: Image.Image) -> bool:
    """Whether the file holds more than 8 bits per channel (checked before decoding, from its tiles)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return True
    return any(";16" in str(tile[-1]) for tile in image.tile)  # a tile's last field is its raw mode


def decode_image(source: str | BinaryIO, name: str, channels: int) -> Image.Image:
    """The image in ``source`` (a path or an open binary file; ``name`` is what errors call it), decoded and
    converted to ``channels`` by the module's rule."""
    check_channels(channels)
    try:
        with Image.open(source) as opened:
            if _is_high_depth(opened):
                raise ImageDataError(
                    f"image file {name!r} has more than 8 bits per channel (mode {opened.mode}); fastdiff "
                    "reads 8-bit images: convert it (e.g. to an 8-bit PNG) first"
                )
            opened.load()
            return opened.convert(CHANNEL_MODES[channels])
    except ImageDataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise ImageDataError(f"cannot read image file {name!r}: {error}") from error


def resize_to_cover(image: Image.Image, size: ImageSize, name: str) -> np.ndarray:
    """A decoded image -> uint8 ``[H, W, C]`` at ``size`` (halve, bicubic resize to cover, centre-crop)."""
    height, width = size
    if image.width < width or image.height < height:
        raise ImageDataError(
            f"image file {name!r} is {image.width}x{image.height} (width x height), smaller than the "
            f"training size {width}x{height} on a side; remove it or train at a smaller --image_size"
        )
    while image.width >= 2 * width and image.height >= 2 * height:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = max(height / image.height, width / image.width)
    covering = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(covering, resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    top = (array.shape[0] - height) // 2
    left = (array.shape[1] - width) // 2
    return array[top : top + height, left : left + width]


def load_image(
    source: str | BinaryIO, size: int | Sequence[int], channels: int = 3, name: str | None = None
) -> np.ndarray:
    """One image as uint8 ``[H, W, channels]`` by the module's rules (errors name the file)."""
    name = name if name is not None else str(source)
    return resize_to_cover(decode_image(source, name, channels), image_size_of(size), name)


def to_model_range(array: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, C]`` (read-only or memory-mapped too) -> a new float32 ``[C, H, W]`` in [-1, 1]."""
    planar = np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)  # a writeable copy
    return torch.from_numpy(planar).div_(127.5).sub_(1.0)
