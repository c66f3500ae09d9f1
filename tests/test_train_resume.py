"""Resuming: N + N steps equal 2N steps bit for bit; SIGTERM saves and resumes; improved-diffusion files."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_run import TINY_RUN_ARGV, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from fastdiff import prepare_data, train

TINY = [
    *TINY_RUN_ARGV,
    "--batch_size", "4",
    "--log_interval", "1",
    "--sample_interval", "0",
    "--ema_rate", "0.9,0.99",
]  # fmt: skip

# Everything that draws random numbers: dropout, flips, the loss-aware timestep sampler, loader workers,
# microbatches; a dataset of 24 images so epochs roll over (4 x 6 = 24) within the run.
RANDOM_EVERYWHERE = [
    "--dropout", "0.1",
    "--random_flip", "True",
    "--schedule_sampler", "loss-second-moment",
    "--microbatch", "2",
    "--num_workers", "1",
    "--class_cond", "True",
]  # fmt: skip


def run_train(log_dir, *extra: str) -> int:
    return train.main([*TINY, "--log_dir", str(log_dir), *extra])


def _tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint object, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}/{key}")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}/{index}")


def assert_identical(path_a, path_b):
    a, b = torch.load(path_a, weights_only=False), torch.load(path_b, weights_only=False)
    tensors_a, tensors_b = dict(_tensors(a)), dict(_tensors(b))
    assert tensors_a.keys() == tensors_b.keys()
    different = [key for key in tensors_a if not torch.equal(tensors_a[key], tensors_b[key])]
    assert not different, f"{os.path.basename(path_a)} differs in {different[:5]}"


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """24 shape images written as PNG files with class prefixes (epochs of 6 steps)."""
    from PIL import Image

    from fastdiff.data import SHAPE_CLASSES, render_shape

    folder = tmp_path_factory.mktemp("shapes")
    for index in range(24):
        array, label = render_shape(index, 12)
        Image.fromarray(array).save(folder / f"{SHAPE_CLASSES[label]}_{index}.png")
    return folder


def test_n_plus_n_steps_equal_2n_steps_exactly(tmp_path, small_dataset):
    data = ["--data_dir", str(small_dataset)]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train(straight, *RANDOM_EVERYWHERE, *data, "--max_steps", "8", "--save_interval", "8") == 0
    assert run_train(resumed, *RANDOM_EVERYWHERE, *data, "--max_steps", "4", "--save_interval", "8") == 0
    assert sorted(name for name in os.listdir(resumed) if name.startswith("state")) == ["state000004.pt"]
    assert run_train(resumed, *RANDOM_EVERYWHERE, *data, "--max_steps", "8", "--save_interval", "8") == 0
    assert "resumed from" in (resumed / "log.txt").read_text()
    for name in ("model000008.pt", "ema_0.9_000008.pt", "ema_0.99_000008.pt", "opt000008.pt"):
        assert_identical(straight / name, resumed / name)
    final_straight = torch.load(straight / "state000008.pt", weights_only=False)
    final_resumed = torch.load(resumed / "state000008.pt", weights_only=False)
    assert final_straight["data"] == final_resumed["data"] == {
        "epoch": 1, "offset": 8, "seed": 0, "dataset_len": 24,
    }  # fmt: skip
    for key in ("loss_history", "loss_counts"):
        assert torch.equal(final_straight["schedule_sampler"][key], final_resumed["schedule_sampler"][key])
    assert torch.equal(final_straight["rng"][0]["torch_cpu"], final_resumed["rng"][0]["torch_cpu"])


def test_a_prepared_dataset_resumes_exactly_and_trains_as_its_folder(tmp_path, small_dataset, capsys):
    """The prepared dataset of a folder gives the folder's run bit for bit, interrupted and resumed or not:
    the same items, data order, flips, sharding and data position."""
    prepared = tmp_path / "prepared"
    prepare_data.prepare(str(small_dataset), str(prepared), 8, class_cond=True, progress=False)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = [*RANDOM_EVERYWHERE, "--save_interval", "8"]
    folder, data = ["--data_dir", str(small_dataset)], ["--data_dir", str(prepared)]
    assert run_train(straight, *flags, *folder, "--max_steps", "8") == 0
    assert run_train(resumed, *flags, *data, "--max_steps", "4") == 0
    assert run_train(resumed, *flags, *data, "--max_steps", "8") == 0
    assert "resumed from" in (resumed / "log.txt").read_text()
    assert f"data: prepared dataset {prepared} (24 images, 8x8x3)" in capsys.readouterr().out
    for name in ("model000008.pt", "ema_0.9_000008.pt", "ema_0.99_000008.pt", "opt000008.pt"):
        assert_identical(straight / name, resumed / name)
    states = [torch.load(run / "state000008.pt", weights_only=False) for run in (straight, resumed)]
    assert states[0]["data"] == states[1]["data"] == {"epoch": 1, "offset": 8, "seed": 0, "dataset_len": 24}
    assert states[0]["run_config"]["class_names"] == states[1]["run_config"]["class_names"]


def as_version_2(state: dict) -> dict:
    """A full state in the layout fastdiff wrote before run_config.json (state format version 2): the
    model and diffusion flags flat under run_config["model_and_diffusion"], the other flags under "train",
    no "evaluation" part. (Checked once against a state written by that fastdiff itself: resuming it gave
    the same bits at the next save as an uninterrupted run of either version.)"""
    config = state["run_config"]
    flat = {**config["model"], **config["diffusion"]}
    train_flags = {
        name: value for part in ("train", "runtime", "evaluation") for name, value in config[part].items()
    }
    legacy = {"model_and_diffusion": flat, "class_names": config["class_names"], "train": train_flags}
    old = {key: value for key, value in state.items() if key != "evaluation"}
    return {**old, "version": 2, "run_config": legacy}


def test_a_version_2_state_resumes_exactly(tmp_path):
    """States written before the run config moved into run_config.json resume bit for bit."""
    flags = [*RANDOM_EVERYWHERE, "--num_workers", "0", "--save_interval", "2"]
    straight, old = tmp_path / "straight", tmp_path / "old"
    assert run_train(straight, *flags, "--max_steps", "4") == 0
    assert run_train(old, *flags, "--max_steps", "2") == 0
    path = old / "state000002.pt"
    torch.save(as_version_2(torch.load(path, weights_only=True)), path)
    (old / "run_config.json").unlink()
    assert run_train(old, *flags, "--max_steps", "4") == 0
    assert f"resumed from {path} at step 2" in (old / "log.txt").read_text()
    for name in (
        "model000004.pt",
        "ema_0.9_000004.pt",
        "ema_0.99_000004.pt",
        "opt000004.pt",
        "state000004.pt",
    ):
        assert_identical(straight / name, old / name)


def test_sigterm_saves_a_loadable_state_and_training_resumes_from_it(tmp_path):
    log_dir = tmp_path / "run"
    command = [sys.executable, "-m", "fastdiff.train", *TINY, "--log_dir", str(log_dir)]
    command += ["--max_steps", "100000", "--save_interval", "100000", "--num_workers", "1"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
    )
    try:
        deadline = time.monotonic() + 180
        progress = log_dir / "progress.csv"
        while time.monotonic() < deadline and process.poll() is None:
            if progress.exists() and len(progress.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert process.poll() is None, process.stdout.read()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "SIGTERM: saving step" in output
    states = [name for name in os.listdir(log_dir) if name.startswith("state")]
    assert len(states) == 1 and not [name for name in os.listdir(log_dir) if ".tmp" in name]
    step = int(states[0][len("state") : -len(".pt")])
    assert step >= 2
    state = torch.load(log_dir / states[0], weights_only=False)
    assert state["step"] == step
    assert (log_dir / f"model{step:06d}.pt").exists()
    assert run_train(log_dir, "--max_steps", str(step + 2), "--save_interval", "100000") == 0
    assert f"resumed from {log_dir / states[0]} at step {step}" in (log_dir / "log.txt").read_text()
    assert (log_dir / f"model{step + 2:06d}.pt").exists()


def test_resume_from_improved_diffusion_files(tmp_path):
    """A model*.pt with opt*.pt and ema_*.pt beside it (no full state) resumes weights, optimizer and EMA."""
    source = tmp_path / "source"
    assert run_train(source, "--max_steps", "2", "--save_interval", "2") == 0
    target = tmp_path / "target"
    target.mkdir()
    for name in ("model000002.pt", "opt000002.pt", "ema_0.9_000002.pt", "ema_0.99_000002.pt"):
        shutil.copy(source / name, target / name)
    assert run_train(target, "--resume_checkpoint", str(target / "model000002.pt"), "--max_steps", "3") == 0
    assert "at step 2" in (target / "log.txt").read_text()
    optimizer = torch.load(target / "opt000003.pt", weights_only=True)
    assert all(float(entry["step"]) == 3 for entry in optimizer["state"].values())
    ema_before = torch.load(source / "ema_0.9_000002.pt", weights_only=True)
    ema_after = torch.load(target / "ema_0.9_000003.pt", weights_only=True)
    model_after = torch.load(target / "model000003.pt", weights_only=True)
    for key, value in ema_after.items():
        torch.testing.assert_close(value, 0.9 * ema_before[key] + 0.1 * model_after[key])
    state_ema = torch.load(target / "state000003.pt", weights_only=True)["ema"]
    assert state_ema["num_updates"] == 3, "the full state holds the resumed EMA, not the one it replaced"
    for name, value in state_ema["shadows"][0].items():
        assert torch.equal(value, ema_after[name]), name


def test_a_checkpoint_of_another_configuration_lists_the_mismatches(tmp_path):
    assert run_train(tmp_path, "--max_steps", "1") == 0
    flags_before = (tmp_path / "run_config.json").read_text()
    with pytest.raises(ValueError, match=r"shape mismatches: .*num_channels: 32 -> 64"):
        run_train(tmp_path, "--max_steps", "2", "--num_channels", "64")
    with pytest.raises(ValueError, match=r"unexpected keys: label_emb.weight|missing keys: label_emb.weight"):
        run_train(tmp_path, "--max_steps", "2", "--class_cond", "True")
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("state")) == ["state000001.pt"]
    assert (tmp_path / "run_config.json").read_text() == flags_before, "a refused run changes nothing"
