"""The embedded default dataset: procedurally drawn shapes, a pure function of the item index.

Nothing is downloaded or shipped. Item ``i`` is drawn with a numpy generator seeded by (content seed, i):
a plain background colour and, in a contrasting colour, one of four classes (class ``i % 4``):

    0 disc       1 square       2 triangle (pointing up)       3 stripes (across the whole image)

with random position, size, colour and (stripes) angle and period. Edges are anti-aliased by drawing at
4x resolution and averaging. A small UNet learns recognisable samples of it on a CPU in minutes.

Any ``(height, width)``: lengths are measured in units of the shorter side, so shapes keep their form
(discs stay round) and their size relative to the shorter side, and positions spread over the whole
image; a square image is drawn exactly as before non-square sizes existed. Any of 1, 3 or 4 channels:
drawn in RGB, then converted by :mod:`fastdiff.data.images`' rule (grey is Pillow's ITU-R 601-2 luma, the
same as an image folder loaded with ``channels=1``; RGBA is opaque).
"""

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from fastdiff.data.images import CHANNEL_MODES, ImageSize, check_channels, image_size_of, to_model_range
from fastdiff.data.keys import ItemKey, flipped_for, item_rng

SHAPE_CLASSES = ("disc", "square", "triangle", "stripes")
SUPERSAMPLE = 4
MIN_CONTRAST = 0.35
DEFAULT_LENGTH = 60_000


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(background, foreground) RGB in [0, 1] whose luminances differ by at least MIN_CONTRAST."""
    luminance = np.array([0.299, 0.587, 0.114])
    background = rng.uniform(0.0, 1.0, size=3)
    foreground = rng.uniform(0.0, 1.0, size=3)
    for _ in range(16):
        if abs(float((foreground - background) @ luminance)) >= MIN_CONTRAST:
            break
        foreground = rng.uniform(0.0, 1.0, size=3)
    else:
        foreground = 1.0 - background
        if abs(float((foreground - background) @ luminance)) < MIN_CONTRAST:
            foreground = np.zeros(3) if float(background @ luminance) > 0.5 else np.ones(3)
    return background, foreground


def _coverage(class_index: int, rng: np.random.Generator, size: ImageSize) -> np.ndarray:
    """Fraction of each pixel the shape covers, float64 ``[height, width]`` in [0, 1]; coordinates run over
    ``[0, width / s] x [0, height / s]`` with ``s`` the shorter side."""
    height, width = size
    unit = min(size) * SUPERSAMPLE
    extent = np.array([width, height]) / min(size)  # (x, y) extent in units of the shorter side
    y, x = np.meshgrid(
        (np.arange(height * SUPERSAMPLE) + 0.5) / unit, (np.arange(width * SUPERSAMPLE) + 0.5) / unit,
        indexing="ij",
    )  # fmt: skip
    if class_index == 0:
        radius = rng.uniform(0.18, 0.32)
        cx, cy = rng.uniform(radius, extent - radius, size=2)
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    elif class_index == 1:
        half = rng.uniform(0.15, 0.3)
        cx, cy = rng.uniform(half, extent - half, size=2)
        mask = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif class_index == 2:
        radius = rng.uniform(0.22, 0.38)
        cx = rng.uniform(0.87 * radius, extent[0] - 0.87 * radius)
        cy = rng.uniform(radius, extent[1] - 0.5 * radius)
        angles = np.pi / 2 + np.array([0.0, 2.0, 4.0]) * np.pi / 3
        vx, vy = cx + radius * np.cos(angles), cy - radius * np.sin(angles)
        mask = np.ones_like(x, dtype=bool)
        for i in range(3):
            ax, ay, bx, by = vx[i], vy[i], vx[(i + 1) % 3], vy[(i + 1) % 3]
            mask &= (bx - ax) * (y - ay) - (by - ay) * (x - ax) <= 0
    elif class_index == 3:
        angle = rng.uniform(0.0, np.pi)
        period = rng.uniform(0.18, 0.32)
        phase = rng.uniform(0.0, 1.0)
        along = (x * np.cos(angle) + y * np.sin(angle)) / period + phase
        mask = np.mod(along, 1.0) < 0.5
    else:
        raise ValueError(f"class_index must be in [0, {len(SHAPE_CLASSES)}), got {class_index}")
    return mask.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean(axis=(1, 3))


def _shape_size(image_size: int | Sequence[int]) -> ImageSize:
    size = image_size_of(image_size)
    if min(size) < 4:
        raise ValueError(
            f"image_size must be at least 4 on each side for the shapes dataset, got {image_size}"
        )
    return size


def render_shape(
    index: int, image_size: int | Sequence[int], seed: int = 0, channels: int = 3
) -> tuple[np.ndarray, int]:
    """Item ``index`` of the shapes dataset: (uint8 ``[height, width, channels]``, class index);
    ``image_size`` is a side or ``(height, width)``."""
    size = _shape_size(image_size)
    check_channels(channels)
    class_index = index % len(SHAPE_CLASSES)
    rng = item_rng(seed, ItemKey(index, 0))
    background, foreground = _contrasting_colours(rng)
    alpha = _coverage(class_index, rng, size)[..., None]
    image = background * (1.0 - alpha) + foreground * alpha
    rgb = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if channels == 3:
        return rgb, class_index
    converted = np.array(Image.fromarray(rgb).convert(CHANNEL_MODES[channels]))
    return converted.reshape(*size, channels), class_index


class ShapesDataset(torch.utils.data.Dataset):
    """``dataset[ItemKey(index, epoch)]`` -> (float32 ``[C, H, W]`` in [-1, 1], class index in [0, 4)).

    ``length`` items (any number: each is drawn on demand) of ``image_size`` (a side or ``(height,
    width)``) with ``channels`` 1, 3 or 4; images depend on (``content_seed``, index) only, flips
    (``random_flip``) on (``flip_seed``, epoch, index).
    """

    class_names: ClassVar[list[str]] = list(SHAPE_CLASSES)

    def __init__(
        self,
        image_size: int | Sequence[int],
        length: int = DEFAULT_LENGTH,
        content_seed: int = 0,
        random_flip: bool = False,
        flip_seed: int = 0,
        channels: int = 3,
    ) -> None:
        size = _shape_size(image_size)
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        self.image_size = size
        self.channels = check_channels(channels)
        self.length = length
        self.content_seed = content_seed
        self.random_flip = random_flip
        self.flip_seed = flip_seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: ItemKey | int) -> tuple[torch.Tensor, int]:
        key = ItemKey.of(key)
        if not 0 <= key.index < self.length:
            raise IndexError(f"index {key.index} out of range for {self.length} items")
        array, label = render_shape(key.index, self.image_size, self.content_seed, self.channels)
        return to_model_range(flipped_for(array, self.flip_seed, key, self.random_flip)), label
