"""Group ``large``: GroupNorm+SiLU over more than 2**31 elements (bf16; 64-bit offsets) and attention at
T=4096, against float64 (scaled down with --quick). Last of the kernel groups: a kernel faulting on
64-bit offsets leaves the CUDA device unusable, and the runner then records the rest as not run."""

import os

import torch

from fastdiff import ops
from fastdiff.selftest.accuracy import check_case, generator, kernel_backends, no_kernel_backend
from fastdiff.selftest.cases import OpCase
from fastdiff.selftest.records import UNIT_ROUNDOFF, Check, Options, Result, max_error, not_run

Tensor = torch.Tensor

GROUP = "large"
LARGE_NORM_SHAPE = (2, 64, 4096, 4100)  # 2**31 + 2_097_152 elements: 64-bit offsets needed
LARGE_NORM_BYTES_NEEDED = 40 * 2**30  # x, y, dy, dx in bf16 (4 x 4.3 GB), autograd's copies, a float64 block
LARGE_BOUND_ULPS = 4.0
"""The >2**31 GroupNorm has no same-dtype baseline (it would need float32 copies of everything): each
value must be within this many unit roundoffs of its dtype times the largest float64 value."""


def _available_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (the CUDA allocator's view; the kernel's MemAvailable on a CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan(options: Options) -> list[Check]:
    if not kernel_backends(options):
        return [no_kernel_backend(options, GROUP)]
    tokens = 256 if options.quick else 4096
    checks = []
    for seed, dtype in enumerate((torch.bfloat16,) if options.quick else options.dtypes):
        case = OpCase("flash_attention", (1, 2, tokens, 64), dtype, model=f"T={tokens}")
        for backend in kernel_backends(options, small=options.quick):
            checks.append(
                Check(
                    f"{backend} {case.label}",
                    lambda c=case, b=backend, s=seed: check_case(
                        c, b, options, generator(s, options.device), GROUP
                    ),
                )
            )
    shape = (2, 8, 13, 11) if options.quick else LARGE_NORM_SHAPE
    for backend in kernel_backends(options, small=options.quick):
        name = (
            f"{backend} group_norm_silu {'x'.join(map(str, shape))} ({torch.Size(shape).numel():,} elements)"
        )
        checks.append(Check(name, lambda b=backend, n=name: _large_norm_if_room(b, n, shape, options)))
    return checks


def _large_norm_if_room(backend: str, name: str, shape: tuple[int, ...], options: Options) -> Result:
    """The >2**31 check when the device has the memory for it, else not run saying how much it needs."""
    free = _available_memory(options.device)
    if not options.quick and free < LARGE_NORM_BYTES_NEEDED:
        need = LARGE_NORM_BYTES_NEEDED / 2**30
        detail = f"needs {need:.0f} GiB free, {options.device} has {free / 2**30:.1f} GiB"
        return not_run(GROUP, name, "unavailable", detail)
    return _check_large_norm(backend, shape, torch.bfloat16, options.device, generator(100, options.device))


def _check_large_norm(
    backend: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Result:
    """group_norm_silu at ``shape`` (32 groups), forward and gradients, checked one (sample, group) block
    at a time in float64 so the reference never holds the whole tensor."""
    n, c = shape[:2]
    groups = 32 if c % 32 == 0 else 4
    name = f"{backend} group_norm_silu {'x'.join(map(str, shape))} ({torch.Size(shape).numel():,} elements)"
    x = torch.empty(shape, dtype=dtype, device=device).normal_(0.5, 2.0, generator=generator)
    dy = torch.empty_like(x).normal_(generator=generator)  # drawn in place: no float32 copy of 8 GB
    weight = torch.empty(c, dtype=dtype, device=device).normal_(1.0, 0.2, generator=generator)
    bias = torch.empty(c, dtype=dtype, device=device).normal_(0.0, 0.2, generator=generator)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    x.requires_grad_(True)
    try:
        with ops.use_backend(backend):
            y = ops.group_norm_silu(x, groups, weight, bias)
            dx, dweight, dbias = torch.autograd.grad(y, (x, weight, bias), dy)
    except ops.BackendUnavailableError as error:
        return not_run(GROUP, name, "unavailable", str(error))
    x = x.detach()
    errors = {key: 0.0 for key in ("out", "grad_x", "grad_weight", "grad_bias")}
    scales = dict.fromkeys(errors, 0.0)
    ref_dweight = torch.zeros(c, dtype=torch.float64, device=device)
    ref_dbias = torch.zeros_like(ref_dweight)
    per_group = c // groups
    for sample in range(n):
        for group in range(groups):
            channels = slice(group * per_group, (group + 1) * per_group)
            xb = x[sample, channels].double()
            w = weight.detach()[channels].double().reshape(-1, *(1,) * (xb.dim() - 1))
            b = bias.detach()[channels].double().reshape(w.shape)
            xhat = (xb - xb.mean()) * torch.rsqrt(xb.var(correction=0) + 1e-5)
            u = xhat * w + b
            sig = torch.sigmoid(u)
            _track(errors, scales, "out", y[sample, channels], u * sig)
            du = dy[sample, channels].double() * sig * (1 + u * (1 - sig))
            ref_dbias[channels] += du.flatten(1).sum(1)
            ref_dweight[channels] += (du * xhat).flatten(1).sum(1)
            g = du * w
            ref_dx = torch.rsqrt(xb.var(correction=0) + 1e-5) * (g - g.mean() - xhat * (g * xhat).mean())
            _track(errors, scales, "grad_x", dx[sample, channels], ref_dx)
    _track(errors, scales, "grad_weight", dweight, ref_dweight)
    _track(errors, scales, "grad_bias", dbias, ref_dbias)
    bounds = {key: LARGE_BOUND_ULPS * UNIT_ROUNDOFF[dtype] * scales[key] for key in errors}
    failed = [f"{k} error {errors[k]:.3g} > bound {bounds[k]:.3g}" for k in errors if errors[k] > bounds[k]]
    data = {"errors": {k: {"error": errors[k], "bound": bounds[k]} for k in errors}, "shape": list(shape)}
    detail = "; ".join(failed) or "worst error/bound " + f"{max(errors[k] / bounds[k] for k in errors):.2f}"
    return Result(GROUP, name, "fail" if failed else "pass", detail, data)


def _track(errors: dict, scales: dict, key: str, actual: Tensor, expected: Tensor) -> None:
    errors[key] = max(errors[key], max_error(actual, expected))
    scales[key] = max(scales[key], expected.abs().max().item())
