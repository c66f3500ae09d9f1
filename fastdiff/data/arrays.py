"""Array files as datasets: an ``.npz`` (``arr_0`` uint8 ``[N, H, W, C]``, optional ``arr_1`` labels
``[N]``, as ``fastdiff.sample`` and improved-diffusion write) or an ``.npy`` (uint8 ``[N, H, W, C]``).

``[N, H, W]`` is taken as one channel. An item whose size or channel count differs from the training size
and ``channels`` goes through :mod:`fastdiff.data.images`' rule (convert, halve, bicubic cover, centre
crop); one that matches is used as stored. An ``.npy`` and an uncompressed ``.npz`` (``np.savez``) are
memory-mapped by each worker process; a compressed ``.npz`` (``np.savez_compressed``) cannot be mapped, so
each worker process reads ``arr_0`` into memory once (prepare such a file with ``fastdiff.prepare_data``).
Labels are the integers of ``arr_1``; the class names are ``"0"`` to ``"K-1"`` for the largest label
``K - 1``.
"""

import os
import struct
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from fastdiff.data.images import (
    CHANNEL_MODES,
    ImageDataError,
    ImageSize,
    resize_to_cover,
)
from fastdiff.data.keys import KeyedImageDataset, PerProcessHandle
from fastdiff.data.prepared import npy_layout

MAX_LABEL = 1000
"""Labels index the class embedding of a class-conditional model (1000 classes, as in the reference)."""
SOURCE_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
"""Pillow mode of a stored uint8 array with this many channels."""
ZIP_LOCAL_HEADER = struct.Struct("<4s5H3I2H")
"""A ZIP local file header: signature ... name length, extra length (30 bytes)."""


def conform_array(array: np.ndarray, size: ImageSize, channels: int, name: str) -> np.ndarray:
    """A stored uint8 ``[H, W, C]`` image at the training ``size`` and ``channels``: as it is when it
    matches, else converted and resized by :mod:`fastdiff.data.images`' rule (errors name ``name``)."""
    if array.shape == (*size, channels):
        return array
    if array.shape[-1] not in SOURCE_MODES:
        raise ImageDataError(f"{name} has {array.shape[-1]} channels; expected 1, 2, 3 or 4")
    stored = array[:, :, 0] if array.shape[-1] == 1 else array
    image = Image.fromarray(np.ascontiguousarray(stored), SOURCE_MODES[array.shape[-1]])
    return resize_to_cover(image.convert(CHANNEL_MODES[channels]), size, name)


def check_labels(labels: Any, count: int, file: str) -> tuple[list[int], list[str]]:
    """Integer labels ``[count]`` in [0, 1000) -> (labels, class names "0".."K-1"); errors name ``file``."""
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{file}: labels must be integers [{count}] (one per image), got {labels.dtype} "
            f"{list(labels.shape)}"
        )
    if count and (labels.min() < 0 or labels.max() >= MAX_LABEL):
        raise ValueError(
            f"{file}: labels must be in [0, {MAX_LABEL}), found [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int64).tolist(), [str(i) for i in range(int(labels.max()) + 1 if count else 0)]


def _npz_member(path: str, member: str) -> tuple[tuple[int, ...], np.dtype, int | None]:
    """(shape, dtype, absolute data offset or None when compressed) of ``member`` of the .npz ``path``."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
        with archive.open(info) as handle:
            shape, dtype, header_length = npy_layout(handle, f"{path}:{member}")
    if info.compress_type != zipfile.ZIP_STORED:
        return shape, dtype, None
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        fields = ZIP_LOCAL_HEADER.unpack(raw.read(ZIP_LOCAL_HEADER.size))
    name_length, extra_length = fields[-2], fields[-1]
    start = info.header_offset + ZIP_LOCAL_HEADER.size + name_length + extra_length
    return shape, dtype, start + header_length


class ArrayFileDataset(PerProcessHandle, KeyedImageDataset):
    """``dataset[ItemKey(index, epoch)]`` -> (float32 ``[C, H, W]`` in [-1, 1], label) from an array file.

    The label is ``arr_1[index]`` with ``class_cond`` (the file must have it), else 0. With
    ``random_flip``, the horizontal flip of an item is a pure function of (``seed``, epoch, index).
    """

    source_kind = "array file"

    def __init__(
        self,
        path: str,
        image_size: int | Sequence[int],
        channels: int = 3,
        class_cond: bool = False,
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(image_size, channels, random_flip, seed)
        self.path = path
        if not os.path.isfile(path):
            raise ValueError(f"array file {path!r} does not exist")
        labels = None
        if path.lower().endswith(".npz"):
            try:
                with zipfile.ZipFile(path) as archive:
                    members = set(archive.namelist())
            except (zipfile.BadZipFile, OSError) as error:
                raise ValueError(f"{path} is not a readable .npz file: {error}") from error
            if "arr_0.npy" not in members:
                raise ValueError(
                    f"{path} holds no arr_0 (found {sorted(members)}): expected uint8 [N, H, W, C]"
                )
            shape, dtype, self._offset = _npz_member(path, "arr_0.npy")
            if "arr_1.npy" in members:
                with np.load(path) as arrays:
                    labels = arrays["arr_1"]
        else:
            with open(path, "rb") as handle:
                shape, dtype, self._offset = npy_layout(handle, path)
        if dtype != np.uint8 or len(shape) not in (3, 4) or 0 in shape:
            raise ValueError(f"{path}: expected uint8 images [N, H, W, C], found {dtype} {list(shape)}")
        self._shape = shape if len(shape) == 4 else (*shape, 1)
        if self._shape[-1] not in SOURCE_MODES:
            raise ValueError(f"{path}: images with {self._shape[-1]} channels; expected 1, 2, 3 or 4")
        count = self._shape[0]
        if class_cond and labels is None:
            raise ValueError(f"{path} has no labels (arr_1), but --class_cond is True")
        if class_cond:
            self.labels, self.class_names = check_labels(labels, count, path)
        else:
            self.labels, self.class_names = [0] * count, []

    def __len__(self) -> int:
        return self._shape[0]

    def array(self) -> np.ndarray:
        """This process's view of the images, uint8 ``[N, H, W, C]`` (mapped, or read when compressed)."""
        return self.per_process(self._open_array)

    def _open_array(self) -> np.ndarray:
        if self._offset is None:
            with np.load(self.path) as arrays:
                return arrays["arr_0"].reshape(self._shape)
        return np.memmap(self.path, np.uint8, mode="r", offset=self._offset, shape=self._shape)

    def item_array(self, index: int) -> np.ndarray:
        """Item ``index`` as uint8 ``[H, W, C]`` at the training size and channels."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items in {self.path}")
        return conform_array(self.array()[index], self.image_size, self.channels, f"{self.path}[{index}]")
