"""Bits per dimension of a trained model: ``python -m fastdiff.nll --model_path ... [--data_dir ...]``.

improved-diffusion's ``image_nll.py``: the variational bound (``calc_bpd_loop``, one noise draw per step)
over ``--num_samples`` images of ``--data_dir`` (or the embedded shapes dataset when it is empty), in a fixed
order, each rank taking its share; averages are taken over ranks. Rank 0 writes ``vb_terms.npz``,
``mse_terms.npz`` and ``xstart_mse_terms.npz`` (per-step means) into ``--out_dir``. Model and diffusion flags
not given are read from the run config beside ``--model_path`` when fastdiff.train wrote one.

A model trained on latents is refused: the bound's last term is the likelihood of 8-bit pixels (a Gaussian
discretised into 256 bins over [-1, 1]), which continuous latents are not, so its "bits per dimension"
would measure nothing.
"""

import os
from collections.abc import Sequence

import numpy as np
import torch

from fastdiff import dist_util, ops
from fastdiff.cli import parse_command, run_main
from fastdiff.config import NllCommand
from fastdiff.data import BatchStream, build_dataset
from fastdiff.runtime.inference import output_dir, prepare_inference
from fastdiff.runtime.rng import seed_everything

TERMS = ("vb", "mse", "xstart_mse")


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


def parse_args(argv: Sequence[str] | None = None) -> tuple[NllCommand, set[str]]:
    """The checked NLL config from ``argv`` and the flags given on it."""
    return parse_command(NllCommand, argv, "fastdiff.nll", __doc__)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate with the flags in ``argv`` (``sys.argv`` when None); returns the exit status."""
    config, given = parse_args(argv)
    nll = config.nll
    ctx = dist_util.setup_dist(config.runtime.device)
    try:
        setup = prepare_inference(config, given, nll.model_path, ctx)
        if setup.latent_info is not None:
            raise ValueError(
                f"--model_path {nll.model_path!r} is a model of latents (its run config records latent "
                "info): fastdiff.nll measures bits per dimension of 8-bit pixels (the bound's last term "
                "discretises [-1, 1] into 256 bins), which continuous latents are not: refused"
            )
        model_config = setup.config.model
        dataset = build_dataset(
            nll.data_dir, model_config.image_hw, model_config.in_channels, class_cond=model_config.class_cond
        )
        data = BatchStream(
            dataset,
            nll.batch_size,
            ctx.rank,
            ctx.world_size,
            seed=config.runtime.seed,
            shuffle=False,
            class_cond=model_config.class_cond,
            num_workers=nll.num_workers,
        )
        seed_everything(config.runtime.seed, ctx.rank)
        clip_denoised = config.sampling.clip_denoised
        with torch.no_grad(), ops.use_backend(setup.kernels):
            bpd, terms = evaluate_bpd(
                setup.model, setup.diffusion, data, nll.num_samples, clip_denoised, ctx, setup.precision
            )
        data.close()
        if ctx.is_main:
            out_dir = output_dir(nll.out_dir, nll.model_path)
            for name, values in terms.items():
                np.savez(os.path.join(out_dir, f"{name}_terms.npz"), values)
            print(f"bits/dim {bpd:.6f} over {nll.num_samples} samples; terms saved in {out_dir}", flush=True)
        dist_util.barrier()
        return 0
    finally:
        dist_util.cleanup_dist()


if __name__ == "__main__":
    run_main(main, "fastdiff.nll")
