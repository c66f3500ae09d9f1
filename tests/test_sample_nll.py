"""``python -m fastdiff.sample`` and ``python -m fastdiff.nll`` on what the trainer wrote, and bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import TINY_MODEL_FLAGS, TINY_RUN_ARGV, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from fastdiff import nll, sample, train
from fastdiff.script_util import create_model_and_diffusion, model_and_diffusion_defaults

TINY = TINY_RUN_ARGV


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("run")
    flags = ["--class_cond", "True", "--batch_size", "4", "--max_steps", "2", "--save_interval", "2"]
    flags += ["--sample_interval", "0", "--num_workers", "0", "--log_dir", str(log_dir)]
    assert train.main([*TINY, *flags]) == 0
    return log_dir


@pytest.mark.parametrize("use_ddim", [True, False])
def test_sample_writes_improved_diffusions_npz_and_a_grid(run_dir, tmp_path, use_ddim, capsys):
    args = ["--model_path", str(run_dir / "ema_0.9999_000002.pt"), "--num_samples", "5", "--batch_size", "2"]
    args += ["--use_ddim", str(use_ddim), "--timestep_respacing", "ddim5" if use_ddim else "5"]
    assert sample.main([*args, "--out_dir", str(tmp_path)]) == 0
    assert "model flags from run_config.json" in capsys.readouterr().out
    arrays = np.load(tmp_path / "samples_5x8x8x3.npz")
    assert sorted(arrays.files) == ["arr_0", "arr_1"]
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (5, 8, 8, 3)
    assert arrays["arr_1"].dtype == np.int64 and arrays["arr_1"].shape == (5,)
    assert set(arrays["arr_1"].tolist()) <= {0, 1, 2, 3}, "labels come from the run's four classes"
    assert arrays["arr_0"].std() > 0
    with Image.open(tmp_path / "samples_5x8x8x3.png") as grid:
        assert grid.mode == "RGB"


def test_sample_loads_improved_diffusion_files_with_flags_on_the_command_line(tmp_path):
    """A plain state_dict with no run config beside it (as improved-diffusion writes them)."""
    flags = {**model_and_diffusion_defaults(), **TINY_MODEL_FLAGS}
    model, _ = create_model_and_diffusion(**flags)
    torch.save(model.state_dict(), tmp_path / "model000100.pt")
    args = ["--model_path", str(tmp_path / "model000100.pt"), "--num_samples", "2", "--batch_size", "2"]
    assert sample.main([*TINY, *args, "--timestep_respacing", "4", "--grid_samples", "0"]) == 0
    arrays = np.load(tmp_path / "samples_2x8x8x3.npz")
    assert arrays.files == ["arr_0"], "no labels for an unconditional model"
    assert not (tmp_path / "samples_2x8x8x3.png").exists()


def test_sample_refuses_a_model_of_another_configuration(run_dir, tmp_path):
    args = ["--model_path", str(run_dir / "model000002.pt"), "--num_samples", "2", "--num_channels", "64"]
    with pytest.raises(ValueError, match="shape mismatches"):
        sample.main([*args, "--out_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="does not exist"):
        sample.main(["--model_path", str(tmp_path / "absent.pt")])
    with pytest.raises(ValueError, match="not a plain state_dict"):
        sample.main(["--model_path", str(run_dir / "state000002.pt"), "--num_samples", "1"])


def test_nll_reports_bits_per_dim_on_the_embedded_dataset(run_dir, tmp_path, capsys):
    args = ["--model_path", str(run_dir / "model000002.pt"), "--num_samples", "4", "--batch_size", "2"]
    assert nll.main([*args, "--out_dir", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    bpd = float(output.split("bits/dim ")[1].split()[0])
    assert 0 < bpd < 100
    for name in ("vb", "mse", "xstart_mse"):
        terms = np.load(tmp_path / f"{name}_terms.npz")["arr_0"]
        assert terms.shape == (50,) and np.isfinite(terms).all()


def test_nll_on_an_image_folder_and_its_errors(run_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for index in range(3):
        Image.new("RGB", (10, 10), (index * 80, 40, 200)).save(data / f"disc_{index}.png")
    args = ["--model_path", str(run_dir / "model000002.pt"), "--num_samples", "2", "--batch_size", "1"]
    assert nll.main([*args, "--data_dir", str(data), "--out_dir", str(tmp_path)]) == 0
    with pytest.raises(ValueError, match="does not exist"):
        nll.main([*args, "--data_dir", str(tmp_path / "absent")])


def test_an_earlier_fastdiffs_model_flags_json_still_loads(run_dir, tmp_path, capsys):
    """Runs written before run_config.json have model_flags.json: sample reads it the same way."""
    config = json.loads((run_dir / "run_config.json").read_text())
    legacy = tmp_path / "old_run"
    legacy.mkdir()
    flags = {**config["model"], **config["diffusion"]}
    (legacy / "model_flags.json").write_text(
        json.dumps({"model_and_diffusion": flags, "class_names": config["class_names"]})
    )
    (legacy / "ema_0.9999_000002.pt").write_bytes((run_dir / "ema_0.9999_000002.pt").read_bytes())
    args = ["--model_path", str(legacy / "ema_0.9999_000002.pt"), "--num_samples", "2", "--batch_size", "2"]
    assert sample.main([*args, "--timestep_respacing", "5", "--out_dir", str(tmp_path)]) == 0
    assert "model flags from model_flags.json" in capsys.readouterr().out
    assert set(np.load(tmp_path / "samples_2x8x8x3.npz")["arr_1"].tolist()) <= {0, 1, 2, 3}
