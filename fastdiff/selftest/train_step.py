"""Group ``train_step``: improved-diffusion's 64x64 UNet (a 16x16 one with --quick) trained one step in
bf16 autocast on fastdiff's kernels (triton on CUDA, cpp on a CPU), against the same UNet and weights in
improved-diffusion's eager code (``eager.make_eager``: GroupNorm32 in fp32, ``nn.SiLU``, einsum attention)
and, on CUDA, against ``torch.compile`` of that eager UNet (inductor).

The weights are moved off improved-diffusion's init (``_unzero``), so every layer's gradient counts.
Agreement: fastdiff's fp32 step against the eager one (both TF32 off) within ``FP32_AGREEMENT``; then
every contestant's bf16 loss and gradients are compared with the eager UNet in exact fp32, and fastdiff
passes when its error is within ``AGREEMENT_FACTOR`` x the other contestant's error in the same bf16
autocast plus ``AGREEMENT_FLOOR`` (errors: |loss - ref| / |ref|, ||grad - ref|| / ||ref|| over all
parameters). Then step time (forward, backward, AdamW) and the step's peak memory above what was
resident before it, reported as ratios.
"""

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator

import torch

from fastdiff import ops
from fastdiff.ops import backend as backends
from fastdiff.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from fastdiff.selftest.cases import MODELS
from fastdiff.selftest.eager import make_eager
from fastdiff.selftest.records import Check, Options, Result, not_run
from fastdiff.selftest.timing import _sync, compiled_first_call, median_seconds

Tensor = torch.Tensor

GROUP = "train_step"
TINY_FLAGS = {
    "image_size": 16,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2",
    "attention_resolutions": "8",
    "num_heads": 2,
    "learn_sigma": True,
}
"""--quick's UNet: the 64x64 model's structure (scale-shift norms, attention, learned sigma) at 16x16."""

FP32_AGREEMENT = {"loss": 1e-4, "grad": 1e-3}
"""Bounds on fastdiff's fp32 step (TF32 off) against the exact fp32 eager step: the same math in the same
precision, differing only by the order of summation."""
AGREEMENT_FACTOR = 2.0
AGREEMENT_FLOOR = {"loss": 1e-3, "grad": 2e-3}
"""fastdiff's bf16 error (against the exact fp32 eager step) may be this many times the other contestant's
bf16 error, plus this floor: bf16 autocast rounds every convolution and matmul to 8 bits, so both errors
are of the order of 1e-3 to 1e-2 and differ by the luck of rounding."""


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions without TF32, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _unzero(model: torch.nn.Module) -> None:
    """Weights as training leaves them: the zero-initialised layers (each ResBlock's last convolution,
    attention's projection, the output convolution) get PyTorch's default init, and the GroupNorm scales
    and shifts move off 1 and 0. At improved-diffusion's init the output is exactly zero, so the loss does
    not depend on the network and every gradient but the output layer's is zero: a comparison there would
    prove nothing about the kernels' backward."""
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, torch.nn.GroupNorm) and module.affine:
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
            elif (
                isinstance(weight, torch.Tensor) and hasattr(module, "reset_parameters") and not weight.any()
            ):
                module.reset_parameters()


class TrainBench:
    """The UNet, its batch and the contestants (built on first use, shared by the group's checks)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.kernel = "triton" if options.is_cuda else "cpp"
        self.flags = TINY_FLAGS if options.quick else MODELS["imagenet-64"][0]
        self.batch = 2 if options.quick or not options.is_cuda else 16
        model_name = "tiny 16x16" if options.quick else "ImageNet-64"
        self.label = f"{model_name} UNet batch {self.batch}"

    @functools.cached_property
    def setup(self):
        """(fastdiff model, eager model, diffusion, (x, t, noise)): same weights, same batch."""
        torch.manual_seed(0)
        model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **self.flags})
        _unzero(model)
        model.to(self.options.device)
        eager_model = copy.deepcopy(model)
        make_eager(eager_model)
        size, device = self.flags["image_size"], self.options.device
        generator = torch.Generator().manual_seed(4)
        x = torch.randn(self.batch, 3, size, size, generator=generator).to(device)
        noise = torch.randn(self.batch, 3, size, size, generator=generator).to(device)
        t = torch.randint(0, diffusion.num_timesteps, (self.batch,), generator=generator).to(device)
        return model, eager_model, diffusion, (x, t, noise)

    def loss(self, net: torch.nn.Module, backend: str, bf16: bool) -> Tensor:
        """The batch's mean training loss of ``net`` (``backend`` serves fastdiff's ops in it)."""
        _, _, diffusion, (x, t, noise) = self.setup
        with ops.use_backend(backend), torch.autocast(self.options.device.type, torch.bfloat16, enabled=bf16):
            return diffusion.training_losses(net, x, t, noise=noise)["loss"].mean()

    def loss_and_grads(self, net: torch.nn.Module, backend: str, bf16: bool) -> tuple[float, Tensor]:
        """One forward and backward: the loss and every parameter's gradient, flattened (fp32)."""
        net.zero_grad(set_to_none=True)
        loss = self.loss(net, backend, bf16)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in net.parameters()])
        net.zero_grad(set_to_none=True)
        return loss.item(), grads

    @functools.cached_property
    def reference(self) -> tuple[float, Tensor]:
        """The eager UNet's loss and gradients in exact fp32 (TF32 off)."""
        with _exact_fp32():
            return self.loss_and_grads(self.setup[1], "auto", bf16=False)

    @functools.cached_property
    def compiled(self) -> torch.nn.Module:
        """``torch.compile`` of the eager UNet (inductor); its first forward+backward is timed as
        compiling."""
        net = torch.compile(self.setup[1])
        compiled_first_call(lambda: self.loss(net, "auto", bf16=True).backward(), self.options.device)
        net.zero_grad(set_to_none=True)
        return net

    def errors(self, loss: float, grads: Tensor) -> dict[str, float]:
        """Relative loss and gradient errors against the fp32 reference."""
        ref_loss, ref_grads = self.reference
        grad = ((grads.double() - ref_grads.double()).norm() / ref_grads.double().norm()).item()
        return {"loss": abs(loss - ref_loss) / abs(ref_loss), "grad": grad}


def _check_agreement(bench: TrainBench, other: str) -> Result:
    """fastdiff's bf16 step against ``other`` (``eager`` or ``torch.compile``) in bf16, both measured
    against the fp32 eager step."""
    model, eager_model = bench.setup[:2]
    ours_loss, ours_grads = bench.loss_and_grads(model, bench.kernel, bf16=True)
    net = eager_model if other == "eager" else bench.compiled
    their_loss, their_grads = bench.loss_and_grads(net, "auto", bf16=True)
    ours, theirs = bench.errors(ours_loss, ours_grads), bench.errors(their_loss, their_grads)
    difference = (ours_grads - their_grads).norm() / their_grads.norm()
    bounds = {key: AGREEMENT_FACTOR * theirs[key] + AGREEMENT_FLOOR[key] for key in ours}
    failed = [
        f"{key} error {ours[key]:.3g} > bound {bounds[key]:.3g}"
        for key in ours
        if not ours[key] <= bounds[key]
    ]
    detail = "; ".join(failed) or (
        f"errors vs fp32: fastdiff loss {ours['loss']:.2g} grad {ours['grad']:.2g}, {other} loss "
        f"{theirs['loss']:.2g} grad {theirs['grad']:.2g}; fastdiff vs {other} grad {difference:.2g}"
    )
    data = {
        "losses": {"fastdiff": ours_loss, other: their_loss, "fp32_eager": bench.reference[0]},
        "errors": {"fastdiff": ours, other: theirs},
        "bounds": bounds,
        "grad_difference": difference.item(),
        "backend": bench.kernel,
    }
    return Result(GROUP, "", "fail" if failed else "pass", detail, data)


def _check_fp32(bench: TrainBench) -> Result:
    """fastdiff's fp32 step (TF32 off) against the eager fp32 step: within ``FP32_AGREEMENT``."""
    with _exact_fp32():
        loss, grads = bench.loss_and_grads(bench.setup[0], bench.kernel, bf16=False)
    errors = bench.errors(loss, grads)
    failed = [
        f"{k} error {errors[k]:.3g} > {FP32_AGREEMENT[k]:g}"
        for k in errors
        if not errors[k] <= FP32_AGREEMENT[k]
    ]
    detail = "; ".join(failed) or f"loss rel. error {errors['loss']:.2g}, gradients {errors['grad']:.2g}"
    data = {"errors": errors, "bounds": FP32_AGREEMENT, "backend": bench.kernel}
    return Result(GROUP, "", "fail" if failed else "pass", detail, data)


def _check_step_time(bench: TrainBench) -> Result:
    """Median bf16 step time (forward, backward, AdamW) of each contestant; on CUDA its peak memory."""
    options = bench.options
    model, eager_model = bench.setup[:2]
    contestants = {"fastdiff": (model, bench.kernel), "eager": (eager_model, "auto")}
    if options.is_cuda:
        contestants["torch.compile"] = (bench.compiled, "auto")
    seconds, peaks = {}, {}
    repeats = options if options.is_cuda else Options(options.device, quick=True)  # CPU: 3 steps
    for name, (net, backend) in contestants.items():
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        resident = 0
        if options.is_cuda:
            _sync(options.device)
            resident = torch.cuda.memory_allocated(options.device)
            torch.cuda.reset_peak_memory_stats(options.device)

        def train(net=net, backend=backend, optimizer=optimizer) -> None:
            net.zero_grad(set_to_none=True)
            bench.loss(net, backend, bf16=True).backward()
            optimizer.step()

        seconds[name] = median_seconds(train, repeats, warmup=1)
        if options.is_cuda:  # the step's peak above what was resident before it (every model's weights)
            peaks[name] = torch.cuda.max_memory_allocated(options.device) - resident
        del train, optimizer  # frees the optimizer state before the next contestant's steps
        net.zero_grad(set_to_none=True)
    ours = seconds["fastdiff"]
    speedup = {name: seconds[name] / ours for name in seconds if name != "fastdiff"}
    detail = f"{ours * 1e3:.1f} ms on {bench.kernel}; " + ", ".join(
        f"{seconds[n] * 1e3:.1f} ms {n} ({speedup[n]:.2f}x)" for n in speedup
    )
    data = {"seconds": seconds, "speedup": speedup, "precision": "bf16", "flags": bench.flags}
    if options.is_cuda:
        data["step_peak_bytes"] = peaks
        data["peak_ratio"] = {n: peaks["fastdiff"] / peaks[n] for n in peaks if n != "fastdiff"}
        detail += "; step peak above resident " + ", ".join(f"{n} {peaks[n] / 2**20:.0f} MiB" for n in peaks)
    else:
        detail += "; torch.compile and peak memory: not run (no CUDA device)"
    return Result(GROUP, "", "info", detail, data)


def plan(options: Options) -> list[Check]:
    bench = TrainBench(options)
    label = bench.label
    refusal = backends.backend_refusal(bench.kernel, options.device)

    def unless_refused(check: Callable[[], Result]) -> Callable[[], Result]:
        if refusal:
            return lambda: not_run(GROUP, "", "unavailable", f"fastdiff's {bench.kernel} kernels: {refusal}")
        return check

    def compiled() -> Result:
        if not options.is_cuda:
            return not_run(
                GROUP, "", "device", "no CUDA device (inductor's CPU compile of a UNet takes minutes)"
            )
        return _check_agreement(bench, "torch.compile")

    return [
        Check(f"fastdiff vs eager agreement, {label} fp32", unless_refused(lambda: _check_fp32(bench))),
        Check(
            f"fastdiff vs eager agreement, {label} bf16",
            unless_refused(lambda: _check_agreement(bench, "eager")),
        ),
        Check(f"fastdiff vs torch.compile(eager) agreement, {label} bf16", unless_refused(compiled)),
        Check(f"step time and peak memory, {label} bf16", unless_refused(lambda: _check_step_time(bench))),
    ]
