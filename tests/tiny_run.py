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
