"""torchrun --max-restarts: a worker killed after the first checkpoint restarts, resumes, ends bit-identical.

Run as a script under torchrun, this file is the worker: it trains with ``fastdiff.train.main``; in the
first attempt (``TORCHELASTIC_RESTART_COUNT`` 0) with ``--kill`` given, rank 1 SIGKILLs itself right after
the first checkpoint is written, as a lost process would.
"""

import os
import signal
import sys

import torch
from test_train_ddp import TINY, run_isolated
from test_train_resume import assert_identical
from tiny_run import one_thread  # noqa: F401 (one_thread: an autouse fixture)

ARGS = [*TINY, "--max_steps", "6", "--save_interval", "3", "--global_batch_size", "4", "--dropout", "0.1"]


def _worker(argv: list[str]) -> int:
    from fastdiff import train
    from fastdiff.training.loop import TrainLoop

    kill = argv[0] == "--kill"
    if kill and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ["RANK"] == "1":
        original_save = TrainLoop.save

        def save_then_die(self):
            original_save(self)
            os.kill(os.getpid(), signal.SIGKILL)

        TrainLoop.save = save_then_die
    return train.main(argv[1:])


def _torchrun(log_dir, kill: bool):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [
        "--max-restarts=1",
        __file__,
        "--kill" if kill else "--no-kill",
        *ARGS,
        "--log_dir",
        str(log_dir),
    ]
    result = run_isolated(command, timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_a_killed_worker_restarts_and_the_run_ends_bit_identical(tmp_path):
    killed = _torchrun(tmp_path / "killed", kill=True)
    assert "exitcode: -9" in killed.stderr, "rank 1 was killed and the group restarted"
    log = (tmp_path / "killed" / "log.txt").read_text()
    assert f"resumed from {tmp_path / 'killed' / 'state000003.pt'} at step 3" in log
    _torchrun(tmp_path / "straight", kill=False)
    for name in ("model000006.pt", "ema_0.9999_000006.pt", "opt000006.pt", "state000006.pt"):
        assert_identical(tmp_path / "straight" / name, tmp_path / "killed" / name)
    state = torch.load(tmp_path / "killed" / "state000006.pt", weights_only=True)
    assert state["step"] == 6 and state["world_size"] == 2


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
