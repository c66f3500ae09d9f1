"""Rewrite any ``nn.Module`` to run fastdiff's fused GroupNorm kernels, report what changed, and undo it.

``fuse_group_norm(model)`` walks the module tree once:

* in an ``nn.Sequential`` (one that keeps ``nn.Sequential.forward``), ``nn.GroupNorm`` followed by
  ``nn.SiLU`` becomes :class:`~fastdiff.nn.GroupNorm32SiLU` + ``nn.Identity``: indices, parameter
  objects and state-dict keys stay as they were;
* every other ``nn.GroupNorm`` becomes :class:`~fastdiff.nn.GroupNorm32`.

Replacements share the original parameters (same ``nn.Parameter`` objects, so dtype, device and any
optimizer that holds them carry over), keep ``num_groups``, ``eps``, the affine flag and the training
mode. Only modules of exactly the listed types are replaced: a subclass of ``nn.GroupNorm`` may compute
something else, and a module with hooks would lose them, so those are left alone and reported with the
reason. The returned :class:`PatchReport` lists every replaced path, every skip, and undoes the patch
(``report.unpatch()`` or ``unpatch(model)``). A model with nothing to replace gives an empty report
(``report.empty``) and a :class:`NothingToPatchWarning`; patching again is a no-op of that kind.

The fused modules take ``x`` with 0 to 3 spatial dims (``[N, C]`` to ``[N, C, D, H, W]``), as
``fastdiff.ops`` does.
"""

import abc
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from torch import nn

from fastdiff.nn import GroupNorm32, GroupNorm32SiLU, ScaleShiftGroupNormSiLU

FASTDIFF_MODULES = (GroupNorm32, GroupNorm32SiLU, ScaleShiftGroupNormSiLU)
"""fastdiff's own norm modules: found in a model, they count as already patched."""

REGISTRY_ATTRIBUTE = "_fastdiff_patches"
"""Name of the list, in a patched model's ``__dict__``, of its active :class:`PatchReport` objects."""


class NothingToPatchWarning(UserWarning):
    """A patch call found nothing to replace (nothing supported, or everything already patched)."""


@dataclass(eq=False)
class Change(abc.ABC):
    """One change a patch made at ``path`` (dotted, as in ``named_modules``), and how to undo it."""

    path: str
    kind: str

    @abc.abstractmethod
    def is_in_place(self) -> bool:
        """Whether the model still holds what this change put there (so undoing it is safe)."""

    @abc.abstractmethod
    def undo(self) -> None:
        """Put back what was there before the change."""

    def describe(self) -> str:
        return self.kind


@dataclass(eq=False)
class ModuleSwap(Change):
    """``parent.<name>`` was ``original`` and is now ``replacement``."""

    parent: nn.Module
    name: str
    original: nn.Module
    replacement: nn.Module

    def is_in_place(self) -> bool:
        return self.parent._modules.get(self.name) is self.replacement

    def undo(self) -> None:
        carry_state(self.replacement, self.original)
        self.parent._modules[self.name] = self.original

    def describe(self) -> str:
        return f"{type(self.original).__name__} -> {type(self.replacement).__name__} ({self.kind})"


@dataclass(frozen=True)
class Skipped:
    """A module at ``path`` that a patch could serve in principle but left alone, and why."""

    path: str
    reason: str


@dataclass(eq=False)
class PatchReport:
    """What one patch call did to ``model``: the changes (undoable), the skips and what was fastdiff already.

    ``empty`` is True when nothing was changed. ``unpatch()`` undoes every change, last first.
    """

    name: str
    model: nn.Module
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    already_patched: list[str] = field(default_factory=list)
    active: bool = True

    @property
    def paths(self) -> list[str]:
        """Dotted paths of everything changed, in the order of the walk."""
        return [change.path for change in self.changes]

    @property
    def empty(self) -> bool:
        return not self.changes

    def unpatch(self) -> None:
        """Undo this patch: put every original module, class or processor back, last change first.

        Raises ``RuntimeError`` when the patch was already undone, or when a patched slot no longer holds
        what the patch put there (the model was changed since; nothing is undone then).
        """
        if not self.active:
            raise RuntimeError(f"this {self.name} patch was already undone")
        moved = [change.path for change in self.changes if not change.is_in_place()]
        if moved:
            raise RuntimeError(
                f"cannot undo {self.name}: the model no longer holds the patched modules at {moved}"
            )
        for change in reversed(self.changes):
            change.undo()
        self.active = False
        registry = self.model.__dict__.get(REGISTRY_ATTRIBUTE, [])
        if self in registry:
            registry.remove(self)

    def summary(self) -> str:
        """Human-readable lines: counts, then each change and each skip with its reason."""
        lines = [
            f"{self.name}: {len(self.changes)} changed, {len(self.skipped)} skipped, "
            f"{len(self.already_patched)} already fastdiff" + ("" if self.active else " (undone)")
        ]
        lines += [f"  changed  {c.path}: {c.describe()}" for c in self.changes]
        lines += [f"  skipped  {s.path}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def check_module(name: str, value: object) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


def carry_state(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the training mode and (for GroupNorms) the current parameter objects of ``source``."""
    target.train(source.training)
    if isinstance(source, nn.GroupNorm) and isinstance(target, nn.GroupNorm) and source.affine:
        target.weight = source.weight
        target.bias = source.bias


HOOK_ATTRIBUTES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has its own forward, backward or state-dict hooks (a replacement drops them)."""
    return any(getattr(module, name, None) for name in HOOK_ATTRIBUTES)


def group_norm_refusal(module: nn.Module, types: tuple[type, ...]) -> str:
    """Why ``module`` (a GroupNorm) cannot be swapped for a fastdiff module ('' when it can)."""
    if type(module) not in types:
        names = ", ".join(t.__name__ for t in types)
        return (
            f"{type(module).__name__} subclasses nn.GroupNorm and may compute something else; "
            f"only exact types ({names}) are replaced (pass it in types= to replace it)"
        )
    if has_hooks(module):
        return "has hooks, which a replacement would drop"
    if not (math.isfinite(module.eps) and module.eps >= 0):
        return f"eps={module.eps!r} is not a finite non-negative number, which fastdiff's ops require"
    return ""


def runs_children_in_order(container: nn.Module) -> bool:
    """Whether ``container`` is an ``nn.Sequential`` whose forward is ``nn.Sequential.forward``."""
    return isinstance(container, nn.Sequential) and type(container).forward is nn.Sequential.forward


def iter_slots(
    model: nn.Module, exclude: set[int]
) -> Iterator[tuple[str, nn.Module, list[tuple[str, nn.Module]]]]:
    """``(path, parent, children)`` for every module reachable from ``model`` (each parent once)."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, parent = stack.pop()
        if id(parent) in seen or id(parent) in exclude:
            continue
        seen.add(id(parent))
        children = [(name, child) for name, child in parent._modules.items() if child is not None]
        yield path, parent, children
        for name, child in reversed(children):
            stack.append((f"{path}.{name}" if path else name, child))


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def rewrite_group_norms(
    model: nn.Module, report: PatchReport, types: tuple[type, ...], exclude: set[int]
) -> None:
    """Swap ``model``'s GroupNorms (and GroupNorm + SiLU pairs) for fastdiff modules, logged in ``report``."""
    if isinstance(model, nn.GroupNorm) and type(model) not in FASTDIFF_MODULES:
        report.skipped.append(
            Skipped(
                "",
                "the model itself is a GroupNorm, with no parent to swap it in; use GroupNorm32.from_module",
            )
        )
    for path, parent, children in iter_slots(model, exclude):
        sequential = runs_children_in_order(parent)
        skip_next = False
        for index, (name, child) in enumerate(children):
            if skip_next:
                skip_next = False
                continue
            child_path = join(path, name)
            if id(child) in exclude or not isinstance(child, nn.GroupNorm):
                continue
            if type(child) in FASTDIFF_MODULES:
                report.already_patched.append(child_path)
                continue
            why = group_norm_refusal(child, types)
            if why:
                report.skipped.append(Skipped(child_path, why))
                continue
            follower = children[index + 1] if index + 1 < len(children) else None
            pairs = (
                sequential
                and follower is not None
                and type(follower[1]) is nn.SiLU
                and id(follower[1]) not in exclude
                and not has_hooks(follower[1])
            )
            if not pairs:
                swap(report, parent, name, child_path, GroupNorm32.from_module(child), "group_norm")
                continue
            swap(report, parent, name, child_path, GroupNorm32SiLU.from_module(child), "group_norm_silu")
            identity = nn.Identity()
            identity.train(follower[1].training)
            swap(report, parent, follower[0], join(path, follower[0]), identity, "silu_fused_into_previous")
            skip_next = True


def swap(report: PatchReport, parent: nn.Module, name: str, path: str, new: nn.Module, kind: str) -> None:
    original = parent._modules[name]
    parent._modules[name] = new
    report.changes.append(ModuleSwap(path, kind, parent, name, original, new))


def register(report: PatchReport) -> PatchReport:
    """Record an applied ``report`` on its model (for ``unpatch(model)``), or warn when it changed nothing."""
    if report.empty:
        report.active = False
        notes = []
        if report.already_patched:
            notes.append(f"{len(report.already_patched)} module(s) already use fastdiff")
        if report.skipped:
            notes.append(f"{len(report.skipped)} skipped (see report.skipped)")
        detail = f" ({'; '.join(notes)})" if notes else ""
        warnings.warn(
            f"{report.name}: nothing to patch in {type(report.model).__name__}{detail}",
            NothingToPatchWarning,
            stacklevel=3,
        )
        return report
    report.model.__dict__.setdefault(REGISTRY_ATTRIBUTE, []).append(report)
    return report


def check_types(types: object) -> tuple[type, ...]:
    if not isinstance(types, tuple) or not types:
        raise TypeError(f"types must be a non-empty tuple of nn.GroupNorm classes, got {types!r}")
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.GroupNorm)) or t in FASTDIFF_MODULES:
            raise TypeError(f"types must hold nn.GroupNorm (sub)classes other than fastdiff's own, got {t!r}")
    return types


def module_ids(name: str, modules: Iterable[nn.Module]) -> set[int]:
    ids = set()
    for module in modules:
        ids.add(id(check_module(f"every item of {name}", module)))
    return ids


def fuse_group_norm(
    model: nn.Module,
    *,
    types: tuple[type[nn.GroupNorm], ...] = (nn.GroupNorm,),
    exclude: Iterable[nn.Module] = (),
) -> PatchReport:
    """Replace ``model``'s GroupNorm + SiLU pairs and lone GroupNorms with fastdiff's fused modules, in place.

    ``types``: GroupNorm classes to replace, matched exactly (add your own subclass when its forward is a
    GroupNorm, e.g. improved-diffusion's ``GroupNorm32``). ``exclude``: modules to leave alone, with
    everything under them. Returns the :class:`PatchReport`; ``report.unpatch()`` undoes it.
    """
    check_module("model", model)
    report = PatchReport("fuse_group_norm", model)
    rewrite_group_norms(model, report, check_types(types), module_ids("exclude", exclude))
    return register(report)


def patches(model: nn.Module) -> list[PatchReport]:
    """The active patches of ``model``, oldest first."""
    check_module("model", model)
    return list(model.__dict__.get(REGISTRY_ATTRIBUTE, []))


def unpatch(model: nn.Module) -> list[PatchReport]:
    """Undo every active fastdiff patch of ``model``, newest first; returns the undone reports.

    Raises ``ValueError`` when ``model`` has no active patch.
    """
    active = patches(model)
    if not active:
        raise ValueError(f"model ({type(model).__name__}) has no active fastdiff patch to undo")
    for report in reversed(active):
        report.unpatch()
    return active
