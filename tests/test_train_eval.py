"""Sample quality during training: metrics in progress.csv, the best EMA checkpoint, resume keeps the best."""

import csv
import json
import os
from types import SimpleNamespace

import pytest
import torch
from test_eval_inception import require_inception
from tiny_run import TINY_RUN_ARGV, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from fastdiff import train
from fastdiff.builders import build_diffusion
from fastdiff.data import build_dataset
from fastdiff.evaluation import inception

EVAL = ["--eval_interval", "2", "--eval_samples", "4", "--eval_ref", "4", "--preview_steps", "3"]
RUN = ["--batch_size", "2", "--save_interval", "2", "--sample_interval", "0", "--num_workers", "0"]


def _rows(log_dir) -> list[dict]:
    with open(log_dir / "progress.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("eval_fid")]


def test_training_scores_ema_samples_keeps_the_best_and_resume_keeps_it(tmp_path):
    require_inception()
    log_dir = tmp_path / "run"
    argv = [*TINY_RUN_ARGV, *RUN, *EVAL, "--class_cond", "True", "--log_dir", str(log_dir)]
    assert train.main([*argv, "--max_steps", "2"]) == 0
    rows = _rows(log_dir)
    assert [row["step"] for row in rows] == ["2"]
    fid = float(rows[0]["eval_fid"])
    assert fid > 0 and 0 <= float(rows[0]["eval_precision"]) <= 1 and rows[0]["eval_kid"]
    assert (log_dir / "fid_reference_8px_4.npz").exists(), "reference statistics cached in the log dir"
    best = json.loads((log_dir / "ema_0.9999_best.json").read_text())
    assert best["step"] == 2 and best["fid"] == pytest.approx(fid, rel=1e-6)
    best_weights = torch.load(log_dir / "ema_0.9999_best.pt", weights_only=True)
    ema_weights = torch.load(log_dir / "ema_0.9999_000002.pt", weights_only=True)
    assert all(torch.equal(best_weights[name], ema_weights[name]) for name in ema_weights)

    # A best FID no later step can beat: the resumed run must keep it (and its weights) untouched.
    best["fid"] = 0.0
    (log_dir / "ema_0.9999_best.json").write_text(json.dumps(best))
    stamp = os.stat(log_dir / "ema_0.9999_best.pt").st_mtime_ns
    assert train.main([*argv, "--max_steps", "4"]) == 0
    assert [row["step"] for row in _rows(log_dir)] == ["2", "4"]
    assert json.loads((log_dir / "ema_0.9999_best.json").read_text()) == best
    assert os.stat(log_dir / "ema_0.9999_best.pt").st_mtime_ns == stamp


def test_eval_interval_without_the_feature_network_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(inception, "PACKAGE", "fastdiff_no_such_package")
    log_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="--eval_interval 2: the FID feature network is not installed"):
        train.main([*TINY_RUN_ARGV, *RUN, *EVAL, "--max_steps", "2", "--log_dir", str(log_dir)])
    assert not list(log_dir.glob("*.pt")), "nothing was trained"
    with pytest.raises(ValueError, match="at least 4 reference images"):
        train.main([*TINY_RUN_ARGV, *RUN, *EVAL, "--eval_ref", "1", "--log_dir", str(tmp_path)])


def test_the_embedded_profile_trains_without_evaluation_when_the_network_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(inception, "PACKAGE", "fastdiff_no_such_package")
    config, given = train.parse_args([])
    assert config.evaluation.eval_interval == config.train.sample_interval and "eval_interval" not in given
    previews = (build_diffusion(config.diffusion, "10"), {"sampler": "ddim"})
    ctx = SimpleNamespace(rank=0, world_size=1, is_main=True, device=torch.device("cpu"))
    dataset = build_dataset("", config.model.image_size, class_cond=config.model.class_cond)
    assert train.build_evaluation(config, given, None, previews, dataset, None, ctx) is None
    assert (
        "note: no sample-quality evaluation (the FID feature network is not installed"
        in capsys.readouterr().out
    )
