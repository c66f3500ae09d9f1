"""Checkpoints that load safely: weights_only everywhere, refused pickles, bad files named, bounded sending
to ranks that cannot see the file, and a full disk that loses nothing."""

import errno
import os
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_run import TINY_RUN_ARGV, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from fastdiff import dist_util, train
from fastdiff.runtime import checkpoint
from fastdiff.runtime.checkpoint import CheckpointWriteError
from fastdiff.training.resume import STATE_VERSION

ARGV = [*TINY_RUN_ARGV, "--batch_size", "2", "--sample_interval", "0", "--num_workers", "0"]


def run_train(log_dir, *extra) -> int:
    return train.main([*ARGV, "--log_dir", str(log_dir), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 2 steps with its checkpoint at step 2."""
    log_dir = tmp_path_factory.mktemp("trained")
    assert run_train(log_dir, "--max_steps", "2", "--save_interval", "2") == 0
    return log_dir


def copy_run(trained, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(trained, target)
    return target


class CreatesAFile:
    """Unpickling this calls ``open(marker, "w")``: what a malicious checkpoint could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_state_that_would_run_code_is_refused_and_runs_nothing(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "marker"
    state = torch.load(run / "state000002.pt", weights_only=True)
    state["step"] = 3
    state["payload"] = CreatesAFile(str(marker))
    torch.save(state, run / "state000003.pt")
    with pytest.raises(dist_util.UnsafeCheckpointError, match=r"state000003\.pt .*--trust_checkpoint"):
        run_train(run, "--max_steps", "4")
    assert not marker.exists()
    for state_file in run.glob("state*.pt"):  # resume from improved-diffusion's files: they are checked too
        state_file.unlink()
    torch.save({"state": CreatesAFile(str(marker))}, run / "opt000002.pt")
    with pytest.raises(dist_util.UnsafeCheckpointError, match="opt000002"):
        run_train(run, "--resume_checkpoint", str(run / "model000002.pt"), "--max_steps", "4")
    assert not marker.exists()


def test_sample_and_nll_refuse_a_model_file_that_would_run_code(trained, tmp_path):
    from fastdiff import nll, sample

    run = copy_run(trained, tmp_path)
    marker = tmp_path / "marker"
    weights = torch.load(run / "model000002.pt", weights_only=True)
    torch.save({**weights, "payload": CreatesAFile(str(marker))}, run / "model000002.pt")
    arguments = ["--model_path", str(run / "model000002.pt"), "--num_samples", "1", "--batch_size", "1"]
    refused = r"--model_path: .*model000002.pt .*--trust_checkpoint"
    for entry_point in (sample, nll):
        with pytest.raises(dist_util.UnsafeCheckpointError, match=refused):
            entry_point.main([*arguments, "--out_dir", str(tmp_path)])
    assert not marker.exists()


def test_an_old_state_with_numpy_arrays_loads_only_when_trusted(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    state = torch.load(run / "state000002.pt", weights_only=True)
    for rng in state["rng"]:  # the version-1 layout: numpy's state as np.random.get_state() returns it
        saved = rng["numpy"]
        keys = saved["keys"].numpy().astype(np.uint32)
        rng["numpy"] = (saved["kind"], keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"])
    state["version"] = 1
    torch.save(state, run / "state000002.pt")
    with pytest.raises(dist_util.UnsafeCheckpointError, match="--trust_checkpoint"):
        run_train(run, "--max_steps", "3")
    assert run_train(run, "--max_steps", "3", "--trust_checkpoint", "True") == 0
    assert "resumed from" in (run / "log.txt").read_text()
    assert torch.load(run / "state000003.pt", weights_only=True)["version"] == STATE_VERSION


def test_truncated_newer_and_incomplete_states_are_named_and_nothing_loads(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    path = run / "state000002.pt"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(
        ValueError, match=r"state000002\.pt is not a readable checkpoint \(truncated or corrupt"
    ):
        run_train(run, "--max_steps", "3")
    state = torch.load(trained / "state000002.pt", weights_only=True)
    torch.save({**state, "version": 99}, path)
    with pytest.raises(ValueError, match=r"state000002\.pt has state format version 99"):
        run_train(run, "--max_steps", "3")
    del state["optimizer"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"state000002\.pt is incomplete: it lacks optimizer"):
        run_train(run, "--max_steps", "3")
    assert sorted(name.name for name in run.glob("state*.pt")) == ["state000002.pt"]


def test_a_failed_save_keeps_the_last_checkpoint_and_names_the_directory(trained, tmp_path, monkeypatch):
    run = copy_run(trained, tmp_path)
    real_save = torch.save

    def disk_full(obj, handle, *args, **kwargs):
        if "state000004" in getattr(handle, "name", ""):
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match=rf"in {run}: it needs about [\d,]+ bytes .*No space left"):
        run_train(run, "--max_steps", "4", "--save_interval", "100")
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert not list(run.glob("*.tmp.*")), "the temporary file is removed"
    assert sorted(name.name for name in run.glob("state*.pt")) == ["state000002.pt"]
    assert torch.load(run / "state000002.pt", weights_only=True)["step"] == 2
    assert run_train(run, "--max_steps", "3") == 0
    assert f"resumed from {run / 'state000002.pt'} at step 2" in (run / "log.txt").read_text()


# ---------------------------------------------------------------- 2 gloo ranks


def _read_on_two_ranks(rank: int, store_path: str, file_path: str, shared: bool, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        pieces, local_reads = [], []
        real_broadcast, real_local = dist.broadcast, dist_util._torch_load_local

        def recording_broadcast(tensor, src, *args, **kwargs):
            pieces.append(tensor.numel() * tensor.element_size())
            return real_broadcast(tensor, src, *args, **kwargs)

        def recording_local(path, trust):
            local_reads.append(path)
            return real_local(path, trust)

        dist.broadcast, dist_util._torch_load_local = recording_broadcast, recording_local
        path = file_path if shared or rank == 0 else os.path.join(out_dir, "not_on_this_node.pt")
        loaded = dist_util.load_file(path, chunk_bytes=4096)
        torch.save(
            {"loaded": loaded, "pieces": pieces, "local_reads": len(local_reads)},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist_util.destroy_group()


@pytest.mark.parametrize("shared", [True, False])
def test_two_ranks_read_a_checkpoint_larger_than_a_chunk(tmp_path, shared):
    generator = torch.Generator().manual_seed(0)
    original = {
        "big": torch.randn(3000, generator=generator),  # 12000 bytes: three pieces of <= 4096 bytes
        "nested": {"ints": torch.arange(7), "half": torch.randn(5, 3, generator=generator).half()},
        "flags": [torch.tensor(True), 3, "text", (1.5, None)],
    }
    file_path = str(tmp_path / "checkpoint.pt")
    torch.save(original, file_path)
    mp.spawn(_read_on_two_ranks, args=(str(tmp_path / "store"), file_path, shared, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        loaded = result["loaded"]
        assert torch.equal(loaded["big"], original["big"])
        assert torch.equal(loaded["nested"]["ints"], original["nested"]["ints"])
        assert torch.equal(loaded["nested"]["half"], original["nested"]["half"])
        assert loaded["flags"][1:] == [3, "text", (1.5, None)] and bool(loaded["flags"][0])
        if shared:
            assert result["local_reads"] == 1 and result["pieces"] == [], "each rank reads the file itself"
        else:
            assert result["local_reads"] == (1 if rank == 0 else 0), "rank 1 never opens the file"
            assert max(result["pieces"]) <= 4096 and sum(result["pieces"]) == 12000 + 7 * 8 + 15 * 2 + 1
