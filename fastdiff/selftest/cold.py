"""Cold compiles of the selftest: the distinct Triton kernel compilations the default plan's groups ask for on
a GPU, counted on any machine by replaying their kernel launches on the ``meta`` device through the launch
layer (``launch.replaying``: every launch makes the choices a CUDA launch makes, nothing runs, nothing
counts as compiled in the process).

What is replayed, per group (a GPU run's shapes, dtypes and layouts; ``Options`` on ``cuda``):

* accuracy: ``accuracy.planned_cases`` on the triton backend, forward and backward;
* determinism: its cases, forward and backward;
* train_step: improved-diffusion's 64x64 UNet at the group's batch, forward and backward in fp32 and in
  bf16 (``MetaBf16Autocast``: CUDA autocast's lowering, emulated for meta tensors);
* kernel_timing: its op cases, forward and backward.

``versions`` launches no kernel; ``large`` and ``all_configs`` come after the first five groups, which the
default budget is sized for.
"""

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastdiff import ops
from fastdiff.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from fastdiff.selftest import accuracy, determinism, timing
from fastdiff.selftest.cases import MODELS, OpCase, forward_backward
from fastdiff.selftest.records import Options

META = torch.device("meta")
FIRST_GROUPS = ("versions", "accuracy", "determinism", "train_step", "kernel_timing")


class MetaBf16Autocast(TorchFunctionMode):
    """What CUDA autocast to bf16 does to a UNet step, for meta tensors: the ops autocast lowers
    (convolutions, linear layers, matmuls) get bf16 operands; everything else runs as given (autocast does
    not run on the meta device)."""

    LOWERED = frozenset({F.conv1d, F.conv2d, F.conv3d, F.linear, torch.matmul, torch.bmm, torch.baddbmm})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.LOWERED:
            args = tuple(self._lower(a) for a in args)
            kwargs = {k: self._lower(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    @staticmethod
    def _lower(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(torch.bfloat16)
        return value


def model_step(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, bf16: bool) -> Callable[[], None]:
    """One forward and backward of ``model`` (built on the meta device) on x ``[N, C, H, W]`` and timesteps
    t ``[N]`` with the triton backend, in bf16 (emulated autocast) or as given."""

    def step() -> None:
        mode = MetaBf16Autocast() if bf16 else contextlib.nullcontext()
        with ops.use_backend("triton"), mode:
            model(x, t).float().square().mean().backward()

    return step


def case_steps(cases: list[OpCase]) -> Callable[[], None]:
    """The forward and backward of each case on the triton backend."""

    def steps() -> None:
        for case in cases:
            forward_backward(case, case.inputs(META, None), "triton")

    return steps


def launches(workload: Callable[[], None]) -> set[str]:
    """Compile keys of the kernel launches ``workload`` makes (on meta tensors: nothing runs)."""
    from fastdiff.kernels import launch

    with launch.replaying() as launched:
        workload()
    return {key for _, _, key in launched}


def group_workloads() -> dict[str, Callable[[], None]]:
    """Per group of the default plan's first five, what makes its launches on a GPU (see the module doc),
    planned already: planning replays launches of its own (the accuracy group's choice among the real
    UNets' calls), which the workloads do not make."""
    options = Options(torch.device("cuda"), quick=False)
    accuracy_cases = [case for case, backend in accuracy.planned_cases(options) if backend == "triton"]
    flags = {**model_and_diffusion_defaults(), **MODELS["imagenet-64"][0]}
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**flags)
    batch, size = 16, flags["image_size"]
    x, t = torch.zeros(batch, 3, size, size, device=META), torch.zeros(batch, dtype=torch.long, device=META)
    timing_cases = [
        OpCase("flash_attention", shape, dtype) if op == "attention" else OpCase(op, shape, dtype, 32)
        for op, dtype, shape in timing.timing_cases(options)
    ]
    fp32_step, bf16_step = model_step(model, x, t, bf16=False), model_step(model, x, t, bf16=True)

    def train_step() -> None:
        fp32_step()
        bf16_step()

    return {
        "versions": lambda: None,
        "accuracy": case_steps(accuracy_cases),
        "determinism": case_steps([case for case, _ in determinism.cases(options)]),
        "train_step": train_step,
        "kernel_timing": case_steps(timing_cases),
    }


def group_compiles() -> dict[str, set[str]]:
    """Compile keys each of the default plan's first five groups asks for on a GPU (see the module doc)."""
    return {name: launches(workload) for name, workload in group_workloads().items()}
