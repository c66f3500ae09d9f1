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
    """This process's generators: torch CPU, ``device``'s CUDA generator (if CUDA), numpy, ``random``.

    Tensors and plain Python values only, so a state file loads with ``torch.load(weights_only=True)``.
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }


def _numpy_state(saved: Any) -> tuple:
    """``np.random.set_state``'s tuple from :func:`capture_rng_state`'s dict (or an older file's tuple)."""
    if not isinstance(saved, dict):
        return saved
    keys = saved["keys"].cpu().numpy().astype(np.uint32)
    return (saved["kind"], keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"])


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`capture_rng_state` returned (the CUDA part onto ``device``)."""
    torch.set_rng_state(state["torch_cpu"].cpu())
    if state.get("torch_cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["torch_cuda"].cpu(), device)
    np.random.set_state(_numpy_state(state["numpy"]))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))


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
