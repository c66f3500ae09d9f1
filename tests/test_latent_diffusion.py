"""Latent diffusion end to end: ``prepare_data --vae`` -> ``train`` on the latents -> ``sample --vae``, and
the bad input around it (another VAE, --vae on a model of pixels, a missing VAE folder, flags that
disagree with the latent data, latents that overflow float16).

Every VAE is the small, randomly initialised AutoencoderKL of tests/small_vae.py (downsampling factor 2, 4
latent channels), saved to a temporary folder; the UNet is tests/tiny_run.py's tiny model at the latents'
8x8. Nothing is downloaded.
"""

import copy
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import TINY_MODEL_FLAGS, as_argv, one_thread  # noqa: F401 (one_thread: an autouse fixture)

pytest.importorskip("diffusers")

from safetensors.torch import load_file, save_file
from small_vae import save_small_vae
from test_eval_inception import require_inception

from fastdiff import evaluate, nll, prepare_data, sample, train
from fastdiff.config import RunConfig, load_run_config
from fastdiff.data.prepared import DATA_FILENAME, HEADER_FILENAME, PreparedDataError, PreparedDataset
from fastdiff.data.sources import FolderDataset
from fastdiff.latents import LatentInfo, decode_latents, load_vae, vae_fingerprint
from fastdiff.runtime.image_grid import to_uint8_nhwc
from fastdiff.training import latent_data as latent_training

WEIGHTS = "diffusion_pytorch_model.safetensors"
IMAGE_SIZE = 16
"""Training images are 16x16; the small VAE halves each side: latents [4, 8, 8], the tiny UNet's 8x8."""
COUNT = 6

MODEL = {name: value for name, value in TINY_MODEL_FLAGS.items() if name != "image_size"}
"""The tiny UNet's flags without --image_size, which comes from the latent data."""
TRAIN = [*as_argv(MODEL), "--precision", "fp32", "--batch_size", "2", "--num_workers", "0"]
TRAIN += ["--ema_rate", "0.9"]
TRAIN += ["--max_steps", "2", "--save_interval", "2", "--preview_steps", "2", "--num_preview_samples", "4"]
SAMPLE = ["--num_samples", "3", "--batch_size", "2", "--timestep_respacing", "ddim2", "--use_ddim", "True"]


pytestmark = pytest.mark.usefixtures("quiet_diffusers")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("latent_diffusion")


@pytest.fixture(scope="module")
def vae_folder(work):
    return save_small_vae(work / "vae", seed=1)


@pytest.fixture(scope="module")
def other_vae(work, vae_folder):
    """The same VAE with one decoder weight changed by a tiny amount."""
    folder = work / "other_vae"
    shutil.copytree(vae_folder, folder)
    state = load_file(folder / WEIGHTS)
    state["decoder.conv_out.bias"][0] += 1e-3
    save_file(state, folder / WEIGHTS)
    return folder


@pytest.fixture(scope="module")
def image_folder(work):
    """Random RGB PNGs, 20x16 (height x width): the image rule centre-crops them to 16x16."""
    folder = work / "images"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for index in range(COUNT):
        Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(folder / f"img_{index}.png")
    return folder


@pytest.fixture(scope="module")
def latent_data(work, image_folder, vae_folder):
    out = work / "latents"
    argv = [str(image_folder), str(out), "--vae", str(vae_folder), "--image_size", str(IMAGE_SIZE)]
    assert prepare_data.main([*argv, "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def latent_run(work, latent_data):
    """Two training steps on the latents, the VAE taken from the dataset's record (no --vae)."""
    log_dir = work / "run"
    argv = [*TRAIN, "--data_dir", str(latent_data), "--sample_interval", "2", "--log_dir", str(log_dir)]
    assert train.main(argv) == 0
    return log_dir


@pytest.fixture(scope="module")
def pixel_run(work):
    log_dir = work / "pixel_run"
    argv = [*TRAIN, "--image_size", "8", "--sample_interval", "0", "--log_dir", str(log_dir)]
    assert train.main(argv) == 0
    return log_dir


def float64_latents(vae_folder, images_uint8: np.ndarray) -> np.ndarray:
    """The reference: diffusers' own encoder in float64, posterior mean times the scaling factor."""
    vae = copy.deepcopy(load_vae(vae_folder)).double()
    images = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).double() / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
    return (mean * vae.config.scaling_factor).numpy()


# --- prepare_data --vae --------------------------------------------------------------------------------


def test_prepared_latents_are_the_encodings_of_the_folders_images(latent_data, image_folder, vae_folder):
    header = json.loads((latent_data / HEADER_FILENAME).read_text())
    assert header["kind"] == "latents" and header["dtype"] == "float16"
    assert header["image_size"] == [8, 8] and header["channels"] == 4 and header["count"] == COUNT
    vae = load_vae(vae_folder)
    assert header["metadata"]["latent_info"] == LatentInfo.from_vae(vae).to_dict()
    assert header["metadata"]["vae_path"] == str(vae_folder)
    assert header["metadata"]["image_size"] == [IMAGE_SIZE, IMAGE_SIZE]

    stored = np.load(latent_data / DATA_FILENAME)
    assert stored.dtype == np.float16 and stored.shape == (COUNT, 4, 8, 8)
    folder = FolderDataset(str(image_folder), IMAGE_SIZE, 3)
    images = np.stack([folder.item_array(index) for index in range(COUNT)])
    expected = float64_latents(vae_folder, images)
    # float16 keeps 11 significant bits: a relative error of at most 2^-11 plus float32's encoder error
    np.testing.assert_allclose(stored.astype(np.float64), expected, rtol=2**-10, atol=1e-5)
    assert np.abs(expected).max() > 0.01  # the latents are not trivially small

    dataset = PreparedDataset(str(latent_data), (8, 8), 4)
    item, label = dataset[3]
    assert item.dtype == torch.float32 and label == 0
    assert torch.equal(item, torch.from_numpy(stored[3].astype(np.float32)))


def test_prepare_refuses_latents_beyond_float16(work, image_folder):
    vae = save_small_vae(work / "huge_scaling", seed=1, scaling_factor=1e9)
    out = work / "overflow"
    with pytest.raises(ValueError, match=r"item 0: its latents reach .* beyond float16's range"):
        prepare_data.prepare(str(image_folder), str(out), IMAGE_SIZE, 0, vae_path=str(vae), progress=False)
    assert not out.exists()


def test_prepare_with_a_missing_or_wrong_vae_folder(work, image_folder, vae_folder):
    missing = work / "no_such_vae"
    argv = [str(image_folder), str(work / "never"), "--image_size", str(IMAGE_SIZE)]
    with pytest.raises(ValueError, match=f"--vae '{missing}': VAE folder {missing} does not exist"):
        prepare_data.main([*argv, "--vae", str(missing)])
    with pytest.raises(ValueError, match=r"--in_channels 1: the VAE .* encodes 3-channel images"):
        prepare_data.main([*argv, "--vae", str(vae_folder), "--in_channels", "1"])
    with pytest.raises(ValueError, match="--image_size: image size 15x15 does not divide by the VAE's"):
        prepare_data.main([*argv[:2], "--image_size", "15", "--vae", str(vae_folder)])
    assert not (work / "never").exists()


def test_prepare_encodes_on_the_device_asked_for(work, image_folder, vae_folder, latent_data, capsys):
    out = work / "latents_on_cpu"
    argv = [str(image_folder), str(out), "--image_size", str(IMAGE_SIZE), "--vae", str(vae_folder)]
    assert prepare_data.main([*argv, "--workers", "1", "--device", "cpu"]) == 0
    assert "float16 latents (encoded on cpu)" in capsys.readouterr().out
    assert np.array_equal(np.load(out / DATA_FILENAME), np.load(latent_data / DATA_FILENAME))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_prepare_refuses_a_device_it_cannot_use(work, image_folder, vae_folder):
    argv = [str(image_folder), str(work / "never"), "--image_size", str(IMAGE_SIZE)]
    with pytest.raises(ValueError, match="--device cuda: device 'cuda' was asked for but torch sees no CUDA"):
        prepare_data.main([*argv, "--vae", str(vae_folder), "--device", "cuda"])
    with pytest.raises(ValueError, match="--device gpu: device must be 'auto', 'cpu' or 'cuda', got 'gpu'"):
        prepare_data.main([*argv, "--vae", str(vae_folder), "--device", "gpu"])
    with pytest.raises(ValueError, match="--device cpu: only --vae encoding runs on a device"):
        prepare_data.main([*argv, "--device", "cpu"])
    assert not (work / "never").exists()


# --- train on latents ----------------------------------------------------------------------------------


def test_training_on_latents_records_them_and_decodes_its_grids(latent_run, latent_data, vae_folder):
    config = load_run_config(str(latent_run / "run_config.json"))
    assert config.model.image_size == 8 and config.model.in_channels == 4
    header = json.loads((latent_data / HEADER_FILENAME).read_text())
    assert config.latents.info == header["metadata"]["latent_info"]
    assert config.latents.latent_info.fingerprint == vae_fingerprint(load_vae(vae_folder))
    assert config.latents.vae == str(vae_folder)
    assert RunConfig.from_dict(config.to_dict(), "again") == config
    # 4 decoded 16x16 RGB samples in a 2x2 grid (2-pixel padding), enlarged to at least 256 pixels
    grid = Image.open(latent_run / "samples_000002.png")
    side = 2 * (IMAGE_SIZE + 2) + 2
    assert grid.mode == "RGB" and grid.size == (side * 7, side * 7)  # 7: the first factor reaching 256


@pytest.mark.parametrize("version", [2, 3])
def test_an_earlier_run_config_without_latents_still_loads(latent_run, tmp_path, version):
    data = json.loads((latent_run / "run_config.json").read_text())
    del data["latents"]
    data["version"] = version
    (tmp_path / "run_config.json").write_text(json.dumps(data))
    config = load_run_config(str(tmp_path / "run_config.json"))
    assert config.latents.info is None and config.latents.latent_info is None
    assert config.model.in_channels == 4


def test_a_run_on_pixels_keeps_no_latent_info_from_a_config_file(latent_run, image_folder):
    saved = load_run_config(str(latent_run / "run_config.json"))  # as --config would read it
    pixels = dataclasses.replace(saved, latents=dataclasses.replace(saved.latents, vae=""))
    config, latent = latent_training.latent_data(pixels.with_flags({"data_dir": str(image_folder)}), set())
    assert latent is None and config.latents.info is None
    with pytest.raises(ValueError, match=r"--vae .*: the image folder .* holds images, not latents"):
        latent_training.latent_data(saved.with_flags({"data_dir": str(image_folder)}), set())


def test_flags_that_disagree_with_the_latent_data(latent_data, tmp_path):
    base = [*TRAIN, "--data_dir", str(latent_data), "--log_dir", str(tmp_path / "run")]
    header = f"{latent_data / HEADER_FILENAME}"
    with pytest.raises(ValueError, match=f"--in_channels 3: the latent dataset {header} holds latents of 4"):
        train.main([*base, "--in_channels", "3"])
    with pytest.raises(
        ValueError, match=f"--image_size 16: the latent dataset {header} holds latents of 8x8"
    ):
        train.main([*base, "--image_size", "16"])
    with pytest.raises(ValueError, match=r"--image_size 8,16: .* give 8"):
        train.main([*base, "--image_size", "8,16"])
    with pytest.raises(
        PreparedDataError, match=f"{header}: the dataset holds latents, and --random_flip True"
    ):
        train.main([*base, "--random_flip", "True"])
    assert not (tmp_path / "run").exists()


def test_train_refuses_another_vae_and_vae_on_pixels(
    latent_data, other_vae, vae_folder, image_folder, tmp_path
):
    base = [*TRAIN, "--log_dir", str(tmp_path / "run")]
    good, bad = vae_fingerprint(load_vae(vae_folder)), vae_fingerprint(load_vae(other_vae))
    assert good != bad
    with pytest.raises(ValueError) as caught:
        train.main([*base, "--data_dir", str(latent_data), "--vae", str(other_vae)])
    message = str(caught.value)
    assert message.startswith(f"--vae '{other_vae}'") and good[:16] in message and bad[:16] in message
    with pytest.raises(
        ValueError, match=f"--vae '{vae_folder}': the image folder .* holds images, not latents"
    ):
        train.main([*base, "--data_dir", str(image_folder), "--vae", str(vae_folder), "--image_size", "8"])
    with pytest.raises(ValueError, match=r"--vae .* does not exist"):
        train.main([*base, "--data_dir", str(latent_data), "--vae", str(tmp_path / "missing")])


def test_without_a_vae_grids_are_skipped_once_and_evaluation_refused(latent_data, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(latent_data, moved)
    header = json.loads((moved / HEADER_FILENAME).read_text())
    header["metadata"]["vae_path"] = str(tmp_path / "deleted_vae")
    (moved / HEADER_FILENAME).write_text(json.dumps(header))
    base = [*TRAIN, "--data_dir", str(moved), "--sample_interval", "1"]
    with pytest.raises(ValueError, match=r"--eval_interval 2: .*needs the VAE.*deleted_vae.*pass --vae PATH"):
        train.main([*base, "--log_dir", str(tmp_path / "refused"), "--eval_interval", "2"])
    capsys.readouterr()
    assert train.main([*base, "--log_dir", str(tmp_path / "run")]) == 0
    output = capsys.readouterr().out
    assert output.count("note: no sample grids") == 1 and "deleted_vae" in output
    assert not list((tmp_path / "run").glob("samples_*.png"))
    assert load_run_config(str(tmp_path / "run" / "run_config.json")).latents.info is not None


def test_in_training_evaluation_scores_decoded_samples(latent_data, vae_folder, tmp_path):
    require_inception()
    log_dir = tmp_path / "run"
    argv = [*TRAIN, "--data_dir", str(latent_data), "--vae", str(vae_folder), "--sample_interval", "0"]
    argv += ["--eval_interval", "2", "--eval_samples", "4", "--eval_ref", "4", "--log_dir", str(log_dir)]
    assert train.main(argv) == 0
    tag = "vae" + vae_fingerprint(load_vae(vae_folder))[:8]
    assert (log_dir / f"fid_reference_16px_{tag}_4.npz").is_file()  # the decoded images' size
    best = json.loads((log_dir / "ema_0.9_best.json").read_text())
    assert np.isfinite(best["fid"]) and best["step"] == 2


# --- sample, evaluate, nll ------------------------------------------------------------------------------


def test_sample_with_vae_decodes_the_latents_it_would_write_without(latent_run, vae_folder, tmp_path, capsys):
    model = str(latent_run / "ema_0.9_000002.pt")
    assert sample.main(["--model_path", model, *SAMPLE, "--out_dir", str(tmp_path / "raw")]) == 0
    assert "no --vae was given" in capsys.readouterr().out
    raw = np.load(tmp_path / "raw" / "latents_3x4x8x8.npz")["arr_0"]
    assert raw.dtype == np.float32 and not list((tmp_path / "raw").glob("*.png"))

    argv = ["--model_path", model, *SAMPLE, "--vae", str(vae_folder), "--out_dir", str(tmp_path / "images")]
    assert sample.main(argv) == 0
    images = np.load(tmp_path / "images" / "samples_3x16x16x3.npz")["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert Image.open(tmp_path / "images" / "samples_3x16x16x3.png").mode == "RGB"
    expected = to_uint8_nhwc(decode_latents(load_vae(vae_folder), torch.from_numpy(raw))).numpy()
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1  # float rounding at a .5 boundary


def test_sample_refuses_another_vae_a_missing_one_and_vae_on_pixels(
    latent_run, pixel_run, other_vae, vae_folder, tmp_path
):
    model = str(latent_run / "ema_0.9_000002.pt")
    out = ["--out_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=f"--vae '{other_vae}': the VAE .* is not the VAE the run of"):
        sample.main(["--model_path", model, *SAMPLE, "--vae", str(other_vae), *out])
    with pytest.raises(ValueError, match=r"--vae .*missing.* does not exist"):
        sample.main(["--model_path", model, *SAMPLE, "--vae", str(tmp_path / "missing"), *out])
    pixels = str(pixel_run / "ema_0.9_000002.pt")
    with pytest.raises(
        ValueError, match=f"--vae '{vae_folder}': the model {pixels} was not trained on latents"
    ):
        sample.main(["--model_path", pixels, *SAMPLE, "--vae", str(vae_folder), *out])
    assert not list(tmp_path.iterdir())


def test_evaluate_needs_the_vae_of_a_latent_model(latent_run, vae_folder, image_folder, tmp_path):
    require_inception()
    images = tmp_path / "images.npz"
    np.savez(images, np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=f"--vae '{vae_folder}': --samples '{images}' holds images already"):
        evaluate.main(["--ref", str(image_folder), "--samples", str(images), "--vae", str(vae_folder)])
    model = str(latent_run / "ema_0.9_000002.pt")
    argv = ["--ref", str(image_folder), "--samples", model, *SAMPLE[:-4], "--timestep_respacing", "ddim2"]
    argv += ["--use_ddim", "True", "--num_samples", "5", "--kid_subsets", "2", "--kid_subset_size", "2"]
    with pytest.raises(ValueError, match=f"--samples '{model}' is a model of latents: pass --vae PATH"):
        evaluate.main(argv)
    assert evaluate.main([*argv, "--vae", str(vae_folder)]) == 0


def test_nll_refuses_a_latent_model(latent_run, latent_data):
    model = str(latent_run / "ema_0.9_000002.pt")
    with pytest.raises(ValueError, match=f"--model_path '{model}' is a model of latents.*256 bins"):
        nll.main(["--model_path", model, "--data_dir", str(latent_data), "--num_samples", "1"])
