"""The UNet configurations the benchmarks run, and the kernel shapes derived from them.

Flags are improved-diffusion's published run flags (its README), on top of ``model_and_diffusion_defaults``
(or ``sr_model_and_diffusion_defaults`` for the upsampler). Kernel shapes are not typed in by hand: each
model is built on the ``meta`` device and run once with hooks on its norm and attention modules, which
record the shape of every call.
"""

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fastdiff.nn import count_op_calls
from fastdiff.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

KERNELS = ("group_norm", "group_norm_silu", "group_norm_scale_shift_silu", "qkv_attention")
"""Benchmarked ops, named as in ``fastdiff.ops``."""


@dataclass(frozen=True)
class UNetConfig:
    """One model: its flags (overrides of the defaults), and its batch on CPU and on a GPU."""

    name: str
    description: str
    flags: Mapping[str, object]
    cpu_batch: int
    cuda_batch: int
    super_res: bool = False

    def batch(self, device: torch.device) -> int:
        return self.cuda_batch if device.type == "cuda" else self.cpu_batch

    def all_flags(self, **overrides: object) -> dict:
        """The full flag dict: defaults, then this config's flags, then ``overrides``."""
        defaults = sr_model_and_diffusion_defaults() if self.super_res else model_and_diffusion_defaults()
        unknown = set(self.flags) - set(defaults)
        if unknown:
            raise ValueError(f"config {self.name!r} has unknown flags {sorted(unknown)}")
        return {**defaults, **self.flags, **overrides}

    def create(self, **overrides: object) -> tuple[nn.Module, object]:
        """(model, diffusion) for these flags; ``overrides`` e.g. ``use_checkpoint=True``."""
        factory = sr_create_model_and_diffusion if self.super_res else create_model_and_diffusion
        return factory(**self.all_flags(**overrides))

    @property
    def image_size(self) -> int:
        flags = self.all_flags()
        return flags["large_size"] if self.super_res else flags["image_size"]

    def model_inputs(
        self, batch: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict]:
        """x ``[batch, 3, S, S]`` and the model kwargs (``low_res``, ``y``) the flags ask for."""
        flags = self.all_flags()
        size = self.image_size
        x = torch.randn(batch, 3, size, size, device=device, generator=generator)
        kwargs = {}
        if self.super_res:
            small = flags["small_size"]
            kwargs["low_res"] = torch.randn(batch, 3, small, small, device=device, generator=generator)
        if flags["class_cond"]:
            kwargs["y"] = torch.randint(0, 1000, (batch,), device=device, generator=generator)
        return x, kwargs


CIFAR10_32 = UNetConfig(
    "cifar10-32",
    "improved-diffusion CIFAR-10 (L_hybrid): 32x32, 128 channels, 3 res blocks, dropout 0.3",
    {"image_size": 32, "num_channels": 128, "num_res_blocks": 3, "learn_sigma": True, "dropout": 0.3},
    cpu_batch=4,
    cuda_batch=128,
)
IMAGENET_64 = UNetConfig(
    "imagenet-64",
    "improved-diffusion unconditional ImageNet-64 (L_hybrid): 64x64, 128 channels, 3 res blocks",
    {"image_size": 64, "num_channels": 128, "num_res_blocks": 3, "learn_sigma": True},
    cpu_batch=2,
    cuda_batch=128,
)
UPSAMPLER_256 = UNetConfig(
    "imagenet-256-sr",
    "improved-diffusion ImageNet 64->256 upsampler: 256x256, 192 channels, 2 res blocks, class-conditional",
    {"num_channels": 192, "num_res_blocks": 2, "learn_sigma": True, "class_cond": True},
    cpu_batch=1,
    cuda_batch=16,
    super_res=True,
)
KERNEL_CONFIGS = (CIFAR10_32, IMAGENET_64, UPSAMPLER_256)
"""Where the kernel benchmarks take their shapes. GPU batches: the README's 128 for 32 and 64; 16 for the
256x256 upsampler, whose README batch of 256 does not fit one GPU (the README suggests --microbatch)."""

YARDSTICK = UNetConfig(
    "yardstick-32",
    "32x32, 64 channels, 2 res blocks, learn_sigma, batch 16; improved-diffusion's other defaults "
    "(use_scale_shift_norm=True, attention at 16,8 with 4 heads, dropout 0)",
    {"image_size": 32, "num_channels": 64, "num_res_blocks": 2, "learn_sigma": True},
    cpu_batch=16,
    cuda_batch=16,
)
END_TO_END_CONFIGS = {"cpu": (YARDSTICK,), "cuda": (YARDSTICK, CIFAR10_32)}
"""Models of the end-to-end benchmarks per device type."""


@dataclass(frozen=True)
class KernelCall:
    """Calls of one op at one per-sample shape inside a model's forward.

    ``shape``: ``(C, *spatial)`` for the norms, ``(3 * H * D, T)`` for attention (batch excluded).
    """

    kernel: str
    shape: tuple[int, ...]
    heads: int
    count: int

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def label(self) -> str:
        if self.kernel == "qkv_attention":
            width, tokens = self.shape
            head_dim = width // (3 * self.heads)
            return f"C{width // 3}xT{tokens}xH{self.heads}(D{head_dim})"
        return "C" + "x".join(str(s) for s in self.shape)


@dataclass(frozen=True)
class KernelCase:
    """One benchmarked op at one shape: the model it comes from and the batch it runs with."""

    config: UNetConfig
    call: KernelCall
    batch: int

    @property
    def id(self) -> str:
        return f"{self.config.name}-{self.call.label}-N{self.batch}"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.call.shape)


def unet_kernel_calls(config: UNetConfig) -> list[KernelCall]:
    """Every distinct (op, shape) of one forward of ``config``'s model, with its call count.

    The model is built on the ``meta`` device, so nothing is allocated or computed.
    """
    with torch.device("meta"):
        model, _ = config.create()
    x, kwargs = config.model_inputs(1, "meta")
    seen: Counter = Counter()
    for (kernel, shape, groups), count in count_op_calls(
        model, x, torch.zeros(1, device="meta"), **kwargs
    ).items():
        seen[(kernel, shape, groups if kernel == "qkv_attention" else 0)] += count  # heads; 0 for norms
    return [KernelCall(kernel, shape, heads, count) for (kernel, shape, heads), count in seen.items()]


def heaviest_calls(calls: list[KernelCall], kernel: str, top: int) -> list[KernelCall]:
    """The ``top`` shapes of ``kernel`` that process the most elements per forward (count x size)."""
    if top < 1:
        raise ValueError(f"top must be a positive int, got {top!r}")
    matching = [c for c in calls if c.kernel == kernel]
    return sorted(matching, key=lambda c: (c.count * c.elements, c.elements), reverse=True)[:top]


def kernel_cases(device: torch.device, per_config: int) -> list[KernelCase]:
    """Benchmark cases: for each config and op, its ``per_config`` heaviest shapes, at the device's batch."""
    cases = []
    for config in KERNEL_CONFIGS:
        calls = unet_kernel_calls(config)
        for kernel in KERNELS:
            for call in heaviest_calls(calls, kernel, per_config):
                cases.append(KernelCase(config, call, config.batch(device)))
    return cases
