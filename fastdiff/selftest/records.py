"""The selftest's vocabulary: one :class:`Result` per check, the run's :class:`Options`, the error bound."""

import math
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

STATUSES = ("pass", "fail", "skip", "info")
"""``pass``/``fail``: a check with a bound; ``skip``: not run here, with the reason; ``info``: a figure."""


@dataclass
class Result:
    """One check's outcome: ``group`` (accuracy, configs, timing, ...), a unique ``name``, ``status``,
    a one-line ``detail`` for people and ``data`` (numbers, bounds) for machines."""

    group: str
    name: str
    status: str
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


@dataclass(frozen=True)
class Options:
    """What to run: on ``device``; ``quick`` for small shapes and few repeats (CI on a CPU)."""

    device: torch.device
    quick: bool

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.float16, torch.bfloat16)

    @property
    def repeats(self) -> int:
        """Timed runs per measurement (their median is reported)."""
        return 3 if self.quick else 15


Check = Callable[[Options], Iterable[Result]]

ERROR_FACTOR = 4.0
"""A kernel may be this many times further from float64 than the torch backend in the same dtype ..."""
UNIT_ROUNDOFF = {
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    torch.float64: 2.0**-53,
}
FLOOR_ULPS = {torch.float32: 64.0, torch.float16: 4.0, torch.bfloat16: 4.0, torch.float64: 64.0}
"""... plus this many unit roundoffs of the dtype times the largest float64 value (rounding noise of the
order of summation, which the torch backend's own error can be luckily free of)."""


BASELINE_SLACK = 2.0**-12
"""The torch backend itself must be within its dtype's unit roundoff plus this share of the largest value
of the float64 reference; else the reference (or the baseline) is wrong and the bound would be
meaningless, so the comparison fails."""


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| in float64 (inf when either holds a NaN or the shapes differ)."""
    if actual.shape != expected.shape:
        return math.inf
    diff = (actual.double() - expected.double()).abs()
    return math.inf if diff.isnan().any() else diff.max().item() if diff.numel() else 0.0


def error_bound(baseline: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    """The stated bound: ``ERROR_FACTOR`` x the baseline's error + ``FLOOR_ULPS`` x unit roundoff x the
    largest float64 value."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return ERROR_FACTOR * max_error(baseline, expected) + FLOOR_ULPS[dtype] * UNIT_ROUNDOFF[dtype] * scale


def compare(
    group: str,
    name: str,
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    baseline: dict[str, torch.Tensor],
    dtype: torch.dtype,
) -> Result:
    """Each named tensor of ``actual`` within :func:`error_bound` of its float64 ``expected``; one Result.

    ``baseline``: the same quantities from the torch backend in ``dtype`` (what the bound is scaled by).
    """
    errors, worst, failed = {}, 0.0, []
    for key, want in expected.items():
        error, bound = max_error(actual[key], want), error_bound(baseline[key], want, dtype)
        errors[key] = {"error": error, "bound": bound}
        scale = want.abs().max().item() if want.numel() else 0.0
        baseline_error = max_error(baseline[key], want)
        if not baseline_error <= (UNIT_ROUNDOFF[dtype] + BASELINE_SLACK) * scale:
            failed.append(f"{key}: the torch backend is {baseline_error:.3g} from the float64 reference")
        worst = max(worst, error / bound if bound > 0 else (0.0 if error == 0 else math.inf))
        if not error <= bound:
            failed.append(f"{key} error {error:.3g} > bound {bound:.3g}")
    detail = "; ".join(failed) if failed else f"worst error/bound {worst:.2f}"
    return Result(group, name, "fail" if failed else "pass", detail, {"errors": errors, "worst_ratio": worst})


def guarded(group: str, check: Check, options: Options) -> Iterator[Result]:
    """Run ``check``; an exception becomes one failed Result naming it (the remaining checks still run)."""
    try:
        yield from check(options)
    except Exception as error:  # a crashing check is a failed check
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        yield Result(group, f"{group}: {check.__name__} crashed", "fail", last)
