"""Class-label dropout for classifier-free guidance: labels replaced by the model's null class."""

import torch

from fastdiff.runtime.rng import derive_seed


def drop_class_labels(
    y: torch.Tensor, prob: float, null_label: int, seed: int, step: int, first: int
) -> torch.Tensor:
    """``y`` [N] with each label replaced by ``null_label`` with probability ``prob``.

    Sample i's draw is the (first + i)-th uniform of one CPU generator seeded from (seed, step), so it
    depends on its position in the global batch only: not on ranks, microbatching, or what ran before.
    ``prob`` is ``ModelConfig.class_dropout_prob``, checked there to lie in [0, 1).
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, step, 3))
    uniforms = torch.rand(first + y.shape[0], generator=generator)[first:].to(y.device)
    return torch.where(uniforms < prob, torch.full_like(y, null_label), y)
