"""A training step of improved-diffusion's 64x64 UNet on fastdiff's kernels and on the torch backend:
loss and gradient agreement, step time, peak memory (a tiny UNet with --quick)."""

import contextlib
import copy
from collections.abc import Iterator

import torch

from fastdiff import ops
from fastdiff.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from fastdiff.selftest.cases import MODELS
from fastdiff.selftest.records import Options, Result
from fastdiff.selftest.timing import median_seconds

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

AGREEMENT = {"loss": 1e-4, "grad": 1e-3}
"""Bounds on |loss_a - loss_b| / |loss_b| and on ||grad_a - grad_b|| / ||grad_b|| over all parameters,
for one fp32 step (TF32 off) on each backend from the same weights and inputs."""


def _step_setup(options: Options):
    flags = TINY_FLAGS if options.quick else MODELS["imagenet-64"][0]
    batch = 2 if options.quick or not options.is_cuda else 16
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **flags})
    model.to(options.device)
    size = flags["image_size"]
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(batch, 3, size, size, generator=generator).to(options.device)
    noise = torch.randn(batch, 3, size, size, generator=generator).to(options.device)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=generator).to(options.device)
    return model, diffusion, (x, t, noise), flags, batch


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions without TF32, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_train_step(options: Options) -> Iterator[Result]:
    """One fp32 step's loss and gradients on the kernel backend against the torch backend; then time and
    peak memory of full steps (forward, backward, AdamW; bf16 autocast on a GPU) on each."""
    model, diffusion, (x, t, noise), flags, batch = _step_setup(options)
    kernel = "triton" if options.is_cuda else "cpp"
    precision = "bf16" if options.is_cuda else "fp32"
    label = f"{'tiny 16x16' if options.quick else 'ImageNet-64'} UNet batch {batch}"
    models = {kernel: model, "torch": copy.deepcopy(model)}

    def step(net: torch.nn.Module, backend: str, autocast: bool) -> torch.Tensor:
        net.zero_grad(set_to_none=True)
        with ops.use_backend(backend):
            with torch.autocast(options.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = diffusion.training_losses(net, x, t, noise=noise)["loss"].mean()
            loss.backward()
        return loss

    losses, grads = {}, {}
    with _exact_fp32():
        for backend, net in models.items():
            losses[backend] = step(net, backend, autocast=False).item()
            grads[backend] = torch.cat([p.grad.double().flatten() for p in net.parameters()])
            net.zero_grad(set_to_none=True)
    loss_error = abs(losses[kernel] - losses["torch"]) / abs(losses["torch"])
    grad_error = ((grads[kernel] - grads["torch"]).norm() / grads["torch"].norm()).item()
    del grads
    failed = [
        f"{what} relative error {error:.3g} > {AGREEMENT[what]:g}"
        for what, error in (("loss", loss_error), ("grad", grad_error))
        if not error <= AGREEMENT[what]
    ]
    data = {"losses": losses, "loss_rel_error": loss_error, "grad_rel_error": grad_error, "bounds": AGREEMENT}
    detail = "; ".join(failed) or f"loss rel. error {loss_error:.2g}, gradients {grad_error:.2g}"
    status = "fail" if failed else "pass"
    yield Result("train_step", f"{kernel} vs torch agreement, {label} fp32", status, detail, data)

    seconds, peaks = {}, {}
    repeats = options if options.is_cuda else Options(options.device, quick=True)  # CPU: 3 steps
    for backend, net in models.items():
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        resident = 0
        if options.is_cuda:
            torch.cuda.synchronize(options.device)
            resident = torch.cuda.memory_allocated(options.device)
            torch.cuda.reset_peak_memory_stats(options.device)

        def train(net=net, backend=backend, optimizer=optimizer) -> None:
            step(net, backend, autocast=precision == "bf16")
            optimizer.step()

        seconds[backend] = median_seconds(train, repeats, warmup=1)
        if options.is_cuda:  # the step's peak above what was resident before it (both models' weights)
            peaks[backend] = torch.cuda.max_memory_allocated(options.device) - resident
        del train, optimizer  # frees the optimizer state before the other backend's steps
        net.zero_grad(set_to_none=True)
    ratio = seconds["torch"] / seconds[kernel]
    detail = f"{seconds[kernel] * 1e3:.1f} ms on {kernel}, "
    detail += f"{seconds['torch'] * 1e3:.1f} ms on torch ({ratio:.2f}x)"
    memory = {"step_peak_bytes": peaks}
    if options.is_cuda:
        memory["peak_ratio"] = peaks[kernel] / peaks["torch"]
        detail += f"; step peak above weights {peaks[kernel] / 2**20:.0f} / {peaks['torch'] / 2**20:.0f} MiB"
        detail += f" ({memory['peak_ratio']:.2f}x)"
    else:
        detail += "; peak memory not measured on a CPU"
    data = {"seconds": seconds, "speedup": ratio, **memory, "precision": precision, "flags": flags}
    yield Result("train_step", f"step time, {label} {precision}", "info", detail, data)
