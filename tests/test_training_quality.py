"""The quality benchmarks' bookkeeping (benchmarks.training_quality): time to a FID, spread, parity verdict.

The training and scoring themselves are fastdiff.train and fastdiff.evaluate, tested elsewhere; this checks
the arithmetic that turns their outputs into the reported figures.
"""

import json

import pytest

from benchmarks import training_quality
from benchmarks.training_quality import VARIANTS, measure, run_one, spread, summarize, time_to

SECONDS = [(100, 10.0), (200, 20.0), (300, 30.0)]  # (step, training seconds since the previous log line)


def test_time_to_interpolates_between_scored_steps():
    curve = [(100, 300.0, 0.3), (200, 200.0, 0.2), (300, 150.0, 0.1)]
    assert time_to(curve, SECONDS, 300.0) == pytest.approx(10.0)  # reached at the first score
    assert time_to(curve, SECONDS, 250.0) == pytest.approx(10.0 + 10.0)  # halfway from step 100 to 200
    assert time_to(curve, SECONDS, 175.0) == pytest.approx(30.0 + 15.0)  # halfway from step 200 to 300
    assert time_to(curve, SECONDS, 150.0) == pytest.approx(60.0)
    assert time_to(curve, SECONDS, 149.0) is None  # never reached


def test_spread():
    assert spread([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}
    assert spread([5.0])["std"] == 0.0


def _run(variant, seed, final_fid, train_s=60.0):
    return {
        "variant": variant, "seed": seed, "train_s": train_s, "step_seconds": SECONDS,
        "curve": [(100, final_fid + 100.0, 0.2), (300, final_fid, 0.1)],
    }  # fmt: skip


def test_summarize_parity_verdict_and_paired_figures():
    eager = [_run("eager", 0, 100.0), _run("eager", 1, 110.0), _run("eager", 2, 120.0)]  # mean 110, std 10
    close = summarize([*eager, _run("fastdiff", 0, 99.0, 50.0), _run("fastdiff", 1, 125.0)])
    assert close["variants"]["eager"]["final_fid"]["mean"] == pytest.approx(110.0)
    assert close["variants"]["fastdiff"]["seeds"] == [0, 1]
    parity = close["parity"]
    assert parity["fastdiff_within_eager_spread"] is True  # |112 - 110| <= 2 * 10
    assert parity["eager_final_fid_std"] == pytest.approx(10.0)
    first, second = parity["paired"]  # only the seeds both contestants ran
    assert first["seed"] == 0 and first["fid_difference"] == pytest.approx([-1.0, -1.0])
    assert first["eager_over_fastdiff_train_s"] == pytest.approx(60.0 / 50.0)
    # fastdiff seed 0's curve (199 at step 100, 99 at 300) reaches eager seed 0's 100 at step 298
    assert first["fastdiff_s_to_eager_final_fid"] == pytest.approx(30.0 + 30.0 * 98 / 100)
    assert second["fid_difference"] == pytest.approx([15.0, 15.0])
    assert second["fastdiff_s_to_eager_final_fid"] is None  # 125 never reaches 110
    assert parity["largest_paired_fid_difference"] == pytest.approx(15.0)
    far = summarize([*eager, _run("fastdiff", 0, 131.0)])
    assert far["parity"]["fastdiff_within_eager_spread"] is False  # |131 - 110| > 20
    assert "parity" not in summarize([_run("predict_v", 0, 90.0)])


def test_measure_rejects_unknown_variants(tmp_path):
    with pytest.raises(ValueError, match="variants must be among"):
        measure(["fastdiff", "predict_x"], {}, tmp_path, "cpu")
    assert VARIANTS["zero_terminal_snr_v"] == ["--rescale_zero_terminal_snr", "True", "--predict_v", "True"]


def test_a_finished_run_is_not_trained_again(tmp_path, monkeypatch):
    """run_one returns a run's saved record when the sizes match (the seed count aside), so a stopped
    sweep resumes, and a sweep with more seeds reuses the runs it shares with an earlier one."""
    size = {"steps": 30, "every": 10, "samples": 8, "ref": 16}
    folder = tmp_path / "predict_v_seed1"
    folder.mkdir()
    saved = {**_run("predict_v", 1, 90.0), "size": {**size, "seeds": 2}}
    (folder / "record.json").write_text(json.dumps(saved))
    job = ("predict_v", 1, {**size, "seeds": 3}, str(tmp_path), "cpu", 1)
    trained = []
    monkeypatch.setattr(training_quality, "_train", lambda *args: trained.append(args) or 1 / 0)
    assert run_one(job) == json.loads(json.dumps(saved)) and not trained
    with pytest.raises(ZeroDivisionError):  # other sizes: it trains again
        run_one(("predict_v", 1, {**size, "steps": 60, "seeds": 3}, str(tmp_path), "cpu", 1))
    assert len(trained) == 1
