"""Training metrics over a log interval: loss terms overall and by timestep quartile, averaged over ranks.

Sums stay on the device between log lines (no host sync per step); :meth:`IntervalMetrics.reduce` sums
them over ranks with one all_reduce and divides by the global counts, so every number is an average over
every sample every rank saw in the interval.
"""

import resource
import sys

import torch

from fastdiff import dist_util

QUARTILES = 4


class IntervalMetrics:
    """Per-sample loss terms (``loss``, ``mse``, ``vb``, ...) and per-step scalars, summed until reduced."""

    def __init__(self, num_timesteps: int, device: torch.device) -> None:
        self.num_timesteps = num_timesteps
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start a new interval."""
        self._term_sums: dict[str, torch.Tensor] = {}
        self._counts = torch.zeros(QUARTILES + 1, dtype=torch.float64, device=self.device)
        self._scalar_sums: dict[str, torch.Tensor] = {}
        self._scalar_counts: dict[str, int] = {}

    def add_losses(self, t: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Add one microbatch: ``t`` long ``[n]``, each term ``[n]`` (already importance-weighted)."""
        quartile = (QUARTILES * t // self.num_timesteps).clamp_(0, QUARTILES - 1)
        index = torch.cat([torch.zeros_like(quartile), quartile + 1])
        ones = torch.ones(2 * t.numel(), dtype=torch.float64, device=self.device)
        self._counts.index_add_(0, index, ones)
        for name, values in terms.items():
            values = values.detach().reshape(-1).double()
            total = self._term_sums.setdefault(
                name, torch.zeros(QUARTILES + 1, dtype=torch.float64, device=self.device)
            )
            total.index_add_(0, index, torch.cat([values, values]))

    def add_scalar(self, name: str, value: torch.Tensor | float) -> None:
        """Add one per-step value (averaged over the steps that reported it)."""
        value = torch.as_tensor(value, dtype=torch.float64, device=self.device).detach()
        if name in self._scalar_sums:
            self._scalar_sums[name] += value
        else:
            self._scalar_sums[name] = value.clone()
        self._scalar_counts[name] = self._scalar_counts.get(name, 0) + 1

    def reduce(self) -> dict[str, float]:
        """Interval averages over every rank: ``loss``, ``loss_q0`` .. ``loss_q3``, ..., scalars; then reset.

        Every rank must call this at the same step with the same term and scalar names.
        """
        term_names = sorted(self._term_sums)
        scalar_names = sorted(self._scalar_sums)
        parts = [self._counts] + [self._term_sums[name] for name in term_names]
        parts += [torch.stack([self._scalar_sums[name] for name in scalar_names])] if scalar_names else []
        packed = dist_util.all_reduce_sum_(torch.cat(parts)).cpu().tolist()
        counts, rest = packed[: QUARTILES + 1], packed[QUARTILES + 1 :]
        result: dict[str, float] = {}
        for position, name in enumerate(term_names):
            sums = rest[position * (QUARTILES + 1) : (position + 1) * (QUARTILES + 1)]
            if counts[0] > 0:
                result[name] = sums[0] / counts[0]
            for q in range(QUARTILES):
                if counts[q + 1] > 0:
                    result[f"{name}_q{q}"] = sums[q + 1] / counts[q + 1]
        scalar_values = rest[len(term_names) * (QUARTILES + 1) :]
        world = dist_util.world_size()
        for name, total in zip(scalar_names, scalar_values, strict=True):
            result[name] = total / (self._scalar_counts[name] * world)
        self.reset()
        return result


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest ``value`` any rank holds."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if dist_util.world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())
