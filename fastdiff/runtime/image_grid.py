"""Samples to images: model range to uint8, and a PNG grid written with numpy and Pillow."""

import math
import os

import numpy as np
import torch
from PIL import Image


def to_uint8_nhwc(samples: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, 3]`` (improved-diffusion's ``(x + 1) * 127.5``)."""
    if samples.ndim != 4 or samples.shape[1] != 3:
        raise ValueError(f"samples must be [N, 3, H, W], got {list(samples.shape)}")
    return ((samples.float() + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def grid_array(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> one uint8 ``[rows*(H+p)+p, cols*(W+p)+p, 3]`` image, row-major, on black."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    count, height, width, _ = images.shape
    if count == 0:
        raise ValueError("images must hold at least one image")
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        grid[top : top + height, left : left + width] = images[index]
    return grid


def save_image_grid(images: np.ndarray, path: str, columns: int | None = None, min_side: int = 256) -> None:
    """Write ``images`` (uint8 ``[N, H, W, 3]``) as a PNG grid, enlarged (nearest) to ``min_side`` or more."""
    grid = grid_array(images, columns)
    picture = Image.fromarray(grid)
    factor = max(1, math.ceil(min_side / max(grid.shape[:2])))
    if factor > 1:
        picture = picture.resize((grid.shape[1] * factor, grid.shape[0] * factor), Image.Resampling.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp.{os.getpid()}.png"
    picture.save(temporary)
    os.replace(temporary, path)
