"""Images to score, read from what users have: an ``.npz`` (``arr_0`` uint8 ``[N, H, W, C]`` with C 1, 3 or 4,
or ``[N, H, W]`` for grey; optional ``arr_1`` labels, as ``fastdiff.sample`` and improved-diffusion's
``image_sample.py`` write), an image folder (:mod:`fastdiff.data.images`' rule: halve, bicubic resize to
cover, centre crop; converted to the channel count asked for, with a warning naming the modes converted), or
the embedded shapes dataset. Images keep their channel count and any (height, width); the feature network
makes them RGB (grey repeats its channel, RGBA drops alpha: ``fastdiff.evaluation.inception``).
"""

import os
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastdiff.data import class_labels, list_image_files, load_image, render_shape
from fastdiff.data.images import CHANNEL_MODES, image_size_of

ImageSize = tuple[int, int]
"""(height, width)."""


@dataclass
class ImageSet:
    """uint8 images ``[N, H, W, C]``, their class labels ``[N]`` (or None), and where they came from."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str

    @property
    def image_size(self) -> ImageSize:
        """``(height, width)``."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])


def size_text(size: ImageSize) -> str:
    """``(48, 64)`` -> ``"48x64"`` (height x width)."""
    return f"{size[0]}x{size[1]}"


def _image_array(array: np.ndarray, flag: str, path: str) -> np.ndarray:
    """``[N, H, W]`` (grey) or ``[N, H, W, C]`` with C 1, 3 or 4 -> ``[N, H, W, C]``."""
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in CHANNEL_MODES:
        raise ValueError(
            f"{flag} {path!r}: arr_0 must be [N, H, W, C] images with C 1, 3 or 4 (or [N, H, W] grey), got "
            f"shape {list(array.shape)}"
        )
    return np.ascontiguousarray(array)


def load_npz(path: str, flag: str, limit: int = 0) -> ImageSet:
    """``arr_0`` (uint8) and, if present, ``arr_1`` (labels) of ``path``; the first ``limit`` when > 0."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path!r} does not exist")
    try:
        with np.load(path) as data:
            files = list(data.files)
            images = data["arr_0"] if "arr_0" in files else None
            labels = data["arr_1"] if "arr_1" in files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{flag} {path!r} is not a readable .npz file: {error}") from error
    if images is None:
        raise ValueError(f"{flag} {path!r} holds no arr_0 (found {', '.join(files) or 'nothing'})")
    if images.dtype != np.uint8:
        raise ValueError(f"{flag} {path!r}: arr_0 must be uint8 images in [0, 255], got {images.dtype}")
    if len(images) == 0:
        raise ValueError(f"{flag} {path!r} holds no images")
    images = _image_array(images, flag, path)
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images)):
        raise ValueError(
            f"{flag} {path!r}: arr_1 must hold one label per image, got shape {list(labels.shape)}"
        )
    if limit > 0:
        images, labels = images[:limit], None if labels is None else labels[:limit]
    return ImageSet(images, None if labels is None else labels.astype(np.int64), path)


def load_folder(
    path: str, flag: str, image_size: int | ImageSize = 0, limit: int = 0, channels: int = 3
) -> ImageSet:
    """Images under ``path`` at ``image_size`` (a side or ``(height, width)``; :mod:`fastdiff.data.images`'
    rule) with ``channels`` (1, 3 or 4), labelled by the class name before the first ``_`` of each file
    name; with ``image_size`` 0 they must all have the first one's size."""
    try:
        paths = list_image_files(path)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from error
    paths = paths[:limit] if limit > 0 else paths
    converted = []
    size = image_size_of(image_size) if image_size else None
    for file in paths:
        try:
            with Image.open(file) as image:
                mode, (width, height) = image.mode, image.size
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"{flag}: cannot read image file {file!r}: {error}") from error
        if mode != CHANNEL_MODES[channels]:
            converted.append(mode)
        if not image_size:
            size = size or (height, width)
            if (height, width) != size:
                raise ValueError(
                    f"{flag}: image file {file!r} is {size_text((height, width))} (height x width), the "
                    f"first is {size_text(size)}: images of mixed sizes need --image_size (they are then "
                    "resized and centre-cropped to it)"
                )
    if converted:
        warnings.warn(
            f"{flag} {path!r}: {len(converted)} image(s) in mode {'/'.join(sorted(set(converted)))} "
            f"converted to {CHANNEL_MODES[channels]}",
            stacklevel=2,
        )
    images = np.stack([load_image(file, size, channels) for file in paths])
    labels, _ = class_labels(paths)
    return ImageSet(images, np.asarray(labels, dtype=np.int64), path)


def load_shapes(count: int, image_size: int | ImageSize, seed: int = 0, channels: int = 3) -> ImageSet:
    """The first ``count`` items of the embedded shapes dataset at ``image_size`` (a side or ``(height,
    width)``) with ``channels``, with their classes."""
    if count <= 0 or not image_size:
        raise ValueError(f"shapes needs a positive count and image size, got {count}, {image_size}")
    items = [render_shape(index, image_size, seed, channels) for index in range(count)]
    return ImageSet(
        np.stack([image for image, _ in items]), np.array([label for _, label in items], np.int64), "shapes"
    )


def load_images(
    source: str, flag: str, image_size: int | ImageSize = 0, limit: int = 0, channels: int = 3
) -> ImageSet:
    """``source`` as an :class:`ImageSet`: an ``.npz`` (its own channels), an image folder or ``shapes``
    (``limit`` images) converted to ``channels``."""
    if not source:
        raise ValueError(f"{flag} is required")
    if source == "shapes":
        if not image_size:
            raise ValueError(f"{flag} shapes needs an image size")
        return load_shapes(limit, image_size, channels=channels)
    if os.path.isdir(source):
        return load_folder(source, flag, image_size, limit, channels)
    if source.endswith(".npz"):
        return load_npz(source, flag, limit)
    if not os.path.exists(source):
        raise ValueError(f"{flag} {source!r} does not exist")
    raise ValueError(f"{flag} {source!r} is not an .npz, an image folder or 'shapes'")
