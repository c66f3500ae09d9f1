"""Prepared datasets: a directory of memory-mapped arrays that trains with no decode and no resize.

Layout of a prepared dataset ``OUT/`` (format :data:`FORMAT_NAME`, version :data:`FORMAT_VERSION`)::

    OUT/dataset.json   the header (below)
    OUT/data.npy       images uint8 [N, H, W, C], or latents float16 [N, C, h, w] (numpy's .npy format)
    OUT/labels.npy     class indices int64 [N] (all 0 when the dataset has no labels)

The header holds ``format``, ``version``, ``count`` (N), ``kind`` (``"images"`` or ``"latents"``),
``layout`` (``"NHWC"`` or ``"NCHW"``), ``dtype``, ``image_size`` ([height, width] of an item), ``channels``,
``class_names`` (label ``i`` is ``class_names[i]``; empty: no labels), ``source`` (what it was made from:
``{"kind": ..., "path": ...}``), ``files`` (each array file's byte count) and ``metadata`` (a free-form
object, e.g. the VAE that encoded latents).

:class:`PreparedWriter` writes one atomically: into a temporary sibling directory, every file flushed to
disk (fsync), then renamed into place, so ``OUT`` is either absent, the old dataset, or the whole new one.
:class:`PreparedDataset` reads one: the header and the array files are checked when it is opened (a
truncated file, another format or version, a size or channel count that disagrees with the flags is an
error naming the file); each worker process maps the arrays itself on its first item, and an item is a
slice of the map converted to float32 ``[C, H, W]``.
"""

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np
import torch

from fastdiff.data.images import ImageSize, check_channels, image_size_of, to_model_range
from fastdiff.data.keys import ItemKey, PerProcessHandle, flipped_for

FORMAT_NAME = "fastdiff-prepared-dataset"
FORMAT_VERSION = 1
HEADER_FILENAME = "dataset.json"
DATA_FILENAME = "data.npy"
LABELS_FILENAME = "labels.npy"
KINDS = {"images": ("NHWC", "uint8"), "latents": ("NCHW", "float16")}
"""Each kind of prepared dataset with its array layout and dtype."""
NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


class PreparedDataError(ValueError):
    """A prepared dataset that cannot be read, or that disagrees with the training flags; names the file."""


def is_prepared_dataset(path: str) -> bool:
    """Whether ``path`` is a directory holding a prepared dataset's header."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, HEADER_FILENAME))


def item_shape(kind: str, image_size: ImageSize, channels: int) -> tuple[int, int, int]:
    """The shape of one item in the data array: ``[H, W, C]`` for images, ``[C, h, w]`` for latents."""
    height, width = image_size
    return (height, width, channels) if KINDS[kind][0] == "NHWC" else (channels, height, width)


def _fsync_path(path: str) -> None:
    """Flush a file or a directory to disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class PreparedWriter:
    """Writes one prepared dataset of ``count`` items to ``out``, atomically.

    ``writer.data[i] = item`` (uint8 ``[H, W, C]`` for images, float16 ``[C, h, w]`` for latents) and
    ``writer.labels[i] = label`` fill the arrays in a temporary sibling directory; :meth:`commit` writes the
    header, flushes everything to disk and renames the directory to ``out``; :meth:`abort` (also on leaving
    a ``with`` block by an exception) removes it. An existing ``out`` is refused unless ``overwrite``, and
    even then unless it is a prepared dataset or an empty directory; it is replaced only at the commit.
    """

    def __init__(
        self,
        out: str,
        count: int,
        image_size: int | Sequence[int],
        channels: int,
        kind: str = "images",
        overwrite: bool = False,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        if count <= 0:
            raise ValueError(f"a prepared dataset needs at least one item, got {count}")
        if kind == "images":
            check_channels(channels)
        elif channels <= 0:
            raise ValueError(f"channels must be positive, got {channels}")
        self.out = os.path.abspath(out)
        if os.path.lexists(self.out):
            if not overwrite:
                raise FileExistsError(
                    f"{out} already exists: pass --overwrite True to replace it, or choose another OUT"
                )
            if not (is_prepared_dataset(self.out) or (os.path.isdir(self.out) and not os.listdir(self.out))):
                raise FileExistsError(
                    f"{out} exists and is neither a prepared dataset nor an empty directory: --overwrite "
                    "replaces only those; remove it yourself or choose another OUT"
                )
        self.count, self.kind, self.channels = count, kind, channels
        self.image_size = image_size_of(image_size)
        parent, name = os.path.split(self.out)
        os.makedirs(parent, exist_ok=True)
        self.temporary = os.path.join(parent, f".{name}.partial-{os.getpid()}")
        if os.path.lexists(self.temporary):
            shutil.rmtree(self.temporary)
        os.makedirs(self.temporary)
        dtype = KINDS[kind][1]
        self.data = np.lib.format.open_memmap(
            os.path.join(self.temporary, DATA_FILENAME),
            mode="w+",
            dtype=np.dtype(dtype),
            shape=(count, *item_shape(kind, self.image_size, channels)),
        )
        self.labels = np.lib.format.open_memmap(
            os.path.join(self.temporary, LABELS_FILENAME), mode="w+", dtype=np.int64, shape=(count,)
        )
        self.done = False

    def __enter__(self) -> "PreparedWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if not self.done:
            self.abort()

    def commit(
        self,
        class_names: Sequence[str] = (),
        source: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Write the header, flush every file and rename the dataset into place; returns its path."""
        labels = np.asarray(self.labels)
        if class_names and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(f"labels must be in [0, {len(class_names)}) to index class_names")
        self.data.flush()
        self.labels.flush()
        del self.data, self.labels  # close the maps before the files are synced and renamed
        files = {}
        for name in (DATA_FILENAME, LABELS_FILENAME):
            path = os.path.join(self.temporary, name)
            _fsync_path(path)
            files[name] = {"bytes": os.path.getsize(path)}
        layout, dtype = KINDS[self.kind]
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "count": self.count,
            "kind": self.kind,
            "layout": layout,
            "dtype": dtype,
            "image_size": list(self.image_size),
            "channels": self.channels,
            "class_names": [str(name) for name in class_names],
            "source": dict(source or {}),
            "files": files,
            "metadata": dict(metadata or {}),
        }
        header_path = os.path.join(self.temporary, HEADER_FILENAME)
        with open(header_path, "w") as handle:
            json.dump(header, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_path(self.temporary)
        replaced = None
        if os.path.lexists(self.out):
            replaced = f"{self.temporary}.old"
            os.rename(self.out, replaced)
        os.rename(self.temporary, self.out)
        _fsync_path(os.path.dirname(self.out))
        if replaced is not None:
            shutil.rmtree(replaced) if os.path.isdir(replaced) else os.remove(replaced)
        self.done = True
        return self.out

    def abort(self) -> None:
        """Remove the temporary directory (``out`` is left as it was)."""
        self.done = True
        self.data = self.labels = None
        shutil.rmtree(self.temporary, ignore_errors=True)


def _header_problem(header: Any) -> str | None:
    """What is wrong with a version-1 header's fields, or None."""
    if not isinstance(header, dict):
        return f"expected a JSON object, got {type(header).__name__}"
    expected = {"count": int, "kind": str, "image_size": list, "channels": int, "class_names": list,
                "files": dict, "metadata": dict, "source": dict, "layout": str, "dtype": str}  # fmt: skip
    for field, kind in expected.items():
        if not isinstance(header.get(field), kind) or isinstance(header.get(field), bool):
            return f"field {field!r} must be a {kind.__name__}, got {header.get(field)!r}"
    if header["kind"] not in KINDS:
        return f"field 'kind' must be one of {sorted(KINDS)}, got {header['kind']!r}"
    if (header["layout"], header["dtype"]) != KINDS[header["kind"]]:
        return (
            f"{header['kind']} are stored as {KINDS[header['kind']]}, not {header['layout'], header['dtype']}"
        )
    if header["count"] <= 0 or header["channels"] <= 0:
        return "fields 'count' and 'channels' must be positive"
    try:
        image_size_of(header["image_size"])
    except ValueError as error:
        return f"field 'image_size': {error}"
    if not all(isinstance(name, str) for name in header["class_names"]):
        return "field 'class_names' must be a list of strings"
    return None


def read_header(path: str) -> dict[str, Any]:
    """The checked header of the prepared dataset in directory ``path`` (PreparedDataError names the file)."""
    header_path = os.path.join(path, HEADER_FILENAME)
    try:
        with open(header_path) as handle:
            header = json.load(handle)
    except OSError as error:
        raise PreparedDataError(f"cannot read {header_path}: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise PreparedDataError(f"{header_path} is not valid JSON: {error}") from error
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise PreparedDataError(f"{header_path}: format {found!r} is not {FORMAT_NAME!r}")
    version = header.get("version")
    if version != FORMAT_VERSION:
        raise PreparedDataError(
            f"{header_path}: prepared dataset format version {version!r}, this fastdiff reads version "
            f"{FORMAT_VERSION}: prepare the dataset again with this fastdiff's fastdiff.prepare_data"
        )
    problem = _header_problem(header)
    if problem:
        raise PreparedDataError(f"{header_path}: {problem}")
    return header


def npy_layout(handle: BinaryIO, file: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of the C-ordered .npy file open in ``handle``."""
    try:
        version = np.lib.format.read_magic(handle)
        if version not in NPY_HEADER_READERS:
            raise ValueError(f".npy format version {version} (expected 1.0 or 2.0)")
        shape, fortran_order, dtype = NPY_HEADER_READERS[version](handle)
    except (ValueError, OSError, SyntaxError) as error:
        raise PreparedDataError(f"{file} is not a readable .npy array: {error}") from error
    if fortran_order:
        raise PreparedDataError(f"{file}: the array is in Fortran order; prepared datasets are C-ordered")
    return tuple(shape), dtype, handle.tell()


def check_array_file(file: str, shape: tuple[int, ...], dtype: str, header_bytes: int | None) -> int:
    """Check that the .npy ``file`` holds an array of ``shape`` and ``dtype`` in full; returns the offset
    of its data. A missing, truncated or mismatched file is a PreparedDataError naming it."""
    try:
        with open(file, "rb") as handle:
            found_shape, found_dtype, offset = npy_layout(handle, file)
    except OSError as error:
        raise PreparedDataError(f"cannot read {file}: {error.strerror or error}") from error
    if found_shape != tuple(shape) or found_dtype != np.dtype(dtype):
        raise PreparedDataError(
            f"{file} holds {found_dtype} {list(found_shape)}, its header says {dtype} {list(shape)}"
        )
    expected = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    size = os.path.getsize(file)
    if size != expected or (header_bytes is not None and size != header_bytes):
        raise PreparedDataError(
            f"{file} is {size} bytes, expected {expected}: the file is truncated or was changed after "
            "it was written; prepare the dataset again"
        )
    return offset


class PreparedDataset(PerProcessHandle, torch.utils.data.Dataset):
    """A prepared dataset; ``dataset[ItemKey(index, epoch)]`` -> (float32 ``[C, H, W]``, label).

    Images come as uint8 ``[H, W, C]`` slices of the map, scaled to [-1, 1]; latents as float16
    ``[C, h, w]`` slices, converted to float32 unscaled (the header's metadata holds what the encoder
    needs; latents are never flipped: ``random_flip`` on them is refused). ``image_size`` and ``channels``,
    when given, must be the dataset's (the flags' values); with
    ``class_cond`` the dataset must have labels. With ``random_flip``, the horizontal flip of an item is a
    pure function of (``seed``, epoch, index).
    """

    source_kind = "prepared dataset"

    def __init__(
        self,
        path: str,
        image_size: int | Sequence[int] | None = None,
        channels: int | None = None,
        class_cond: bool = False,
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        self.path = path
        self.header = header = read_header(path)
        header_path = os.path.join(path, HEADER_FILENAME)
        self.kind = header["kind"]
        self.image_size = image_size_of(header["image_size"])
        self.channels = header["channels"]
        if image_size is not None and image_size_of(image_size) != self.image_size:
            wanted = image_size_of(image_size)
            raise PreparedDataError(
                f"{header_path}: the dataset's items are {self.image_size[0]}x{self.image_size[1]} (height x "
                f"width), but --image_size asks for {wanted[0]}x{wanted[1]}: train at the dataset's size or "
                "prepare it again at this one"
            )
        if channels is not None and channels != self.channels:
            raise PreparedDataError(
                f"{header_path}: the dataset has {self.channels} channel(s), but --in_channels is "
                f"{channels}: train with the dataset's channel count or prepare it again with this one"
            )
        if random_flip and self.kind == "latents":
            raise PreparedDataError(
                f"{header_path}: the dataset holds latents, and --random_flip True cannot flip them: the "
                "flipped latent of an image is not the latent of the flipped image; train without "
                "--random_flip (or prepare the flipped images as a dataset of their own)"
            )
        self.class_names = list(header["class_names"])
        if class_cond and not self.class_names:
            raise PreparedDataError(
                f"{header_path}: the dataset has no class labels, but --class_cond is True: prepare it with "
                "--class_cond True from a labelled source, or train unconditionally"
            )
        count = header["count"]
        dtype = KINDS[self.kind][1]
        self._shape = (count, *item_shape(self.kind, self.image_size, self.channels))
        files = header["files"]
        data_file, labels_file = os.path.join(path, DATA_FILENAME), os.path.join(path, LABELS_FILENAME)
        self._data_offset = check_array_file(
            data_file, self._shape, dtype, files.get(DATA_FILENAME, {}).get("bytes")
        )
        check_array_file(labels_file, (count,), "int64", files.get(LABELS_FILENAME, {}).get("bytes"))
        labels = np.load(labels_file)
        if self.class_names and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise PreparedDataError(
                f"{labels_file}: labels must be in [0, {len(self.class_names)}) (the header's class names), "
                f"found [{labels.min()}, {labels.max()}]"
            )
        self.labels = labels.tolist() if class_cond else [0] * count
        self.random_flip = random_flip
        self.seed = seed

    def __len__(self) -> int:
        return self._shape[0]

    def array(self) -> np.memmap:
        """This process's read-only map of the data array (opened on first use in each process)."""
        return self.per_process(self._open_map)

    def _open_map(self) -> np.memmap:
        file = os.path.join(self.path, DATA_FILENAME)
        dtype = np.dtype(KINDS[self.kind][1])
        return np.memmap(file, dtype=dtype, mode="r", offset=self._data_offset, shape=self._shape)

    def item_array(self, index: int) -> np.ndarray:
        """Item ``index`` as stored: uint8 ``[H, W, C]`` (images) or float16 ``[C, h, w]`` (latents)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items in {self.path}")
        return self.array()[index]

    def __getitem__(self, key: ItemKey | int) -> tuple[torch.Tensor, int]:
        key = ItemKey.of(key)
        item = self.item_array(key.index)
        if self.kind == "images":
            return to_model_range(flipped_for(item, self.seed, key, self.random_flip)), self.labels[key.index]
        latent = torch.from_numpy(np.array(item, dtype=np.float32))  # never flipped (see __init__)
        return latent, self.labels[key.index]
