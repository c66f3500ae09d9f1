"""A folder of images as a map-style dataset: recursive listing, class labels from file names, resize + crop.

Files ending in .jpg, .jpeg, .png or .webp (any case) are found recursively, in sorted path order. With
class labels, a file's class name is the part of its file name before the first ``_`` (``cat_001.png`` ->
``cat``; a name without ``_`` is its own class, without the extension); the sorted class names are numbered
0, 1, ... Images are reduced by halving (box filter) while both sides are at least twice ``image_size``,
resized (bicubic) so the short side is ``image_size``, and center-cropped, as improved-diffusion does.
"""

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fastdiff.data.keys import ItemKey, flip_for

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class ImageDataError(ValueError):
    """An image file cannot serve as training data (unreadable, corrupt, or too small); names the file."""


def list_image_files(data_dir: str) -> list[str]:
    """Every image file under ``data_dir`` (recursive), sorted by path; raises if there is none."""
    if not data_dir:
        raise ValueError(
            "data_dir is empty: pass a folder of images (or leave --data_dir unset for the default)"
        )
    if not os.path.isdir(data_dir):
        raise ValueError(f"data_dir {data_dir!r} does not exist or is not a directory")
    found = []
    for root, dirs, files in os.walk(data_dir, followlinks=True):
        dirs.sort()
        found.extend(os.path.join(root, name) for name in files if name.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise ValueError(
            f"data_dir {data_dir!r} holds no images (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return sorted(found)


def class_name_of(path: str) -> str:
    """The class name encoded in a file name: the part before the first ``_`` (the stem if there is none)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem.split("_", 1)[0]


def class_labels(paths: Sequence[str]) -> tuple[list[int], list[str]]:
    """Per-file class indices and the sorted class names they index."""
    names = [class_name_of(path) for path in paths]
    sorted_names = sorted(set(names))
    index = {name: i for i, name in enumerate(sorted_names)}
    return [index[name] for name in names], sorted_names


def load_image(path: str, image_size: int) -> np.ndarray:
    """One image as uint8 ``[image_size, image_size, 3]``: halved, resized on the short side, center-cropped.

    Raises :class:`ImageDataError` naming the file when it cannot be decoded or is below ``image_size``.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise ImageDataError(f"cannot read image file {path!r}: {error}") from error
    width, height = image.size
    if min(width, height) < image_size:
        raise ImageDataError(
            f"image file {path!r} is {width}x{height}, smaller than image_size {image_size} on its short "
            "side; "
            "remove it or train at a smaller --image_size"
        )
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(
        tuple(max(image_size, round(side * scale)) for side in image.size), resample=Image.Resampling.BICUBIC
    )
    array = np.asarray(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top : top + image_size, left : left + image_size]


def to_model_range(array: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float32 ``[3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images under a folder; ``dataset[ItemKey(index, epoch)]`` -> (float32 ``[3, S, S]`` in [-1, 1], label).

    The label is the class index (0 when ``class_cond`` is false). With ``random_flip``, the horizontal flip
    of an item is a pure function of (``seed``, epoch, index), so any worker computes the same image.
    """

    def __init__(
        self,
        data_dir: str,
        image_size: int,
        class_cond: bool = False,
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be a positive integer, got {image_size}")
        self.paths = list_image_files(data_dir)
        self.image_size = image_size
        self.random_flip = random_flip
        self.seed = seed
        if class_cond:
            self.labels, self.class_names = class_labels(self.paths)
        else:
            self.labels, self.class_names = [0] * len(self.paths), []

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: ItemKey | int) -> tuple[torch.Tensor, int]:
        key = ItemKey.of(key)
        array = load_image(self.paths[key.index], self.image_size)
        if self.random_flip and flip_for(self.seed, key):
            array = array[:, ::-1]
        return to_model_range(array), self.labels[key.index]
