"""Random state: seeding, saving and restoring every generator, and the per-step draws of the trainer.

The diffusion timesteps and noise of a training step are functions of (seed, step, position in the global
batch) only: each rank draws the whole step's timesteps from one CPU generator and the noise of each of its
own samples from a generator seeded for that sample. So a step's randomness does not depend on the number
of ranks, on microbatching, or on what ran before (sampling previews, a restart); what remains on the
global generators (dropout) is saved and restored per rank with the training state.
"""

import random
from typing import Any

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (stable across runs and platforms)."""
    state = np.random.SeedSequence([int(part) & 0xFFFFFFFFFFFFFFFF for part in parts]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) & 0x7FFFFFFFFFFFFFFF)


def seed_everything(seed: int, rank: int) -> None:
    """Seed torch (CPU and CUDA), numpy and ``random`` from (seed, rank)."""
    per_rank = derive_seed(seed, rank, 0x5EED)
    torch.manual_seed(per_rank)
    np.random.seed(per_rank % 2**32)
    random.seed(per_rank)


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generators: torch CPU, ``device``'s CUDA generator (if CUDA), numpy, ``random``."""
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`capture_rng_state` returned (the CUDA part onto ``device``)."""
    torch.set_rng_state(state["torch_cpu"].cpu())
    if state.get("torch_cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["torch_cuda"].cpu(), device)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class StepRandomness:
    """Timesteps and noise of step ``step`` for samples ``[first, first + count)`` of the global batch."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed = seed
        self.device = device
        self._cpu = torch.Generator()
        self._device = torch.Generator(device=device)

    def timesteps(
        self, sampler: Any, step: int, global_batch: int, first: int, count: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t long ``[count]``, importance weights float32 ``[count]``) on the device."""
        self._cpu.manual_seed(derive_seed(self.seed, step, 1))
        t, weights = sampler.sample(global_batch, self.device, generator=self._cpu)
        return t[first : first + count], weights[first : first + count]

    def noise(self, step: int, first: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Standard normal ``[shape[0], *shape[1:]]``; row ``i`` depends on (seed, step, first + i) only."""
        rows = []
        for index in range(first, first + shape[0]):
            self._device.manual_seed(derive_seed(self.seed, step, 2, index))
            rows.append(torch.randn(shape[1:], generator=self._device, device=self.device, dtype=dtype))
        return torch.stack(rows) if rows else torch.empty(shape, device=self.device, dtype=dtype)
