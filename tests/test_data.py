"""Data: the image-folder dataset, the embedded shapes dataset, and the resumable sharded batch stream."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.data import (
    SHAPE_CLASSES,
    BatchStream,
    DataPosition,
    ImageDataError,
    ImageFolderDataset,
    ItemKey,
    ShapesDataset,
    ShardedBatchSampler,
    build_dataset,
    list_image_files,
    load_image,
    render_shape,
)


def _write(path, width, height, colour=(10, 200, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path, format=fmt)
    return path


@pytest.fixture
def image_dir(tmp_path):
    """Seven images in nested folders, three classes by prefix, four formats; plus a non-image file."""
    root = tmp_path / "images"
    _write(root / "dog_1.png", 12, 12, (255, 0, 0))
    _write(root / "cat_1.jpg", 16, 20, (0, 255, 0))
    _write(root / "sub" / "cat_2.JPEG", 20, 16, (0, 0, 255))
    _write(root / "sub" / "deeper" / "bird_x_y.webp", 9, 9, (255, 255, 0))
    _write(root / "sub" / "dog_2.jpeg", 30, 30, (0, 255, 255))
    _write(root / "zebra.png", 8, 8, (255, 0, 255))
    _write(root / "sub" / "cat_3.png", 64, 48, (9, 9, 9))
    (root / "notes.txt").write_text("not an image")
    return root


def test_listing_is_recursive_sorted_and_filtered(image_dir):
    files = list_image_files(str(image_dir))
    names = [path.split("/images/")[1] for path in files]
    assert names == sorted(names)
    assert len(names) == 7
    assert "sub/deeper/bird_x_y.webp" in names and "sub/cat_2.JPEG" in names
    assert not any(name.endswith(".txt") for name in names)


def test_labels_come_from_the_prefix_before_the_first_underscore(image_dir):
    dataset = ImageFolderDataset(str(image_dir), 8, class_cond=True)
    assert dataset.class_names == ["bird", "cat", "dog", "zebra"]
    by_name = {path.split("/")[-1]: label for path, label in zip(dataset.paths, dataset.labels, strict=True)}
    assert by_name == {
        "bird_x_y.webp": 0,
        "cat_1.jpg": 1,
        "cat_2.JPEG": 1,
        "cat_3.png": 1,
        "dog_1.png": 2,
        "dog_2.jpeg": 2,
        "zebra.png": 3,
    }
    image, label = dataset[dataset.paths.index(str(image_dir / "zebra.png"))]
    assert label == 3
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    expected = torch.tensor([1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, 8, 8)
    torch.testing.assert_close(image, expected)


def test_unconditional_labels_are_zero(image_dir):
    dataset = ImageFolderDataset(str(image_dir), 8, class_cond=False)
    assert set(dataset.labels) == {0} and dataset.class_names == []


def test_resize_keeps_the_centre_of_a_wide_image(tmp_path):
    array = np.zeros((8, 24, 3), np.uint8)
    array[:, :8] = (255, 0, 0)
    array[:, 8:16] = (0, 255, 0)
    array[:, 16:] = (0, 0, 255)
    path = tmp_path / "wide.png"
    Image.fromarray(array).save(path)
    out = load_image(str(path), 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 2:6], np.broadcast_to(np.array([0, 255, 0], np.uint8), (8, 4, 3)))


def test_large_images_are_reduced_to_image_size(tmp_path):
    path = _write(tmp_path / "big.png", 100, 70, (1, 2, 3))
    out = load_image(str(path), 16)
    assert out.shape == (16, 16, 3)
    assert (out == np.array([1, 2, 3], np.uint8)).all()


def test_corrupt_file_is_named(tmp_path):
    _write(tmp_path / "good.png", 8, 8)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    dataset = ImageFolderDataset(str(tmp_path), 8)
    index = dataset.paths.index(str(tmp_path / "broken.png"))
    with pytest.raises(ImageDataError, match=r"broken\.png"):
        dataset[index]


def test_truncated_jpeg_is_named(tmp_path):
    path = _write(tmp_path / "cut.jpg", 32, 32, fmt="JPEG")
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ImageDataError, match=r"cut\.jpg"):
        load_image(str(path), 8)


def test_image_smaller_than_image_size_is_named_with_its_size(tmp_path):
    _write(tmp_path / "tiny.png", 6, 40)
    dataset = ImageFolderDataset(str(tmp_path), 8)
    with pytest.raises(ImageDataError, match=r"tiny\.png.*6x40.*training size 8x8"):
        dataset[0]


def test_missing_and_empty_directories_raise(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "nope"), 8)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolderDataset(str(tmp_path / "empty"), 8)


def test_random_flip_is_a_function_of_seed_epoch_and_index(tmp_path):
    array = np.zeros((8, 8, 3), np.uint8)
    array[:, :4] = 255
    Image.fromarray(array).save(tmp_path / "half.png")
    dataset = ImageFolderDataset(str(tmp_path), 8, random_flip=True, seed=3)
    flips = [bool(dataset[ItemKey(0, epoch)][0][0, 0, 0] < 0) for epoch in range(40)]
    again = [bool(dataset[ItemKey(0, epoch)][0][0, 0, 0] < 0) for epoch in range(40)]
    assert flips == again
    assert 5 < sum(flips) < 35
    plain = ImageFolderDataset(str(tmp_path), 8, random_flip=False)
    assert all(plain[ItemKey(0, epoch)][0][0, 0, 0] > 0 for epoch in range(5))


def test_shapes_dataset_is_deterministic_and_class_labelled():
    first, second = ShapesDataset(16), ShapesDataset(16)
    for index in (0, 1, 2, 3, 4, 1234):
        image, label = first[index]
        again, label_again = second[index]
        assert torch.equal(image, again) and label == label_again == index % len(SHAPE_CLASSES)
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        assert image.std() > 0.1, "a shape must stand out from its background"
    assert not torch.equal(first[0][0], first[4][0]), "items of one class must differ"
    assert len(first) > 10_000


def test_shapes_dataset_draws_the_named_shapes():
    """Disc, square and triangle cover a minority of the image; stripes split it about evenly."""
    for index in range(4, 44):
        array, label = render_shape(index, 32)
        colours, counts = np.unique(array.reshape(-1, 3), axis=0, return_counts=True)
        others = 1.0 - counts.max() / counts.sum()
        if SHAPE_CLASSES[label] == "stripes":
            assert 0.3 < others < 0.7, (index, others)
        else:
            assert 0.03 < others < 0.45, (index, others)
        assert len(colours) > 2, "edges are anti-aliased"


def test_sampler_shards_contiguous_slices_of_each_global_batch():
    length, batch, world = 37, 3, 2
    single = iter(ShardedBatchSampler(length, batch * world, 0, 1, seed=5))
    ranks = [iter(ShardedBatchSampler(length, batch, r, world, seed=5)) for r in range(world)]
    for _ in range(20):
        whole = next(single)
        parts = [next(rank) for rank in ranks]
        assert whole == parts[0] + parts[1]


def test_sampler_visits_each_item_once_per_epoch_then_reshuffles():
    sampler = iter(ShardedBatchSampler(10, 3, 0, 1, seed=1))
    epoch0 = [next(sampler) for _ in range(3)]
    epoch1 = [next(sampler) for _ in range(3)]
    flat0 = [key.index for batch in epoch0 for key in batch]
    flat1 = [key.index for batch in epoch1 for key in batch]
    assert len(set(flat0)) == 9 and len(set(flat1)) == 9
    assert {key.epoch for batch in epoch0 for key in batch} == {0}
    assert {key.epoch for batch in epoch1 for key in batch} == {1}
    assert flat0 != flat1


def test_sampler_rejects_a_dataset_smaller_than_a_global_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedBatchSampler(5, 3, 0, 2)


def test_position_advances_across_epochs():
    position = DataPosition()
    for _ in range(3):
        position = position.advanced(4, 10)
    assert position == DataPosition(1, 4)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_resumes_exactly_from_its_state(num_workers):
    dataset = ShapesDataset(8, length=20, random_flip=True, flip_seed=2)
    stream = BatchStream(dataset, 3, seed=4, class_cond=True, num_workers=num_workers)
    for _ in range(5):
        next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(4)]
    stream.close()
    resumed = BatchStream(dataset, 3, seed=99, class_cond=True, num_workers=0)
    resumed.load_state_dict(state)
    for (images, cond), (want_images, want_cond) in zip(
        [next(resumed) for _ in range(4)], expected, strict=True
    ):
        assert torch.equal(images, want_images) and torch.equal(cond["y"], want_cond["y"])
    resumed.close()


def test_stream_state_rejects_another_dataset():
    stream = BatchStream(ShapesDataset(8, length=20), 2)
    with pytest.raises(ValueError, match="20 items"):
        BatchStream(ShapesDataset(8, length=30), 2).load_state_dict(stream.state_dict())


def test_stream_labels_only_when_class_conditional():
    dataset = ShapesDataset(8, length=12)
    images, cond = next(BatchStream(dataset, 4, class_cond=False))
    assert images.shape == (4, 3, 8, 8) and cond == {}
    images, cond = next(BatchStream(dataset, 4, class_cond=True))
    assert cond["y"].dtype == torch.int64 and cond["y"].shape == (4,)


def test_build_dataset_picks_the_folder_or_the_shapes(image_dir):
    assert isinstance(build_dataset("", 8), ShapesDataset)
    assert isinstance(build_dataset(str(image_dir), 8), ImageFolderDataset)
