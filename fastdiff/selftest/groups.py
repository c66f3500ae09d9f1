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
    lists its checks, a one-line ``summary`` of what it measures, and its ``share`` of the budget (the
    runner normalises the shares of the groups selected; see ``run``)."""

    name: str
    module: str
    summary: str
    share: float

    def plan(self, options: Options) -> list[Check]:
        """This group's checks on ``options.device`` (each named; nothing has run yet)."""
        return importlib.import_module(f"fastdiff.selftest.{self.module}").plan(options)


GROUPS: tuple[Group, ...] = (
    Group(
        "versions",
        "versions",
        "Python, torch, Triton, CUDA, the GPU; which fastdiff backends serve here.",
        0.02,
    ),
    Group(
        "accuracy",
        "accuracy",
        "Every op with the config the default rule picks, forward and every gradient against float64: "
        "small odd shapes in every dtype and layout; at the call shapes of improved-diffusion's "
        "ImageNet-64, CIFAR-10 and upsampler UNets (not with --quick), each Triton kernel and config the "
        "rule picks there once per dtype (every call on a CPU's C++ kernels); Tq != Tk attention.",
        0.25,
    ),
    Group("determinism", "determinism", "Three runs of each op bitwise equal, outputs and gradients.", 0.06),
    Group(
        "train_step",
        "train_step",
        "improved-diffusion's 64x64 UNet train step (bf16 autocast) on fastdiff's kernels against the same "
        "UNet in improved-diffusion's eager code and against torch.compile of that eager code, then "
        "fastdiff's UNet under torch.compile(fullgraph=True): loss and gradient agreement, step-time "
        "ratios, peak memory.",
        0.40,
    ),
    Group(
        "kernel_timing",
        "timing",
        "Each op against F.group_norm + SiLU, SDPA / einsum attention and torch.compile of the eager code: "
        "median times, GB/s over the op's bytes floor, share of the device's copy and peak bandwidth.",
        0.17,
    ),
    Group(
        "large", "large", "GroupNorm+SiLU over 2**31 elements and attention at T=4096 against float64.", 0.05
    ),
    Group(
        "all_configs",
        "configs",
        "Every config of every launch-layer list, forced one at a time, against float64.",
        0.05,
    ),
)
"""Priority order, and shares of the budget. Of the default 300 s the first five groups have 270 s
reserved (versions 6, accuracy 75, determinism 18, train_step 120, kernel_timing 51) and large and
all_configs 15 s each, plus what the groups before them leave. The sizing, for a cold H100 (empty Triton
and inductor caches; Triton's 0.3-0.5 s per compile; distinct compiles counted on a CPU by replaying each
group's launches through the fixed rules for sm_90 with nothing launched):

* accuracy: 33 small cases, the 27 real-UNet cases (of 465) that launch a kernel, config and dtype no
  case before them does (84 such triples; ``accuracy.covering``), 6 Tq != Tk cases: 66 checks and 192
  distinct compiles (58-96 s cold). Planning replays the 465 calls on the meta device: about 45 s on two
  loaded cores of a small AMD EPYC, not yet measured on a GPU host (part of the group's share).
  Before that cut (2026-12-03) it took all 465 real-UNet cases and 612 compiles (3-5 minutes by itself).
  Its runs, float64 references included, are estimated at well under 30 s on a GPU.
* determinism: 12 cases, 42 compiles, 7 of them not already compiled by accuracy.
* train_step: 77 Triton compiles for the UNet's fp32 and bf16 steps at batch 16 (56 not compiled
  before), two inductor compiles of the UNet, forward and backward (the eager code's, then fastdiff's;
  estimated at 40-70 s each on a server CPU), and 15 timed steps per contestant. On a cold cache the
  share may end before the last check (torch.compile of fastdiff's UNet); ``--only train_step`` reruns it
  with inductor's cache warm.
* kernel_timing: 28 Triton compiles (7 new), 8 inductor compiles of one op each (bf16 only), 17 timed
  runs per contestant.

In all 262 distinct Triton compiles for the first five groups (``fastdiff.selftest.cold`` counts them on
any machine; ``tests/test_selftest_compiles.py`` bounds them), 672 before the accuracy cut.

These are estimates until a GPU runs the selftest: the reports give every group's compile count and
compile seconds apart from its run seconds, which is what the next sizing should use."""

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
