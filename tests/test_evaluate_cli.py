"""``python -m fastdiff.evaluate`` on every REF and SAMPLES kind, per class, and bad input.

The feature network runs at about 1 image/s on a shared CPU core, so these tests score a handful of images.
"""

import json
import warnings

import numpy as np
import pytest
from PIL import Image
from test_eval_inception import require_inception
from tiny_run import TINY_RUN_ARGV, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from fastdiff import evaluate, train
from fastdiff.evaluation.sources import load_images, load_shapes

KEYS = {"fid", "kid", "kid_std", "precision", "recall", "num_samples", "num_ref"}
FAST = ["--kid_subsets", "3", "--feature_batch_size", "8", "--pr_k", "1"]


def _result(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Shapes items 0, 4, 1, 5 (classes 0, 0, 1, 1) as a sample npz and a PNG folder; the statistics of
    shapes items 0..7 saved by a first evaluation, whose JSON result is returned too."""
    require_inception()
    folder = tmp_path_factory.mktemp("shapes")
    found = load_shapes(8, 16)
    order = [0, 4, 1, 5]
    np.savez(folder / "samples.npz", found.images[order], found.labels[order])
    (folder / "pngs").mkdir()
    for index in order:
        Image.fromarray(found.images[index]).save(folder / "pngs" / f"c{found.labels[index]}_{index}.png")
    argv = ["--ref", "shapes", "--num_ref", "8", "--samples", str(folder / "samples.npz")]
    argv += ["--save_ref_stats", str(folder / "stats.npz"), "--out", str(folder / "result.json")]
    assert evaluate.main([*argv, *FAST]) == 0
    return folder, json.loads((folder / "result.json").read_text())


def test_every_ref_and_samples_kind(scored, capsys):
    folder, first = scored
    assert set(first) == KEYS
    assert (first["num_ref"], first["num_samples"], first["precision"]) == (8, 4, 1.0)
    assert first["fid"] > 1.0 and first["recall"] < 1.0, "4 of the 8 references have no sample"
    assert evaluate.main(["--ref", str(folder / "stats.npz"), "--samples", str(folder / "pngs"), *FAST]) == 0
    from_stats = _result(capsys)
    assert from_stats["fid"] == pytest.approx(first["fid"], rel=1e-4), "PNG folder == npz, stats == shapes"
    assert (
        evaluate.main(["--ref", str(folder / "samples.npz"), "--samples", str(folder / "pngs"), *FAST]) == 0
    )
    same = _result(capsys)
    assert same["fid"] == pytest.approx(0.0, abs=1e-3)
    assert (same["precision"], same["recall"]) == (1.0, 1.0)


def test_per_class_scores_each_label_against_its_references(scored, capsys):
    folder, _ = scored
    argv = [
        "--ref",
        str(folder / "stats.npz"),
        "--samples",
        str(folder / "samples.npz"),
        "--per_class",
        "True",
    ]
    assert evaluate.main([*argv, *FAST]) == 0
    per_class = _result(capsys)["per_class"]
    assert sorted(per_class) == ["0", "1"]
    for label in ("0", "1"):
        # Both samples of a class are exactly its two reference images.
        assert per_class[label]["num_ref"] == 2 and per_class[label]["num_samples"] == 2
        assert per_class[label]["fid"] == pytest.approx(0.0, abs=1e-3)
        assert (per_class[label]["precision"], per_class[label]["recall"]) == (1.0, 1.0)


def test_checkpoint_samples_use_fastdiffs_sampler(tmp_path, capsys):
    require_inception()
    log_dir = tmp_path / "run"
    flags = ["--batch_size", "2", "--max_steps", "1", "--save_interval", "1", "--sample_interval", "0"]
    assert train.main([*TINY_RUN_ARGV, *flags, "--num_workers", "0", "--log_dir", str(log_dir)]) == 0
    capsys.readouterr()
    argv = ["--ref", "shapes", "--num_ref", "2", "--samples", str(log_dir / "ema_0.9999_000001.pt")]
    argv += ["--num_samples", "2", "--batch_size", "2", "--timestep_respacing", "3"]
    assert evaluate.main([*argv, *FAST]) == 0
    result = _result(capsys)
    assert result["num_samples"] == 2 and result["num_ref"] == 2 and result["fid"] > 0


def test_a_stats_file_of_another_image_size_is_refused(scored, tmp_path):
    folder, _ = scored
    np.savez(tmp_path / "big.npz", np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="16x16 images, the samples are 8x8"):
        evaluate.main(["--ref", str(folder / "stats.npz"), "--samples", str(tmp_path / "big.npz"), *FAST])


def test_bad_input_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="--ref REF and --samples"):
        evaluate.main(["--samples", "x.npz"])
    np.savez(tmp_path / "float.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"float\.npz.*uint8"):
        load_images(str(tmp_path / "float.npz"), "--samples")
    (tmp_path / "corrupt.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"corrupt\.npz.*not a readable"):
        load_images(str(tmp_path / "corrupt.npz"), "--ref")
    np.savez(tmp_path / "empty.npz", np.zeros((0, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="holds no images"):
        load_images(str(tmp_path / "empty.npz"), "--ref")
    with pytest.raises(ValueError, match="does not exist"):
        load_images(str(tmp_path / "absent.npz"), "--ref")
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    Image.new("RGBA", (9, 9)).save(folder / "b.png")
    with pytest.raises(ValueError, match=r"b\.png.*mixed sizes"):
        load_images(str(folder), "--samples")
    with pytest.warns(UserWarning, match="RGBA converted to RGB"):
        assert load_images(str(folder), "--samples", image_size=8).images.shape == (2, 8, 8, 3)
    np.savez(tmp_path / "gray.npz", np.zeros((2, 4, 4), np.uint8))
    assert load_images(str(tmp_path / "gray.npz"), "--ref").images.shape == (2, 4, 4, 1), "grey stays grey"
    np.savez(tmp_path / "two.npz", np.zeros((2, 4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match=r"two\.npz.*C 1, 3 or 4"):
        load_images(str(tmp_path / "two.npz"), "--ref")
    (folder / "c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"c\.png"):
        load_images(str(folder), "--ref", image_size=8)
    with pytest.raises(ValueError, match=r"gray\.npz.*4x4 images, not the --image_size 16"):
        evaluate.main(["--ref", "shapes", "--samples", str(tmp_path / "gray.npz"), "--image_size", "16"])
    np.savez(tmp_path / "one.npz", np.zeros((1, 4, 4, 3), np.uint8))
    with warnings.catch_warnings(), pytest.raises(ValueError, match="at least 2"):
        warnings.simplefilter("ignore")
        evaluate.main(["--ref", "shapes", "--samples", str(tmp_path / "one.npz")])
