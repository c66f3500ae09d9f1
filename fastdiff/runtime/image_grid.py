"""Samples to images: model range to uint8, and a PNG grid written with numpy and Pillow.

Images are ``[N, H, W, C]`` with any height and width; a grid (and its PNG) takes 1 (grey), 3 (RGB) or 4
(RGBA) channels, as the data layer loads them.
"""

import math
import os

import numpy as np
import torch
from PIL import Image

GRID_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
"""Pillow mode of a grid by its channel count."""


def to_uint8_nhwc(samples: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, C]`` (improved-diffusion's ``(x + 1) * 127.5``)."""
    if samples.ndim != 4:
        raise ValueError(f"samples must be [N, C, H, W], got {list(samples.shape)}")
    return ((samples.float() + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def grid_array(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` (C 1, 3 or 4) -> one uint8 ``[rows*(H+p)+p, cols*(W+p)+p, C]`` image, row-major,
    on black (opaque black for RGBA)."""
    if images.ndim != 4 or images.shape[-1] not in GRID_MODES or images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 [N, H, W, C] with C 1, 3 or 4, got {images.dtype} {list(images.shape)}"
        )
    count, height, width, channels = images.shape
    if count == 0:
        raise ValueError("images must hold at least one image")
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels), np.uint8
    )
    if channels == 4:
        grid[..., 3] = 255
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        grid[top : top + height, left : left + width] = images[index]
    return grid


def save_image_grid(images: np.ndarray, path: str, columns: int | None = None, min_side: int = 256) -> None:
    """Write ``images`` (uint8 ``[N, H, W, C]``, C 1, 3 or 4) as a grey, RGB or RGBA PNG grid, enlarged
    (nearest) until its longer side is ``min_side`` or more."""
    grid = grid_array(images, columns)
    channels = grid.shape[-1]
    picture = Image.fromarray(grid[..., 0] if channels == 1 else grid, GRID_MODES[channels])
    factor = max(1, math.ceil(min_side / max(grid.shape[:2])))
    if factor > 1:
        picture = picture.resize((grid.shape[1] * factor, grid.shape[0] * factor), Image.Resampling.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp.{os.getpid()}.png"
    picture.save(temporary)
    os.replace(temporary, path)
