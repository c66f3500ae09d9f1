"""Class-conditional latent diffusion under torchrun (two processes, gloo): ``prepare_data --vae
--class_cond True`` -> ``torchrun -m fastdiff.train`` on the latents, which makes one process's update on the
same global batch, decodes its grid with the dataset's VAE and keeps the labels."""

import csv
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from small_vae import save_small_vae
from test_train_ddp import run_isolated
from tiny_run import TINY_MODEL_FLAGS, as_argv, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from fastdiff import prepare_data, train
from fastdiff.config import load_run_config
from fastdiff.data.prepared import HEADER_FILENAME, PreparedDataset
from fastdiff.diffusion.data_moments import MOMENTS_FILENAME, DataMoments

IMAGE_SIZE = 16
"""16x16 images; the small VAE halves each side: latents [4, 8, 8] for the tiny 8x8 UNet."""
CLASSES = ("cat", "dog", "owl")
MODEL = {name: value for name, value in TINY_MODEL_FLAGS.items() if name != "image_size"}
TRAIN = [*as_argv(MODEL), "--precision", "fp32", "--class_cond", "True", "--num_workers", "0", "--lr", "1e-3"]
TRAIN += ["--max_steps", "2", "--save_interval", "2", "--log_interval", "1", "--ema_rate", "0.9"]
TRAIN += ["--sample_interval", "2", "--preview_steps", "2", "--num_preview_samples", "4"]


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """Nine RGB PNGs named by class (``cat_0.png``, ...), encoded with the small VAE, labels kept."""
    work = tmp_path_factory.mktemp("latent_ddp")
    folder = work / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for index in range(9):
        pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{CLASSES[index % 3]}_{index}.png")
    vae = save_small_vae(work / "vae", seed=1)
    out = work / "latents"
    argv = [str(folder), str(out), "--vae", str(vae), "--image_size", str(IMAGE_SIZE), "--class_cond", "True"]
    assert prepare_data.main([*argv, "--workers", "1"]) == 0
    return work, out


@pytest.fixture(scope="module")
def two_process_run(latents):
    work, data = latents
    log_dir = work / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "fastdiff.train", *TRAIN, "--data_dir", str(data), "--log_dir", str(log_dir)]
    command += ["--global_batch_size", "4", "--microbatch", "1"]
    result = run_isolated(command, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return log_dir, result.stdout


def test_the_prepared_latents_keep_the_class_labels(latents):
    _, data = latents
    dataset = PreparedDataset(str(data), class_cond=True)
    labels = sorted(int(dataset[index][1]) for index in range(len(dataset)))
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert tuple(dataset[0][0].shape) == (4, 8, 8)


def test_two_processes_make_one_processs_update_on_latents(two_process_run, latents, tmp_path):
    log_dir, output = two_process_run
    _, data = latents
    assert "training on 2 process(es)" in output
    assert train.main([*TRAIN, "--data_dir", str(data), "--batch_size", "4", "--log_dir", str(tmp_path)]) == 0
    two = torch.load(log_dir / "model000002.pt", weights_only=True)
    one = torch.load(tmp_path / "model000002.pt", weights_only=True)
    assert two.keys() == one.keys() and "label_emb.weight" in two
    for key, value in one.items():  # Adam turns rounding noise in tiny gradients into up to lr per step
        torch.testing.assert_close(two[key], value, rtol=0, atol=2 * 1e-3, msg=key)
    with open(log_dir / "progress.csv", newline="") as two_file, open(tmp_path / "progress.csv") as one_file:
        two_rows, one_rows = list(csv.DictReader(two_file)), list(csv.DictReader(one_file))
    assert [int(float(row["step"])) for row in two_rows] == [1, 2]
    for key in ("loss", "mse", "grad_norm"):  # the same items, noise and timesteps: the same first gradient
        assert float(two_rows[0][key]) == pytest.approx(float(one_rows[0][key]), rel=1e-5)


def test_the_run_decodes_its_grid_and_records_the_latents(two_process_run, latents):
    log_dir, _ = two_process_run
    _, data = latents
    grid = Image.open(log_dir / "samples_000002.png")
    assert grid.mode == "RGB"
    config = load_run_config(str(log_dir / "run_config.json"))
    assert config.model.in_channels == 4 and config.model.image_size == 8 and config.model.class_cond
    header = json.loads((data / HEADER_FILENAME).read_text())
    assert config.latents.info == header["metadata"]["latent_info"]
    assert DataMoments.load(str(log_dir / MOMENTS_FILENAME)).shape == (4, 8, 8)
