"""Comparing a patched model with the unpatched one, both against a float64 run of the same model."""

import torch


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def assert_no_worse(
    after: list, before: list, expected: list, *, factor: float, floor: float, what: str
) -> None:
    """Each patched result is at most ``factor`` times as far from the float64 result as the unpatched
    one, plus ``floor`` times the largest float64 value of the group. Chained norms amplify rounding
    unevenly, so a fixed tolerance on patched-minus-unpatched would be fragile; a wrong kernel is off by
    the values' size."""
    scale = max(e.abs().max().item() for e in expected)
    for index, (a, b, e) in enumerate(zip(after, before, expected, strict=True)):
        bound = factor * max_error(b, e) + floor * scale
        assert max_error(a, e) <= bound, f"{what} {index}: error {max_error(a, e):.3g} > {bound:.3g}"
