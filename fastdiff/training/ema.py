"""Exponential moving averages of the model's parameters, one per rate, kept in fp32."""

import math

import torch

from fastdiff.runtime.checkpoint import mismatched_keys

WARMUP_POWER = 2.0 / 3.0
"""Exponent of the power-function EMA warm-up (the choice of Karras et al.'s and diffusers' EMA)."""


def warmup_decay(rate: float, num_updates: int) -> float:
    """The decay of update ``num_updates + 1``: min(rate, 1 - (1 + num_updates)^(-2/3)).

    0 on the first update (the average starts at the weights), 0.9 after 31, 0.99 after 999; it reaches
    ``rate`` and stays there.
    """
    return min(rate, 1.0 - math.pow(1.0 + num_updates, -WARMUP_POWER))


class ParameterEMA:
    """fp32 shadows of ``model``'s parameters per rate: ``shadow = decay * shadow + (1 - decay) * param``.

    decay is the rate, or with ``warmup`` :func:`warmup_decay` of the updates made so far
    (``num_updates``, saved in :meth:`state_dict`, so a resumed run continues the same decays).
    """

    def __init__(self, model: torch.nn.Module, rates: list[float], warmup: bool = False) -> None:
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.rates = list(rates)
        self.names = [name for name, _ in model.named_parameters()]
        self.shadows = [
            [param.detach().float().clone() for _, param in model.named_parameters()] for _ in self.rates
        ]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skip: torch.Tensor | None = None) -> None:
        """One EMA step towards ``model``'s current parameters; none (bit for bit) where the 0-dim bool
        ``skip`` is true, decided on the device (a skipped step left the parameters finite and unchanged).

        With ``warmup`` the decay follows the updates actually applied: a skipped step does not advance
        ``num_updates`` either, counted on the device so that no host sync is needed.
        """
        params = [param.detach().float() for _, param in model.named_parameters()]
        applied = None if skip is None else (~skip).to(torch.int64)
        for rate, shadow in zip(self.rates, self.shadows, strict=True):
            decay = self._decay(rate, shadow[0].device)
            if skip is None and isinstance(decay, float):
                torch._foreach_mul_(shadow, decay)
                torch._foreach_add_(shadow, params, alpha=1.0 - decay)
                continue
            if skip is None:
                skip = torch.zeros((), dtype=torch.bool, device=shadow[0].device)
            keep = torch.where(skip, 1.0, decay).to(device=shadow[0].device, dtype=torch.float32)
            take = torch.where(skip, 0.0, 1.0 - decay).to(device=shadow[0].device, dtype=torch.float32)
            torch._foreach_mul_(shadow, keep)
            torch._foreach_add_(shadow, torch._foreach_mul(params, take))
        self.num_updates = self.num_updates + (1 if applied is None else applied)

    def _decay(self, rate: float, device: torch.device) -> float | torch.Tensor:
        """This update's decay for ``rate``: the rate, or its warm-up value (a float64 0-dim tensor on
        ``device`` while the update count lives on the device)."""
        if not self.warmup:
            return rate
        if isinstance(self.num_updates, int):
            return warmup_decay(rate, self.num_updates)
        count = self.num_updates.to(device=device, dtype=torch.float64)
        return torch.clamp(1.0 - torch.pow(1.0 + count, -WARMUP_POWER), max=rate)

    def model_state_dict(self, model: torch.nn.Module, index: int) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with rate ``index``'s averages in place of the parameters (loadable)."""
        state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        for name, value in zip(self.names, self.shadows[index], strict=True):
            state[name] = value.detach().clone()
        return state

    def copy_to(self, model: torch.nn.Module, index: int = 0) -> None:
        """Write rate ``index``'s averages into ``model``'s parameters."""
        with torch.no_grad():
            for (_, param), value in zip(model.named_parameters(), self.shadows[index], strict=True):
                param.copy_(value)

    def state_dict(self) -> dict:
        """Rates, warm-up, the number of updates and the averages by parameter name."""
        return {
            "rates": list(self.rates),
            "warmup": self.warmup,
            "num_updates": int(self.num_updates),
            "shadows": [dict(zip(self.names, shadow, strict=True)) for shadow in self.shadows],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore averages saved by :meth:`state_dict` (same rates and parameter names)."""
        if [float(rate) for rate in state["rates"]] != self.rates:
            raise ValueError(
                f"the checkpoint's EMA rates {state['rates']} differ from --ema_rate {self.rates}"
            )
        if bool(state.get("warmup", False)) != self.warmup:
            trained = bool(state.get("warmup", False))
            raise ValueError(
                f"the checkpoint's EMA was made with ema_warmup {trained}, this run has {self.warmup}"
            )
        for shadow, saved in zip(self.shadows, state["shadows"], strict=True):
            problems = mismatched_keys(dict(zip(self.names, shadow, strict=True)), saved)
            if problems:
                raise ValueError("the checkpoint's EMA does not fit this model: " + "; ".join(problems))
            for target, name in zip(shadow, self.names, strict=True):
                target.copy_(saved[name])
        self.num_updates = int(state.get("num_updates", 0))

    def load_rate_from_model_state(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Set rate ``index``'s averages from a model-shaped state_dict (an ``ema_{rate}_*.pt`` file)."""
        expected = dict(zip(self.names, self.shadows[index], strict=True))
        problems = mismatched_keys(
            expected, {name: value for name, value in state.items() if name in expected}
        )
        if problems:
            raise ValueError("the EMA file does not fit this model: " + "; ".join(problems))
        for target, name in zip(self.shadows[index], self.names, strict=True):
            target.copy_(state[name])
