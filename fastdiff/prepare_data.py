"""Write a prepared dataset: ``python -m fastdiff.prepare_data SOURCE OUT --image_size 64``.

SOURCE is an image folder, an EDM/StyleGAN dataset ZIP (``.zip``), an array file (``.npz``/``.npy``, uint8
``[N, H, W, C]``) or a prepared dataset. Every item is decoded, converted to ``--in_channels`` and resized
to ``--image_size`` by the rule training uses (fastdiff.data.images), by ``--workers`` processes (results
kept in the source's order), and written to OUT as one prepared dataset (fastdiff.data.prepared): a
memory-mapped uint8 array, the labels and a JSON header. Training on OUT (``--data_dir OUT``) then reads an
item with no decode and no resize. With ``--class_cond True`` the labels are stored (from the file names of
a folder, the ZIP's dataset.json, the array file's arr_1) and the source must have them.

OUT is written atomically (a temporary sibling directory, renamed when complete); an existing OUT is
refused unless ``--overwrite True``, which replaces only a prepared dataset or an empty directory.
"""

import multiprocessing
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from fastdiff.cli import parse_command, run_main
from fastdiff.config import PrepareDataCommand
from fastdiff.data.images import CHANNEL_MODES
from fastdiff.data.prepared import PreparedDataset, PreparedWriter
from fastdiff.data.sources import open_source

CHUNK = 32
"""Items per task sent to a worker process."""

_worker_source = None
"""The source a worker process reads (set by :func:`_init_worker`)."""


def _init_worker(source) -> None:
    global _worker_source
    _worker_source = source


def _load_chunk(span: tuple[int, int]) -> np.ndarray:
    """Items ``[start, stop)`` of the worker's source, stacked: uint8 ``[n, H, W, C]``."""
    start, stop = span
    return np.stack([_worker_source.item_array(index) for index in range(start, stop)])


def usable_cpus() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare(
    source_path: str,
    out: str,
    image_size: int | Sequence[int],
    channels: int = 3,
    class_cond: bool = False,
    workers: int = 1,
    overwrite: bool = False,
    limit: int = 0,
    progress: bool = True,
) -> str:
    """Write the prepared dataset of ``source_path`` to ``out`` (module docstring); returns its path."""
    if not out:
        raise ValueError("OUT is empty: name the directory to write the prepared dataset to")
    if isinstance(channels, bool) or channels not in CHANNEL_MODES:
        raise ValueError(
            f"--in_channels {channels}: images are prepared as 1 (grey), 3 (RGB) or 4 (RGBA) channels"
        )
    if os.path.exists(out) and os.path.realpath(out) == os.path.realpath(source_path):
        raise ValueError(f"OUT {out} is SOURCE itself: write the prepared dataset somewhere else")
    source = open_source(source_path, image_size, channels, class_cond, resize_prepared=True)
    count = min(len(source), limit) if limit else len(source)
    spans = [(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]
    with PreparedWriter(out, count, image_size, channels, overwrite=overwrite) as writer:
        bar = tqdm(total=count, unit="img", desc="prepare_data", disable=not progress, file=sys.stderr)
        pool = None
        try:
            if workers <= 1:
                _init_worker(source)
                chunks = map(_load_chunk, spans)
            else:
                pool = multiprocessing.Pool(min(workers, len(spans)), _init_worker, (source,))
                chunks = pool.imap(_load_chunk, spans)
            for (start, stop), chunk in zip(spans, chunks, strict=True):
                writer.data[start:stop] = chunk
                bar.update(stop - start)
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
        writer.labels[:] = np.asarray(source.labels[:count], dtype=np.int64)
        origin = {
            "kind": source.source_kind,
            "path": os.path.abspath(source_path),
            "items": len(source),
            "limit": limit,
        }
        return writer.commit(source.class_names if class_cond else (), origin)


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare a dataset with the arguments in ``argv`` (``sys.argv`` when None); returns the exit status."""
    config, _ = parse_command(PrepareDataCommand, argv, "fastdiff.prepare_data", __doc__)
    settings, model = config.prepare, config.model
    workers = settings.workers or usable_cpus()
    began = time.perf_counter()
    path = prepare(
        settings.source,
        settings.out,
        model.image_hw,
        model.in_channels,
        model.class_cond,
        workers=workers,
        overwrite=settings.overwrite,
        limit=settings.limit,
    )
    written = PreparedDataset(path)
    height, width = written.image_size
    size = sum(entry["bytes"] for entry in written.header["files"].values())
    classes = f", {len(written.class_names)} classes" if written.class_names else ""
    print(
        f"wrote prepared dataset {path}: {len(written)} images {height}x{width}x{written.channels}{classes}, "
        f"{size / 2**20:.1f} MiB, from {written.header['source']['kind']} {settings.source} with {workers} "
        f"worker(s) in {time.perf_counter() - began:.1f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    run_main(main, "fastdiff.prepare_data", expected=(FileExistsError,))
