"""Group ``accuracy``: every op, with the config the default rule picks, against float64: small odd shapes,
every call shape of the three real UNets, Tq != Tk attention; forward and every gradient, every dtype and
layout. Also the helpers the other numerical groups share (``check_case``, ``kernel_backends``)."""

from collections.abc import Iterable

import torch

from fastdiff import ops
from fastdiff.ops import backend as backends
from fastdiff.selftest import compiles
from fastdiff.selftest.cases import OpCase, as_float64, forward_backward, quick_cases, unet_cases
from fastdiff.selftest.records import Check, Options, Result, compare, not_run

Tensor = torch.Tensor

GROUP = "accuracy"
UNET_BATCH = 2
PRIORITY = {
    "models": ("imagenet-64", "cifar10-32", "upsampler-256"),
    "dtypes": (torch.bfloat16, torch.float16),
}
"""The real-model cases run in this order (what a budget cut leaves out last): the 64x64 model the train
step uses, bf16 (the GPU's training dtype) first; within one model and dtype, in call order."""


def kernel_backends(options: Options, small: bool = True) -> list[str]:
    """The fastdiff kernel backends to prove on this device: triton on CUDA; on a CPU cpp, and for
    ``small`` cases Triton's interpreter (far too slow for real-model and large shapes)."""
    wanted = ("triton",) if options.is_cuda else ("cpp", "triton") if small else ("cpp",)
    return [name for name in wanted if name in ops.available_backends()]


def generator(seed: int, device: torch.device) -> torch.Generator:
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
        return not_run(group, name, "unavailable", str(error))
    expected = forward_backward(case, as_float64(inputs), "torch")
    baseline = forward_backward(case, inputs, "torch")
    result = compare(group, name, actual, expected, baseline, case.dtype)
    out, like = actual["out"], baseline["out"]
    if out.dtype != like.dtype or out.stride() != like.stride():
        result.status = "fail"
        result.detail = f"output {out.dtype} strides {out.stride()}, expected {like.dtype} {like.stride()}"
    return result


def _case_check(case: OpCase, backend: str, options: Options, seed: int, group: str = GROUP) -> Check:
    """One case on one backend, its inputs drawn from ``seed`` (so each check stands alone)."""
    return Check(
        f"{backend} {case.label}",
        lambda: check_case(case, backend, options, generator(seed, options.device), group),
    )


def no_kernel_backend(options: Options, group: str) -> Check:
    """A failing check: no fastdiff kernel runs on this device (nothing else could be proven)."""
    why = compiles.triton_problem() or "Triton cannot serve this device"
    if not options.is_cuda:
        why = f"the C++ extension is not built ({backends.CPP_IMPORT_ERROR}) and {why}"
    return Check(
        f"fastdiff kernels on {options.device}",
        lambda: Result(group, "", "fail", f"no kernel backend: {why}"),
    )


def plan(options: Options) -> list[Check]:
    """Small odd shapes on every kernel backend; unless --quick, every call shape of the real UNets (on
    the C++ kernels only on a CPU: the interpreter is far too slow there); Tq != Tk; another GPU current."""
    if not kernel_backends(options):
        return [no_kernel_backend(options, GROUP)]
    cases = [(case, backend) for case in quick_cases(options.dtypes) for backend in kernel_backends(options)]
    if not options.quick:
        big = kernel_backends(options, small=False)
        cases += [
            (case, backend)
            for case in _by_priority(unet_cases(UNET_BATCH, options.dtypes))
            for backend in big
        ]
    checks = [_case_check(case, backend, options, seed) for seed, (case, backend) in enumerate(cases)]
    checks += _cross_attention_checks(options, len(checks))
    return checks + _other_current_device_checks(options)


def _by_priority(found: Iterable[OpCase]) -> list[OpCase]:
    """``found`` sorted by ``PRIORITY`` (stable: call order within one model and dtype)."""
    models, dtypes = PRIORITY["models"], PRIORITY["dtypes"]

    def rank(case: OpCase) -> tuple[int, int]:
        model = models.index(case.model) if case.model in models else len(models)
        return model, dtypes.index(case.dtype) if case.dtype in dtypes else len(dtypes)

    return sorted(found, key=rank)


def _other_current_device_checks(options: Options) -> list[Check]:
    """With two GPUs or more: the ops on this device while another one is current (launch device guard)."""
    count = torch.cuda.device_count() if options.is_cuda else 0
    if count < 2:
        return []
    other = (options.device.index + 1) % count
    cases = (
        OpCase("group_norm_silu", (2, 64, 9, 9), torch.bfloat16),
        OpCase("flash_attention", (1, 2, 70, 64), torch.bfloat16),
    )

    def run(case: OpCase) -> Result:
        with torch.cuda.device(other):
            return check_case(case, "triton", options, generator(7, options.device), GROUP)

    return [Check(f"triton {case.label} (cuda:{other} current)", lambda c=case: run(c)) for case in cases]


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


def _cross_attention_checks(options: Options, seed: int) -> list[Check]:
    if not _cross_attention_supported(options.device):
        return [
            Check(
                "flash_attention Tq != Tk",
                lambda: not_run(GROUP, "", "unavailable", "flash_attention refuses Tq != Tk here"),
            )
        ]
    shapes = [((1, 2, 37, 40), 77)] if options.quick else [((2, 8, 4096, 40), 77), ((2, 8, 1024, 64), 4096)]
    checks = []
    for dtype in options.dtypes:
        for shape, kv_tokens in shapes:
            case = OpCase("flash_attention", shape, dtype, kv_tokens=kv_tokens, model="cross-attention")
            for backend in kernel_backends(options, small=options.quick):
                checks.append(_case_check(case, backend, options, seed + len(checks)))
    return checks
