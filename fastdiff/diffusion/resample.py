"""Timestep samplers: importance sampling of training steps, uniform or by loss second moment.

Timesteps are drawn with torch's CPU generator (the global one, seeded by torch.manual_seed, unless a
generator is given) and then moved to the requested device, so a seeded trainer gets the same steps
on any device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name: str, diffusion: Any) -> ScheduleSampler:
    """Build a sampler by name ("uniform" or "loss-second-moment") for a diffusion's num_timesteps."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"unknown schedule sampler name {name!r}; expected one of {list(SCHEDULE_SAMPLERS)}")


class ScheduleSampler(ABC):
    """A distribution p over diffusion steps with importance weights 1 / (T p(t)).

    Weighting each sampled loss by its importance weight keeps the expected loss that of uniform steps.
    """

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised positive sampling weights, a float64 array of shape [T]."""

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw batch_size steps.

        :param generator: a CPU torch.Generator; torch's default CPU generator if None.
        :return: (timesteps, weights): a [batch_size] long tensor of steps and a [batch_size] float32
            tensor of importance weights 1 / (T p(t)), both on device.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 0:
            raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
        batch_size = int(batch_size)
        w = np.asarray(self.weights(), dtype=np.float64)
        if w.ndim != 1 or not np.all(w > 0) or not np.all(np.isfinite(w)):
            raise ValueError("sampler weights must be a 1-D array of finite positive values")
        probs = torch.from_numpy(w / w.sum())
        if batch_size == 0:
            indices = torch.zeros(0, dtype=torch.long)
        else:
            indices = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        importance = 1.0 / (len(probs) * probs[indices])
        return indices.to(device), importance.to(device=device, dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        """State to save for an exact resume (tensors and Python numbers only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")


class UniformSampler(ScheduleSampler):
    """Every step equally likely; all importance weights are 1."""

    def __init__(self, diffusion: Any) -> None:
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps], dtype=np.float64)

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the losses seen in training, identical on every rank."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Record this rank's [n] steps and [n] losses, together with every other rank's.

        With torch.distributed initialised and several ranks, the batches (whose sizes may differ) are
        all-gathered, padded to the largest; every rank must call this. Otherwise the local batch is used.
        """
        local_ts = local_ts.detach().reshape(-1)
        local_losses = local_losses.detach().reshape(-1)
        if local_ts.numel() != local_losses.numel():
            raise ValueError(
                f"local_ts and local_losses must have the same length, got {local_ts.numel()} "
                f"and {local_losses.numel()}"
            )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ts, losses = _all_gather_padded(local_ts, local_losses)
        else:
            ts, losses = local_ts.tolist(), local_losses.double().tolist()
        self.update_with_all_losses(ts, losses)

    @abstractmethod
    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        """Update the weights from all ranks' steps and losses; every rank gets the same arguments."""


def _all_gather_padded(local_ts: torch.Tensor, local_losses: torch.Tensor) -> tuple[list[int], list[float]]:
    world_size = dist.get_world_size()
    device = local_ts.device
    count = torch.tensor([local_ts.numel()], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)

    padded_ts = torch.zeros(longest, dtype=torch.long, device=device)
    padded_ts[: local_ts.numel()] = local_ts
    padded_losses = torch.zeros(longest, dtype=torch.float32, device=device)
    padded_losses[: local_losses.numel()] = local_losses.to(device=device, dtype=torch.float32)
    gathered_ts = [torch.empty_like(padded_ts) for _ in range(world_size)]
    gathered_losses = [torch.empty_like(padded_losses) for _ in range(world_size)]
    dist.all_gather(gathered_ts, padded_ts)
    dist.all_gather(gathered_losses, padded_losses)

    ts = [int(s) for batch, n in zip(gathered_ts, sizes, strict=True) for s in batch[:n].tolist()]
    losses = [float(v) for batch, n in zip(gathered_losses, sizes, strict=True) for v in batch[:n].tolist()]
    return ts, losses


class LossSecondMomentResampler(LossAwareSampler):
    """Sample steps with probability proportional to the root mean square of their recent losses.

    Until every step has history_per_term losses recorded, sampling is uniform. Afterwards the
    probabilities are mixed with uniform_prob of the uniform distribution so no step starves.
    """

    def __init__(self, diffusion: Any, history_per_term: int = 10, uniform_prob: float = 0.001) -> None:
        if (
            isinstance(history_per_term, bool)
            or not isinstance(history_per_term, int)
            or history_per_term < 1
        ):
            raise ValueError(f"history_per_term must be a positive int, got {history_per_term!r}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob!r}")
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = float(uniform_prob)
        num_timesteps = diffusion.num_timesteps
        self._loss_history = np.zeros([num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        num_timesteps = self._loss_counts.shape[0]
        if not self._warmed_up():
            return np.ones([num_timesteps], dtype=np.float64)
        rms = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        total = rms.sum()
        if not total > 0:
            return np.ones([num_timesteps], dtype=np.float64)
        return rms / total * (1.0 - self.uniform_prob) + self.uniform_prob / num_timesteps

    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        num_timesteps = self._loss_counts.shape[0]
        for t, loss in zip(ts, losses, strict=True):
            t = int(t)
            if not 0 <= t < num_timesteps:
                raise ValueError(f"timestep {t} in ts is outside [0, {num_timesteps})")
            count = self._loss_counts[t]
            if count == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, count] = loss
                self._loss_counts[t] = count + 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_history": torch.from_numpy(self._loss_history.copy()),
            "loss_counts": torch.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"loss_history", "loss_counts"} - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        history = torch.as_tensor(state["loss_history"]).detach().cpu().double().numpy()
        counts = torch.as_tensor(state["loss_counts"]).detach().cpu().long().numpy()
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(
                f"state holds loss_history {history.shape} and loss_counts {counts.shape}; this sampler "
                f"needs {self._loss_history.shape} and {self._loss_counts.shape} "
                "(num_timesteps, history_per_term)"
            )
        if counts.min() < 0 or counts.max() > self.history_per_term:
            raise ValueError(f"state loss_counts must lie in [0, {self.history_per_term}]")
        self._loss_history = history.copy()
        self._loss_counts = counts.copy()
