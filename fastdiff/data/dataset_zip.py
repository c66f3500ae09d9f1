"""EDM / StyleGAN dataset ZIPs as datasets: images in a ZIP, labels in its ``dataset.json``.

What is read (the layout EDM's and StyleGAN's ``dataset_tool.py`` write):

* **Images**: every member whose name ends in ``.jpg``, ``.jpeg``, ``.png`` or ``.webp`` (any case), in
  any folder of the ZIP, in sorted name order; each is decoded from the ZIP when it is loaded, by
  :mod:`fastdiff.data.images`' rule. Other members are ignored.
* **Labels**: ``dataset.json`` at the ZIP's root, ``{"labels": [[member name, integer label], ...]}`` or
  ``{"labels": null}``. A ``dataset.json`` that is not that (not JSON, no ``labels`` key, an entry that is
  not a [name, integer] pair, a label outside [0, 1000), a name listed twice or naming no image of the ZIP)
  is an error whether or not labels are used. With ``--class_cond True`` the ZIP must have a
  ``dataset.json`` with labels for every image; without it the labels are not read (0 for every item). The
  class names are ``"0"`` to ``"K-1"`` for the largest label ``K - 1``.

Each worker process opens its own handle on the ZIP, on its first item.
"""

import io
import json
import zipfile
from collections.abc import Sequence

import numpy as np

from fastdiff.data.arrays import check_labels
from fastdiff.data.image_folder import IMAGE_EXTENSIONS
from fastdiff.data.images import load_image
from fastdiff.data.keys import KeyedImageDataset, PerProcessHandle

LABELS_MEMBER = "dataset.json"


def _labels_from_json(text: bytes, path: str, names: list[str]) -> list[int] | None:
    """The labels ``dataset.json`` gives each of ``names`` (None for ``"labels": null``); ValueError
    names the ZIP and what is wrong."""
    where = f"{path}:{LABELS_MEMBER}"
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{where} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or "labels" not in data:
        raise ValueError(f'{where} must be an object with a "labels" field ([[name, label], ...] or null)')
    entries = data["labels"]
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise ValueError(f'{where}: "labels" must be a list of [name, label] pairs or null')
    by_name: dict[str, int] = {}
    for entry in entries:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or not isinstance(entry[1], int)
            or isinstance(entry[1], bool)
        ):
            raise ValueError(f"{where}: each label must be a [name, integer] pair, got {entry!r}")
        name = entry[0].replace("\\", "/")
        if name in by_name:
            raise ValueError(f"{where}: {name!r} is labelled twice")
        by_name[name] = entry[1]
    unknown = sorted(set(by_name) - set(names))
    if unknown:
        raise ValueError(
            f"{where} labels {len(unknown)} name(s) that are no image of the ZIP, e.g. {unknown[0]!r}"
        )
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ValueError(f"{where} has no label for {len(missing)} image(s), e.g. {missing[0]!r}")
    return [by_name[name] for name in names]


class ZipDataset(PerProcessHandle, KeyedImageDataset):
    """``dataset[ItemKey(index, epoch)]`` -> (float32 ``[C, H, W]`` in [-1, 1], label) from a dataset ZIP.

    The label is the ``dataset.json`` label with ``class_cond``, else 0. With ``random_flip``, the
    horizontal flip of an item is a pure function of (``seed``, epoch, index).
    """

    source_kind = "dataset ZIP"

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
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.namelist()
                self.names = sorted(
                    name
                    for name in members
                    if name.lower().endswith(IMAGE_EXTENSIONS) and not name.endswith("/")
                )
                labels_text = archive.read(LABELS_MEMBER) if LABELS_MEMBER in members else None
        except (zipfile.BadZipFile, OSError) as error:
            raise ValueError(f"{path} is not a readable ZIP file: {error}") from error
        if not self.names:
            raise ValueError(f"{path} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} members)")
        labels = _labels_from_json(labels_text, path, self.names) if labels_text is not None else None
        if class_cond and labels is None:
            problem = "has no dataset.json" if labels_text is None else 'has "labels": null in dataset.json'
            raise ValueError(
                f"{path} {problem}, but --class_cond is True: add labels "
                '({"labels": [[name, label], ...]}) or train unconditionally'
            )
        if class_cond:
            self.labels, self.class_names = check_labels(labels, len(self.names), f"{path}:{LABELS_MEMBER}")
        else:
            self.labels, self.class_names = [0] * len(self.names), []

    def __len__(self) -> int:
        return len(self.names)

    def archive(self) -> zipfile.ZipFile:
        """This process's handle on the ZIP (opened on first use in each process)."""
        return self.per_process(lambda: zipfile.ZipFile(self.path))

    def item_array(self, index: int) -> np.ndarray:
        """Item ``index`` decoded from the ZIP: uint8 ``[H, W, C]`` at the training size and channels."""
        name = self.names[index]
        encoded = io.BytesIO(self.archive().read(name))
        return load_image(encoded, self.image_size, self.channels, name=f"{self.path}:{name}")
