"""Numerical checks: every op against float64 (real-model and large shapes), every launch config, and
bitwise determinism. Each check is a function ``(Options) -> Iterator[Result]``."""

import contextlib
import importlib
import os
import time
from collections.abc import Iterator
from types import ModuleType

import torch

from fastdiff import ops
from fastdiff.selftest.cases import OpCase, as_float64, forward_backward, quick_cases, unet_cases
from fastdiff.selftest.records import UNIT_ROUNDOFF, Options, Result, compare, max_error

Tensor = torch.Tensor

UNET_BATCH = 2
LARGE_NORM_SHAPE = (2, 64, 4096, 4100)  # 2**31 + 2_097_152 elements: 64-bit offsets needed
LARGE_NORM_BYTES_NEEDED = 40 * 2**30  # x, y, dy, dx in bf16 (4 x 4.3 GB), autograd's copies, a float64 block
LARGE_BOUND_ULPS = 4.0
"""The >2**31 GroupNorm has no same-dtype baseline (it would need float32 copies of everything): each
value must be within this many unit roundoffs of its dtype times the largest float64 value."""
CONFIG_SECONDS = {True: 10.0, False: 150.0}
"""Time budget of the config check (preparation included) with and without --quick. Every list's first
config runs regardless; past the budget the rest are reported left out (a skip). Under the interpreter
(--quick) each config costs seconds; on a GPU a cold Triton cache compiles each config once (seconds),
and a second run, served from the cache, runs them all."""


def kernel_backends(options: Options, small: bool = True) -> list[str]:
    """The fastdiff kernel backends to prove on this device: triton on CUDA; on a CPU cpp, and for
    ``small`` cases Triton's interpreter (far too slow for real-model and large shapes)."""
    wanted = ("triton",) if options.is_cuda else ("cpp", "triton") if small else ("cpp",)
    return [name for name in wanted if name in ops.available_backends()]


def _available_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (the CUDA allocator's view; the kernel's MemAvailable on a CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded generator on ``device``: inputs are drawn where they are used (no host copies)."""
    return torch.Generator(device).manual_seed(seed)


def check_case(
    case: OpCase, backend: str, options: Options, generator: torch.Generator, group: str
) -> Result:
    """One case on ``backend``: output and every gradient within the bound of the float64 reference, the
    output in the input's dtype and strides."""
    inputs = case.inputs(options.device, generator)
    name = f"{backend} {case.label}"
    try:
        actual = forward_backward(case, inputs, backend)
    except ops.BackendUnavailableError as error:
        return Result(group, name, "skip", str(error))
    expected = forward_backward(case, as_float64(inputs), "torch")
    baseline = forward_backward(case, inputs, "torch")
    result = compare(group, name, actual, expected, baseline, case.dtype)
    out, like = actual["out"], baseline["out"]
    if out.dtype != like.dtype or out.stride() != like.stride():
        result.status = "fail"
        result.detail = f"output {out.dtype} strides {out.stride()}, expected {like.dtype} {like.stride()}"
    return result


def check_accuracy(options: Options) -> Iterator[Result]:
    """Every op, dtype and layout at small odd shapes and (unless --quick) at every call shape of the
    three real UNets, forward and every gradient, against float64."""
    if not kernel_backends(options):
        why = (
            "triton is not installed" if options.is_cuda else "neither the C++ extension nor Triton runs here"
        )
        yield Result("accuracy", f"fastdiff kernels on {options.device}", "fail", f"no kernel backend: {why}")
        return
    generator = _generator(0, options.device)
    for case in quick_cases(options.dtypes):
        for backend in kernel_backends(options):
            yield check_case(case, backend, options, generator, "accuracy")
    for case in () if options.quick else unet_cases(UNET_BATCH, options.dtypes):
        for backend in kernel_backends(options, small=False):
            yield check_case(case, backend, options, generator, "accuracy")
    yield from _check_cross_attention(options, generator)
    yield from _check_other_current_device(options, generator)


def _check_other_current_device(options: Options, generator: torch.Generator) -> Iterator[Result]:
    """With two GPUs or more: the ops on this device while another one is current (launch device guard)."""
    count = torch.cuda.device_count() if options.is_cuda else 0
    if count < 2:
        return
    other = (options.device.index + 1) % count
    with torch.cuda.device(other):
        for case in (
            OpCase("group_norm_silu", (2, 64, 9, 9), torch.bfloat16),
            OpCase("flash_attention", (1, 2, 70, 64), torch.bfloat16),
        ):
            result = check_case(case, "triton", options, generator, "accuracy")
            result.name += f" (cuda:{other} current)"
            yield result


def _cross_attention_supported(device: torch.device) -> bool:
    """Whether ``flash_attention`` takes keys of another length than the queries (detected, not assumed)."""
    q = torch.zeros(1, 1, 3, 16, device=device)
    kv = torch.zeros(1, 1, 5, 16, device=device)
    try:
        with ops.use_backend("torch"):
            ops.flash_attention(q, kv, kv)
    except ValueError:
        return False
    return True


def _check_cross_attention(options: Options, generator: torch.Generator) -> Iterator[Result]:
    if not _cross_attention_supported(options.device):
        yield Result("accuracy", "flash_attention Tq != Tk", "skip", "flash_attention refuses Tq != Tk here")
        return
    shapes = [((1, 2, 37, 40), 77)] if options.quick else [((2, 8, 4096, 40), 77), ((2, 8, 1024, 64), 4096)]
    for dtype in options.dtypes:
        for shape, kv_tokens in shapes:
            case = OpCase("flash_attention", shape, dtype, kv_tokens=kv_tokens, model="cross-attention")
            for backend in kernel_backends(options, small=options.quick):
                yield check_case(case, backend, options, generator, "accuracy")


# --- large sizes ---------------------------------------------------------------------------------


def check_large(options: Options) -> Iterator[Result]:
    """GroupNorm+SiLU over more than 2**31 elements (bf16) and attention at T=4096 (scaled down with
    --quick), against float64."""
    generator = _generator(1, options.device)
    tokens = 256 if options.quick else 4096
    for dtype in (torch.bfloat16,) if options.quick else options.dtypes:
        case = OpCase("flash_attention", (1, 2, tokens, 64), dtype, model=f"T={tokens}")
        for backend in kernel_backends(options, small=options.quick):
            yield check_case(case, backend, options, generator, "large")
    shape = (2, 8, 13, 11) if options.quick else LARGE_NORM_SHAPE
    free = _available_memory(options.device)
    if not options.quick and free < LARGE_NORM_BYTES_NEEDED:
        yield Result(
            "large",
            "group_norm_silu > 2**31 elements",
            "skip",
            f"needs {LARGE_NORM_BYTES_NEEDED / 2**30:.0f} GiB free, {options.device} has "
            f"{free / 2**30:.1f} GiB",
        )
        return
    for backend in kernel_backends(options, small=options.quick):
        yield _check_large_norm(backend, shape, torch.bfloat16, options.device, generator)


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
        return Result("large", name, "skip", str(error))
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
    return Result("large", name, "fail" if failed else "pass", detail, data)


def _track(errors: dict, scales: dict, key: str, actual: Tensor, expected: Tensor) -> None:
    errors[key] = max(errors[key], max_error(actual, expected))
    scales[key] = max(scales[key], expected.abs().max().item())


# --- every config of every list ------------------------------------------------------------------


def _config_probes(options: Options) -> list[OpCase]:
    """Small cases that between them reach every kernel: GroupNorm fused and split (one large group),
    attention per dtype and head-dim bucket (up to 256, Tq != Tk where supported). --quick: a few bf16
    probes (under the interpreter every probe costs seconds)."""
    norm = [((2, 32, 9, 9), 8), ((1, 4, 40, 40), 1)]
    if options.quick:
        probes = [
            OpCase("group_norm_scale_shift_silu", shape, torch.bfloat16, groups) for shape, groups in norm
        ]
        return probes + [OpCase("flash_attention", (1, 2, 45, d), torch.bfloat16) for d in (16, 64)]
    probes = []
    for dtype in (torch.float32, torch.bfloat16):
        probes += [OpCase("group_norm_scale_shift_silu", shape, dtype, groups) for shape, groups in norm]
        probes += [OpCase("flash_attention", (1, 2, 45, d), dtype) for d in (16, 32, 64, 128, 160, 192, 256)]
        if _cross_attention_supported(options.device):
            probes.append(OpCase("flash_attention", (1, 2, 45, 64), dtype, kv_tokens=83))
    return probes


@contextlib.contextmanager
def _recording_launches(launch: ModuleType) -> Iterator[set[str]]:
    """Names of the kernels launched (through ``launch.run``) inside the block."""
    launched: set[str] = set()
    original = launch.run

    def run(kernel, *args, **kwargs):
        launched.add(kernel.name)
        return original(kernel, *args, **kwargs)

    launch.run = run
    try:
        yield launched
    finally:
        launch.run = original


def check_configs(options: Options) -> Iterator[Result]:
    """Every config of every launch-layer list, forced one at a time, on each probe that launches that
    kernel: outputs and gradients against float64. A kernel no probe reaches fails the check."""
    try:
        launch = importlib.import_module("fastdiff.kernels.launch")
        config_lists, force_config = launch.config_lists, launch.force_config
        for family in ("group_norm", "attention"):  # their import registers the kernels' lists
            importlib.import_module(f"fastdiff.kernels.{family}")
    except (ImportError, AttributeError) as error:
        yield Result("configs", "config lists", "skip", f"no launch layer (fastdiff.kernels.launch): {error}")
        return
    if "triton" not in ops.available_backends():
        yield Result("configs", "config lists", "skip", "Triton cannot run on this device")
        return
    started, generator = time.perf_counter(), _generator(2, options.device)
    prepared = {}  # probe -> (inputs, float64 result, torch-backend baseline, kernels it launches)
    for probe in _config_probes(options):
        inputs = probe.inputs(options.device, generator)
        try:
            with _recording_launches(launch) as launched:
                forward_backward(probe, inputs, "triton")
        except ops.BackendUnavailableError:
            continue  # e.g. a head dim over the Triton kernels' maximum: the accuracy check says so
        expected = forward_backward(probe, as_float64(inputs), "torch")
        prepared[probe] = (inputs, expected, forward_backward(probe, inputs, "torch"), launched)
    lists = config_lists()
    reaching = {}  # list name -> the first probe of each dtype that launches that kernel (one with --quick)
    for name in lists:
        probes = [probe for probe, (*_, launched) in prepared.items() if name in launched]
        reaching[name] = (
            probes[:1] if options.quick else list({p.dtype: p for p in reversed(probes)}.values())
        )
    unreached = [name for name, probes in reaching.items() if not probes]
    if options.quick and unreached:
        message = f"--quick's probes do not reach {len(unreached)} of {len(lists)} lists; a full run does"
        yield Result("configs", "lists left out", "skip", message, {"lists": unreached})
    elif unreached:
        for name in unreached:
            yield Result("configs", f"{name}: {len(lists[name])} configs", "fail", "no probe launches it")
    # each list's first config (its default) first, so --quick's budget reaches every list it can
    order = sorted(
        ((index, name, config) for name, configs in lists.items() for index, config in enumerate(configs)),
        key=lambda item: item[0] > 0,
    )
    order = [item for item in order if reaching[item[1]]]
    budget = CONFIG_SECONDS[options.quick]
    for ran, (index, name, config) in enumerate(order):
        if index > 0 and time.perf_counter() - started > budget:
            yield Result(
                "configs",
                "configs left out",
                "skip",
                f"{len(order) - ran} of {len(order)} configs not run: past the check's {budget:.0f} s budget "
                "(every list's first config ran; "
                + (
                    "a full run on a GPU runs them)"
                    if options.quick
                    else "run again: Triton's cache skips compiles)"
                ),
                {"left_out": len(order) - ran},
            )
            return
        yield _check_config(
            f"{name}[{index}] {config.tag}", force_config(name, config), reaching[name], prepared
        )
    yield Result("configs", "configs run", "info", f"{len(order)} configs of {len(lists)} lists")


def _check_config(
    name: str, forced: contextlib.AbstractContextManager, probes: list[OpCase], prepared: dict
) -> Result:
    """One forced config on each of its probes; a launch that raises (compile error, resources) fails."""
    failures, worst = [], 0.0
    with forced:
        for probe in probes:
            inputs, expected, baseline, _ = prepared[probe]
            try:
                actual = forward_backward(probe, inputs, "triton")
            except Exception as error:  # reported as this config's failure
                failures.append(f"{probe.label}: {type(error).__name__}: {str(error)[:200]}")
                continue
            result = compare("configs", name, actual, expected, baseline, probe.dtype)
            worst = max(worst, result.data["worst_ratio"])
            if result.status == "fail":
                failures.append(f"{probe.label}: {result.detail}")
    detail = "; ".join(failures) or f"worst error/bound {worst:.2f} over {len(probes)} probe(s)"
    return Result("configs", name, "fail" if failures else "pass", detail, {"worst_ratio": worst})


# --- determinism ---------------------------------------------------------------------------------


def _determinism_cases(options: Options) -> list[tuple[OpCase, bool]]:
    """(case, small): the quick shapes, and ImageNet-64's shapes unless --quick."""
    small = [("group_norm_scale_shift_silu", (2, 12, 5, 7), 4), ("qkv_attention", (2, 96, 37), 2)]
    small.append(("flash_attention", (1, 2, 33, 48), 1))
    large = [("group_norm_scale_shift_silu", (8, 256, 32, 32), 32), ("qkv_attention", (8, 1152, 256), 4)]
    large.append(("flash_attention", (4, 4, 1024, 64), 1))
    dtypes = (torch.bfloat16,) if options.quick else (torch.float32, torch.bfloat16)
    cases = [(OpCase(op, shape, d, groups), True) for op, shape, groups in small for d in dtypes]
    if not options.quick:
        cases += [(OpCase(op, shape, d, groups), False) for op, shape, groups in large for d in dtypes]
    return cases


def check_determinism(options: Options, runs: int = 3) -> Iterator[Result]:
    """Each op's output and gradients bitwise equal over ``runs`` runs on the same inputs."""
    generator = _generator(3, options.device)
    for case, small in _determinism_cases(options):
        inputs = case.inputs(options.device, generator)
        for backend in kernel_backends(options, small):
            name = f"{backend} {case.label}"
            results = [forward_backward(case, inputs, backend) for _ in range(runs)]
            differing = sorted(
                {k for other in results[1:] for k in other if not torch.equal(other[k], results[0][k])}
            )
            status = "fail" if differing else "pass"
            detail = f"differ between runs: {', '.join(differing)}" if differing else f"{runs} runs bit-equal"
            yield Result("determinism", name, status, detail, {"runs": runs, "differing": differing})
