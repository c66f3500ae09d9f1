"""Bits per dimension of a trained model: ``python -m fastdiff.nll --model_path ... [--data_dir ...]``.

improved-diffusion's ``image_nll.py``: the variational bound (``calc_bpd_loop``, one noise draw per step)
over ``--num_samples`` images of ``--data_dir`` (or the embedded shapes dataset when it is empty), in a fixed
order, each rank taking its share; averages are taken over ranks. Rank 0 writes ``vb_terms.npz``,
``mse_terms.npz`` and ``xstart_mse_terms.npz`` (per-step means) into ``--out_dir``. Model and diffusion flags
not given are read from ``model_flags.json`` beside ``--model_path`` when fastdiff.train wrote one.
"""

import argparse
import os
from collections.abc import Sequence

import numpy as np
import torch

from fastdiff import dist_util, ops
from fastdiff.app import build_parser, output_dir, prepare_inference
from fastdiff.data import BatchStream, build_dataset
from fastdiff.script_util import model_and_diffusion_defaults
from fastdiff.training.cli import explicit_flags, run_main
from fastdiff.training.rng import seed_everything

NLL_DEFAULTS = dict(data_dir="", clip_denoised=True, num_samples=1000, batch_size=1, model_path="")
"""improved-diffusion's image_nll.py flags, with its defaults."""

EXTRA_DEFAULTS = dict(
    out_dir="", seed=0, precision="fp32", kernels="auto", device="auto", num_workers=0, trust_checkpoint=False
)

TERMS = ("vb", "mse", "xstart_mse")


def create_argparser() -> argparse.ArgumentParser:
    """The evaluation flags: improved-diffusion's, fastdiff's additions, model and diffusion flags."""
    return build_parser(
        "fastdiff.nll", __doc__, {**NLL_DEFAULTS, **EXTRA_DEFAULTS, **model_and_diffusion_defaults()}
    )


def evaluate_bpd(model, diffusion, data: BatchStream, num_samples: int, clip_denoised: bool, ctx, precision):
    """(mean total bits/dim over ranks, {term: per-step means ``[T]``}) over ``num_samples`` images."""
    bpd_means: list[float] = []
    term_means: dict[str, list[np.ndarray]] = {name: [] for name in TERMS}
    done = 0
    while done < num_samples:
        images, cond = next(data)
        images = images.to(ctx.device)
        cond = {name: value.to(ctx.device) for name, value in cond.items()}
        with precision.autocast():
            metrics = diffusion.calc_bpd_loop(model, images, clip_denoised=clip_denoised, model_kwargs=cond)
        for name in TERMS:
            terms = dist_util.all_reduce_mean_(metrics[name].float().mean(dim=0))
            term_means[name].append(terms.cpu().numpy())
        bpd_means.append(dist_util.all_reduce_mean_(metrics["total_bpd"].float().mean()).item())
        done += images.shape[0] * ctx.world_size
        if ctx.is_main:
            print(f"done {done} samples: bpd={np.mean(bpd_means):.6f}", flush=True)
    return float(np.mean(bpd_means)), {
        name: np.mean(np.stack(values), axis=0) for name, values in term_means.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate with the flags in ``argv`` (``sys.argv`` when None); returns the exit status."""
    args = create_argparser().parse_args(argv)
    given = explicit_flags(create_argparser, argv)
    if args.num_samples <= 0 or args.batch_size <= 0:
        raise ValueError(
            f"--num_samples and --batch_size must be positive, got {args.num_samples}, {args.batch_size}"
        )
    ctx = dist_util.setup_dist(args.device)
    try:
        setup = prepare_inference(args, given, ctx)
        dataset = build_dataset(args.data_dir, args.image_size, class_cond=args.class_cond)
        data = BatchStream(
            dataset,
            args.batch_size,
            ctx.rank,
            ctx.world_size,
            seed=args.seed,
            shuffle=False,
            class_cond=args.class_cond,
            num_workers=args.num_workers,
        )
        seed_everything(args.seed, ctx.rank)
        with torch.no_grad(), ops.use_backend(setup.kernels):
            bpd, terms = evaluate_bpd(
                setup.model, setup.diffusion, data, args.num_samples, args.clip_denoised, ctx, setup.precision
            )
        data.close()
        if ctx.is_main:
            out_dir = output_dir(args.out_dir, args.model_path)
            for name, values in terms.items():
                np.savez(os.path.join(out_dir, f"{name}_terms.npz"), values)
            print(f"bits/dim {bpd:.6f} over {args.num_samples} samples; terms saved in {out_dir}", flush=True)
        dist_util.barrier()
        return 0
    finally:
        dist_util.cleanup_dist()


if __name__ == "__main__":
    run_main(main, "fastdiff.nll")
