"""The data wait: how long each training step blocks on its batch, in progress.csv and the status line."""

import csv
import time

import pytest
import torch
from tiny_run import one_thread, tiny_loop  # noqa: F401 (one_thread: an autouse fixture)

from fastdiff import dist_util
from fastdiff.data import BatchStream, ShapesDataset
from fastdiff.training.reporters import format_status

DELAY = 0.03
"""Seconds the slow dataset sleeps per item."""
BATCH = 4


class SlowShapes(ShapesDataset):
    """The shapes dataset, ``delay`` seconds slower per item (a loader that cannot keep up)."""

    def __init__(self, delay: float) -> None:
        super().__init__(8, length=64)
        self.delay = delay

    def __getitem__(self, key):
        time.sleep(self.delay)
        return super().__getitem__(key)


@pytest.fixture(scope="module")
def ctx():
    context = dist_util.setup_dist("cpu")
    yield context
    dist_util.cleanup_dist()


def _train(ctx, log_dir, delay: float) -> list[dict[str, str]]:
    loop = tiny_loop(ctx, log_dir, batch=BATCH, max_steps=4, log_interval=2, save_interval=100,
                     sample_interval=0)  # fmt: skip
    loop.data = BatchStream(SlowShapes(delay), BATCH, seed=0)
    loop.run()
    with open(log_dir / "progress.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_slow_dataset_shows_in_the_data_wait(ctx, tmp_path):
    slow = _train(ctx, tmp_path / "slow", DELAY)
    fast = _train(ctx, tmp_path / "fast", 0.0)
    assert [row["step"] for row in slow] == ["2", "4"]
    for slow_row, fast_row in zip(slow, fast, strict=True):
        slow_wait, fast_wait = float(slow_row["data_wait_ms"]), float(fast_row["data_wait_ms"])
        assert slow_wait >= 1000 * DELAY * BATCH  # every item of the batch slept in this process
        assert slow_wait - fast_wait >= 0.9 * 1000 * DELAY * BATCH
        assert 0.0 < float(fast_row["data_wait_share"]) < float(slow_row["data_wait_share"]) <= 1.0
    log = (tmp_path / "slow" / "log.txt").read_text()
    assert "ms/step" in log and "data wait" in log


def test_status_line_shows_the_wait_and_its_share():
    line = format_status({"step": 10, "images_per_s": 50.0, "data_wait_ms": 12.34, "data_wait_share": 0.256})
    assert "50.0 img/s | data wait 12.3 ms/step (26%)" in line


def test_the_wait_is_averaged_over_ranks_and_steps(ctx, tmp_path):
    loop = tiny_loop(ctx, tmp_path, batch=BATCH)
    loop.data_wait = 0.3  # three steps of 100 ms
    with torch.no_grad():
        values = loop.log(steps=3, seconds=0.6)
    assert values["data_wait_ms"] == pytest.approx(100.0)
    assert values["data_wait_share"] == pytest.approx(0.5)
    assert loop.data_wait == 0.0
