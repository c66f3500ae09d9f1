"""The machinery of typed configs: a field with its default, help text and checks, and a checked section.

A config section is a frozen dataclass whose fields are declared with :func:`option`; creating one checks
every field (type, choices, its own check) and then the section's cross-field rules (``check``). A failed
check raises :class:`ConfigError` naming the field, so the command line can say ``--lr`` and a JSON file can
say ``train.lr`` in that file.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

SCALAR_TYPES = (bool, int, float, str)


class ConfigError(ValueError):
    """A config value that fails its check; ``field`` names it (``""`` for a rule over several fields) and
    ``problem`` completes the sentence: ``lr`` + ``must be positive, got 0.0``."""

    def __init__(self, field: str, problem: str) -> None:
        if field and problem.startswith(f"{field} "):  # a parser's message that names the field itself
            problem = problem[len(field) + 1 :]
        super().__init__(f"{field} {problem}" if field else problem)
        self.field = field
        self.problem = problem


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    check: Callable[[Any], str | None] | None = None,
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """A config field: ``default``, the ``--help`` text, allowed ``choices`` and a ``check`` returning a
    problem (a phrase such as "must be positive") or None.

    ``parse`` is for a field that is not one scalar type (``--image_size 64`` or ``48,64``): it turns the
    command line's text, a JSON value or a Python value into the field's canonical value, raising
    ValueError for anything else; the flag then reads a string (``parse.metavar``, or ``VALUE``, in
    ``--help``)."""
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "check": check,
        "parse": parse,
    }
    return dataclasses.field(default=default, metadata=metadata)


def positive(value: float) -> str | None:
    return None if value > 0 else f"must be positive, got {value!r}"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be >= 0 (0 turns it off), got {value!r}"


def probability(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else f"must be in [0, 1), got {value!r}"


def non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def coerce(value: Any, kind: type, name: str) -> Any:
    """``value`` as ``kind`` when it is one already (an int is taken for a float); else a ConfigError."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(name, f"must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _field_value(spec: dataclasses.Field, value: Any) -> Any:
    """``value`` as field ``spec``'s canonical value: parsed by its ``parse``, else coerced to its type."""
    parse = spec.metadata.get("parse")
    if parse is None:
        return coerce(value, spec.type, spec.name)
    try:
        return parse(value)
    except ValueError as error:
        raise ConfigError(spec.name, str(error)) from None


@dataclasses.dataclass(frozen=True)
class Section:
    """Base of the config sections: checks every field on creation, then :meth:`check`."""

    title: ClassVar[str] = ""
    """What the section holds, for ``--help`` and documentation."""

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = _field_value(spec, getattr(self, spec.name))
            object.__setattr__(self, spec.name, value)
            choices = spec.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(spec.name, f"must be one of {list(choices)}, got {value!r}")
            check = spec.metadata.get("check")
            problem = check(value) if check is not None else None
            if problem:
                raise ConfigError(spec.name, problem)
        self.check()

    def check(self) -> None:
        """Rules over several fields (raise ConfigError); none by default."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(spec.name for spec in dataclasses.fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {spec.name: spec.default for spec in dataclasses.fields(cls)}

    @classmethod
    def help_text(cls, name: str) -> str:
        return cls.__dataclass_fields__[name].metadata.get("help", "")

    @classmethod
    def field_type(cls, name: str) -> type:
        return cls.__dataclass_fields__[name].type
