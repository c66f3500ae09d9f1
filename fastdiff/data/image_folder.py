"""A folder of images as a map-style dataset: recursive listing, class labels from file names.

Files ending in .jpg, .jpeg, .png or .webp (any case) are found recursively, in sorted path order. With
class labels, a file's class name is the part of its file name before the first ``_`` (``cat_001.png`` ->
``cat``; a name without ``_`` is its own class, without the extension); the sorted class names are numbered
0, 1, ... Each item is decoded, converted and resized by :mod:`fastdiff.data.images`' rules.
"""

import os
from collections.abc import Sequence

import numpy as np

from fastdiff.data.images import load_image
from fastdiff.data.keys import KeyedImageDataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


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


class ImageFolderDataset(KeyedImageDataset):
    """Images under a folder; ``dataset[ItemKey(index, epoch)]`` -> (float32 ``[C, H, W]`` in [-1, 1], label).

    The label is the class index (0 when ``class_cond`` is false). With ``random_flip``, the horizontal flip
    of an item is a pure function of (``seed``, epoch, index), so any worker computes the same image.
    """

    def __init__(
        self,
        data_dir: str,
        image_size: int | Sequence[int],
        channels: int = 3,
        class_cond: bool = False,
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(image_size, channels, random_flip, seed)
        self.paths = list_image_files(data_dir)
        if class_cond:
            self.labels, self.class_names = class_labels(self.paths)
        else:
            self.labels, self.class_names = [0] * len(self.paths), []

    def item_array(self, index: int) -> np.ndarray:
        """Image ``index`` decoded: uint8 ``[H, W, C]`` at the training size and channels."""
        return load_image(self.paths[index], self.image_size, self.channels)
