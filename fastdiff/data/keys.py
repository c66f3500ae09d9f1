"""Item keys: which dataset item, in which epoch; the per-item randomness derived from them."""

from typing import NamedTuple

import numpy as np


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
