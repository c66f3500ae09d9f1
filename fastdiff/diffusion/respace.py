"""Timestep respacing: run a diffusion process on a subset of the steps it was trained with."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion, Model, validated_betas


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """Choose which steps of a num_timesteps-step process to keep.

    The process is cut into len(section_counts) near-equal sections (earlier sections take the
    remainder), and section i keeps section_counts[i] steps evenly spread from its first to its last
    step. For 300 steps and [10, 15, 20], steps 0-99 keep 10, 100-199 keep 15 and 200-299 keep 20.

    :param section_counts: a sequence of ints, an int, a comma-separated string such as "10,15,20", or
        "ddimN": the N steps 0, s, 2s, ... of the one integer stride s that gives exactly N (DDIM paper).
    :return: the set of kept step indices.
    """
    if (
        isinstance(num_timesteps, bool)
        or not isinstance(num_timesteps, (int, np.integer))
        or num_timesteps < 1
    ):
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    num_timesteps = int(num_timesteps)
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            return _ddim_steps(num_timesteps, text)
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"section_counts {section_counts!r} must be comma-separated integers or 'ddimN'"
            ) from None
    elif isinstance(section_counts, (int, np.integer)) and not isinstance(section_counts, bool):
        counts = [int(section_counts)]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"section_counts must be one or more positive step counts, got {section_counts!r}")

    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    steps: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(
                f"section_counts {section_counts!r} cannot be met: section {i} spans {size} of the "
                f"{num_timesteps} steps but asks for {count}"
            )
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        # Accumulate the fractional position (rather than multiplying) so rounding matches improved-diffusion.
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return set(steps)


def _ddim_steps(num_timesteps: int, section_counts: str) -> set[int]:
    try:
        desired = int(section_counts[len("ddim") :])
    except ValueError:
        raise ValueError(f"section_counts {section_counts!r} must be 'ddimN' with an integer N") from None
    if desired < 1:
        raise ValueError(f"section_counts {section_counts!r} must ask for at least one step")
    for stride in range(1, num_timesteps + 1):
        kept = range(0, num_timesteps, stride)
        if len(kept) == desired:
            return set(kept)
    raise ValueError(
        f"section_counts {section_counts!r} cannot be met: no integer stride takes exactly {desired} "
        f"of {num_timesteps} steps"
    )


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over a subset of a base process's steps.

    Betas are recomputed so that alphas_cumprod at the kept steps equals the base process's; the model
    is called with the base process's step indices (times 1000 / original_num_steps when
    rescale_timesteps), so a model trained on the base process can sample with fewer steps.

    :param use_timesteps: the base steps to keep (e.g. from space_timesteps).
    :param kwargs: GaussianDiffusion's arguments for the base process (betas of the full schedule).
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any) -> None:
        if "betas" not in kwargs:
            raise TypeError("SpacedDiffusion needs the base process's betas as the keyword argument betas")
        base_betas = validated_betas(kwargs["betas"])
        self.base_betas = base_betas
        self.original_num_steps = int(base_betas.shape[0])
        kept = sorted({int(step) for step in use_timesteps})
        if not kept:
            raise ValueError("use_timesteps must hold at least one step")
        if kept[0] < 0 or kept[-1] >= self.original_num_steps:
            raise ValueError(
                f"use_timesteps must lie in [0, {self.original_num_steps}), "
                f"got min {kept[0]} and max {kept[-1]}"
            )
        self.use_timesteps = set(kept)
        self.timestep_map = kept
        base_alphas_cumprod = np.cumprod(1.0 - base_betas)[kept]
        previous = np.append(1.0, base_alphas_cumprod[:-1])
        super().__init__(**{**kwargs, "betas": 1.0 - base_alphas_cumprod / previous})
        self._timestep_map_tables: dict[torch.device, torch.Tensor] = {}

    def p_mean_variance(self, model: Model, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model: Model, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def _wrap_model(self, model: Model) -> Model:
        if isinstance(model, _RespacedModel):
            return model
        return _RespacedModel(model, self._timestep_map_on, self.rescale_timesteps, self.original_num_steps)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        # The wrapped model maps and scales the timesteps itself.
        return t

    def _timestep_map_on(self, device: torch.device) -> torch.Tensor:
        """The [T] long tensor of base steps, cached per device."""
        table = self._timestep_map_tables.get(device)
        if table is None:
            table = torch.tensor(self.timestep_map, dtype=torch.long, device=device)
            self._timestep_map_tables[device] = table
        return table


class _RespacedModel:
    """Calls `model` with base-process timesteps in place of respaced step indices.

    A plain callable (not an nn.Module), so it neither registers parameters nor gets in the way of
    DDP or torch.compile wrapping the model it calls. Extra keyword arguments pass through.
    """

    def __init__(
        self,
        model: Model,
        timestep_map_on: Callable[[torch.device], torch.Tensor],
        rescale_timesteps: bool,
        original_num_steps: int,
    ) -> None:
        self.model = model
        self._timestep_map_on = timestep_map_on
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x: torch.Tensor, ts: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        base_ts = self._timestep_map_on(ts.device)[ts]
        if self.rescale_timesteps:
            base_ts = base_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, base_ts, **kwargs)
