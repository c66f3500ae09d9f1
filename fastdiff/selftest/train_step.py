"""Group ``train_step``: improved-diffusion's 64x64 UNet (a 16x16 one with --quick) trained one step in
bf16 autocast on fastdiff's kernels (triton on CUDA, cpp on a CPU), against the same UNet and weights in
improved-diffusion's eager code (``eager.make_eager``: GroupNorm32 in fp32, ``nn.SiLU``, einsum attention)
and, on CUDA, against ``torch.compile`` of that eager UNet (inductor); last, on CUDA, fastdiff's UNet under
``torch.compile(fullgraph=True)`` with inductor, as ``fastdiff.train --compile True`` runs it.

The weights are moved off improved-diffusion's init (``_unzero``), so every layer's gradient counts.
Agreement: fastdiff's fp32 step against the eager one (both TF32 off) within ``FP32_AGREEMENT``; then
every contestant's bf16 loss and gradients are compared with the eager UNet in exact fp32, and fastdiff
passes when its error is within ``AGREEMENT_FACTOR`` x the other contestant's error in the same bf16
autocast plus ``AGREEMENT_FLOOR`` (errors: |loss - ref| / |ref|, ||grad - ref|| / ||ref|| over all
parameters). Step time (forward, backward, AdamW) and the step's peak memory above what was resident
before it are reported as ratios. Each check stands alone, so a budget cut keeps the checks before it.
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
        self._nets: dict[str, tuple[torch.nn.Module, str]] = {}
        self._bf16: dict[str, dict[str, float]] = {}
        self._steps: dict[str, tuple[float, int | None]] = {}
        self._fastdiff_grads: Tensor | None = None

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

    def net(self, name: str) -> tuple[torch.nn.Module, str]:
        """Contestant ``name`` (one of ``CONTESTANTS``): its module and the backend its fastdiff ops run on.
        The compiled ones are compiled on first use, their first forward+backward timed as compiling."""
        if name not in self._nets:
            model, eager_model = self.setup[:2]
            if name in ("fastdiff", "eager"):
                self._nets[name] = (model, self.kernel) if name == "fastdiff" else (eager_model, "auto")
            else:
                source, backend = self.net(name.removeprefix("torch.compile(").removesuffix(")"))
                net = torch.compile(source, fullgraph=source is model)
                compiled_first_call(
                    lambda: self.loss(net, backend, bf16=True).backward(), self.options.device
                )
                net.zero_grad(set_to_none=True)
                self._nets[name] = (net, backend)
        return self._nets[name]

    def bf16(self, name: str) -> dict[str, float]:
        """Contestant ``name``'s bf16 loss, and its loss and gradient errors against the fp32 reference;
        also ``grad_vs_fastdiff``, its gradients' distance from fastdiff's (relative)."""
        if name != "fastdiff":
            self.bf16("fastdiff")  # its gradients, for the distance
        if name not in self._bf16:
            loss, grads = self.loss_and_grads(*self.net(name), bf16=True)
            ref_loss, ref_grads = self.reference
            found = {"loss_value": loss, "loss": abs(loss - ref_loss) / abs(ref_loss)}
            found["grad"] = ((grads.double() - ref_grads.double()).norm() / ref_grads.double().norm()).item()
            if name == "fastdiff":
                self._fastdiff_grads = grads
            else:
                ours = self._fastdiff_grads
                found["grad_vs_fastdiff"] = ((grads - ours).norm() / ours.norm()).item()
            self._bf16[name] = found
        return self._bf16[name]

    def step(self, name: str) -> tuple[float, int | None]:
        """Contestant ``name``'s median bf16 step time (forward, backward, AdamW) and, on CUDA, the step's
        peak memory above what was resident before it. AdamW runs with lr 0: a training step's work, with
        the weights left as they were for the checks after it."""
        if name not in self._steps:
            net, backend = self.net(name)
            optimizer = torch.optim.AdamW(net.parameters(), lr=0.0)
            resident = 0
            if self.options.is_cuda:
                _sync(self.options.device)
                resident = torch.cuda.memory_allocated(self.options.device)
                torch.cuda.reset_peak_memory_stats(self.options.device)

            def train() -> None:
                net.zero_grad(set_to_none=True)
                self.loss(net, backend, bf16=True).backward()
                optimizer.step()

            repeats = self.options if self.options.is_cuda else Options(self.options.device, quick=True)
            seconds = median_seconds(train, repeats, warmup=1)
            peak = None
            if self.options.is_cuda:
                peak = torch.cuda.max_memory_allocated(self.options.device) - resident
            del train, optimizer  # frees the optimizer state
            net.zero_grad(set_to_none=True)
            self._steps[name] = (seconds, peak)
        return self._steps[name]


CONTESTANTS = ("fastdiff", "eager", "torch.compile(eager)", "torch.compile(fastdiff)")
"""fastdiff's UNet; the same UNet in improved-diffusion's eager code; inductor's compile of that eager
UNet; inductor's compile of fastdiff's UNet (``fullgraph=True``, as ``fastdiff.train --compile True``)."""


def _check_fp32(bench: TrainBench) -> Result:
    """fastdiff's fp32 step (TF32 off) against the eager fp32 step: within ``FP32_AGREEMENT``."""
    with _exact_fp32():
        loss, grads = bench.loss_and_grads(bench.setup[0], bench.kernel, bf16=False)
    ref_loss, ref_grads = bench.reference
    errors = {
        "loss": abs(loss - ref_loss) / abs(ref_loss),
        "grad": ((grads.double() - ref_grads.double()).norm() / ref_grads.double().norm()).item(),
    }
    failed = [
        f"{k} error {errors[k]:.3g} > {FP32_AGREEMENT[k]:g}"
        for k in errors
        if not errors[k] <= FP32_AGREEMENT[k]
    ]
    detail = "; ".join(failed) or f"loss rel. error {errors['loss']:.2g}, gradients {errors['grad']:.2g}"
    data = {"errors": errors, "bounds": FP32_AGREEMENT, "backend": bench.kernel}
    return Result(GROUP, "", "fail" if failed else "pass", detail, data)


def _check_agreement(bench: TrainBench, ours: str, theirs: str, timed: bool) -> Result:
    """``ours``' bf16 errors against the fp32 step within ``AGREEMENT_FACTOR`` x ``theirs``' plus the floor;
    with ``timed``, both contestants' step times and peak memory too (ratios: theirs / ours)."""
    mine, other = bench.bf16(ours), bench.bf16(theirs)
    bounds = {key: AGREEMENT_FACTOR * other[key] + AGREEMENT_FLOOR[key] for key in AGREEMENT_FLOOR}
    failed = [f"{k} error {mine[k]:.3g} > bound {bounds[k]:.3g}" for k in bounds if not mine[k] <= bounds[k]]
    detail = "; ".join(failed) or (
        f"errors vs fp32: {ours} loss {mine['loss']:.2g} grad {mine['grad']:.2g}, {theirs} loss "
        f"{other['loss']:.2g} grad {other['grad']:.2g}"
    )
    if ours != "fastdiff":
        detail += f"; {ours} vs fastdiff grad {mine['grad_vs_fastdiff']:.2g}"
    data = {"errors": {ours: mine, theirs: other}, "bounds": bounds, "backend": bench.kernel}
    if timed:
        timing = _steps(bench, (ours, theirs, *(n for n in bench._steps if n not in (ours, theirs))))
        detail += "; " + timing.detail
        data.update(timing.data)
    return Result(GROUP, "", "fail" if failed else "pass", detail, data)


def _steps(bench: TrainBench, names: tuple[str, ...]) -> Result:
    """Step times and peak memory of ``names``; ratios of the others to the first."""
    measured = {name: bench.step(name) for name in names}
    seconds = {name: found[0] for name, found in measured.items()}
    first = names[0]
    speedup = {name: seconds[name] / seconds[first] for name in names[1:]}
    detail = f"step {seconds[first] * 1e3:.1f} ms {first}, " + ", ".join(
        f"{seconds[n] * 1e3:.1f} ms {n} ({speedup[n]:.2f}x)" for n in speedup
    )
    data: dict = {"step_seconds": seconds, "step_speedup": speedup, "precision": "bf16", "flags": bench.flags}
    if bench.options.is_cuda:
        peaks = {name: found[1] for name, found in measured.items()}
        data["step_peak_bytes"] = peaks
        data["peak_ratio"] = {n: peaks[first] / peaks[n] for n in names[1:]}
        detail += "; step peak above resident " + ", ".join(f"{n} {peaks[n] / 2**20:.0f} MiB" for n in peaks)
    else:
        detail += "; peak memory not measured on a CPU"
    return Result(GROUP, "", "info", detail, data)


def plan(options: Options) -> list[Check]:
    bench = TrainBench(options)
    label = f"{bench.label} bf16"
    refusal = backends.backend_refusal(bench.kernel, options.device)

    def ready(check: Callable[[], Result], cuda_only: bool = False) -> Callable[[], Result]:
        if refusal:
            return lambda: not_run(GROUP, "", "unavailable", f"fastdiff's {bench.kernel} kernels: {refusal}")
        if cuda_only and not options.is_cuda:
            why = "no CUDA device (inductor's CPU compile of a UNet takes minutes)"
            return lambda: not_run(GROUP, "", "device", why)
        return check

    return [
        Check(f"fastdiff vs eager agreement, {bench.label} fp32", ready(lambda: _check_fp32(bench))),
        Check(
            f"fastdiff vs eager agreement, {label}",
            ready(lambda: _check_agreement(bench, "fastdiff", "eager", timed=False)),
        ),
        Check(
            f"fastdiff vs eager step time and peak memory, {label}",
            ready(lambda: _steps(bench, CONTESTANTS[:2])),
        ),
        Check(
            f"fastdiff vs torch.compile(eager), {label}",
            ready(
                lambda: _check_agreement(bench, "fastdiff", "torch.compile(eager)", timed=True),
                cuda_only=True,
            ),
        ),
        Check(
            f"torch.compile(fastdiff) fullgraph vs eager, {label}",
            ready(
                lambda: _check_agreement(bench, "torch.compile(fastdiff)", "eager", timed=True),
                cuda_only=True,
            ),
        ),
    ]
