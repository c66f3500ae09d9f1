"""Variants of the embedded main job, trained per seed and scored by FID/KID against the shapes data.

One machinery serves two figures:

* issue 12's quality parity: ``fastdiff`` (the default kernels: cpp on CPU, triton on CUDA) against
  ``eager`` (the same UNet whose fused modules compute with improved-diffusion's eager code,
  ``fastdiff.selftest.eager.eager_modules``, ``--kernels torch``): FID within the eager run's seed-to-seed
  spread and, paired by seed, the FID difference at every save and the training time fastdiff needs to reach
  that seed's eager final FID;
* issue 13's training objectives: ``predict_v``, ``min_snr_5`` (``--snr_gamma 5``),
  ``zero_terminal_snr_v`` (``--rescale_zero_terminal_snr`` with v-prediction, which it needs: with
  alpha_T = 0 an epsilon model cannot predict x_0 at the first step) and ``ema_warmup`` against the
  default objective (the ``fastdiff`` runs).

Every run trains ``fastdiff.train``'s ``EMBEDDED_PROFILE`` (16x16 shapes, class-conditional, 1500 steps) with
one seed (same data order and noise for every variant of a seed), in a fresh process. Its EMA checkpoints are
sampled by ``fastdiff.evaluate`` (``SAMPLER``, the same starting noise per seed) and scored against the
statistics of ``--ref`` shapes images with the same feature network. The parity contestants are scored at
every save (the curve gives the time to a FID, linearly interpolated between saves); the others at the end.

``--jobs 2`` runs two processes side by side with ``--threads`` each (on a 2-core CPU: 1 thread each gives
about 20% more throughput than one process on both cores); runs are queued seed by seed, so a seed's
``fastdiff`` and ``eager`` share the machine alike and their wall times stay comparable.

    python -m benchmarks.training_quality --variants fastdiff,eager --seeds 3 --jobs 2 \\
        --out benchmarks/results/quality_parity.json
"""

import argparse
import contextlib
import csv
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

VARIANTS: dict[str, list[str]] = {
    "fastdiff": [],
    "eager": [],
    "predict_v": ["--predict_v", "True"],
    "min_snr_5": ["--snr_gamma", "5"],
    "zero_terminal_snr_v": ["--rescale_zero_terminal_snr", "True", "--predict_v", "True"],
    "ema_warmup": ["--ema_warmup", "True"],
}
PARITY = ("fastdiff", "eager")
SAMPLER = ["--sampler", "ddim", "--steps", "50"]


def default_sizes() -> dict[str, int]:
    """The embedded profile's steps and save interval, and the scoring sizes."""
    from fastdiff import train

    profile = train.EMBEDDED_PROFILE
    return {"steps": profile["max_steps"], "every": 500, "seeds": 3, "samples": 128, "ref": 1000}


def eager_model_factory(stack: contextlib.ExitStack):
    """A ``fastdiff.train.main(..., model_factory=...)`` whose models compute their fused modules with the
    eager code for as long as ``stack`` is open."""
    from fastdiff.builders import build_model
    from fastdiff.selftest.eager import eager_modules

    def build(model_config, diffusion_config):
        model = build_model(model_config, diffusion_config)
        stack.enter_context(eager_modules(model))
        return model

    return build


def _train(variant: str, seed: int, size: dict, log_dir: Path, device: str) -> list[tuple[int, float]]:
    """Train one run; (step, training seconds since the previous log line) from its progress.csv."""
    from fastdiff import train

    argv = ["--seed", str(seed), "--max_steps", str(size["steps"]), "--save_interval", str(size["every"])]
    argv += ["--log_interval", str(min(size["every"], 50)), "--sample_interval", "0", "--eval_interval", "0"]
    argv += ["--keep_states", "1", "--log_dir", str(log_dir), "--device", device]
    argv += ["--kernels", "torch" if variant == "eager" else "auto", *VARIANTS[variant]]
    with contextlib.ExitStack() as stack:
        factory = {"model_factory": eager_model_factory(stack)} if variant == "eager" else {}
        if train.main(argv, **factory) != 0:
            raise RuntimeError(f"training {variant} seed {seed} failed: fastdiff.train {' '.join(argv)}")
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
    """fastdiff.evaluate's result for ``size["samples"]`` samples of ``checkpoint``."""
    from fastdiff import evaluate

    out = checkpoint.with_suffix(".json")
    argv = ["--ref", str(stats), "--samples", str(checkpoint), "--num_samples", str(size["samples"])]
    argv += ["--batch_size", str(min(size["samples"], 128)), *SAMPLER, "--seed", str(seed)]
    argv += [
        "--out",
        str(out),
        "--out_dir",
        str(checkpoint.parent),
        "--device",
        device,
        "--grid_samples",
        "0",
    ]
    if evaluate.main(argv) != 0:
        raise RuntimeError(f"scoring {checkpoint} failed: fastdiff.evaluate {' '.join(argv)}")
    return json.loads(out.read_text())


def _per_run_size(size: dict) -> dict:
    """The sizes one run depends on: all but the sweep's number of seeds."""
    return {name: value for name, value in size.items() if name != "seeds"}


def run_one(job: tuple[str, int, dict, str, str, int]) -> dict:
    """Train and score one (variant, seed) in this process: its record (curve of (step, fid, kid)).

    The record is saved in the run's folder; a later call with the same sizes (the number of seeds aside)
    returns it instead of training again."""
    variant, seed, size, work, device, threads = job
    import torch

    from fastdiff import train

    log_dir = Path(work) / f"{variant}_seed{seed}"
    saved = log_dir / "record.json"
    per_run = _per_run_size(size)
    if saved.exists():
        record = json.loads(saved.read_text())
        if _per_run_size(record["size"]) == per_run:
            return record
    torch.set_num_threads(threads)
    started = time.perf_counter()
    seconds = _train(variant, seed, size, log_dir, device)
    wall = time.perf_counter() - started
    steps = range(size["every"], size["steps"] + 1, size["every"]) if variant in PARITY else [size["steps"]]
    curve = []
    for step in steps:
        checkpoint = log_dir / f"ema_{train.EMBEDDED_PROFILE['ema_rate']}_{step:06d}.pt"
        result = _score(checkpoint, Path(work) / "shapes_stats.npz", seed, size, device)
        curve.append((step, result["fid"], result["kid"]))
    print(f"[training_quality] {variant} seed {seed}: {curve[-1]} wall {wall:.0f} s", flush=True)
    record = {
        "variant": variant,
        "seed": seed,
        "size": per_run,
        "wall_s": wall,
        "threads": threads,
        "train_s": sum(s for _, s in seconds),
        "curve": curve,
        "step_seconds": seconds,
    }
    saved.write_text(json.dumps(record))
    return record


def time_to(curve: list[tuple[int, float, float]], seconds: list[tuple[int, float]], target: float):
    """Training seconds until the FID curve, linear between scored steps, first reaches ``target``."""

    def elapsed(step: float) -> float:
        total, previous = 0.0, 0
        for row_step, s in seconds:
            total += s * max(0.0, min(step, row_step) - previous) / (row_step - previous)
            previous = row_step
        return total

    previous_step, previous_fid = None, None
    for step, fid, _ in curve:
        if fid <= target:
            if previous_fid is None:
                return elapsed(step)
            crossing = previous_step + (step - previous_step) * (previous_fid - target) / (previous_fid - fid)
            return elapsed(crossing)
        previous_step, previous_fid = step, fid
    return None


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def reference_statistics(size: dict, work: Path, device: str) -> Path:
    """The shapes dataset's feature statistics (``size["ref"]`` images), computed once into ``work``."""
    from fastdiff import train
    from fastdiff.evaluation.features import reference_stats
    from fastdiff.evaluation.inception import load_feature_network
    from fastdiff.evaluation.sources import load_shapes

    path = work / "shapes_stats.npz"
    if not path.exists():
        network = load_feature_network("", device)
        shapes = load_shapes(size["ref"], train.EMBEDDED_PROFILE["image_size"])
        one_rank = SimpleNamespace(rank=0, world_size=1, is_main=True)
        reference_stats(network, shapes.images, shapes.labels, one_rank).save(str(path))
    return path


def summarize(runs: list[dict]) -> dict:
    """Per variant: final FID/KID and training time over seeds. When both parity contestants ran, the
    verdict (fastdiff's mean final FID within two of eager's seed-to-seed standard deviations) and, per
    seed (same data order and noise), fastdiff's FID minus eager's at every scored step, eager's training
    time over fastdiff's, and fastdiff's training seconds to reach that seed's eager final FID."""
    by_variant: dict[str, list[dict]] = {}
    for run in sorted(runs, key=lambda r: (r["variant"], r["seed"])):
        by_variant.setdefault(run["variant"], []).append(run)
    summary: dict = {"variants": {}}
    for variant, items in by_variant.items():
        summary["variants"][variant] = {
            "seeds": [r["seed"] for r in items],
            "final_fid": spread([r["curve"][-1][1] for r in items]),
            "final_kid": spread([r["curve"][-1][2] for r in items]),
            "train_s": spread([r["train_s"] for r in items]),
        }
    if all(name in by_variant for name in PARITY):
        fd, eg = summary["variants"]["fastdiff"]["final_fid"], summary["variants"]["eager"]["final_fid"]
        eager = {run["seed"]: run for run in by_variant["eager"]}
        paired = []
        for run in by_variant["fastdiff"]:
            if run["seed"] not in eager:
                continue
            other = eager[run["seed"]]
            target = other["curve"][-1][1]
            paired.append(
                {
                    "seed": run["seed"],
                    "steps": [step for step, _, _ in run["curve"]],
                    "fid_difference": [
                        a[1] - b[1] for a, b in zip(run["curve"], other["curve"], strict=True)
                    ],
                    "eager_over_fastdiff_train_s": other["train_s"] / run["train_s"],
                    "eager_final_fid": target,
                    "fastdiff_s_to_eager_final_fid": time_to(run["curve"], run["step_seconds"], target),
                    "eager_train_s": other["train_s"],
                }
            )
        summary["parity"] = {
            "fastdiff_within_eager_spread": abs(fd["mean"] - eg["mean"]) <= max(2 * eg["std"], 1e-12),
            "eager_final_fid_std": eg["std"],
            "largest_paired_fid_difference": max(abs(d) for p in paired for d in p["fid_difference"]),
            "paired": paired,
        }
    return summary


def measure(
    variants: Sequence[str], size: dict, work: Path, device: str, jobs: int = 1, threads: int = 0
) -> dict:
    """Train and score every (variant, seed), seed by seed; the runs and their summary."""
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ValueError(f"variants must be among {sorted(VARIANTS)}, got {unknown}")
    from benchmarks.machine import load_average

    work.mkdir(parents=True, exist_ok=True)
    reference_statistics(size, work, device)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    queue = [
        (name, seed, size, str(work), device, threads) for seed in range(size["seeds"]) for name in variants
    ]
    if jobs == 1:
        runs = [run_one(job) for job in queue]
    else:
        context = multiprocessing.get_context("spawn")
        with context.Pool(jobs, maxtasksperchild=1) as pool:
            runs = list(pool.imap(run_one, queue))
    return {
        "sizes": size,
        "device": device,
        "jobs": jobs,
        "threads_per_job": threads,
        "sampler": " ".join(SAMPLER),
        "load_after": load_average(),
        "summary": summarize(runs),
        "runs": [{k: v for k, v in run.items() if k not in ("step_seconds", "size")} for run in runs],
    }


def markdown(record: dict) -> str:
    """The summary as markdown tables."""
    size = record["sizes"]
    lines = [
        f"{size['steps']} steps per run, {size['samples']} samples ({record['sampler']}) against"
        f" {size['ref']} shapes images per score; {record['jobs']} run(s) side by side,"
        f" {record['threads_per_job']} thread(s) each. FID at this sample size is biased upwards (compare"
        " rows); KID is unbiased.",
        "",
        "| variant | seeds | final FID mean | FID std | FID min-max | final KID mean | KID std"
        " | train s mean |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in record["summary"]["variants"].items():
        fid, kid, seconds = row["final_fid"], row["final_kid"], row["train_s"]
        lines.append(
            f"| {name} | {len(row['seeds'])} | {fid['mean']:.1f} | {fid['std']:.1f} | {fid['min']:.1f}-"
            f"{fid['max']:.1f} | {kid['mean']:.4f} | {kid['std']:.4f} | {seconds['mean']:.0f} |"
        )
    parity = record["summary"].get("parity")
    if parity:
        lines += [
            "",
            "Parity: fastdiff's mean final FID within 2 std of eager's:"
            f" {parity['fastdiff_within_eager_spread']}. Paired by seed (same data order and noise), the"
            " largest |fastdiff - eager| FID at any scored step is"
            f" {parity['largest_paired_fid_difference']:.2f}, against eager's seed-to-seed std of"
            f" {parity['eager_final_fid_std']:.2f}.",
            "",
            "| seed | fastdiff - eager FID by step | eager / fastdiff training time"
            " | fastdiff s to eager's final FID (eager: s) |",
            "| --- | --- | --- | --- |",
        ]
        for pair in parity["paired"]:
            steps, differences = pair["steps"], pair["fid_difference"]
            shown_differences = ", ".join(f"{s}: {d:+.2f}" for s, d in zip(steps, differences, strict=True))
            reach = pair["fastdiff_s_to_eager_final_fid"]
            shown = "not reached" if reach is None else f"{reach:.0f}"
            lines.append(
                f"| {pair['seed']} | {shown_differences} | {pair['eager_over_fastdiff_train_s']:.3f}x"
                f" | {shown} ({pair['eager_train_s']:.0f}) |"
            )
    lines += ["", "| variant | seed | curve (step: FID / KID) | wall s |", "| --- | --- | --- | --- |"]
    for run in record["runs"]:
        curve = ", ".join(f"{step}: {fid:.1f} / {kid:.4f}" for step, fid, kid in run["curve"])
        lines.append(f"| {run['variant']} | {run['seed']} | {curve} | {run['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    sizes = default_sizes()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training_quality", description=__doc__)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}"
    )
    for name, value in sizes.items():
        parser.add_argument(f"--{name}", type=int, default=value)
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: cores / jobs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default="runs/training_quality", help="where the runs are written")
    parser.add_argument("--out", default="", help="write the record to this JSON file (and .md beside it)")
    args = parser.parse_args(argv)
    for name in sizes:
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    size = {name: getattr(args, name) for name in sizes}
    record = measure(args.variants.split(","), size, Path(args.work), args.device, args.jobs, args.threads)
    text = markdown(record)
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(
            "# Training variants by FID (benchmarks/training_quality.py)\n\n" + text + "\n"
        )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
