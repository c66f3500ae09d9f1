"""Group ``accuracy``: every op, with the config the default rule picks, against float64, forward and every
gradient: small odd shapes in every dtype and layout; at the call shapes of the three real UNets, each
launch-layer kernel and config the default rule picks there, in every dtype (on a GPU; a CPU's C++ kernels
have no configs and take every call); Tq != Tk attention. Also the helpers the other numerical groups share
(``check_case``, ``kernel_backends``)."""

import functools
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


def planned_cases(options: Options) -> list[tuple[OpCase, str]]:
    """(case, backend) of the float64 comparisons, in order: small odd shapes on every kernel backend;
    unless --quick, the real UNets' calls (on the C++ kernels only on a CPU: the interpreter is far too
    slow there), on Triton only those that ``covering`` keeps; Tq != Tk attention."""
    cases = [(case, backend) for case in quick_cases(options.dtypes) for backend in kernel_backends(options)]
    if not options.quick:
        unet = _by_priority(unet_cases(UNET_BATCH, options.dtypes))
        for backend in kernel_backends(options, small=False):
            cases += [(case, backend) for case in (covering(unet) if backend == "triton" else unet)]
    if _cross_attention_supported():
        cases += _cross_attention_cases(options)
    return cases


def plan(options: Options) -> list[Check]:
    """The checks of ``planned_cases`` (each case's inputs drawn from its own seed); with two GPUs or
    more, the ops on one while another is current."""
    if not kernel_backends(options):
        return [no_kernel_backend(options, GROUP)]
    cases = planned_cases(options)
    checks = [_case_check(case, backend, options, seed) for seed, (case, backend) in enumerate(cases)]
    if not _cross_attention_supported():
        checks.append(
            Check(
                "flash_attention Tq != Tk",
                lambda: not_run(GROUP, "", "unavailable", "flash_attention refuses Tq != Tk here"),
            )
        )
    return checks + _other_current_device_checks(options)


def covering(cases: list[OpCase]) -> list[OpCase]:
    """The cases of ``cases`` (in their order) that launch a (Triton kernel, config, dtype) that no case
    before them launches (``kernel_configs``): each kernel and config the default rule picks at these
    shapes is proven once per dtype, not once per shape, layout and op variant (each of those compiles a
    kernel of its own, too many for a cold GPU's first minutes)."""
    covered: set[tuple[str, object, torch.dtype]] = set()
    kept = []
    for case in cases:
        new = kernel_configs(case) - covered
        if new:
            covered |= new
            kept.append(case)
    return kept


@functools.cache
def kernel_configs(case: OpCase) -> frozenset[tuple[str, object, torch.dtype]]:
    """(launch-layer kernel name, config, dtype) of every Triton launch of ``case``'s forward and backward,
    found by replaying them on the ``meta`` device through the launch layer: nothing runs, every launch
    makes the choices a CUDA launch makes, and the process's compile counter is left as it was."""
    from fastdiff.kernels import launch  # Triton serves this process: the caller runs the triton backend

    with launch.replaying() as launched:
        forward_backward(case, case.inputs(torch.device("meta"), None), "triton")
    return frozenset((name, config, case.dtype) for name, config, _ in launched)


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


def _cross_attention_supported() -> bool:
    """Whether ``flash_attention`` takes keys of another length than the queries (detected, not assumed;
    on the meta device: the op's checks, nothing computed)."""
    q = torch.zeros(1, 1, 3, 16, device="meta")
    kv = torch.zeros(1, 1, 5, 16, device="meta")
    try:
        with ops.use_backend("torch"):
            ops.flash_attention(q, kv, kv)
    except ValueError:
        return False
    return True


def _cross_attention_cases(options: Options) -> list[tuple[OpCase, str]]:
    """flash_attention with Tk != Tq, every dtype, on every kernel backend that takes its size."""
    shapes = [((1, 2, 37, 40), 77)] if options.quick else [((2, 8, 4096, 40), 77), ((2, 8, 1024, 64), 4096)]
    return [
        (OpCase("flash_attention", shape, dtype, kv_tokens=kv_tokens, model="cross-attention"), backend)
        for dtype in options.dtypes
        for shape, kv_tokens in shapes
        for backend in kernel_backends(options, small=options.quick)
    ]
