"""Group ``determinism``: each op's output and gradients bitwise equal over three runs on the same inputs
(the quick shapes, and ImageNet-64's shapes unless --quick)."""

import torch

from fastdiff.selftest.accuracy import generator, kernel_backends, no_kernel_backend
from fastdiff.selftest.cases import OpCase, forward_backward
from fastdiff.selftest.records import Check, Options, Result

GROUP = "determinism"
RUNS = 3


def cases(options: Options) -> list[tuple[OpCase, bool]]:
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


def check_bitwise(case: OpCase, backend: str, options: Options, seed: int, runs: int = RUNS) -> Result:
    """``runs`` forward+backward runs of ``case`` on ``backend``: pass when every output is bit-equal."""
    inputs = case.inputs(options.device, generator(seed, options.device))
    results = [forward_backward(case, inputs, backend) for _ in range(runs)]
    differing = sorted(
        {k for other in results[1:] for k in other if not torch.equal(other[k], results[0][k])}
    )
    status = "fail" if differing else "pass"
    detail = f"differ between runs: {', '.join(differing)}" if differing else f"{runs} runs bit-equal"
    return Result(GROUP, "", status, detail, {"runs": runs, "differing": differing})


def plan(options: Options) -> list[Check]:
    if not kernel_backends(options):
        return [no_kernel_backend(options, GROUP)]
    checks = []
    for seed, (case, small) in enumerate(cases(options)):
        for backend in kernel_backends(options, small):
            checks.append(
                Check(
                    f"{backend} {case.label}",
                    lambda c=case, b=backend, s=seed: check_bitwise(c, b, options, s),
                )
            )
    return checks
