"""Issue 12's quality-parity figure: does training with fastdiff's kernels learn what eager PyTorch learns?

The embedded main job's model and data (``fastdiff.train``'s ``EMBEDDED_PROFILE``: 16x16 shapes,
class-conditional) is trained twice per seed, in one process each after the other, with the same seed, data
order, steps and noise:

* ``fastdiff``: the default kernels (``--kernels auto``: cpp on CPU, triton on CUDA);
* ``eager``: the fused norm and attention modules computing with improved-diffusion's eager code
  (``benchmarks.eager.eager_modules``, as in the end-to-end benchmark), ``--kernels torch``.

Every ``EVERY`` steps the EMA checkpoint is scored afterwards by ``fastdiff.evaluate`` (the same sampler,
``fastdiff.sample.generate`` with ``SAMPLING_STEPS`` respaced steps, and the same feature network for both
contestants) against the shapes dataset's statistics: FID and KID per checkpoint. Reported: each
contestant's final FID/KID per seed, their mean and seed-to-seed spread, training wall time (summed from
progress.csv's images/s), and the training time fastdiff takes to reach the eager run's mean final FID.
Reported into the run's data under ``"quality"``; never asserted.

It trains 2 x seeds models and samples thousands of images, hours on a CPU, so it runs only when asked for
with ``FASTDIFF_QUALITY=1``. Sizes come from the environment so that a reduced run is possible (defaults:
the embedded profile)::

    FASTDIFF_QUALITY=1 FASTDIFF_QUALITY_STEPS=1500 FASTDIFF_QUALITY_EVERY=250 FASTDIFF_QUALITY_SEEDS=3 \\
    FASTDIFF_QUALITY_SAMPLES=256 FASTDIFF_QUALITY_REF=1000 FASTDIFF_QUALITY_SAMPLING_STEPS=100 \\
        pytest benchmarks/test_bench_quality.py --benchmark-only
"""

import contextlib
import csv
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.eager import eager_modules
from benchmarks.machine import load_average
from benchmarks.session import BenchRun
from fastdiff import evaluate, train
from fastdiff.evaluation.features import reference_stats
from fastdiff.evaluation.inception import load_feature_network, verified_inception_path
from fastdiff.evaluation.sources import load_shapes

CONTESTANTS = ("fastdiff", "eager")


def _env_int(name: str, default: int) -> int:
    value = int(os.environ.get(f"FASTDIFF_QUALITY_{name}", default))
    if value <= 0:
        raise ValueError(f"FASTDIFF_QUALITY_{name} must be positive, got {value}")
    return value


def sizes() -> dict[str, int]:
    """The run's sizes (see the module docstring)."""
    profile = train.EMBEDDED_PROFILE
    return {
        "steps": _env_int("STEPS", profile["max_steps"]),
        "every": _env_int("EVERY", profile["sample_interval"]),
        "seeds": _env_int("SEEDS", 3),
        "samples": _env_int("SAMPLES", 256),
        "ref": _env_int("REF", 1000),
        "sampling_steps": _env_int("SAMPLING_STEPS", profile["preview_steps"]),
    }


@contextlib.contextmanager
def _eager_training():
    """Inside the block, fastdiff.train builds models whose fused modules compute with the eager code."""
    build = train.create_model_and_diffusion
    with contextlib.ExitStack() as stack:

        def eager_build(**flags):
            model, diffusion = build(**flags)
            stack.enter_context(eager_modules(model))
            return model, diffusion

        train.create_model_and_diffusion = eager_build
        try:
            yield
        finally:
            train.create_model_and_diffusion = build


def _train(contestant: str, seed: int, size: dict, log_dir: Path, device: str) -> list[tuple[int, float]]:
    """Train one run; returns (step, training seconds since the previous log line) from progress.csv."""
    argv = ["--seed", str(seed), "--max_steps", str(size["steps"]), "--save_interval", str(size["every"])]
    argv += ["--log_interval", str(min(size["every"], 50)), "--sample_interval", "0", "--eval_interval", "0"]
    argv += ["--keep_states", "1", "--log_dir", str(log_dir), "--device", device]
    argv += ["--kernels", "auto" if contestant == "fastdiff" else "torch"]
    with _eager_training() if contestant == "eager" else contextlib.nullcontext():
        assert train.main(argv) == 0
    with open(log_dir / "progress.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("images_per_s")]
    seconds, previous = [], 0
    batch = train.EMBEDDED_PROFILE["batch_size"]
    for row in rows:
        step = int(row["step"])
        seconds.append((step, (step - previous) * batch / float(row["images_per_s"])))
        previous = step
    return seconds


def _score(checkpoint: Path, stats: Path, seed: int, size: dict, device: str) -> dict:
    out = checkpoint.with_suffix(".json")
    argv = ["--ref", str(stats), "--samples", str(checkpoint), "--num_samples", str(size["samples"])]
    argv += [
        "--batch_size",
        str(min(size["samples"], 64)),
        "--timestep_respacing",
        str(size["sampling_steps"]),
    ]
    argv += ["--seed", str(seed), "--out", str(out), "--device", device, "--grid_samples", "0"]
    assert evaluate.main(argv) == 0
    return json.loads(out.read_text())


def _time_to(fids: list[tuple[int, float]], seconds: list[tuple[int, float]], target: float) -> float | None:
    """Training seconds until the first checkpoint whose FID is at most ``target`` (None: never)."""
    for step, fid in fids:
        if fid <= target:
            return sum(s for row_step, s in seconds if row_step <= step)
    return None


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def measure(size: dict, work: Path, device: str) -> dict:
    """Train and score every (contestant, seed); the record of the ``"quality"`` section."""
    stats = work / "shapes_stats.npz"
    network = load_feature_network("", device)
    shapes = load_shapes(size["ref"], train.EMBEDDED_PROFILE["image_size"])
    one_rank = SimpleNamespace(rank=0, world_size=1, is_main=True)
    reference_stats(network, shapes.images, shapes.labels, one_rank).save(str(stats))
    runs: dict[str, list[dict]] = {name: [] for name in CONTESTANTS}
    for seed in range(size["seeds"]):
        for contestant in CONTESTANTS:
            log_dir = work / f"{contestant}_seed{seed}"
            started = time.perf_counter()
            seconds = _train(contestant, seed, size, log_dir, device)
            wall = time.perf_counter() - started
            fids = []
            for step in range(size["every"], size["steps"] + 1, size["every"]):
                checkpoint = log_dir / f"ema_{train.EMBEDDED_PROFILE['ema_rate']}_{step:06d}.pt"
                result = _score(checkpoint, stats, seed, size, device)
                fids.append((step, result["fid"], result["kid"]))
            runs[contestant].append(
                {
                    "seed": seed,
                    "wall_s": wall,
                    "train_s": sum(s for _, s in seconds),
                    "curve": fids,
                    "step_seconds": seconds,
                }
            )
    eager_final = statistics.fmean(run["curve"][-1][1] for run in runs["eager"])
    summary = {}
    for contestant, items in runs.items():
        reach = [_time_to([(s, f) for s, f, _ in r["curve"]], r["step_seconds"], eager_final) for r in items]
        summary[contestant] = {
            "final_fid": _spread([r["curve"][-1][1] for r in items]),
            "final_kid": _spread([r["curve"][-1][2] for r in items]),
            "train_s": _spread([r["train_s"] for r in items]),
            "time_to_eager_final_fid_s": reach,
        }
    fd, eg = summary["fastdiff"]["final_fid"], summary["eager"]["final_fid"]
    return {
        "sizes": size,
        "device": device,
        "load_after": load_average(),
        "eager_final_fid_mean": eager_final,
        "fastdiff_within_eager_spread": abs(fd["mean"] - eg["mean"]) <= max(2 * eg["std"], 1e-12),
        "summary": summary,
        "runs": {
            name: [{k: v for k, v in r.items() if k != "step_seconds"} for r in items]
            for name, items in runs.items()
        },
    }


def test_quality_parity(benchmark, bench: BenchRun, tmp_path):
    if os.environ.get("FASTDIFF_QUALITY") != "1":
        pytest.skip("the quality-parity benchmark trains for hours on a CPU: FASTDIFF_QUALITY=1 runs it")
    try:
        verified_inception_path()
    except ValueError as error:
        pytest.skip(str(error))
    size = sizes()
    benchmark.group = "quality parity: embedded job, fastdiff kernels vs eager"
    device = bench.settings.device.type
    record = {}
    benchmark.pedantic(lambda: record.update(measure(size, tmp_path, device)), rounds=1, iterations=1)
    bench.data["quality"] = record
    benchmark.extra_info.update(
        fastdiff_final_fid=record["summary"]["fastdiff"]["final_fid"]["mean"],
        eager_final_fid=record["summary"]["eager"]["final_fid"]["mean"],
    )
