"""The selftest's vocabulary: one :class:`Result` per check, a planned :class:`Check`, the run's
:class:`Options`, and the accuracy bound."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

STATUSES = ("pass", "fail", "error", "not run", "info")
"""``pass``/``fail``: a check with a bound; ``error``: the check raised (its exception is the detail);
``not run``: never run, with the reason (the budget was spent, no CUDA device, ...; never a pass);
``info``: a figure with no bound (timings)."""

NOT_RUN_REASONS = ("budget", "device", "unavailable", "crash", "quick")
"""Why a check was not run (``data["reason"]``): the ``--budget`` was spent before it started; the
device cannot run it (e.g. no CUDA device); something it needs is missing (Triton, memory, a backend);
an earlier CUDA fault left no usable device; ``--quick`` leaves it out."""


@dataclass
class Result:
    """One check's outcome: ``group`` (accuracy, train_step, ...), a unique ``name``, ``status``, a one-line
    ``detail`` for people and ``data`` (numbers, bounds) for machines. The runner fills in ``seconds``
    (wall time, compiles excluded), ``compile_seconds`` (Triton compiles and ``torch.compile`` first
    calls) and ``compiles`` (distinct Triton compilations; None when the launch layer cannot count)."""

    group: str
    name: str
    status: str
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    compile_seconds: float = 0.0
    compiles: int | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


def not_run(group: str, name: str, reason: str, detail: str) -> Result:
    """A check that did not run: ``reason`` one of ``NOT_RUN_REASONS``, ``detail`` says why."""
    if reason not in NOT_RUN_REASONS:
        raise ValueError(f"reason must be one of {NOT_RUN_REASONS}, got {reason!r}")
    return Result(group, name, "not run", detail, {"reason": reason})


@dataclass(frozen=True)
class Check:
    """One planned check: its ``name`` (unique in its group) and ``run``, which returns its Result (the
    runner sets the Result's group and name to the plan's, times it and catches what it raises)."""

    name: str
    run: Callable[[], Result]


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
