"""``python -m fastdiff.train``: the files it writes, the embedded profile, flags, bad input it refuses."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tiny_run import TINY_MODEL_FLAGS, TINY_RUN_ARGV, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from fastdiff import train
from fastdiff.data import ImageDataError
from fastdiff.runtime import precision
from fastdiff.script_util import create_model_and_diffusion, model_and_diffusion_defaults

TINY = [
    *TINY_RUN_ARGV,
    "--batch_size", "4",
    "--num_workers", "0",
    "--log_interval", "2",
    "--sample_interval", "0",
]  # fmt: skip
TINY_FLAGS = TINY_MODEL_FLAGS


def run_train(log_dir, *extra: str) -> int:
    return train.main([*TINY, "--log_dir", str(log_dir), *extra])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Four steps, class-conditional, two EMA rates, saves at 2 and 4, a sample grid at 4."""
    log_dir = tmp_path_factory.mktemp("run")
    flags = [
        "--class_cond", "True",
        "--ema_rate", "0.9,0.99",
        "--max_steps", "4",
        "--save_interval", "2",
        "--sample_interval", "4",
        "--num_preview_samples", "4",
    ]  # fmt: skip
    assert run_train(log_dir, *flags) == 0
    return log_dir


def test_checkpoints_use_improved_diffusions_names(trained_run):
    names = set(os.listdir(trained_run))
    for step in ("000002", "000004"):
        assert {f"model{step}.pt", f"ema_0.9_{step}.pt", f"ema_0.99_{step}.pt", f"opt{step}.pt"} <= names
    assert "state000004.pt" in names and "state000002.pt" not in names, "keep_states=1 keeps the newest"
    assert not [name for name in names if ".tmp" in name]


def test_plain_state_dicts_load_strictly_into_an_improved_diffusion_model(trained_run):
    flags = {**model_and_diffusion_defaults(), **TINY_FLAGS, "class_cond": True}
    model, _ = create_model_and_diffusion(**flags)
    for name in ("model000004.pt", "ema_0.99_000004.pt"):
        state = torch.load(trained_run / name, weights_only=True)
        model.load_state_dict(state, strict=True)
        assert all(value.dtype == torch.float32 for value in state.values())
    optimizer_state = torch.load(trained_run / "opt000004.pt", weights_only=True)
    assert {"state", "param_groups"} <= set(optimizer_state)
    model_state = torch.load(trained_run / "model000004.pt", weights_only=True)
    ema_state = torch.load(trained_run / "ema_0.9_000004.pt", weights_only=True)
    assert any(not torch.equal(model_state[key], ema_state[key]) for key in model_state)


def test_full_state_holds_everything_for_an_exact_resume(trained_run):
    state = torch.load(trained_run / "state000004.pt", weights_only=False)
    assert state["step"] == 4 and state["world_size"] == 1 and state["global_batch"] == 4
    assert set(state) >= {"model", "optimizer", "scaler", "ema", "schedule_sampler", "data", "rng"}
    assert set(state["rng"][0]) == {"torch_cpu", "torch_cuda", "numpy", "python"}
    assert state["data"]["offset"] == 16 and state["data"]["epoch"] == 0
    assert state["ema"]["rates"] == [0.9, 0.99]


def test_progress_csv_log_and_sample_grid(trained_run):
    with open(trained_run / "progress.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(float(row["step"])) for row in rows] == [2, 4]
    for column in ("loss", "mse", "grad_norm", "images_per_s", "peak_mem_gib", "lr", "samples"):
        assert all(float(row[column]) >= 0 for row in rows), column
    for row in rows:  # a quartile no sampled timestep fell into in the interval is left empty
        quartiles = [row[f"loss_q{q}"] for q in range(4) if row.get(f"loss_q{q}")]
        assert quartiles and all(float(value) >= 0 for value in quartiles)
    assert float(rows[-1]["samples"]) == 16
    log = (trained_run / "log.txt").read_text()
    assert "step 4 | loss" in log and "saved checkpoint for step 4" in log
    with Image.open(trained_run / "samples_000004.png") as grid:
        assert grid.mode == "RGB" and min(grid.size) >= 256
    config = json.loads((trained_run / "run_config.json").read_text())
    assert config["model"]["num_channels"] == 32 and config["train"]["ema_rate"] == "0.9,0.99"
    assert config["class_names"] == ["disc", "square", "triangle", "stripes"]
    assert not (trained_run / "model_flags.json").exists(), "one file holds the run's config"


def test_a_finished_run_does_not_train_again(trained_run, capsys):
    assert run_train(trained_run, "--class_cond", "True", "--ema_rate", "0.9,0.99", "--max_steps", "4") == 0
    assert "nothing to train" in capsys.readouterr().out


def test_embedded_profile_fills_only_what_is_not_given():
    config, _ = train.parse_args([])
    model, training = config.model, config.train
    assert (model.image_size, model.num_channels, model.class_cond, training.batch_size) == (16, 32, True, 32)
    assert training.max_steps > 0 and training.sample_interval > 0
    config, _ = train.parse_args(["--lr", "0.001", "--max_steps", "7"])
    assert config.model.image_size == 16 and config.train.lr == 0.001 and config.train.max_steps == 7
    config, _ = train.parse_args(["--num_res_blocks", "2"])
    assert (config.model.num_channels, config.train.batch_size, config.train.lr) == (128, 1, 1e-4), (
        "improved-diffusion's defaults"
    )
    config, _ = train.parse_args(["--image_size", "16,24", "--in_channels", "1"])
    assert (config.model.image_hw, config.model.in_channels, config.model.num_channels) == (
        (16, 24),
        1,
        32,
    ), "the image's size and channels keep the profile"
    assert config.model.attention_resolutions == "6", "attention stays at the 4x-downsampled level (24 / 4)"
    assert config.model.geometry() == ((1, 2, 2), (4,))
    config, _ = train.parse_args(["--image_size", "32"])
    assert config.model.attention_resolutions == "8" and config.model.geometry()[1] == (4,)
    with pytest.raises(ValueError, match=r"--image_size 16,18: both sides must be divisible .* = 4"):
        train.parse_args(["--image_size", "16,18"])
    config, _ = train.parse_args(["--data_dir", "somewhere"])
    assert config.model.image_size == 64 and config.train.ema_rate == "0.9999"
    config, _ = train.parse_args(["--predict_v", "True", "--rescale_zero_terminal_snr", "True"])
    assert config.model.image_size == 16 and config.diffusion.predict_v, "objective flags keep the profile"


def test_global_batch_size_derives_the_per_rank_batch(tmp_path):
    assert run_train(tmp_path, "--global_batch_size", "4", "--max_steps", "1") == 0
    assert torch.load(tmp_path / "state000001.pt", weights_only=False)["global_batch"] == 4


def test_memory_flags_and_compile_are_wired(tmp_path, monkeypatch):
    compiled = []

    def record_compile(module, *args, **kwargs):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", record_compile)
    flags = [
        "--channels_last", "True",
        "--grad_checkpoint", "True",
        "--compile", "True",
        "--precision", "bf16",
        "--grad_clip", "1.0",
        "--max_steps", "2",
    ]  # fmt: skip
    assert run_train(tmp_path, *flags) == 0
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    assert compiled[0].use_checkpoint
    assert compiled[0].input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_fp16_scale_growth_is_accepted_and_ignored(tmp_path, capsys):
    fp16_alias = ["--precision", "auto", "--use_fp16", "True", "--fp16_scale_growth", "0.01"]
    assert run_train(tmp_path, *fp16_alias, "--max_steps", "1") == 0
    output = capsys.readouterr().out
    assert "fp16_scale_growth is ignored" in output and "precision fp16" in output
    assert torch.load(tmp_path / "state000001.pt", weights_only=False)["scaler"]["scale"] > 0


# ---------------------------------------------------------------------------- bad input


def test_missing_and_empty_data_dirs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        run_train(tmp_path / "log", "--data_dir", str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        run_train(tmp_path / "log", "--data_dir", str(tmp_path / "empty"))


def test_corrupt_image_is_named_and_the_state_is_saved(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for index in range(3):
        Image.new("RGB", (8, 8), (index * 50, 0, 0)).save(data / f"ok_{index}.png")
    (data / "bad_0.png").write_bytes(b"definitely not an image")
    with pytest.raises(ImageDataError, match=r"bad_0\.png"):
        run_train(tmp_path / "log", "--data_dir", str(data), "--max_steps", "3")
    assert (tmp_path / "log" / "state000000.pt").exists()


def test_too_small_image_is_named(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for index in range(4):
        Image.new("RGB", (8 if index else 5, 8), (0, 0, 0)).save(data / f"img_{index}.png")
    with pytest.raises(ImageDataError, match=r"img_0.png.*5x8"):
        run_train(tmp_path / "log", "--data_dir", str(data), "--max_steps", "3")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--microbatch", "3"], "not divisible by microbatch 3"),
        (["--global_batch_size", "8"], "pass only one, or make them agree"),
        (["--use_fp16", "True", "--precision", "bf16"], "use_fp16"),
        (["--optimizer", "fused_adam"], "apex"),
        (["--ema_rate", "1.5"], "ema_rate"),
        (["--resume_checkpoint", "/nonexistent/model000010.pt"], "does not exist"),
    ],
)
def test_bad_flags_are_refused(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        run_train(tmp_path, *flags, "--max_steps", "1")
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".pt")]


def test_precision_the_device_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "_cpu_autocast_runs", lambda dtype: False)
    with pytest.raises(precision.PrecisionUnsupportedError, match="bf16"):
        run_train(tmp_path, "--precision", "bf16", "--max_steps", "1")


def test_unavailable_kernel_backend(tmp_path, monkeypatch):
    from fastdiff import ops

    monkeypatch.setattr(ops, "available_backends", lambda: ["auto", "torch"])
    with pytest.raises(ValueError, match="--kernels triton is not available"):
        run_train(tmp_path, "--kernels", "triton", "--max_steps", "1")


def test_command_line_errors_are_one_line(tmp_path):
    command = [sys.executable, "-m", "fastdiff.train", "--data_dir", str(tmp_path / "absent")]
    result = subprocess.run(
        [*command, "--log_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("fastdiff.train: error: data_dir")
    assert "Traceback" not in result.stderr


def test_the_kernel_backend_is_used_during_training_and_restored_after(tmp_path, monkeypatch):
    from fastdiff import ops
    from fastdiff.training.loop import TrainLoop

    seen = []
    original_step = TrainLoop.run_step

    def record_backend(self, *args):
        seen.append(ops.get_backend())
        return original_step(self, *args)

    monkeypatch.setattr(TrainLoop, "run_step", record_backend)
    before = ops.get_backend()
    assert run_train(tmp_path, "--kernels", "torch", "--max_steps", "2") == 0
    assert seen == ["torch", "torch"] and ops.get_backend() == before
