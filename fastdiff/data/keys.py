"""Item keys: which dataset item, in which epoch; the per-item randomness derived from them; and what the
image sources share (the keyed item, a per-process file handle)."""

import abc
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from fastdiff.data.images import check_channels, image_size_of, to_model_range


class ItemKey(NamedTuple):
    """A dataset item in an epoch. Augmentations are functions of (dataset seed, epoch, index) only."""

    index: int
    epoch: int = 0

    @classmethod
    def of(cls, key: "ItemKey | int") -> "ItemKey":
        """Accept a plain integer index too (epoch 0)."""
        if isinstance(key, ItemKey):
            return key
        if isinstance(key, tuple):
            return cls(*key)
        return cls(int(key))


def item_rng(seed: int, key: ItemKey, stream: int = 0) -> np.random.Generator:
    """A numpy generator that depends only on (seed, epoch, index, stream)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, key.epoch, key.index, stream])


def flip_for(seed: int, key: ItemKey) -> bool:
    """Whether the item is flipped horizontally in this epoch (probability 1/2)."""
    return bool(item_rng(seed, key, stream=1).random() < 0.5)


def flipped_for(array: np.ndarray, seed: int, key: ItemKey, random_flip: bool) -> np.ndarray:
    """An item's image ``[H, W, C]``, mirrored left-right when ``random_flip`` and :func:`flip_for` say so."""
    return array[:, ::-1] if random_flip and flip_for(seed, key) else array


Handle = TypeVar("Handle")


class PerProcessHandle:
    """For a source that reads its file through a handle (an open ZIP, a memory map): the handle is made on
    first use in each process, so a forked or spawned loader worker opens its own, and it is never pickled."""

    _handle: Any = None
    _handle_pid: int | None = None

    def per_process(self, opener: Callable[[], Handle]) -> Handle:
        """``opener()``'s handle for this process (made on this process's first call)."""
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle, self._handle_pid = opener(), os.getpid()
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the handle: each process opens the file itself."""
        return {**self.__dict__, "_handle": None, "_handle_pid": None}


class KeyedImageDataset(torch.utils.data.Dataset, abc.ABC):
    """What the image sources share: ``dataset[ItemKey(index, epoch)]`` -> (float32 ``[C, H, W]`` in
    [-1, 1], label) from the subclass's :meth:`item_array` (uint8 ``[H, W, C]`` at the training size and
    channels), mirrored with ``random_flip`` as a pure function of (``seed``, epoch, index), so that any
    worker computes the same item. Subclasses set ``labels`` (one per item)."""

    labels: list[int]

    def __init__(self, image_size: int | Sequence[int], channels: int, random_flip: bool, seed: int) -> None:
        self.image_size = image_size_of(image_size)
        self.channels = check_channels(channels)
        self.random_flip, self.seed = random_flip, seed

    @abc.abstractmethod
    def item_array(self, index: int) -> np.ndarray:
        """Item ``index`` as uint8 ``[H, W, C]`` at the training size and channels."""

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: ItemKey | int) -> tuple[torch.Tensor, int]:
        key = ItemKey.of(key)
        array = self.item_array(key.index)
        return to_model_range(flipped_for(array, self.seed, key, self.random_flip)), self.labels[key.index]
