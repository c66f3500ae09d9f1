"""What ``--data_dir`` names, opened as a dataset: a prepared dataset, a dataset ZIP, an array file or an
image folder.

The kind is told by the path: a directory holding ``dataset.json`` is a prepared dataset
(:mod:`fastdiff.data.prepared`), any other directory an image folder (:mod:`fastdiff.data.image_folder`),
a ``.zip`` file a dataset ZIP (:mod:`fastdiff.data.dataset_zip`), a ``.npz`` or ``.npy`` file an array
file (:mod:`fastdiff.data.arrays`). Every kind yields ``(float32 [C, H, W] in [-1, 1], label)`` for an
:class:`~fastdiff.data.keys.ItemKey`, so data order, sharding and resume are the same for all of them.
Every dataset here also has ``item_array(index)`` (uint8 ``[H, W, C]`` at the training size, before any
flip), which ``fastdiff.prepare_data`` writes.
"""

import os
from collections.abc import Sequence

import numpy as np
import torch

from fastdiff.data.arrays import ArrayFileDataset, conform_array
from fastdiff.data.dataset_zip import ZipDataset
from fastdiff.data.image_folder import ImageFolderDataset
from fastdiff.data.images import image_size_of, load_image
from fastdiff.data.prepared import PreparedDataError, PreparedDataset, is_prepared_dataset

SOURCE_KINDS = ("prepared dataset", "dataset ZIP", "array file", "image folder")


class FolderDataset(ImageFolderDataset):
    """:class:`ImageFolderDataset` with the interface of the other sources (``source_kind``, ``path``,
    ``item_array``)."""

    source_kind = "image folder"

    def __init__(self, data_dir: str, *args, **kwargs) -> None:
        super().__init__(data_dir, *args, **kwargs)
        self.path = data_dir

    def item_array(self, index: int) -> np.ndarray:
        """Image ``index`` decoded and resized: uint8 ``[H, W, C]``."""
        return load_image(self.paths[index], self.image_size, self.channels)


class ResizedPrepared(PreparedDataset):
    """A prepared image dataset read as a source at another size or channel count (``fastdiff.prepare_data``
    from a prepared dataset): each stored image goes through the image rule."""

    def __init__(self, path: str, image_size, channels: int, class_cond: bool, random_flip: bool, seed: int):
        super().__init__(path, None, None, class_cond, random_flip, seed)
        if self.kind != "images":
            raise PreparedDataError(f"{path} holds {self.kind}, not images: it cannot be resized")
        self.target_size, self.target_channels = image_size_of(image_size), channels

    def item_array(self, index: int) -> np.ndarray:
        stored = super().item_array(index)
        return conform_array(stored, self.target_size, self.target_channels, f"{self.path}[{index}]")


def source_kind(path: str) -> str:
    """Which kind of source ``path`` is (one of :data:`SOURCE_KINDS`); ValueError when it is none."""
    if not path:
        raise ValueError(
            "data_dir is empty: pass a folder, a prepared dataset, a dataset ZIP or an array file"
        )
    if os.path.isdir(path):
        return "prepared dataset" if is_prepared_dataset(path) else "image folder"
    if not os.path.exists(path):
        raise ValueError(f"data_dir {path!r} does not exist")
    lowered = path.lower()
    if lowered.endswith(".zip"):
        return "dataset ZIP"
    if lowered.endswith((".npz", ".npy")):
        return "array file"
    raise ValueError(
        f"data_dir {path!r} is a file but not a dataset ZIP (.zip) or an array file (.npz, .npy); pass one "
        "of those, an image folder or a prepared dataset"
    )


def open_source(
    path: str,
    image_size: int | Sequence[int],
    channels: int = 3,
    class_cond: bool = False,
    random_flip: bool = False,
    seed: int = 0,
    resize_prepared: bool = False,
) -> torch.utils.data.Dataset:
    """The dataset at ``path`` (any kind of :data:`SOURCE_KINDS`); its ``source_kind`` says which.

    A prepared dataset must match ``image_size`` and ``channels`` (it is never resized in training), unless
    ``resize_prepared``: then its images go through the image rule like an array file's.
    """
    kind = source_kind(path)
    arguments = (image_size, channels, class_cond, random_flip, seed)
    if kind == "prepared dataset":
        return ResizedPrepared(path, *arguments) if resize_prepared else PreparedDataset(path, *arguments)
    if kind == "dataset ZIP":
        return ZipDataset(path, *arguments)
    if kind == "array file":
        return ArrayFileDataset(path, *arguments)
    return FolderDataset(path, *arguments)


def describe_dataset(dataset: torch.utils.data.Dataset) -> str:
    """What the run's log says about its data: the kind, the path, the item count and shape."""
    kind = getattr(dataset, "source_kind", None)
    if kind is None:
        return f"embedded shapes ({len(dataset)} images)"
    height, width = dataset.image_size
    items = "latents" if getattr(dataset, "kind", "images") == "latents" else "images"
    return f"{kind} {dataset.path} ({len(dataset)} {items}, {height}x{width}x{dataset.channels})"
