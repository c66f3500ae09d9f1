"""A resumable stream of per-rank training batches, loaded by worker processes."""

import functools
import random
import signal
from collections.abc import Sequence

import numpy as np
import torch

from fastdiff.data.images import CHANNEL_MODES
from fastdiff.data.sampler import DataPosition, ShardedBatchSampler
from fastdiff.data.shapes import ShapesDataset
from fastdiff.data.sources import open_source, source_kind


def build_dataset(
    data_dir: str,
    image_size: int | Sequence[int],
    channels: int = 3,
    class_cond: bool = False,
    random_flip: bool = False,
    seed: int = 0,
) -> torch.utils.data.Dataset:
    """The source at ``data_dir`` (an image folder, a prepared dataset, a dataset ZIP or an array file: see
    fastdiff.data.sources), or the embedded shapes dataset when ``data_dir`` is empty, at ``image_size`` (a
    side or ``(height, width)``) with ``channels`` (``--in_channels``) per image: items are float32
    ``[channels, height, width]``. Images convert to 1, 3 or 4 channels (a ValueError naming
    ``--in_channels`` for another count); a prepared dataset must hold ``channels`` (any count)."""
    if data_dir and source_kind(data_dir) == "prepared dataset":
        return open_source(data_dir, image_size, channels, class_cond, random_flip, seed)
    if isinstance(channels, bool) or channels not in CHANNEL_MODES:
        source = f"the {source_kind(data_dir)} {data_dir!r}" if data_dir else "the embedded shapes dataset"
        raise ValueError(
            f"--in_channels {channels}: {source} loads as 1 (grey), 3 (RGB) or 4 (RGBA) channels; other "
            "channel counts need prepared or latent data"
        )
    if data_dir:
        return open_source(data_dir, image_size, channels, class_cond, random_flip, seed)
    return ShapesDataset(image_size, random_flip=random_flip, flip_seed=seed, channels=channels)


def _init_worker(worker_id: int, base_seed: int) -> None:
    """Seed a loader worker's global RNGs from (base seed, worker id), the same in every run, and leave
    Ctrl-C to the main process (which saves, then ends the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = (base_seed * 1000 + worker_id) % 2**32
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class BatchStream:
    """Endless ``(images float32 [B, C, H, W] in [-1, 1], {"y": int64 [B]} or {})`` for one rank.

    The order is :class:`ShardedBatchSampler`'s, so ``state_dict()`` (epoch and offset after the batches
    handed out so far) and ``load_state_dict`` resume it exactly; prefetched batches do not count as consumed.
    The main process's RNGs are never touched.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        class_cond: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.class_cond = class_cond
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.position = DataPosition()
        self._sampler = self._make_sampler(self.position)
        self._iterator = None

    def _make_sampler(self, start: DataPosition) -> ShardedBatchSampler:
        return ShardedBatchSampler(
            len(self.dataset), self.batch_size, self.rank, self.world_size, self.seed, self.shuffle, start
        )

    def _make_iterator(self):
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self._sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=functools.partial(_init_worker, base_seed=self.seed * 7919 + self.rank),
            generator=torch.Generator().manual_seed(self.seed),
        )
        return iter(loader)

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self._iterator is None:
            self.position = self._sampler.start
            self._iterator = self._make_iterator()
        images, labels = next(self._iterator)
        self.position = self.position.advanced(self._sampler.global_batch, self._sampler.dataset_len)
        cond = {"y": labels.long()} if self.class_cond else {}
        return images, cond

    def state_dict(self) -> dict[str, int]:
        """The data position: epoch and global items consumed in it, with the shape of the stream."""
        return {
            "epoch": self.position.epoch,
            "offset": self.position.offset,
            "seed": self.seed,
            "dataset_len": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position (the next batch is the one that followed it), in the saved order."""
        if int(state["dataset_len"]) != len(self.dataset):
            raise ValueError(
                f"the saved data position is for a dataset of {state['dataset_len']} items, "
                f"this one has {len(self.dataset)}"
            )
        self.close()
        self.seed = int(state["seed"])
        self._sampler = self._make_sampler(DataPosition(int(state["epoch"]), int(state["offset"])))
        self.position = self._sampler.start

    def close(self) -> None:
        """Stop the worker processes (a following ``next`` starts them again at the current position)."""
        if self._iterator is not None:
            self._sampler = self._make_sampler(self.position)
            self._iterator = None
