"""Draw samples from a trained model: ``python -m fastdiff.sample --model_path RUN/ema_0.9999_010000.pt``.

improved-diffusion's ``image_sample.py`` flags and output: ``samples_{N}x{H}x{W}x3.npz`` holding ``arr_0``
(uint8 ``[N, H, W, 3]``) and, for class-conditional models, ``arr_1`` (int64 labels ``[N]``), plus a PNG
grid of the first ``--grid_samples`` images. DDPM by default, DDIM with ``--use_ddim True``; fewer steps
with ``--timestep_respacing`` (e.g. ``250`` or ``ddim50``). Under torchrun every rank samples its share.
``--sampler``, ``--steps``, ``--timestep_spacing`` and ``--guidance_scale`` choose among DDPM, DDIM,
DPM-Solver++(2M), Heun and Euler and turn on classifier-free guidance (README, "Guidance and samplers").

Model and diffusion flags not given are read from ``model_flags.json`` beside ``--model_path`` when
fastdiff.train wrote one (improved-diffusion's files need the flags on the command line, as in its script).
"""

import argparse
import os
from collections.abc import Sequence

import numpy as np
import torch

from fastdiff import dist_util, ops
from fastdiff.app import build_parser, output_dir, prepare_inference
from fastdiff.diffusion.sampling import (
    SAMPLING_HELP,
    check_sampling_options,
    sample_batch,
    sampling_defaults,
    sampling_options,
)
from fastdiff.script_util import (
    NUM_CLASSES,
    model_and_diffusion_defaults,
)
from fastdiff.training.cli import explicit_flags, run_main
from fastdiff.training.image_grid import save_image_grid, to_uint8_nhwc
from fastdiff.training.rng import seed_everything

SAMPLE_DEFAULTS = dict(
    clip_denoised=True,
    num_samples=10000,
    batch_size=16,
    use_ddim=False,
    model_path="",
)
"""improved-diffusion's image_sample.py flags, with its defaults."""

EXTRA_DEFAULTS = dict(
    out_dir="",
    sample_classes=0,
    eta=0.0,
    grid_samples=64,
    seed=0,
    precision="fp32",
    kernels="auto",
    device="auto",
    trust_checkpoint=False,
)

FLAG_HELP = dict(
    batch_size="samples per rank per batch",
    out_dir="where to write the npz and PNG (default: the directory of --model_path)",
    sample_classes="class-conditional: draw labels from [0, this) (0: the run's classes, else all 1000)",
    eta="DDIM noise (0: deterministic)",
    grid_samples="how many samples go into the PNG grid (0: no grid)",
    precision="fp32 | bf16 | fp16 autocast for sampling (auto: bf16 on GPUs that have it)",
)


def create_argparser() -> argparse.ArgumentParser:
    """The sampling flags: improved-diffusion's, fastdiff's additions, model and diffusion flags."""
    defaults = {**SAMPLE_DEFAULTS, **EXTRA_DEFAULTS, **sampling_defaults(), **model_and_diffusion_defaults()}
    return build_parser("fastdiff.sample", __doc__, defaults, {**SAMPLING_HELP, **FLAG_HELP})


def label_count(args: argparse.Namespace, class_names: list[str]) -> int:
    if args.sample_classes < 0 or args.sample_classes > NUM_CLASSES:
        raise ValueError(f"--sample_classes must be in [0, {NUM_CLASSES}], got {args.sample_classes}")
    return args.sample_classes or len(class_names) or NUM_CLASSES


def generate(
    model, diffusion, args, ctx, precision, label_count: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """``num_samples`` images (uint8 NHWC) and labels, gathered from every rank in rank order per batch."""
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    options = sampler_options(args)
    images, labels = [], []
    produced = 0
    while produced < args.num_samples:
        kwargs = {}
        if args.class_cond:
            kwargs["y"] = torch.randint(0, label_count, (args.batch_size,), device=ctx.device)
        with precision.autocast():
            sample = sample_batch(
                model,
                diffusion,
                shape,
                clip_denoised=args.clip_denoised,
                model_kwargs=kwargs,
                device=ctx.device,
                **options,
            )
        gathered = dist_util.all_gather_object(to_uint8_nhwc(sample).cpu().numpy())
        images.extend(gathered)
        if args.class_cond:
            labels.extend(dist_util.all_gather_object(kwargs["y"].cpu().numpy()))
        produced += args.batch_size * ctx.world_size
        if ctx.is_main:
            print(f"created {min(produced, args.num_samples)} of {args.num_samples} samples", flush=True)
    array = np.concatenate(images)[: args.num_samples]
    label_array = np.concatenate(labels)[: args.num_samples].astype(np.int64) if args.class_cond else None
    return array, label_array


def sampler_options(args: argparse.Namespace) -> dict:
    """sample_batch's options from the flags: --sampler, --steps, --timestep_spacing, --guidance_scale, and
    improved-diffusion's --use_ddim (ddim when no --sampler is given) and --eta."""
    if args.use_ddim and args.sampler not in ("", "ddim"):
        raise ValueError(
            f"--use_ddim True asks for DDIM, but --sampler is {args.sampler!r}: give one of them"
        )
    return {**sampling_options(args, use_ddim=args.use_ddim), "eta": args.eta}


def main(argv: Sequence[str] | None = None) -> int:
    """Sample with the flags in ``argv`` (``sys.argv`` when None); returns the exit status."""
    args = create_argparser().parse_args(argv)
    given = explicit_flags(create_argparser, argv)
    if args.num_samples <= 0 or args.batch_size <= 0:
        raise ValueError(
            f"--num_samples and --batch_size must be positive, got {args.num_samples}, {args.batch_size}"
        )
    ctx = dist_util.setup_dist(args.device)
    try:
        options = sampler_options(args)
        setup = prepare_inference(args, given, ctx)
        check_sampling_options(setup.diffusion, model=setup.model, **options)
        num_labels = label_count(args, setup.class_names)
        seed_everything(args.seed, ctx.rank)
        with ops.use_backend(setup.kernels):
            images, labels = generate(setup.model, setup.diffusion, args, ctx, setup.precision, num_labels)
        if ctx.is_main:
            out_dir = output_dir(args.out_dir, args.model_path)
            stem = os.path.join(out_dir, "samples_" + "x".join(str(side) for side in images.shape))
            arrays = (images,) if labels is None else (images, labels)
            np.savez(f"{stem}.npz", *arrays)
            if args.grid_samples > 0:
                save_image_grid(images[: args.grid_samples], f"{stem}.png")
            print(f"saved {stem}.npz" + (f" and {stem}.png" if args.grid_samples > 0 else ""), flush=True)
        dist_util.barrier()
        return 0
    finally:
        dist_util.cleanup_dist()


if __name__ == "__main__":
    run_main(main, "fastdiff.sample")
