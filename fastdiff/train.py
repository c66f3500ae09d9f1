"""Train a diffusion model on images: ``python -m fastdiff.train`` or ``torchrun ... -m fastdiff.train``.

improved-diffusion's ``image_train.py`` flags and defaults, plus precision, memory, kernel, logging and
resume options (``--help`` lists them). ``--batch_size`` is per rank; ``--global_batch_size`` is the sum
over ranks: give one and the other is derived, give both and they must agree.

With no ``--data_dir`` it trains on the embedded shapes dataset; when, in addition, no model or diffusion flag
is given (the objective flags ``--class_dropout_prob``, ``--predict_v``, ``--snr_gamma`` and
``--rescale_zero_terminal_snr``, and the image flags ``--image_size`` and ``--in_channels``, do not count),
the small CPU profile ``EMBEDDED_PROFILE`` (listed at the end of ``--help``) fills every flag not given on the
command line: a 16x16 class-conditional model that draws recognisable shapes after a few minutes on two CPU
cores (at another ``--image_size``, its attention stays at the 4x-downsampled level).

On a latent dataset (``fastdiff.prepare_data --vae``) the model trains on the latents: ``--in_channels`` and
``--image_size`` come from the data (a value given that disagrees is an error), ``run_config.json`` records
the latents' info, and the sample grids and the in-training evaluation decode with the VAE (``--vae``, by
default the folder the dataset records, when it still exists; it must be the VAE that made the latents).
Without a VAE the grids are skipped (said once) and ``--eval_interval`` is refused.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fastdiff import dist_util, ops
from fastdiff.builders import build_diffusion, build_model, preview_respacing, preview_steps
from fastdiff.cli import parse_command, run_main
from fastdiff.config import DiffusionConfig, ModelConfig, RunConfig
from fastdiff.config.sections import image_sides
from fastdiff.data import BatchStream, build_dataset
from fastdiff.data.sources import describe_dataset
from fastdiff.diffusion import create_named_schedule_sampler
from fastdiff.diffusion.data_moments import DataMoments, moments_for_run
from fastdiff.diffusion.sampling import ODE_SAMPLERS
from fastdiff.runtime.backends import check_autotune, check_kernels
from fastdiff.runtime.latent_vae import decoder
from fastdiff.runtime.precision import Precision, resolve_precision
from fastdiff.runtime.rng import derive_seed, seed_everything
from fastdiff.training.latent_data import latent_data
from fastdiff.training.loop import TrainLoop
from fastdiff.training.nonfinite import NonFiniteStepsError
from fastdiff.training.preview import SamplePreview
from fastdiff.training.quality import TrainingEvaluation

ModelFactory = Callable[[ModelConfig, DiffusionConfig], torch.nn.Module]
"""What builds the model to train from its config (default: ``fastdiff.builders.build_model``); benchmarks
pass another, e.g. improved-diffusion's own UNet, as ``main(argv, model_factory=...)``."""

PROFILE_NEUTRAL_FLAGS = frozenset(
    {"class_dropout_prob", "predict_v", "snr_gamma", "rescale_zero_terminal_snr", "in_channels", "image_size"}
)
"""Model and diffusion flags that leave the embedded profile on: objectives any model can train with, and
the shape of the images (the shapes dataset draws any size and channel count)."""
PROFILE_ATTENTION_FACTOR = 4
"""The profile's attention sits at the 4x-downsampled level: ``--attention_resolutions`` 4 at 16x16, and
the longer side / 4 at another ``--image_size``."""

EMBEDDED_PROFILE = dict(
    image_size=16,
    num_channels=32,
    channel_mult="1,2,2",
    num_res_blocks=1,
    attention_resolutions="4",
    class_cond=True,
    diffusion_steps=1000,
    noise_schedule="cosine",
    batch_size=32,
    lr=5e-4,
    ema_rate="0.99",
    max_steps=1500,
    log_interval=50,
    save_interval=500,
    sample_interval=250,
    eval_interval=250,
    eval_samples=32,
    eval_ref=256,
    preview_steps=20,
    preview_sampler="unipc",
    preview_ddim=False,
    num_workers=0,
)
"""Values for every flag not given when there is no --data_dir and no model or diffusion flag: a small model
that learns the embedded shapes dataset on a CPU in minutes (about 0.3 s per step on two cores)."""


def embedded_preset(given: Mapping[str, Any]) -> dict[str, Any]:
    """:data:`EMBEDDED_PROFILE` when no --data_dir and no model or diffusion flag (other than
    :data:`PROFILE_NEUTRAL_FLAGS`) is in ``given``, its attention at :data:`PROFILE_ATTENTION_FACTOR` for
    the ``--image_size`` given; else nothing."""
    model_flags = set(ModelConfig.field_names()) | set(DiffusionConfig.field_names())
    if given.get("data_dir") or set(given) & (model_flags - PROFILE_NEUTRAL_FLAGS):
        return {}
    try:
        longer = max(image_sides(given.get("image_size", EMBEDDED_PROFILE["image_size"])))
    except ValueError:
        return EMBEDDED_PROFILE  # --image_size's own check reports it
    return {**EMBEDDED_PROFILE, "attention_resolutions": str(max(1, longer // PROFILE_ATTENTION_FACTOR))}


def parse_args(argv: Sequence[str] | None = None) -> tuple[RunConfig, set[str]]:
    """The checked run config from ``argv`` (the embedded profile applied where it applies) and the flags
    given on the command line."""
    epilog = "embedded profile (no --data_dir, no model or diffusion flag): " + " ".join(
        f"--{name} {value}" for name, value in EMBEDDED_PROFILE.items()
    )
    config, given = parse_command(
        RunConfig, argv, "fastdiff.train", __doc__, epilog=epilog, preset=embedded_preset, config_file=True
    )
    if "snr_gamma" in given and config.diffusion.snr_gamma <= 0:
        raise ValueError(
            f"--snr_gamma must be > 0 (leave it out for no min-SNR weighting), got "
            f"{config.diffusion.snr_gamma}"
        )
    if config.train.grad_checkpoint:
        config = config.with_flags({"use_checkpoint": True})
    return config, given


def shared_moments(dataset, log_dir: str, is_main: bool) -> tuple[DataMoments, str]:
    """The run's Gaussian fit and its source (``moments_for_run``), read or measured by the main process
    alone and sent to every rank, so all ranks hold the same fit and measure nothing. What stops the main
    process stops every rank."""
    found, error = None, None
    if is_main:
        try:
            found = moments_for_run(dataset, log_dir, write=True)
        except Exception as caught:  # raised below, on this rank as it is and on the others by its message
            error = caught
    shared = dist_util.broadcast_object(found if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if isinstance(shared, str):
        raise RuntimeError(f"the main process could not get the data's Gaussian fit: {shared}")
    return shared


def build_previews(config: RunConfig, model: torch.nn.Module, data_moments: DataMoments | None = None):
    """The diffusion and sample_batch options of the sample grids and the in-training evaluation, with the
    --preview_* flags: an ODE sampler (unipc, the default, ...) runs --preview_steps grid points over the
    training diffusion (from ``data_moments``, the data's Gaussian fit, with --preview_ode_start auto or
    gaussian); ddpm and ddim run every step of the training diffusion respaced to --preview_steps
    (by DDIM's stride with --preview_ddim True). A latent model's samples are not clipped to [-1, 1]
    (latents are not bounded there)."""
    preview = config.preview
    if preview.resolved_sampler in ODE_SAMPLERS:
        diffusion = build_diffusion(config.diffusion)
        steps = preview_steps(config.diffusion.diffusion_steps, preview.steps)
        sampling = dataclasses.replace(preview, steps=steps)
    else:
        respacing = preview_respacing(config.diffusion.diffusion_steps, preview.steps, preview.use_ddim)
        diffusion = build_diffusion(config.diffusion, respacing)
        sampling = dataclasses.replace(preview, steps=0)
    if config.latents.info is not None:
        sampling = dataclasses.replace(sampling, clip_denoised=False)
    sampling.check_against(diffusion, model, flag_prefix="preview_", data_moments=data_moments)
    return diffusion, {**sampling.options(), "data_moments": data_moments}


def build_evaluation(
    config: RunConfig, given: set[str], model, previews, dataset, precision: Precision, ctx, decode=None
) -> TrainingEvaluation | None:
    """The in-training evaluation for ``--eval_interval`` (None when 0), sampling like the grids
    (``previews``: their diffusion and options). Reference statistics are computed here, before training;
    an evaluation the embedded profile asked for is dropped, with a note, when the feature network is not
    installed (one asked for on the command line is an error)."""
    evaluation = config.evaluation
    if evaluation.eval_interval <= 0:
        return None
    tag = ""
    if config.latents.info is not None:
        tag = "vae" + config.latents.info["fingerprint"][:8]
    try:
        return TrainingEvaluation(
            model=model,
            sampling_diffusion=previews[0],
            sampling=previews[1],
            dataset=dataset,
            interval=evaluation.eval_interval,
            num_samples=evaluation.eval_samples,
            num_ref=evaluation.eval_ref,
            num_classes=len(config.class_names) if config.model.class_cond else None,
            seed=config.runtime.seed,
            precision=precision,
            ctx=ctx,
            log_dir=config.train.log_dir,
            ema_rate=config.train.ema_rates[0],
            inception=evaluation.inception,
            decode=decode,
            decode_tag=tag,
        )
    except ValueError as error:
        if "eval_interval" in given:
            raise ValueError(f"--eval_interval {evaluation.eval_interval}: {error}") from error
        _print_main(ctx, f"note: no sample-quality evaluation ({error})")
        return None


def _print_main(ctx: dist_util.DistContext, text: str) -> None:
    if ctx.is_main:
        print(text, flush=True)


def main(argv: Sequence[str] | None = None, model_factory: ModelFactory = build_model) -> int:
    """Train with the flags in ``argv`` (``sys.argv`` when None); returns the exit status.

    ``model_factory(model_config, diffusion_config)`` builds the network to train (default: fastdiff's UNet).
    """
    config, given = parse_args(argv)
    config, latent = latent_data(config, given)
    if latent is not None and latent.vae is None and config.evaluation.eval_interval > 0:
        raise ValueError(
            f"--eval_interval {config.evaluation.eval_interval}: scoring a latent model's samples needs the "
            f"VAE to decode them, and there is none ({latent.missing}); pass --vae PATH"
        )
    train, runtime = config.train, config.runtime
    ctx = dist_util.setup_dist(runtime.device)
    try:
        batch_size, global_batch = train.batch_sizes(ctx.world_size, "batch_size" in given)
        microbatch = train.microbatch_size(batch_size)
        precision = resolve_precision(runtime.precision, ctx.device, use_fp16=train.use_fp16)
        kernels = check_kernels(runtime.kernels, ctx.device)
        check_autotune(runtime.autotune)
        if "fp16_scale_growth" in given:
            _print_main(
                ctx, "note: --fp16_scale_growth is ignored (torch.amp.GradScaler manages the loss scale)"
            )

        class_cond = config.model.class_cond
        dataset = build_dataset(
            train.data_dir, config.model.image_hw, config.model.in_channels, class_cond, train.random_flip,
            runtime.seed,
        )  # fmt: skip
        class_names = tuple(dataset.class_names) if class_cond else ()
        config = dataclasses.replace(config.with_flags({"batch_size": batch_size}), class_names=class_names)
        data = BatchStream(
            dataset,
            batch_size,
            ctx.rank,
            ctx.world_size,
            seed=runtime.seed,
            shuffle=True,
            class_cond=class_cond,
            num_workers=train.num_workers,
            pin_memory=ctx.device.type == "cuda",
        )
        torch.manual_seed(derive_seed(runtime.seed, 0x30DE1))
        model = model_factory(config.model, config.diffusion)
        diffusion = build_diffusion(config.diffusion)
        model.to(ctx.device)
        seed_everything(runtime.seed, ctx.rank)
        schedule_sampler = create_named_schedule_sampler(train.schedule_sampler, diffusion)

        moments, moments_source = shared_moments(dataset, train.log_dir, ctx.is_main)
        previews = build_previews(config, model, moments)
        decode = decoder(latent.vae, ctx.device) if latent is not None and latent.vae is not None else None
        preview = None
        if latent is not None and decode is None and train.sample_interval:
            _print_main(
                ctx,
                "note: no sample grids: the model works on latents and no VAE decodes them "
                f"({latent.missing}); pass --vae PATH for grids",
            )
        elif ctx.is_main and train.sample_interval:
            preview = SamplePreview(
                model,
                previews[0],
                (config.model.in_channels, *config.model.image_hw),
                train.num_preview_samples,
                len(class_names) if class_cond else None,
                runtime.seed,
                precision,
                sampling=previews[1],
                decode=decode,
            )
        evaluation = build_evaluation(config, given, model, previews, dataset, precision, ctx, decode)
        _print_main(
            ctx,
            f"training on {ctx.world_size} process(es), device {ctx.device}, precision {precision.name}, "
            f"batch {batch_size} per rank / {global_batch} global (microbatch {microbatch}), "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
            f"data: {describe_dataset(dataset)} (Gaussian fit {moments_source}), log dir {train.log_dir}",
        )
        loop = TrainLoop(
            config=config,
            model=model,
            diffusion=diffusion,
            data=data,
            schedule_sampler=schedule_sampler,
            ctx=ctx,
            precision=precision,
            preview=preview,
            evaluation=evaluation,
        )
        with ops.use_backend(kernels):
            loop.run()
        # On success only (a rank that failed may never reach it): the loop's DDP wrapper goes, so that
        # cleanup_dist can free the group, and every rank has left every collective before any tears it down.
        del loop, data
        dist_util.barrier()
        return 0
    finally:
        dist_util.cleanup_dist()


if __name__ == "__main__":
    run_main(main, "fastdiff.train", expected=(NonFiniteStepsError,))
