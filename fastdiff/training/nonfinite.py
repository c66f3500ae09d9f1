"""Non-finite training steps in any precision: detected on the device, skipped, counted, and fatal in a row.

How a step is judged without a host sync of its own:

1. A rank whose loss is not finite multiplies the loss it backpropagates by NaN (:func:`poison_nonfinite`;
   by exactly 1.0 otherwise), so every gradient it contributes is NaN. DDP's gradient all-reduce then
   spreads the NaN to every rank: the reduced gradients, and so their norm, are non-finite on all ranks at
   once. The finiteness flag rides in the gradient all-reduce the step does anyway; no collective is added.
2. ``bad = ~isfinite(grad_norm)`` stays a device tensor. The optimizer skips on the device
   (:func:`step_unless`: torch's fused AdamW takes it as ``found_inf``, as GradScaler passes it), the EMA
   update is masked with it, and the flags of the steps are kept on the device.
3. :meth:`NonFiniteSteps.settle` reads the pending flags on the host only where the loop syncs already:
   at a log line, before a save, and at the latest every ``max_bad_steps`` steps (one read per N steps), so
   a run of N bad steps in a row stops the run at most N - 1 steps after the N-th, before anything is saved.
"""

import os

import torch

INJECT_NAN_AT_STEPS: frozenset[int] = frozenset(
    int(part) for part in os.environ.get("FASTDIFF_TEST_INJECT_NAN_STEPS", "").split(",") if part.strip()
)
"""Test hook (not a user flag): steps whose loss is replaced by NaN, by 0-based index (the loop's ``step``
while it runs; the log calls it step index + 1). Tests set this attribute, or,
for subprocesses, the environment variable ``FASTDIFF_TEST_INJECT_NAN_STEPS`` (comma-separated steps)."""


class NonFiniteStepsError(RuntimeError):
    """Too many non-finite steps in a row: the run stops, its last checkpoint untouched."""


def inject_test_nan(loss: torch.Tensor, step: int) -> torch.Tensor:
    """``loss`` times NaN when ``step`` is in :data:`INJECT_NAN_AT_STEPS` (the test hook), else ``loss``."""
    return loss * float("nan") if step in INJECT_NAN_AT_STEPS else loss


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` (0-dim) times 1.0 when finite, times NaN when not: every gradient it yields is then NaN.

    The factor is a constant to autograd, so a finite loss and its gradients are unchanged bit for bit.
    """
    factor = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)
    return loss * factor


def is_bad(grad_norm: torch.Tensor) -> torch.Tensor:
    """0-dim bool on the device: whether the (all-reduced) gradient norm is not finite."""
    return ~torch.isfinite(grad_norm)


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` skips on the device when given a ``found_inf`` flag (torch's fused Adam)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(
        optimizer.param_groups and optimizer.param_groups[0].get("fused")
    )


def step_unless(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``bad``: on the device for fused AdamW (weights, moments and the step
    count stay bit for bit), else after reading ``bad`` on the host (one sync; e.g. apex FusedAdam)."""
    if supports_found_inf(optimizer):
        optimizer.found_inf = bad.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(bad):
        optimizer.step()


class NonFiniteSteps:
    """Per-step ``bad`` flags, kept on the device until :meth:`settle`; the skipped total; the current run."""

    def __init__(self, max_bad_steps: int, skipped_steps: int = 0) -> None:
        if max_bad_steps <= 0:
            raise ValueError(f"max_bad_steps must be a positive integer, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.skipped_steps = skipped_steps
        self.bad_in_a_row = 0
        self._pending: list[tuple[int, torch.Tensor]] = []

    def record(self, step: int, bad: torch.Tensor) -> None:
        """Keep the flag of the step the log numbers ``step`` (no sync)."""
        self._pending.append((step, bad.detach().reshape(())))

    @property
    def due(self) -> bool:
        """Whether enough flags are pending that a run of ``max_bad_steps`` could hide among them."""
        return len(self._pending) >= self.max_bad_steps

    def settle(self) -> list[int]:
        """Read the pending flags (one host sync); returns the steps skipped among them.

        Raises :class:`NonFiniteStepsError` naming the step at which ``max_bad_steps`` bad steps in a row
        were reached.
        """
        if not self._pending:
            return []
        steps = [step for step, _ in self._pending]
        flags = torch.stack([flag for _, flag in self._pending]).tolist()
        self._pending = []
        skipped = []
        for step, bad in zip(steps, flags, strict=True):
            if not bad:
                self.bad_in_a_row = 0
                continue
            skipped.append(step)
            self.skipped_steps += 1
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= self.max_bad_steps:
                raise NonFiniteStepsError(
                    f"training step {step} makes {self.bad_in_a_row} steps in a row whose loss or "
                    f"gradient norm is not finite (--max_bad_steps {self.max_bad_steps}): stopping. None "
                    "of them was applied and the checkpoints written are left as they are (lower the "
                    "learning rate or check the data, then resume from the last checkpoint)"
                )
        return skipped
