"""Deterministic, resumable sharding of a dataset into per-rank batches.

The order of epoch ``e`` is a permutation drawn from (seed, e) (or the identity without shuffling). Step
``s`` of an epoch takes the global batch ``order[s*G : (s+1)*G]`` (``G = batch_size * world_size``); rank
``r`` gets the contiguous slice ``[r*B : (r+1)*B]`` of it. The union over ranks of a step's batches is thus
the same set of items whatever the number of ranks, and the data position is just (epoch, items consumed in
the epoch): restoring it replays the exact remaining order. The last partial global batch of an epoch is
dropped so every rank takes the same number of steps.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fastdiff.data.keys import ItemKey


@dataclass(frozen=True)
class DataPosition:
    """Where the stream stands: ``epoch`` and ``offset`` (global items consumed within that epoch)."""

    epoch: int = 0
    offset: int = 0

    def advanced(self, global_batch: int, dataset_len: int) -> "DataPosition":
        """The position after one more global batch (moving to the next epoch when the next would not fit)."""
        offset = self.offset + global_batch
        if offset + global_batch > dataset_len:
            return DataPosition(self.epoch + 1, 0)
        return DataPosition(self.epoch, offset)


def epoch_order(dataset_len: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Item indices in the order epoch ``epoch`` visits them, int64 ``[dataset_len]``."""
    if not shuffle:
        return np.arange(dataset_len, dtype=np.int64)
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch]).permutation(dataset_len)


class ShardedBatchSampler:
    """Endless batch sampler: yields this rank's list of :class:`ItemKey` for each step, from ``start`` on."""

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start: DataPosition | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.global_batch = batch_size * world_size
        if dataset_len < self.global_batch:
            raise ValueError(
                f"the dataset has {dataset_len} items, fewer than one global batch of {self.global_batch} "
                f"(batch_size {batch_size} x {world_size} ranks)"
            )
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.start = start or DataPosition()
        if self.start.offset + self.global_batch > dataset_len:
            self.start = DataPosition(self.start.epoch + 1, 0)

    def __iter__(self) -> Iterator[list[ItemKey]]:
        position = self.start
        order = epoch_order(self.dataset_len, self.seed, position.epoch, self.shuffle)
        while True:
            first = position.offset + self.rank * self.batch_size
            yield [ItemKey(int(i), position.epoch) for i in order[first : first + self.batch_size]]
            following = position.advanced(self.global_batch, self.dataset_len)
            if following.epoch != position.epoch:
                order = epoch_order(self.dataset_len, self.seed, following.epoch, self.shuffle)
            position = following
