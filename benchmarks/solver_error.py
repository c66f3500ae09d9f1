"""How far each ODE sampler and grid lands from the exact ODE solution on a trained model, without FID.

The same starting noise and labels go through every (sampler, spacing, steps) and through a reference
solve (dpmpp_2m on the log-SNR grid with ``--reference_steps`` points; on the shapes model, Heun on 200
Karras points and dpmpp_2m on 400 Karras points agree to 0.0014 RMS, so a few hundred points converge).
Printed is the RMS and the largest pixel distance of each row's samples from it, in the [-1, 1] pixel
range. It isolates the solver's error from the model's and the metric's (FID needs many samples; this
needs a few dozen).

    python -m benchmarks.solver_error --model_path runs/fastdiff/ema_0.99_001500.pt

``--closed_form True`` needs no model: Gaussian data (64 coordinates, scales log-uniform over
``--scales``, mean 0) with the exact denoiser, and the RMS distance of 128 samples from the exact
probability-flow map of the same noise to step 0, then the x_0 prediction there (a capped grid's last
point may lie above step 0; trailing rows are measured to their own last point)
(``fastdiff.diffusion.gaussian_reference``), for every ODE solver on its default grid and the others, at
5-80 model calls, on linear, cosine and zero-terminal-SNR schedules of 1000 and 4000 steps:

    python -m benchmarks.solver_error --closed_form True > benchmarks/results/solver_error_closed_form.md
"""

import argparse
import itertools
import sys
from collections.abc import Sequence

import torch

from fastdiff import dist_util
from fastdiff.config import SampleCommand, find_run_config
from fastdiff.diffusion import create_gaussian_diffusion
from fastdiff.diffusion.gaussian_reference import GaussianData
from fastdiff.diffusion.sampling import NoiseSchedule, resolve_spacing, sample_batch, sampling_grid
from fastdiff.runtime.inference import prepare_inference

ROWS = (
    ("ddim", "uniform", 20), ("ddim", "uniform", 50), ("ddim", "uniform", 100),
    ("euler", "uniform", 20), ("euler", "karras", 20), ("euler", "logsnr", 20),
    ("heun", "karras", 10), ("heun", "logsnr", 10), ("heun", "karras", 25), ("heun", "logsnr", 25),
    ("dpmpp_2m", "uniform", 20), ("dpmpp_2m", "karras", 20), ("dpmpp_2m", "logsnr", 20),
    ("dpmpp_2m", "uniform", 50), ("dpmpp_2m", "karras", 50), ("dpmpp_2m", "logsnr", 50),
    ("dpmpp_2m", "auto", 5), ("dpmpp_2m", "auto", 10), ("dpmpp_2m", "auto", 20),
    ("dpmpp_3m", "logsnr", 10), ("dpmpp_3m", "auto", 5), ("dpmpp_3m", "auto", 10), ("dpmpp_3m", "auto", 20),
    ("unipc", "logsnr", 10), ("unipc", "trailing", 10), ("unipc", "auto", 5), ("unipc", "auto", 8),
    ("unipc", "auto", 10), ("unipc", "auto", 15), ("unipc", "auto", 20),
    ("heun", "auto", 5), ("heun", "auto", 10),
)  # fmt: skip
"""(sampler, spacing, steps) rows; ``auto`` is the sampler's default grid (capped_logsnr for these)."""


ZERO_SNR = dict(predict_v=True, rescale_zero_terminal_snr=True)
CLOSED_FORM_SCHEDULES = {
    "linear 1000": dict(steps=1000, noise_schedule="linear"),
    "cosine 1000": dict(steps=1000, noise_schedule="cosine"),
    "linear 4000": dict(steps=4000, noise_schedule="linear"),
    "cosine 4000": dict(steps=4000, noise_schedule="cosine"),
    "zero-SNR linear 1000": dict(steps=1000, noise_schedule="linear", **ZERO_SNR),
    "zero-SNR cosine 1000": dict(steps=1000, noise_schedule="cosine", **ZERO_SNR),
}  # fmt: skip
CLOSED_FORM_CALLS = (5, 8, 10, 15, 20, 40, 80)
CLOSED_FORM_ROWS = (
    ("unipc", "auto"), ("unipc", "logsnr"), ("unipc", "trailing"),
    ("unipc bh1", "auto"),
    ("dpmpp_3m", "auto"), ("dpmpp_3m", "logsnr"), ("dpmpp_3m", "trailing"),
    ("dpmpp_2m", "auto"), ("dpmpp_2m", "logsnr"), ("dpmpp_2m", "uniform"),
    ("heun", "auto"), ("heun", "logsnr"), ("heun", "karras"),
    ("euler", "auto"), ("euler", "logsnr"), ("euler", "uniform"),
    ("unipc gaussian", "auto"), ("dpmpp_3m gaussian", "auto"), ("dpmpp_2m gaussian", "auto"),
    ("heun gaussian", "auto"), ("euler gaussian", "auto"),
)  # fmt: skip
"""(sampler, spacing) rows; "unipc bh1" is UniPC with --unipc_variant bh1; "... gaussian" starts the ODE
from the data's exact Gaussian fit (--ode_start gaussian; the others start from noise, as without a fit)."""


def closed_form(scales: tuple[float, float]) -> None:
    """Print the closed-form error table (markdown), one block per schedule."""
    data = GaussianData.log_uniform(64, scales[0], scales[1], seed=0)
    noise = torch.randn(128, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    header = " | ".join(str(calls) for calls in CLOSED_FORM_CALLS)
    print(
        "RMS error vs the exact probability-flow map; data scales log-uniform over "
        f"[{scales[0]}, {scales[1]}]"
    )
    for name, flags in CLOSED_FORM_SCHEDULES.items():
        diffusion = create_gaussian_diffusion(**flags)
        schedule, model = NoiseSchedule.from_diffusion(diffusion), data.model(diffusion)
        print(
            f"\n### {name}\n\n| sampler | grid | {header} | falls |\n|"
            + " --- |" * (len(CLOSED_FORM_CALLS) + 3)
        )
        for label, spacing in CLOSED_FORM_ROWS:
            sampler, _, variant = label.partition(" ")
            resolved = resolve_spacing(sampler, spacing)
            errors = []
            for calls in CLOSED_FORM_CALLS:
                steps = (calls + 1) // 2 if sampler == "heun" else calls
                options = dict(sampler=sampler, steps=steps, timestep_spacing=spacing, clip_denoised=False)
                if variant == "gaussian":
                    options["data_moments"] = data.moments()
                elif variant:
                    options["unipc_variant"] = variant
                out = sample_batch(model, diffusion, noise.shape, noise=noise, **options)
                # One target for every grid but trailing's: the exact flow to step 0, then its x_0
                # prediction (a grid that ends above step 0 is charged for the noise it leaves).
                end = sampling_grid(schedule, steps, resolved, 0.0, sampler)[-1]
                end = end if resolved == "trailing" else schedule.point(0)
                errors.append((out - data.flow(schedule, noise, end)).pow(2).mean().sqrt().item())
            falls = all(a > b for a, b in itertools.pairwise(errors))
            grid = f"{resolved} (auto)" if spacing == "auto" else spacing
            cells = " | ".join(f"{error:.2e}" for error in errors)
            print(f"| {label} | {grid} | {cells} | {'yes' if falls else 'no'} |", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.solver_error", description=__doc__)
    parser.add_argument("--model_path", default="", help="an ema_*.pt or model*.pt with run_config.json")
    parser.add_argument(
        "--closed_form", type=lambda text: text.lower() in ("1", "true", "yes"), default=False
    )
    parser.add_argument("--scales", default="0.05,2", help="closed form: the data scales' range, low,high")
    parser.add_argument("--num_samples", type=int, default=48)
    parser.add_argument("--reference_steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.closed_form:
        low, high = (float(value) for value in args.scales.split(","))
        closed_form((low, high))
        return 0
    if not args.model_path:
        parser.error("--model_path is required (or --closed_form True)")
    if find_run_config(args.model_path) is None:
        parser.error(
            f"--model_path {args.model_path}: no run_config.json beside it (fastdiff.train writes it)"
        )
    setup = prepare_inference(SampleCommand(), set(), args.model_path, dist_util.setup_dist("cpu"))
    model, diffusion, model_config = setup.model, setup.diffusion, setup.config.model
    classes = len(setup.class_names) or 1
    size = model_config.image_size
    shape = (args.num_samples, 3, size, size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    kwargs = {"y": torch.arange(args.num_samples) % classes} if model_config.class_cond else {}

    def solve(sampler: str, spacing: str, steps: int) -> torch.Tensor:
        options = dict(sampler=sampler, timestep_spacing=spacing, steps=steps, model_kwargs=kwargs)
        return sample_batch(model, diffusion, shape, noise=noise.clone(), **options)

    reference = solve("dpmpp_2m", "logsnr", args.reference_steps)
    print("| sampler | spacing | steps | model calls | RMS | max |\n| --- | --- | --- | --- | --- | --- |")
    for sampler, spacing, steps in ROWS:
        error = solve(sampler, spacing, steps) - reference
        calls = 2 * steps - 1 if sampler == "heun" else steps
        rms, largest = error.pow(2).mean().sqrt().item(), error.abs().max().item()
        print(f"| {sampler} | {spacing} | {steps} | {calls} | {rms:.4f} | {largest:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
