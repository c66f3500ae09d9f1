"""Draw samples from a trained model: ``python -m fastdiff.sample --model_path RUN/ema_0.9999_010000.pt``.

improved-diffusion's ``image_sample.py`` flags and output: ``samples_{N}x{H}x{W}x{C}.npz`` holding ``arr_0``
(uint8 ``[N, H, W, C]``, C the model's ``--in_channels``) and, for class-conditional models, ``arr_1`` (int64
labels ``[N]``), plus a PNG grid (grey, RGB or RGBA) of the first ``--grid_samples`` images. DDPM by
default, DDIM with ``--use_ddim True``; fewer steps with ``--timestep_respacing`` (e.g. ``250`` or
``ddim50``). Under torchrun every rank samples its share.
``--sampler``, ``--steps``, ``--timestep_spacing`` and ``--guidance_scale`` choose among DDPM, DDIM,
DPM-Solver++(2M), Heun and Euler and turn on classifier-free guidance (docs/sampling.md).

A model trained on latents (its run config records their ``LatentInfo``) samples latents: with ``--vae PATH``
(the VAE that made them: its fingerprint must match) they are decoded into the images above; without it,
``latents_{N}x{C}x{h}x{w}.npz`` holds them as float32 ``[N, C, h, w]`` (``arr_1`` the labels), with no
grid. ``--vae`` for a model of pixels is an error. A latent model samples without clipping each x_0
prediction to [-1, 1] unless ``--clip_denoised`` is given.

Model and diffusion flags not given are read from the run config beside ``--model_path`` (``run_config.json``,
or an earlier fastdiff's ``model_flags.json``); improved-diffusion's files need the flags on the command line,
as in its script.
"""

import os
from collections.abc import Sequence

import numpy as np
import torch

from fastdiff import dist_util, ops
from fastdiff.builders import NUM_CLASSES
from fastdiff.cli import parse_command, run_main
from fastdiff.config import ConfigError, SampleCommand
from fastdiff.diffusion.data_moments import MOMENTS_FILENAME
from fastdiff.diffusion.sampling import gaussian_start, resolve_spacing, sample_batch
from fastdiff.runtime.image_grid import GRID_MODES, save_image_grid, to_uint8_nhwc
from fastdiff.runtime.inference import InferenceSetup, output_dir, prepare_inference
from fastdiff.runtime.latent_vae import checked_vae, decoder
from fastdiff.runtime.rng import seed_everything


def parse_args(argv: Sequence[str] | None = None) -> tuple[SampleCommand, set[str]]:
    """The checked sampling config from ``argv`` and the flags given on it."""
    config, given = parse_command(SampleCommand, argv, "fastdiff.sample", __doc__)
    check_sampler(config)
    return config, given


def check_sampler(config: SampleCommand) -> None:
    """``--use_ddim True`` with another ``--sampler`` is a conflict (ValueError naming the flag)."""
    try:
        config.sampling.check_use_ddim()
    except ConfigError as error:
        raise ValueError(f"--{error}") from None


def label_count(config: SampleCommand, class_names: list[str]) -> int:
    """Labels are drawn from [0, this): --sample_classes, else the run's classes, else all 1000."""
    if config.sample.sample_classes > NUM_CLASSES:
        raise ValueError(
            f"--sample_classes must be in [0, {NUM_CLASSES}], got {config.sample.sample_classes}"
        )
    return config.sample.sample_classes or len(class_names) or NUM_CLASSES


def prepare(config: SampleCommand, given: set[str], model_path: str, ctx) -> InferenceSetup:
    """The model, diffusion, precision and kernels fastdiff.sample draws with, the sampling options
    checked against them, and for a latent model the VAE decoder of ``--vae`` (checked against the run's
    latent info)."""
    setup = prepare_inference(config, given, model_path, ctx)
    sampling = setup.config.sampling
    sampling.check_against(setup.diffusion, setup.model, data_moments=setup.data_moments)
    sampler = sampling.resolved_sampler
    spacing = resolve_spacing(sampler, sampling.timestep_spacing)
    if ctx.is_main and gaussian_start(sampling.ode_start, sampler, spacing, setup.data_moments):
        print(
            f"ODE start: the data's Gaussian fit ({MOMENTS_FILENAME} beside {model_path}), flowed to "
            "--sigma_max in closed form",
            flush=True,
        )
    vae_path, info = setup.config.latents.vae, setup.latent_info
    if vae_path and info is None:
        raise ValueError(
            f"--vae {vae_path!r}: the model {model_path} was not trained on latents (no run config beside it "
            "records latent info); --vae decodes the samples of a latent model only"
        )
    if info is not None:
        if "clip_denoised" not in given:
            setup.config = setup.config.with_flags({"clip_denoised": False})
        if vae_path:
            vae = checked_vae(vae_path, info, f"the run of {model_path}")
            setup.decode = decoder(vae, ctx.device)
    return setup


def generate(setup: InferenceSetup, ctx) -> tuple[np.ndarray, np.ndarray | None]:
    """``num_samples`` images (uint8 ``[N, H, W, C]``; a latent model's decoded by ``setup.decode``, or, with
    no decoder, its latents as float32 ``[N, C, h, w]``) and labels, gathered from every rank in rank order
    per batch."""
    config = setup.config
    batch_size, num_samples = config.sample.batch_size, config.sample.num_samples
    shape = (batch_size, config.model.in_channels, *config.model.image_hw)
    num_labels = label_count(config, setup.class_names)
    images, labels = [], []
    produced = 0
    while produced < num_samples:
        kwargs = {}
        if config.model.class_cond:
            kwargs["y"] = torch.randint(0, num_labels, (batch_size,), device=ctx.device)
        with setup.precision.autocast():
            sample = sample_batch(
                setup.model, setup.diffusion, shape, model_kwargs=kwargs, device=ctx.device,
                data_moments=setup.data_moments, **config.sampling.options(),
            )  # fmt: skip
        if setup.decode is not None:
            sample = setup.decode(sample)
        if setup.latent_info is not None and setup.decode is None:
            produced_batch = sample.float().cpu().numpy()  # latents, as the model made them
        else:
            produced_batch = to_uint8_nhwc(sample).cpu().numpy()
        gathered = dist_util.all_gather_object(produced_batch)
        images.extend(gathered)
        if config.model.class_cond:
            labels.extend(dist_util.all_gather_object(kwargs["y"].cpu().numpy()))
        produced += batch_size * ctx.world_size
        if ctx.is_main:
            print(f"created {min(produced, num_samples)} of {num_samples} samples", flush=True)
    array = np.concatenate(images)[:num_samples]
    label_array = np.concatenate(labels)[:num_samples].astype(np.int64) if config.model.class_cond else None
    return array, label_array


def main(argv: Sequence[str] | None = None) -> int:
    """Sample with the flags in ``argv`` (``sys.argv`` when None); returns the exit status."""
    config, given = parse_args(argv)
    model_path = config.sample.model_path
    ctx = dist_util.setup_dist(config.runtime.device)
    try:
        setup = prepare(config, given, model_path, ctx)
        seed_everything(config.runtime.seed, ctx.rank)
        with ops.use_backend(setup.kernels):
            images, labels = generate(setup, ctx)
        if ctx.is_main and images.dtype != np.uint8:
            out_dir = output_dir(config.sample.out_dir, model_path)
            stem = os.path.join(out_dir, "latents_" + "x".join(str(side) for side in images.shape))
            np.savez(f"{stem}.npz", *((images,) if labels is None else (images, labels)))
            print(
                f"note: the model works on latents and no --vae was given: saved the latents (float32 "
                f"[N, C, h, w], not images; no PNG grid) in {stem}.npz; pass --vae PATH to decode them",
                flush=True,
            )
        elif ctx.is_main:
            out_dir = output_dir(config.sample.out_dir, model_path)
            stem = os.path.join(out_dir, "samples_" + "x".join(str(side) for side in images.shape))
            arrays = (images,) if labels is None else (images, labels)
            np.savez(f"{stem}.npz", *arrays)
            grid = config.sample.grid_samples
            if grid > 0 and images.shape[-1] not in GRID_MODES:
                print(
                    f"note: no PNG grid for {images.shape[-1]}-channel samples (1, 3 or 4 only)", flush=True
                )
                grid = 0
            if grid > 0:
                save_image_grid(images[:grid], f"{stem}.png")
            print(f"saved {stem}.npz" + (f" and {stem}.png" if grid > 0 else ""), flush=True)
        dist_util.barrier()
        return 0
    finally:
        dist_util.cleanup_dist()


if __name__ == "__main__":
    run_main(main, "fastdiff.sample")
