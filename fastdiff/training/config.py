"""The training loop's settings, checked, and the per-rank / global batch size rule."""

from dataclasses import dataclass, field


def resolve_batch_sizes(
    batch_size: int | None, global_batch_size: int | None, world_size: int
) -> tuple[int, int]:
    """(per-rank batch, global batch) from whichever of the two was given.

    ``--batch_size`` is per rank (improved-diffusion's meaning: each process loads that many images);
    ``--global_batch_size`` is summed over all ``world_size`` ranks. Given one, the other is derived; given
    both, they must agree (``batch_size * world_size == global_batch_size``).
    """
    if batch_size is not None and batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if global_batch_size is not None and global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size}")
    if batch_size is None and global_batch_size is None:
        raise ValueError("pass --batch_size (per rank) or --global_batch_size (all ranks)")
    if global_batch_size is None:
        return batch_size, batch_size * world_size
    if global_batch_size % world_size:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the {world_size} ranks; "
            f"use a multiple of {world_size} or pass --batch_size per rank"
        )
    derived = global_batch_size // world_size
    if batch_size is not None and batch_size != derived:
        raise ValueError(
            f"batch_size {batch_size} per rank x {world_size} ranks = {batch_size * world_size}, but "
            f"global_batch_size is {global_batch_size}: pass only one, or make them agree"
        )
    return derived, global_batch_size


def resolve_microbatch(microbatch: int, batch_size: int) -> int:
    """improved-diffusion's ``--microbatch`` (-1 or 0: the whole batch); it must divide the batch."""
    if microbatch <= 0:
        return batch_size
    if batch_size % microbatch:
        raise ValueError(
            f"batch_size {batch_size} (per rank) is not divisible by microbatch {microbatch}: every "
            "microbatch must have the same size"
        )
    return microbatch


@dataclass
class LoopSettings:
    """What the loop needs beyond the model, diffusion and data (all validated in ``__post_init__``).

    ``run_config`` is saved in every full state: its ``model_and_diffusion`` flags are compared on resume
    and, with ``class_names``, written to ``model_flags.json`` once the run has started; ``train`` holds
    the remaining command-line flags for the record.
    """

    batch_size: int
    microbatch: int
    lr: float
    ema_rates: list[float]
    log_dir: str
    weight_decay: float = 0.0
    lr_anneal_steps: int = 0
    max_steps: int = 0
    log_interval: int = 10
    save_interval: int = 10000
    sample_interval: int = 0
    num_preview_samples: int = 16
    grad_clip: float = 0.0
    optimizer: str = "adamw"
    seed: int = 0
    keep_states: int = 1
    channels_last: bool = False
    compile: bool = False
    max_bad_steps: int = 20
    trust_checkpoint: bool = False
    class_dropout_prob: float = 0.0
    ema_warmup: bool = False
    run_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "microbatch": self.microbatch}
        positive.update(log_interval=self.log_interval, save_interval=self.save_interval)
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.batch_size % self.microbatch:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by microbatch {self.microbatch}")
        for name in ("lr_anneal_steps", "max_steps", "sample_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 turns it off), got {self.grad_clip}")
        if self.num_preview_samples <= 0:
            raise ValueError(f"num_preview_samples must be positive, got {self.num_preview_samples}")
        if self.max_bad_steps <= 0:
            raise ValueError(
                f"max_bad_steps must be a positive integer (non-finite steps in a row before stopping), "
                f"got {self.max_bad_steps}"
            )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if not self.log_dir:
            raise ValueError("log_dir must name a directory")

    def last_step(self) -> int | None:
        """The step count training stops at: the smaller of max_steps and lr_anneal_steps that are set."""
        limits = [limit for limit in (self.max_steps, self.lr_anneal_steps) if limit > 0]
        return min(limits) if limits else None
