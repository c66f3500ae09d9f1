"""Write a prepared dataset: ``python -m fastdiff.prepare_data SOURCE OUT --image_size 64``.

SOURCE is an image folder, an EDM/StyleGAN dataset ZIP (``.zip``), an array file (``.npz``/``.npy``, uint8
``[N, H, W, C]``) or a prepared dataset. Every item is decoded, converted to ``--in_channels`` and resized
to ``--image_size`` by the rule training uses (fastdiff.data.images), by ``--workers`` processes (results
kept in the source's order), and written to OUT as one prepared dataset (fastdiff.data.prepared): a
memory-mapped uint8 array, the labels and a JSON header. Training on OUT (``--data_dir OUT``) then reads an
item with no decode and no resize. With ``--class_cond True`` the labels are stored (from the file names of
a folder, the ZIP's dataset.json, the array file's arr_1) and the source must have them.

With ``--vae PATH`` (a diffusers AutoencoderKL folder) the images, decoded and resized the same way, are
encoded with the VAE (``fastdiff.latents.encode_images``: the posterior mean, normalised by the VAE's
scaling) and OUT holds latents: float16 ``[N, C, H / f, W / f]`` (C the VAE's latent channels, f its
downsampling factor), its ``image_size`` the latents' size, and ``metadata`` the ``LatentInfo`` (scaling,
shift, channels, factor, the VAE's fingerprint), the VAE path as given (for information: training looks
there for its VAE by default) and the images' size. A latent that does not fit float16 is an error. The
VAE runs in float32 on ``--device`` (auto: the first CUDA device when there is one, else the CPU).

OUT is written atomically (a temporary sibling directory, renamed when complete); an existing OUT is
refused unless ``--overwrite True``, which replaces only a prepared dataset or an empty directory.
"""

import multiprocessing
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fastdiff import dist_util
from fastdiff.cli import parse_command, run_main
from fastdiff.config import PrepareDataCommand
from fastdiff.data.images import CHANNEL_MODES, image_size_of
from fastdiff.data.prepared import PreparedDataset, PreparedWriter
from fastdiff.data.sources import open_source
from fastdiff.runtime.latent_vae import LATENT_INFO_KEY, VAE_PATH_KEY, open_vae

CHUNK = 32
"""Items per task sent to a worker process (and per VAE encoding call with --vae)."""
FLOAT16_MAX = float(np.finfo(np.float16).max)

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


class LatentEncoder:
    """Turns chunks of uint8 images ``[n, H, W, C]`` into float16 latents ``[n, C', H / f, W / f]`` with the
    VAE at ``vae_path`` (see the module docstring)."""

    def __init__(self, vae_path: str, image_size: tuple[int, int], device: str = "cpu") -> None:
        from fastdiff.latents import LatentInfo

        self.vae_path = vae_path
        self.vae = open_vae(vae_path)
        self.device, self.placed = device, False
        self.info = LatentInfo.from_vae(self.vae)
        try:
            self.shape = self.info.latent_shape(*image_size)
        except ValueError as error:
            raise ValueError(f"--image_size: {error} (--vae {vae_path!r})") from None
        self.image_size = image_size

    @property
    def channels(self) -> int:
        """The channel count of the images the VAE encodes."""
        return int(self.vae.config.in_channels)

    def encode(self, chunk: np.ndarray, start: int) -> np.ndarray:
        """Items ``start, start + 1, ...`` (uint8 ``[n, H, W, C]``) -> float16 latents ``[n, C', h, w]``;
        a ValueError naming the item when a latent does not fit float16."""
        from fastdiff.latents import encode_images

        if not self.placed:  # moved on first use, after the decoding workers fork: they hold no CUDA state
            self.vae.to(self.device)
            self.placed = True
        images = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latents = encode_images(self.vae, images).numpy()
        peaks = np.abs(latents).reshape(len(latents), -1).max(axis=1)
        if (peaks > FLOAT16_MAX).any():
            index = int(np.argmax(peaks > FLOAT16_MAX))
            raise ValueError(
                f"item {start + index}: its latents reach {peaks[index]:.4g}, beyond float16's range "
                f"({FLOAT16_MAX:.0f}), where prepared latents are stored; is {self.vae_path} the right VAE "
                "(its scaling_factor)?"
            )
        return latents.astype(np.float16)

    def metadata(self) -> dict:
        """What the dataset's header records about its latents."""
        return {
            LATENT_INFO_KEY: self.info.to_dict(),
            VAE_PATH_KEY: self.vae_path,
            "image_size": list(self.image_size),
            "image_channels": self.channels,
        }


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
    vae_path: str = "",
    device: str = "cpu",
) -> str:
    """Write the prepared dataset of ``source_path`` to ``out`` (module docstring); returns its path. With
    ``vae_path`` the images are encoded to latents (``channels``: the VAE's input channels, or 0 for them)
    by the VAE on ``device``."""
    if not out:
        raise ValueError("OUT is empty: name the directory to write the prepared dataset to")
    encoder = None
    if vae_path:
        encoder = LatentEncoder(vae_path, image_size_of(image_size), device)
        channels = channels or encoder.channels
        if channels != encoder.channels:
            raise ValueError(
                f"--in_channels {channels}: the VAE {vae_path} encodes {encoder.channels}-channel images"
            )
    if isinstance(channels, bool) or channels not in CHANNEL_MODES:
        raise ValueError(
            f"--in_channels {channels}: images are prepared as 1 (grey), 3 (RGB) or 4 (RGBA) channels"
        )
    if os.path.exists(out) and os.path.realpath(out) == os.path.realpath(source_path):
        raise ValueError(f"OUT {out} is SOURCE itself: write the prepared dataset somewhere else")
    source = open_source(source_path, image_size, channels, class_cond, resize_prepared=True)
    count = min(len(source), limit) if limit else len(source)
    spans = [(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]
    if encoder is None:
        writer = PreparedWriter(out, count, image_size, channels, overwrite=overwrite)
    else:
        latent_channels, *latent_size = encoder.shape
        writer = PreparedWriter(out, count, latent_size, latent_channels, "latents", overwrite=overwrite)
    with writer:
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
                writer.data[start:stop] = chunk if encoder is None else encoder.encode(chunk, start)
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
        metadata = encoder.metadata() if encoder is not None else None
        return writer.commit(source.class_names if class_cond else (), origin, metadata)


def encoding_device(device: str, vae_path: str, given: bool) -> torch.device:
    """Where the VAE encodes: ``--device`` as training reads it (auto: the first CUDA device when there is
    one, else the CPU); a ValueError naming the flag for a device this machine lacks, or for ``--device``
    given without ``--vae`` (images are decoded and resized on the CPU)."""
    if given and not vae_path:
        raise ValueError(
            f"--device {device}: only --vae encoding runs on a device; images are prepared on the CPU"
        )
    try:
        return dist_util.pick_device(0, device)
    except ValueError as error:
        raise ValueError(f"--device {device}: {error}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare a dataset with the arguments in ``argv`` (``sys.argv`` when None); returns the exit status."""
    config, given = parse_command(PrepareDataCommand, argv, "fastdiff.prepare_data", __doc__)
    settings, model = config.prepare, config.model
    channels = model.in_channels
    if config.latents.vae and "in_channels" not in given:
        channels = 0  # the VAE's input channels, read when it is loaded
    workers = settings.workers or usable_cpus()
    device = encoding_device(config.runtime.device, config.latents.vae, "device" in given)
    began = time.perf_counter()
    path = prepare(
        settings.source,
        settings.out,
        model.image_hw,
        channels,
        model.class_cond,
        workers=workers,
        overwrite=settings.overwrite,
        limit=settings.limit,
        vae_path=config.latents.vae,
        device=str(device),
    )
    written = PreparedDataset(path)
    height, width = written.image_size
    size = sum(entry["bytes"] for entry in written.header["files"].values())
    classes = f", {len(written.class_names)} classes" if written.class_names else ""
    what = "images" if written.kind == "images" else f"float16 latents (encoded on {device})"
    print(
        f"wrote prepared dataset {path}: {len(written)} {what} {height}x{width}x{written.channels}{classes}, "
        f"{size / 2**20:.1f} MiB, from {written.header['source']['kind']} {settings.source} with {workers} "
        f"worker(s) in {time.perf_counter() - began:.1f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    run_main(main, "fastdiff.prepare_data", expected=(FileExistsError,))
