"""Sources of --data_dir besides folders: EDM/StyleGAN dataset ZIPs and .npz/.npy array files."""

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff import prepare_data
from fastdiff.data import ItemKey, build_dataset, load_image
from fastdiff.data.arrays import ArrayFileDataset
from fastdiff.data.dataset_zip import ZipDataset
from fastdiff.data.prepared import PreparedDataset
from fastdiff.data.sources import FolderDataset, describe_dataset, source_kind

SIZE = (10, 7)


def _png(array: np.ndarray) -> bytes:
    encoded = io.BytesIO()
    Image.fromarray(array).save(encoded, format="png")
    return encoded.getvalue()


@pytest.fixture(scope="module")
def images():
    """Nine random RGB images of sizes between 1x and 3x the training size."""
    rng = np.random.default_rng(3)
    return [
        rng.integers(0, 256, (rng.integers(10, 30), rng.integers(7, 21), 3), dtype=np.uint8) for _ in range(9)
    ]


def write_zip(path, images, labels=None, dataset_json=None, extra=()):
    """A dataset ZIP in EDM's layout: ``00000/img{i:08d}.png`` and ``dataset.json`` (``labels`` as pairs,
    or ``dataset_json`` verbatim; none when both are None)."""
    names = [f"{i // 5:05d}/img{i:08d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in zip(names, images, strict=True):
            archive.writestr(name, _png(array))
        if labels is not None:
            archive.writestr(
                "dataset.json",
                json.dumps({"labels": [[n, int(y)] for n, y in zip(names, labels, strict=True)]}),
            )
        elif dataset_json is not None:
            archive.writestr("dataset.json", dataset_json)
        for name, data in extra:
            archive.writestr(name, data)
    return path, names


def test_zip_items_decode_by_the_image_rule_with_labels(tmp_path, images):
    labels = [2, 0, 1, 2, 2, 0, 1, 1, 0]
    path, names = write_zip(tmp_path / "d.zip", images, labels, extra=[("README.txt", b"ignored")])
    dataset = ZipDataset(str(path), SIZE, class_cond=True)
    assert dataset.names == names and len(dataset) == 9
    assert dataset.labels == labels and dataset.class_names == ["0", "1", "2"]
    for index, array in enumerate(images):
        expected = load_image(io.BytesIO(_png(array)), SIZE)
        reference = expected.astype(np.float64).transpose(2, 0, 1) / 127.5 - 1.0
        image, label = dataset[ItemKey(index, 0)]
        assert image.shape == (3, *SIZE) and label == labels[index]
        torch.testing.assert_close(image.double(), torch.from_numpy(reference), rtol=0, atol=1e-6)
    assert describe_dataset(dataset) == f"dataset ZIP {path} (9 images, 10x7x3)"
    assert source_kind(str(path)) == "dataset ZIP"


def test_zip_opens_one_handle_per_process(tmp_path, images):
    path, _ = write_zip(tmp_path / "d.zip", images)
    dataset = ZipDataset(str(path), SIZE)
    first = dataset[1][0]
    handle = dataset._handle
    assert handle is not None and dataset.archive() is handle
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._handle is None and torch.equal(copy[1][0], first)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2)
    batches = torch.cat([images for images, _ in loader])
    assert torch.equal(batches, torch.stack([dataset[i][0] for i in range(9)]))


def test_zip_without_dataset_json(tmp_path, images):
    path, _ = write_zip(tmp_path / "d.zip", images)
    assert ZipDataset(str(path), SIZE).labels == [0] * 9
    with pytest.raises(ValueError, match=f"{path} has no dataset.json, but --class_cond is True"):
        ZipDataset(str(path), SIZE, class_cond=True)
    null, _ = write_zip(tmp_path / "null.zip", images, dataset_json='{"labels": null}')
    assert len(ZipDataset(str(null), SIZE)) == 9
    with pytest.raises(ValueError, match=f'{null} has "labels": null in dataset.json, but --class_cond'):
        ZipDataset(str(null), SIZE, class_cond=True)


@pytest.mark.parametrize(
    "text,problem",
    [
        ("{labels: [", "is not valid JSON"),
        ('{"classes": []}', 'must be an object with a "labels" field'),
        ('{"labels": {"a": 1}}', '"labels" must be a list'),
        ('{"labels": [["00000/img00000000.png", "cat"]]}', r"must be a \[name, integer\] pair"),
        ('{"labels": [["00000/img00000000.png", [0, 1]]]}', r"must be a \[name, integer\] pair"),
        ('{"labels": [["00000/img00000000.png", 1]]}', r"has no label for 8 image\(s\)"),
        ('{"labels": [["nowhere.png", 1]]}', "no image of the ZIP"),
    ],
)
def test_a_malformed_dataset_json_is_an_error_naming_it(tmp_path, images, text, problem):
    path, _ = write_zip(tmp_path / "d.zip", images, dataset_json=text)
    for class_cond in (True, False):
        with pytest.raises(ValueError, match=f"{path}:dataset.json.*{problem}|{path}:dataset.json {problem}"):
            ZipDataset(str(path), SIZE, class_cond=class_cond)


def test_zip_labels_out_of_range_and_bad_zips(tmp_path, images):
    path, _ = write_zip(tmp_path / "d.zip", images, labels=[1000] + [0] * 8)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1000\)"):
        ZipDataset(str(path), SIZE, class_cond=True)
    (tmp_path / "bad.zip").write_bytes(b"PK not really")
    with pytest.raises(ValueError, match=r"bad\.zip is not a readable ZIP"):
        ZipDataset(str(tmp_path / "bad.zip"), SIZE)
    empty, _ = write_zip(tmp_path / "empty.zip", [], dataset_json='{"labels": null}')
    with pytest.raises(ValueError, match=r"empty\.zip holds no images"):
        ZipDataset(str(empty), SIZE)


def test_npz_at_the_training_size_is_used_as_stored(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, *SIZE, 3), dtype=np.uint8)
    labels = np.array([3, 1, 0, 3, 2, 1])
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, images, labels)
        dataset = ArrayFileDataset(str(path), SIZE, class_cond=True, random_flip=True, seed=1)
        assert (dataset._offset is None) == (save is np.savez_compressed)  # mapped unless compressed
        assert dataset.labels == labels.tolist() and dataset.class_names == ["0", "1", "2", "3"]
        for index in range(6):
            image, label = dataset[ItemKey(index, 2)]
            reference = images[index].astype(np.float64).transpose(2, 0, 1) / 127.5 - 1.0
            if not np.allclose(image.numpy(), reference, atol=1e-6):
                reference = reference[:, :, ::-1]  # this item is flipped in epoch 2
            torch.testing.assert_close(image.double(), torch.from_numpy(reference.copy()), rtol=0, atol=1e-6)
            assert label == labels[index]
        assert len(pickle.dumps(dataset)) < 4096


def test_arrays_of_another_size_or_channels_follow_the_image_rule(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 23, 31, 3), dtype=np.uint8)
    np.save(tmp_path / "big.npy", images)
    dataset = ArrayFileDataset(str(tmp_path / "big.npy"), SIZE, channels=1)
    assert source_kind(str(tmp_path / "big.npy")) == "array file"
    for index in range(4):
        Image.fromarray(images[index]).save(tmp_path / "one.png")
        assert np.array_equal(dataset.item_array(index), load_image(str(tmp_path / "one.png"), SIZE, 1))
    grey = rng.integers(0, 256, (3, *SIZE), dtype=np.uint8)  # [N, H, W]: one channel
    np.save(tmp_path / "grey.npy", grey)
    rgb = ArrayFileDataset(str(tmp_path / "grey.npy"), SIZE, channels=3)
    assert np.array_equal(rgb.item_array(2), np.repeat(grey[2][:, :, None], 3, axis=2))


def test_bad_array_files_are_named(tmp_path):
    np.save(tmp_path / "float.npy", np.zeros((2, *SIZE, 3), np.float32))
    with pytest.raises(ValueError, match=r"float.npy: expected uint8 images \[N, H, W, C\], found float32"):
        ArrayFileDataset(str(tmp_path / "float.npy"), SIZE)
    np.savez(tmp_path / "nolabels.npz", np.zeros((2, *SIZE, 3), np.uint8))
    with pytest.raises(ValueError, match=r"nolabels.npz has no labels \(arr_1\), but --class_cond is True"):
        ArrayFileDataset(str(tmp_path / "nolabels.npz"), SIZE, class_cond=True)
    np.savez(tmp_path / "other.npz", images=np.zeros((2, *SIZE, 3), np.uint8))
    with pytest.raises(ValueError, match=r"other\.npz holds no arr_0"):
        ArrayFileDataset(str(tmp_path / "other.npz"), SIZE)
    np.savez(tmp_path / "labels.npz", np.zeros((2, *SIZE, 3), np.uint8), np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"labels.npz: labels must be integers \[2\]"):
        ArrayFileDataset(str(tmp_path / "labels.npz"), SIZE, class_cond=True)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match=r"data\.txt' is a file but not a dataset ZIP"):
        build_dataset(str(tmp_path / "data.txt"), 8)
    with pytest.raises(ValueError, match="nowhere' does not exist"):
        build_dataset(str(tmp_path / "nowhere"), 8)


def test_prepare_data_reads_zips_and_arrays(tmp_path, images):
    path, _ = write_zip(tmp_path / "d.zip", images, labels=[1, 0, 1, 0, 1, 0, 1, 0, 4])
    out = tmp_path / "from_zip"
    prepare_data.prepare(str(path), str(out), SIZE, class_cond=True, workers=2, progress=False)
    prepared = PreparedDataset(str(out), SIZE, 3, class_cond=True)
    zipped = ZipDataset(str(path), SIZE, class_cond=True)
    assert prepared.class_names == ["0", "1", "2", "3", "4"] and prepared.labels == zipped.labels
    assert all(torch.equal(prepared[i][0], zipped[i][0]) for i in range(9))
    assert prepared.header["source"]["kind"] == "dataset ZIP"
    samples = np.stack([np.asarray(prepared.item_array(i)) for i in range(9)])
    np.savez(tmp_path / "samples.npz", samples, np.arange(9) % 2)
    again = tmp_path / "from_npz"
    prepare_data.prepare(str(tmp_path / "samples.npz"), str(again), SIZE, class_cond=True, progress=False)
    assert np.array_equal(np.load(again / "data.npy"), samples)
    assert PreparedDataset(str(again), class_cond=True).labels == [0, 1] * 4 + [0]


def test_build_dataset_reads_every_kind(tmp_path, images):
    folder = tmp_path / "folder"
    folder.mkdir()
    for index, array in enumerate(images):
        (folder / f"img{index}.png").write_bytes(_png(array))
    assert isinstance(build_dataset(str(folder), SIZE), FolderDataset)
    path, _ = write_zip(tmp_path / "d.zip", images)
    assert isinstance(build_dataset(str(path), SIZE), ZipDataset)
    out = tmp_path / "prepared"
    prepare_data.prepare(str(folder), str(out), SIZE, progress=False)
    assert isinstance(build_dataset(str(out), SIZE), PreparedDataset)
    same = [build_dataset(str(p), SIZE)[4][0] for p in (folder, path, out)]
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], same[2])
