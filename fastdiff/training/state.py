"""The saved training state as one registry of stateful parts, written and read in one place.

Each part (model, EMA, optimizer, loss scaler, timestep sampler, data position, RNG, evaluation best, and
the step counters) registers how it saves and loads itself; a full state (``state{step}.pt``) is the dict
of every part's saved value, and loading gives each part its value back in registration order. A part
added after earlier states were written is registered as optional, so those states still resume.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StatePart:
    """How one part of a run saves (``save() -> value``) and restores (``load(value)``) itself."""

    save: Callable[[], Any]
    load: Callable[[Any], None]
    required: bool = True


class StateRegistry:
    """The stateful parts of a training run, by the key each has in a full state."""

    def __init__(self) -> None:
        self.parts: dict[str, StatePart] = {}

    def register(
        self, name: str, save: Callable[[], Any], load: Callable[[Any], None], required: bool = True
    ) -> None:
        if name in self.parts:
            raise ValueError(f"state part {name!r} is registered twice")
        self.parts[name] = StatePart(save, load, required)

    @property
    def required(self) -> tuple[str, ...]:
        """Keys every state this registry reads must have."""
        return tuple(name for name, part in self.parts.items() if part.required)

    def state_dict(self) -> dict[str, Any]:
        return {name: part.save() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Give each part its value, in registration order (optional parts missing from ``state`` keep
        theirs); the caller has checked the required keys (``fastdiff.training.resume``)."""
        for name, part in self.parts.items():
            if name in state:
                part.load(state[name])
