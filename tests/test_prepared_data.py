"""Prepared datasets: the format, the atomic writer, the reader and its errors, fastdiff.prepare_data."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff import prepare_data
from fastdiff.data import BatchStream, ImageDataError, ItemKey, build_dataset
from fastdiff.data.prepared import (
    DATA_FILENAME,
    FORMAT_VERSION,
    HEADER_FILENAME,
    LABELS_FILENAME,
    PreparedDataError,
    PreparedDataset,
    PreparedWriter,
)
from fastdiff.data.sources import FolderDataset, describe_dataset, open_source, source_kind

SIZE = (9, 14)
"""An odd, non-square (height, width) training size."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """23 RGB images of random content and sizes (at least 2x the training size on some), three classes."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(7)
    for index in range(23):
        height, width = rng.integers(SIZE[0], 3 * SIZE[0]), rng.integers(SIZE[1], 3 * SIZE[1])
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(array).save(root / f"{'xyz'[index % 3]}_{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "out"
    prepare_data.prepare(str(folder), str(out), SIZE, class_cond=True, workers=2, progress=False)
    return out


def test_items_are_the_folders_items_without_decoding(folder, prepared):
    reference = FolderDataset(str(folder), SIZE, class_cond=True)
    dataset = PreparedDataset(str(prepared), SIZE, 3, class_cond=True)
    assert len(dataset) == len(reference) == 23
    assert dataset.class_names == reference.class_names == ["x", "y", "z"]
    assert dataset.labels == reference.labels
    for index in range(len(dataset)):
        image, label = dataset[ItemKey(index, 0)]
        assert image.dtype == torch.float32 and image.shape == (3, *SIZE)
        assert torch.equal(image, reference[index][0]) and label == reference.labels[index]
    stored = np.load(prepared / DATA_FILENAME)
    expected = stored[5].astype(np.float64).transpose(2, 0, 1) / 127.5 - 1.0  # float64 reference of the range
    torch.testing.assert_close(dataset[5][0].double(), torch.from_numpy(expected), rtol=0, atol=1e-6)


def test_header_records_what_the_dataset_holds(folder, prepared):
    header = json.loads((prepared / HEADER_FILENAME).read_text())
    assert header["format"] == "fastdiff-prepared-dataset" and header["version"] == FORMAT_VERSION
    assert header["count"] == 23 and header["image_size"] == list(SIZE) and header["channels"] == 3
    assert (header["kind"], header["layout"], header["dtype"]) == ("images", "NHWC", "uint8")
    assert header["source"] == {"kind": "image folder", "path": str(folder), "items": 23, "limit": 0}
    for name in (DATA_FILENAME, LABELS_FILENAME):
        assert header["files"][name]["bytes"] == os.path.getsize(prepared / name)
    assert np.load(prepared / DATA_FILENAME, mmap_mode="r").shape == (23, *SIZE, 3)


def test_workers_keep_the_source_order(folder, prepared, tmp_path):
    one = tmp_path / "one"
    prepare_data.prepare(str(folder), str(one), SIZE, class_cond=True, workers=1, progress=False)
    for name in (DATA_FILENAME, LABELS_FILENAME):
        assert (one / name).read_bytes() == (prepared / name).read_bytes()


def test_flips_and_order_match_the_folder(folder, prepared):
    reference = FolderDataset(str(folder), SIZE, random_flip=True, seed=5)
    dataset = PreparedDataset(str(prepared), SIZE, 3, random_flip=True, seed=5)
    flipped = 0
    for epoch in range(3):
        for index in range(len(dataset)):
            key = ItemKey(index, epoch)
            assert torch.equal(dataset[key][0], reference[key][0])
            flipped += not torch.equal(dataset[key][0], dataset[ItemKey(index, 0)][0]) if epoch else 0
    assert flipped > 0
    for rank in range(2):  # the same batches on each of two ranks, with a worker process
        streams = [
            BatchStream(data, 4, rank, 2, seed=3, num_workers=1, class_cond=False)
            for data in (reference, dataset)
        ]
        for _ in range(4):
            assert torch.equal(next(streams[0])[0], next(streams[1])[0])
        for stream in streams:
            stream.close()


def test_each_process_maps_the_array_itself(prepared):
    dataset = PreparedDataset(str(prepared), SIZE, 3)
    dataset[0]
    assert isinstance(dataset._handle, np.memmap)
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._handle is None and len(pickle.dumps(dataset)) < 4096
    assert torch.equal(copy[3][0], dataset[3][0])


def test_latents_fit_the_format(tmp_path):
    rng = np.random.default_rng(1)
    latents = rng.normal(size=(5, 4, 3, 6)).astype(np.float16)
    with PreparedWriter(str(tmp_path / "latents"), 5, (3, 6), 4, kind="latents") as writer:
        writer.data[:] = latents
        writer.labels[:] = [0, 1, 0, 1, 1]
        path = writer.commit(["a", "b"], {"kind": "image folder"}, {"scaling_factor": 0.18215, "vae": "x"})
    with pytest.raises(PreparedDataError, match=r"dataset.json.*latents.*--random_flip True"):
        PreparedDataset(path, (3, 6), 4, class_cond=True, random_flip=True, seed=0)
    dataset = PreparedDataset(path, (3, 6), 4, class_cond=True, seed=0)
    assert dataset.header["metadata"] == {"scaling_factor": 0.18215, "vae": "x"}
    assert describe_dataset(dataset) == f"prepared dataset {path} (5 latents, 3x6x4)"
    for index in range(5):
        item, label = dataset[ItemKey(index, 1)]
        assert item.dtype == torch.float32 and label == [0, 1, 0, 1, 1][index]
        assert np.array_equal(item.numpy(), latents[index].astype(np.float32))


def test_a_failed_write_leaves_out_as_it_was(folder, prepared, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in sorted(folder.iterdir())[:5]:
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "z_999.png").write_bytes(b"not a png")
    before = {name: (prepared / name).read_bytes() for name in os.listdir(prepared)}
    with pytest.raises(ImageDataError, match=r"z_999\.png"):
        prepare_data.prepare(str(broken), str(prepared), SIZE, workers=2, overwrite=True, progress=False)
    assert {name: (prepared / name).read_bytes() for name in os.listdir(prepared)} == before
    with pytest.raises(ImageDataError, match=r"z_999\.png"):
        prepare_data.prepare(str(broken), str(tmp_path / "new"), SIZE, workers=1, progress=False)
    assert not (tmp_path / "new").exists()
    assert not [name for name in os.listdir(tmp_path) if "partial" in name]
    assert not [name for name in os.listdir(prepared.parent) if "partial" in name]


def test_an_existing_out_is_refused_unless_overwrite(folder, tmp_path):
    out = tmp_path / "out"
    prepare_data.prepare(str(folder), str(out), SIZE, limit=4, progress=False)
    with pytest.raises(FileExistsError, match=f"{out} already exists: pass --overwrite True"):
        prepare_data.prepare(str(folder), str(out), SIZE, limit=6, progress=False)
    assert len(PreparedDataset(str(out))) == 4
    prepare_data.prepare(str(folder), str(out), SIZE, limit=6, overwrite=True, progress=False)
    assert len(PreparedDataset(str(out))) == 6
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="neither a prepared dataset nor an empty directory"):
        prepare_data.prepare(str(folder), str(users), SIZE, overwrite=True, progress=False)
    assert (users / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="is SOURCE itself"):
        prepare_data.prepare(str(out), str(out), SIZE, overwrite=True, progress=False)


def _copy(prepared, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(prepared):
        (copy / name).write_bytes((prepared / name).read_bytes())
    return copy


def test_a_truncated_array_is_named_before_training(prepared, tmp_path):
    copy = _copy(prepared, tmp_path)
    data = (copy / DATA_FILENAME).read_bytes()
    (copy / DATA_FILENAME).write_bytes(data[:-7])
    with pytest.raises(
        PreparedDataError, match=f"{copy / DATA_FILENAME} is {len(data) - 7} bytes.*truncated"
    ):
        PreparedDataset(str(copy), SIZE, 3)
    (copy / DATA_FILENAME).write_bytes(data[:40])
    with pytest.raises(PreparedDataError, match=str(copy / DATA_FILENAME)):
        PreparedDataset(str(copy), SIZE, 3)
    (copy / DATA_FILENAME).unlink()
    with pytest.raises(PreparedDataError, match=f"cannot read {copy / DATA_FILENAME}"):
        PreparedDataset(str(copy), SIZE, 3)


def test_another_format_or_version_is_named(prepared, tmp_path):
    copy = _copy(prepared, tmp_path)
    header_path = copy / HEADER_FILENAME
    header = json.loads(header_path.read_text())
    header_path.write_text(json.dumps({**header, "version": FORMAT_VERSION + 1}))
    with pytest.raises(PreparedDataError, match=f"{header_path}: prepared dataset format version 2"):
        PreparedDataset(str(copy))
    header_path.write_text(json.dumps({**header, "format": "something-else"}))
    with pytest.raises(PreparedDataError, match=f"{header_path}: format 'something-else'"):
        PreparedDataset(str(copy))
    header_path.write_text(json.dumps({**header, "count": 22}))
    with pytest.raises(PreparedDataError, match=f"{copy / DATA_FILENAME} holds uint8 \\[23, 9, 14, 3\\]"):
        PreparedDataset(str(copy))
    header_path.write_text("{not json")
    with pytest.raises(PreparedDataError, match=f"{header_path} is not valid JSON"):
        PreparedDataset(str(copy))


def test_size_channels_and_labels_must_agree_with_the_flags(prepared, tmp_path):
    header = prepared / HEADER_FILENAME
    with pytest.raises(PreparedDataError, match=f"{header}: .* are 9x14 .* --image_size asks for 14x9"):
        PreparedDataset(str(prepared), (14, 9), 3)
    with pytest.raises(PreparedDataError, match=f"{header}: the dataset has 3 channel.*--in_channels is 1"):
        PreparedDataset(str(prepared), SIZE, 1)
    unlabelled = tmp_path / "unlabelled"
    prepare_data.prepare(str(prepared), str(unlabelled), SIZE, limit=3, progress=False)
    with pytest.raises(PreparedDataError, match="no class labels, but --class_cond is True"):
        PreparedDataset(str(unlabelled), SIZE, 3, class_cond=True)
    assert PreparedDataset(str(unlabelled), SIZE, 3).labels == [0, 0, 0]


def test_a_prepared_dataset_is_a_source_and_says_so(prepared):
    assert source_kind(str(prepared)) == "prepared dataset"
    dataset = open_source(str(prepared), SIZE, 3)
    assert describe_dataset(dataset) == f"prepared dataset {prepared} (23 images, 9x14x3)"


def test_prepare_data_command(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        str(folder),
        str(out),
        "--image_size",
        "9,14",
        "--in_channels",
        "1",
        "--workers",
        "2",
        "--limit",
        "5",
    ]
    assert prepare_data.main(argv) == 0
    assert f"wrote prepared dataset {out}: 5 images 9x14x1" in capsys.readouterr().out
    dataset = PreparedDataset(str(out), SIZE, 1)
    reference = FolderDataset(str(folder), SIZE, channels=1)
    assert all(torch.equal(dataset[i][0], reference[i][0]) for i in range(5))
    assert dataset[0][0].shape == (1, *SIZE)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_data.main(argv)
    with pytest.raises(ValueError, match=r"--in_channels 2: images are prepared as 1 \(grey\), 3"):
        prepare_data.main([str(folder), str(tmp_path / "two"), "--in_channels", "2"])
    with pytest.raises(SystemExit):
        prepare_data.main([str(folder)])  # OUT is required


def test_build_dataset_takes_any_channel_count_from_a_prepared_dataset(tmp_path, folder):
    with PreparedWriter(str(tmp_path / "latents"), 3, (2, 4), 8, kind="latents") as writer:
        writer.data[:] = np.arange(3 * 8 * 2 * 4).reshape(3, 8, 2, 4)
        path = writer.commit()
    dataset = build_dataset(path, (2, 4), 8)
    assert isinstance(dataset, PreparedDataset) and dataset[2][0].shape == (8, 2, 4)
    assert float(dataset[2][0][7, 1, 3]) == 3 * 8 * 2 * 4 - 1
    with pytest.raises(PreparedDataError, match=r"the dataset has 8 channel.*--in_channels is 3"):
        build_dataset(path, (2, 4), 3)
    with pytest.raises(ValueError, match=f"--in_channels 8: the image folder '{folder}' loads as 1"):
        build_dataset(str(folder), SIZE, 8)


def test_command_line_errors_are_one_line_naming_the_problem(folder, prepared):
    command = [sys.executable, "-m", "fastdiff.prepare_data", str(folder), str(prepared), "--image_size", "9"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"fastdiff.prepare_data: error: {prepared} already exists: pass --overwrite True to replace it, or "
        "choose another OUT"
    )
