"""Sample quality of one trained model against the sampler, its number of model calls, and guidance.

Every row samples ``--num_samples`` images from the checkpoint with ``fastdiff.evaluate`` (the same
starting noise for every row: one ``--seed``) and scores them against ``--ref`` (a statistics file, e.g.
the ``fid_reference_*.npz`` that training with ``--eval_interval`` caches in its log dir, or ``shapes``).

    python -m benchmarks.sampler_sweep --model_path runs/fastdiff/ema_0.99_001500.pt \\
        --ref runs/fastdiff/fid_reference_16px_256.npz --out benchmarks/results/sampler_sweep.json
    python -m benchmarks.sampler_sweep --model_path runs/cfg/ema_0.99_001500.pt --ref ... --guidance True

Rows: ddpm and ddim on uniform grids, dpmpp_2m on uniform, Karras and log-SNR grids, heun on Karras grids,
at about ``--calls`` model calls each (heun makes 2N - 1 calls for N steps); with ``--guidance True``,
dpmpp_2m at ``--guidance_steps`` steps on the log-SNR grid for each ``--scales`` value, scored per class
too. ``--rows dpmpp_2m:logsnr,...`` keeps only those rows (``auto``: the sampler's default grid).
``--ode_start noise`` starts the ODE samplers from noise even when the run has a Gaussian fit
(``data_moments.npz``; ``auto`` starts from it). ``--seeds 0,1,2`` repeats every row with each seed (other
starting noise and labels) and adds a summary: KID's mean and its spread over the seeds. Writes the rows as
JSON and prints markdown tables. Small sample counts bias FID upwards (compare rows, not papers); KID is
unbiased.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from fastdiff import evaluate

SAMPLER_ROWS = (
    ("ddpm", "uniform"),
    ("ddim", "uniform"),
    ("dpmpp_2m", "uniform"),
    ("dpmpp_2m", "karras"),
    ("dpmpp_2m", "logsnr"),
    ("dpmpp_2m", "auto"),
    ("dpmpp_3m", "auto"),
    ("unipc", "auto"),
    ("heun", "auto"),
)
HEUN_ROW = ("heun", "karras")


def steps_for_calls(sampler: str, calls: int) -> int:
    """The step count whose model calls come closest to ``calls`` without exceeding it."""
    return (calls + 1) // 2 if sampler == "heun" else calls


def score(model_path: str, ref: str, num_samples: int, seed: int, options: dict[str, str]) -> dict:
    """fastdiff.evaluate's JSON result for one sampling configuration, with its wall time."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        argv = ["--ref", ref, "--samples", model_path, "--num_samples", str(num_samples)]
        argv += ["--batch_size", str(num_samples), "--seed", str(seed), "--out", out, "--out_dir", folder]
        for name, value in options.items():
            argv += [f"--{name}", str(value)]
        start = time.perf_counter()
        code = evaluate.main(argv)
        if code != 0:
            raise RuntimeError(f"fastdiff.evaluate {' '.join(argv)} exited with {code}")
        with open(out) as handle:
            result = json.load(handle)
    return {**options, **result, "seconds": round(time.perf_counter() - start, 1)}


def sweep(args: argparse.Namespace) -> list[dict]:
    """Every row's options and metrics, for each of ``--seeds`` (or ``--seed``)."""
    seeds = [int(value) for value in args.seeds.split(",")] if args.seeds else [args.seed]
    rows = []
    for seed in seeds:
        for row in sweep_seed(args, seed):
            rows.append({**row, "seed": seed})
    return rows


def sweep_seed(args: argparse.Namespace, seed: int) -> list[dict]:
    """Every row's options and metrics with one seed."""
    rows = []
    if args.guidance:
        for scale in (float(value) for value in args.scales.split(",")):
            options = {
                "sampler": "dpmpp_2m",
                "steps": args.guidance_steps,
                "timestep_spacing": "logsnr",
                "guidance_scale": scale,
            }
            rows.append(
                score(args.model_path, args.ref, args.num_samples, seed, {**options, "per_class": True})
            )
        return rows
    chosen = [*SAMPLER_ROWS, HEUN_ROW]
    if args.rows:
        picked = [tuple(item.split(":", 1)) for item in args.rows.split(",")]
        unknown = [row for row in picked if row not in chosen]
        if unknown:
            raise ValueError(f"--rows takes sampler:spacing pairs of {chosen}, got {unknown}")
        chosen = picked
    for calls in (int(value) for value in args.calls.split(",")):
        for sampler, spacing in chosen:
            steps = steps_for_calls(sampler, calls)
            options = {"sampler": sampler, "steps": steps, "timestep_spacing": spacing}
            if args.ode_start != "auto":
                options["ode_start"] = args.ode_start
            row = score(args.model_path, args.ref, args.num_samples, seed, options)
            row["model_calls"] = 2 * steps - 1 if sampler == "heun" else steps
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    names = ("sampler", "timestep_spacing", "ode_start", "steps", "model_calls", "guidance_scale", "seed")
    columns = [name for name in names if name in rows[0]]
    columns += ["fid", "kid", "kid_std", "precision", "recall", "seconds"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [f"{row[name]:.4g}" if isinstance(row[name], float) else str(row[name]) for name in columns]
        lines.append("| " + " | ".join(cells) + " |")
        if "per_class" in row:
            per_class = ", ".join(
                f"{label}: {value['fid']:.1f}" if "fid" in value else f"{label}: n/a"
                for label, value in row["per_class"].items()
            )
            lines.append(f"| per-class FID: {per_class} |" + " |" * (len(columns) - 1))
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """KID (mean, standard deviation and range over the seeds) and mean FID per sampler, grid and calls."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (
            row["sampler"], row["timestep_spacing"], row.get("ode_start", "auto"),
            row.get("model_calls", row.get("steps")),
        )  # fmt: skip
        groups.setdefault(key, []).append(row)
    lines = [
        "| sampler | timestep_spacing | ode_start | model_calls | seeds | KID mean | KID std over seeds "
        "| KID min-max | FID mean |",
        "|" + " --- |" * 9,
    ]
    for (sampler, spacing, start, calls), group in groups.items():
        kids = np.array([row["kid"] for row in group])
        fids = np.array([row["fid"] for row in group])
        spread = float(kids.std(ddof=1)) if len(kids) > 1 else float("nan")
        lines.append(
            f"| {sampler} | {spacing} | {start} | {calls} | {len(group)} | {kids.mean():.4f} | "
            f"{spread:.4f} | {kids.min():.4f}-{kids.max():.4f} | {fids.mean():.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sampler_sweep", description=__doc__)
    parser.add_argument("--model_path", required=True, help="a model*.pt or ema_*.pt checkpoint")
    parser.add_argument(
        "--ref", required=True, help="fastdiff.evaluate's --ref (a statistics file is fastest)"
    )
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default="", help="comma-separated seeds, each row once per seed")
    parser.add_argument("--calls", default="10,20,50,100", help="model calls per sample, comma-separated")
    parser.add_argument("--guidance", type=lambda text: text.lower() in ("1", "true", "yes"), default=False)
    parser.add_argument("--scales", default="0,1,2,4", help="guidance scales, comma-separated")
    parser.add_argument("--guidance_steps", type=int, default=20)
    parser.add_argument("--rows", default="", help="sampler:spacing pairs, comma-separated (default: all)")
    parser.add_argument(
        "--ode_start", default="auto", choices=("auto", "noise", "gaussian"),
        help="fastdiff.evaluate's --ode_start for every row (auto: the Gaussian fit when the run has one)",
    )  # fmt: skip
    parser.add_argument("--out", default="", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = sweep(args)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"model_path": args.model_path, "ref": args.ref, "rows": rows}, handle, indent=1)
    print(markdown(rows))
    if args.seeds:
        print()
        print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
