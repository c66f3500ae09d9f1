"""``fastdiff.evaluate`` under torchrun (two gloo processes): each rank extracts its share of the features,
and the gathered result equals one process's."""

import json
import sys

import numpy as np
import pytest
from test_eval_inception import require_inception
from test_train_ddp import run_isolated
from tiny_run import one_thread  # noqa: F401 (one_thread: an autouse fixture)

from fastdiff import evaluate
from fastdiff.evaluation.sources import load_shapes


def test_two_ranks_share_the_extraction_and_agree_with_one_process(tmp_path):
    require_inception()
    found = load_shapes(3, 16, seed=5)
    np.savez(tmp_path / "samples.npz", found.images)
    argv = ["--ref", "shapes", "--num_ref", "3", "--samples", str(tmp_path / "samples.npz")]
    argv += ["--kid_subsets", "2", "--pr_k", "1", "--device", "cpu"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "fastdiff.evaluate", *argv, "--out", str(tmp_path / "two.json")]
    command += ["--save_ref_stats", str(tmp_path / "ref.npz")]
    result = run_isolated(command, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count('"fid"') == 1, "rank 0 alone prints the result"
    two = json.loads((tmp_path / "two.json").read_text())
    assert evaluate.main([*argv, "--out", str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert one.keys() == two.keys() and one["num_samples"] == 3
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
