"""What the trainer, sampler and NLL tests share: a tiny model's flags and one CPU thread."""

import pytest
import torch

TINY_MODEL_FLAGS = dict(
    image_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="4",
    num_heads=2,
    diffusion_steps=50,
)
"""An 8x8 UNet with attention, small enough for many training runs in a test."""


def as_argv(flags: dict) -> list[str]:
    """``{"lr": 1e-3}`` -> ``["--lr", "0.001"]``."""
    return [part for name, value in flags.items() for part in (f"--{name}", str(value))]


TINY_RUN_ARGV = [*as_argv(TINY_MODEL_FLAGS), "--precision", "fp32"]
"""The tiny model's flags for train / sample / nll, in fp32 so runs compare exactly on any CPU."""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from more threads, and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_loop(ctx, log_dir, precision_name: str = "fp32", batch: int = 4, **flags):
    """A TrainLoop of the tiny model on 64 items of the shapes dataset (8x8 RGB unless ``flags`` give another
    ``image_size`` or ``in_channels``; ``batch`` per step), lr 1e-3, one EMA at 0.9, with ``flags`` (flat
    flag names, e.g. ``microbatch=2``) on top."""
    from fastdiff.builders import build_diffusion, build_model
    from fastdiff.config import RunConfig
    from fastdiff.data import BatchStream, ShapesDataset
    from fastdiff.diffusion import create_named_schedule_sampler
    from fastdiff.runtime.precision import resolve_precision
    from fastdiff.training.loop import TrainLoop

    base = dict(batch_size=batch, lr=1e-3, ema_rate="0.9", log_dir=str(log_dir), seed=0)
    config = RunConfig().with_flags({**TINY_MODEL_FLAGS, **base, **flags})
    torch.manual_seed(0)
    model = build_model(config.model, config.diffusion)
    diffusion = build_diffusion(config.diffusion)
    return TrainLoop(
        config=config,
        model=model,
        diffusion=diffusion,
        data=BatchStream(
            ShapesDataset(config.model.image_hw, length=64, channels=config.model.in_channels), batch, seed=0
        ),
        schedule_sampler=create_named_schedule_sampler(config.train.schedule_sampler, diffusion),
        ctx=ctx,
        precision=resolve_precision(precision_name, ctx.device),
    )
