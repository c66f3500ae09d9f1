"""The selftest's groups, in priority order: a budget spent early still covers what matters most.

Importing this module imports no kernel code (``TRITON_INTERPRET`` may still be set after it); a group's
module is imported when the group is planned.
"""

import importlib
from collections.abc import Sequence
from dataclasses import dataclass

from fastdiff.selftest.records import Check, Options


@dataclass(frozen=True)
class Group:
    """A group of checks: its ``name`` (what ``--only``/``--skip`` take), the module whose ``plan(options)``
    lists its checks, and a one-line ``summary`` of what it measures."""

    name: str
    module: str
    summary: str

    def plan(self, options: Options) -> list[Check]:
        """This group's checks on ``options.device`` (each named; nothing has run yet)."""
        return importlib.import_module(f"fastdiff.selftest.{self.module}").plan(options)


GROUPS: tuple[Group, ...] = (
    Group(
        "versions", "versions", "Python, torch, Triton, CUDA, the GPU; which fastdiff backends serve here."
    ),
    Group(
        "accuracy",
        "accuracy",
        "Every op with the config the default rule picks, at every call shape of improved-diffusion's "
        "CIFAR-10, ImageNet-64 and upsampler UNets (small odd shapes with --quick): forward and every "
        "gradient, every dtype and layout, against float64.",
    ),
    Group("determinism", "determinism", "Three runs of each op bitwise equal, outputs and gradients."),
    Group(
        "train_step",
        "train_step",
        "improved-diffusion's 64x64 UNet train step (bf16 autocast) on fastdiff's kernels against the same "
        "UNet in improved-diffusion's eager code and against torch.compile of that eager code: loss and "
        "gradient agreement, step-time ratios, peak memory.",
    ),
    Group(
        "kernel_timing",
        "timing",
        "Each op against F.group_norm + SiLU, SDPA / einsum attention and torch.compile of the eager code: "
        "median times, GB/s over the op's bytes floor, share of the device's copy and peak bandwidth.",
    ),
    Group("large", "large", "GroupNorm+SiLU over 2**31 elements and attention at T=4096 against float64."),
    Group(
        "all_configs",
        "configs",
        "Every config of every launch-layer list, forced one at a time, against float64.",
    ),
)
"""Priority order. The default budget is sized for the first five (see ``__main__.DEFAULT_BUDGET``)."""

NAMES = tuple(group.name for group in GROUPS)


def parse_names(value: str, flag: str) -> list[str]:
    """``a,b`` -> ``["a", "b"]``; a ValueError naming ``flag`` for an empty or unknown name."""
    names = [name.strip() for name in value.split(",")]
    unknown = [name for name in names if name not in NAMES]
    if not value.strip() or unknown:
        shown = ", ".join(repr(name) for name in unknown) or repr(value)
        raise ValueError(f"{flag}: no group named {shown}; the groups are {', '.join(NAMES)}")
    return names


def select(only: Sequence[str] | None, skip: Sequence[str] | None) -> list[Group]:
    """The groups to run, in priority order: those of ``only`` (all when None) less those of ``skip``."""
    wanted = set(NAMES if only is None else only) - set(skip or ())
    return [group for group in GROUPS if group.name in wanted]
