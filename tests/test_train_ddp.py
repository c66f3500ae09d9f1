"""Two processes under torchrun (gloo): ranks stay identical, and match one process on the same global batch.

Run as a script under torchrun, this file is the worker: it trains with ``fastdiff.train.main`` and, after
the loop, rank 0 saves every rank's flattened parameters; then it samples with ``fastdiff.sample.main``.
"""

import csv
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_run import TINY_RUN_ARGV, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from fastdiff.diffusion.data_moments import MOMENTS_FILENAME, DataMoments

TINY = [
    *TINY_RUN_ARGV,
    "--num_workers", "0",
    "--log_interval", "1",
    "--sample_interval", "0",
    "--class_cond", "True",
    "--schedule_sampler", "loss-second-moment",
    "--max_steps", "3",
    "--save_interval", "3",
    "--lr", "1e-3",
]  # fmt: skip


def record_first_gradients(loop_class, path_pattern: str) -> None:
    """Patch the loop so the gradients of step 0 (as the optimizer gets them) are saved, per rank."""
    original_step = loop_class._optimizer_step

    def step_and_record(self):
        if self.step == 0:
            gradients = torch.cat([param.grad.reshape(-1) for param in self.model.parameters()])
            torch.save(gradients, path_pattern.format(rank=self.ctx.rank))
        return original_step(self)

    loop_class._optimizer_step = step_and_record


def record_the_fit(train, out_dir: str) -> None:
    """Patch ``train`` so each rank notes when it measures the data's fit, and saves the fit it previews
    with."""
    from fastdiff.diffusion.data_moments import DataMoments

    measure, build_previews = DataMoments.measure.__func__, train.build_previews

    def measure_and_note(cls, *args, **kwargs):
        open(os.path.join(out_dir, f"measured_on_rank{torch.distributed.get_rank()}"), "w").close()
        return measure(cls, *args, **kwargs)

    def build_and_record(config, model, data_moments=None):
        torch.save(data_moments, os.path.join(out_dir, f"fit_rank{torch.distributed.get_rank()}.pt"))
        return build_previews(config, model, data_moments)

    DataMoments.measure = classmethod(measure_and_note)
    train.build_previews = build_and_record


def _worker(out_dir: str, train_args: list[str]) -> int:
    """Train under torchrun, record every rank's parameters, then sample a few images on both ranks.

    The worker owns the process group, so both entry points run in it (each one alone would create its own).
    """
    from fastdiff import dist_util, nll, sample, train
    from fastdiff.training.loop import TrainLoop

    torch.distributed.init_process_group("gloo")

    original_run = TrainLoop.run
    record_first_gradients(TrainLoop, os.path.join(out_dir, "first_gradients_rank{rank}.pt"))

    def run_and_record(self):
        step = original_run(self)
        flat = torch.cat([param.detach().reshape(-1) for param in self.model.parameters()])
        gathered = dist_util.all_gather_object(flat)
        if self.ctx.is_main:
            torch.save(gathered, os.path.join(out_dir, "params_by_rank.pt"))
        return step

    TrainLoop.run = run_and_record
    record_the_fit(train, out_dir)
    code = train.main(train_args)
    log_dir = train_args[train_args.index("--log_dir") + 1]
    sample_args = ["--model_path", os.path.join(log_dir, "ema_0.9999_000003.pt"), "--num_samples", "5"]
    sample_args += ["--batch_size", "2", "--use_ddim", "True", "--timestep_respacing", "ddim5"]
    code = code or sample.main([*sample_args, "--out_dir", out_dir])
    nll_args = [
        "--model_path",
        os.path.join(log_dir, "model000003.pt"),
        "--num_samples",
        "4",
        "--batch_size",
        "1",
    ]
    code = code or nll.main([*nll_args, "--out_dir", out_dir])
    dist_util.destroy_group()
    return code


def run_isolated(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` in its own session; on timeout, kill the whole group (torchrun and its workers)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    command += [
        str(out),
        *TINY,
        "--global_batch_size",
        "4",
        "--microbatch",
        "1",
        "--log_dir",
        str(out / "log"),
    ]
    result = run_isolated(command, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_parameters_are_identical_on_every_rank(two_process_run):
    out, output = two_process_run
    rank0, rank1 = torch.load(out / "params_by_rank.pt")
    assert torch.equal(rank0, rank1)
    assert "training on 2 process(es)" in output and "batch 2 per rank / 4 global (microbatch 1)" in output


def test_one_process_with_the_same_global_batch_makes_the_same_update(two_process_run, tmp_path, monkeypatch):
    """Same gradients (microbatches and DDP average to the batch mean), same data, same sampler state."""
    from fastdiff import train
    from fastdiff.training.loop import TrainLoop

    out, _ = two_process_run
    monkeypatch.setattr(TrainLoop, "_optimizer_step", TrainLoop._optimizer_step)
    record_first_gradients(TrainLoop, str(tmp_path / "first_gradients.pt"))
    assert train.main([*TINY, "--batch_size", "4", "--log_dir", str(tmp_path)]) == 0
    single_gradients = torch.load(tmp_path / "first_gradients.pt")
    for rank in (0, 1):
        ddp_gradients = torch.load(out / f"first_gradients_rank{rank}.pt")
        torch.testing.assert_close(ddp_gradients, single_gradients, rtol=1e-4, atol=1e-7)
    assert single_gradients.abs().max() > 1e-3
    two = torch.load(out / "log" / "model000003.pt", weights_only=True)
    one = torch.load(tmp_path / "model000003.pt", weights_only=True)
    for key, value in one.items():  # Adam turns rounding noise in tiny gradients into up to lr per step
        torch.testing.assert_close(two[key], value, rtol=0, atol=3 * 1e-3, msg=key)
    with (
        open(out / "log" / "progress.csv", newline="") as two_file,
        open(tmp_path / "progress.csv") as one_file,
    ):
        two_rows, one_rows = list(csv.DictReader(two_file)), list(csv.DictReader(one_file))
    for key in ("loss", "mse", "grad_norm"):  # logged metrics are averages over every rank's samples
        assert float(two_rows[0][key]) == pytest.approx(float(one_rows[0][key]), rel=1e-5)
    state_two = torch.load(out / "log" / "state000003.pt", weights_only=False)
    state_one = torch.load(tmp_path / "state000003.pt", weights_only=False)
    assert state_two["data"] == state_one["data"]
    torch.testing.assert_close(
        state_two["schedule_sampler"]["loss_history"], state_one["schedule_sampler"]["loss_history"]
    )


def test_the_main_process_alone_measures_the_fit_and_every_rank_gets_it(two_process_run):
    out, _ = two_process_run
    assert (out / "measured_on_rank0").is_file() and not (out / "measured_on_rank1").exists()
    fits = [torch.load(out / f"fit_rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for name in ("mean", "directions", "variances"):
        assert torch.equal(getattr(fits[0], name), getattr(fits[1], name))
    assert fits[1].count == fits[0].count > 2 and fits[1].residual_variance == fits[0].residual_variance
    written = DataMoments.load(str(out / "log" / MOMENTS_FILENAME))
    torch.testing.assert_close(written.mean, fits[0].mean)


def test_metrics_are_logged_once_per_step(two_process_run):
    out, _ = two_process_run
    with open(out / "log" / "progress.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(float(row["step"])) for row in rows] == [1, 2, 3]
    assert all(float(row["samples"]) == 4 * int(float(row["step"])) for row in rows)


def test_sampling_gathers_every_ranks_share(two_process_run):
    out, _ = two_process_run
    arrays = np.load(out / "samples_5x8x8x3.npz")
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (5, 8, 8, 3)
    assert arrays["arr_1"].shape == (5,) and set(arrays["arr_1"].tolist()) <= {0, 1, 2, 3}
    assert not np.array_equal(arrays["arr_0"][0], arrays["arr_0"][2]), "ranks must draw different samples"


def test_bits_per_dim_are_averaged_over_ranks(two_process_run):
    out, output = two_process_run
    assert "done 2 samples" in output and "done 4 samples" in output
    bpd = float(output.split("bits/dim ")[1].split()[0])
    assert 0 < bpd < 100
    assert np.load(out / "vb_terms.npz")["arr_0"].shape == (50,)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2:]))
