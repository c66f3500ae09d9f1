"""One launch layer for every Triton kernel of fastdiff: configs, config choice, autotune persistence,
the device/stream guard, interpreter dispatch and compile specs.

A kernel family (GroupNorm, attention, ...) registers each ``@triton.jit`` kernel once::

    FWD = launch.register(
        "gn_fwd_fused", family="group_norm", fn=_gn_fwd_fused_kernel,
        configs=[launch.Config(num_warps=w) for w in (1, 2, 4, 8)],
        rule=lambda problem: ...,                       # the fixed choice, see ``Problem``
        arg_types=launch.arg_types(_gn_fwd_fused_kernel, storage=(...), fp32_pointers=(...), ...),
    )

and launches it with ``launch.run(FWD, grid, args, constexprs, like=x, sizes={...})``.

Public names: ``Config``, ``Problem``, ``Kernel``, ``register``, ``kernels(family)``, ``config_lists()``,
``force_config(name, config)``, ``last_config(name)``, ``choose``, ``run``,
``device_guard(device)``, ``interprets(tensor)``, ``interpreting(fn)``, ``set_autotune``,
``autotune_enabled``, ``autotune_key``, ``AutotuneCache``, ``autotune_cache_path``, ``arg_types``,
``constexpr_names``, ``launch_constexprs``, ``compile_spec``, ``size_bucket``, ``TARGET_SMS``,
``compile_key``, ``compile_count``, ``compile_keys``, ``reset_compile_count``, ``replaying``,
``compiling_meta_launches``.

Compile counter: every launch records its compile key (``compile_key``: device, kernel function, every
constexpr and tile size, warps, stages and what Triton's JIT specialises each runtime argument on), so
``compile_count()`` is the number of distinct kernel binaries the launches so far compile on a GPU, one
per key per device; ``compile_keys()`` lists them, ``reset_compile_count()`` starts over. Interpreted
launches (CPU tensors) are recorded with the same key, so the count is known without a GPU. Tensors on the
``meta`` device hold no data: their launches are recorded and not run, which counts a whole model step's
compiles in seconds (a meta launch takes the compiled path's choices, e.g. bf16 dot operands).

Which config runs (``choose``), in order:

1. ``force_config(name, config)`` (tests, the selftest) or the caller's explicit ``config=``;
2. CPU tensors, the interpreter, or ``torch.use_deterministic_algorithms(True)``: the kernel's fixed
   ``rule`` (shape, dtype, GPU arch -> config; no stopwatch), so the same inputs give the same bits in
   every process, rank and resumed run on the same GPU arch and Triton version;
3. CUDA with autotuning asked for (``FASTDIFF_AUTOTUNE=1`` or ``set_autotune(True)``, the train flag
   ``--autotune True``): the fastest config of the list for the autotune key, measured once and persisted
   in ``autotune_cache_path()`` (per GPU name and Triton version), so later processes reuse the pick;
4. otherwise the fixed rule.

The autotune key holds everything that changes the compiled kernel (the kernel, every constexpr such as
SiLU, scale-shift, dx written and block sizes, each tensor argument's dtype and 16-byte alignment, which
integer arguments are 1 or multiples of 16, i.e. the layout) plus the caller's ``sizes`` bucketed to
powers of two. Launched kernels must be idempotent (every output element written, never accumulated
across launches), since autotuning runs each candidate more than once.

Execution mode is per call, from the tensors' device: CUDA tensors run the compiled ``JITFunction``
under ``torch.cuda.device(device)`` (so Triton launches on that device's current stream); CPU tensors run
an ``InterpretedFunction`` built from the same Python function (``interpreting``). Both coexist in one
process with no environment variable; ``TRITON_INTERPRET=1`` (every ``triton.jit`` is then interpreted)
keeps working as before.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from .compile_spec import CompileSpec

# Triton's argument specialisation imports gluon lazily, and gluon's import checks that tl's functions
# are jit functions: import it now, never while ``interpreting`` has them swapped for their twins.
with contextlib.suppress(ImportError):
    import triton.experimental.gluon

Tensor = torch.Tensor

AUTOTUNE_ENV = "FASTDIFF_AUTOTUNE"
CACHE_DIR_ENV = "FASTDIFF_CACHE_DIR"
# SMs of the GPU the fixed rules are written for (H100 SXM: 132; A100: 108). Rules use it as "enough
# programs to fill the GPU"; the real count of the device at hand never changes a fixed choice, so the
# bits stay the same on every GPU of one architecture.
TARGET_SMS = 132


# ----------------------------------------------------------------------------------------------------
# Configs and kernels
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One launch configuration: ``num_warps``, ``num_stages`` and the constexpr tile sizes it sets
    (``tiles``, e.g. ``{"TILE": 1024}`` or ``{"BLOCK_M": 64, "BLOCK_N": 32}``; stored sorted)."""

    num_warps: int = 4
    num_stages: int = 1
    tiles: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        tiles = self.tiles.items() if isinstance(self.tiles, Mapping) else self.tiles
        object.__setattr__(self, "tiles", tuple(sorted((str(k), int(v)) for k, v in tiles)))
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"Config.num_warps must be a power of two, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"Config.num_stages must be positive, got {self.num_stages}")

    @property
    def meta(self) -> dict[str, int]:
        """The constexprs this config sets."""
        return dict(self.tiles)

    @property
    def tag(self) -> str:
        """Short name, e.g. ``TILE=1024,w4,s1``."""
        return ",".join([f"{k}={v}" for k, v in self.tiles] + [f"w{self.num_warps}", f"s{self.num_stages}"])

    def to_json(self) -> dict[str, Any]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, "tiles": dict(self.tiles)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Config:
        return cls(int(data["num_warps"]), int(data["num_stages"]), tuple(dict(data["tiles"]).items()))


@dataclass(frozen=True)
class Problem:
    """What a fixed rule sees: the caller's named ``sizes`` (e.g. programs, tile elements, T, head dim),
    the launch's ``constexprs``, the storage ``dtype`` and the GPU ``arch`` (compute capability; None for
    CPU tensors and the interpreter)."""

    sizes: Mapping[str, int]
    constexprs: Mapping[str, Any]
    dtype: torch.dtype
    arch: tuple[int, int] | None


@dataclass(frozen=True, eq=False)  # hashed by identity
class Kernel:
    """A registered kernel: its ``name``, ``family`` (``"group_norm"``, ``"attention"``, ...), the
    ``@triton.jit`` function, its full config list, its fixed ``rule`` (Problem -> one of ``configs``),
    ``fits`` (Problem, Config -> whether autotuning may try it; default all) and ``arg_types`` (every
    non-constexpr argument -> a Triton type, ``"*storage"`` for tensors of the launch's dtype).

    ``constexprs``: constexprs every launch of this kernel takes, added to the caller's (a kernel that is
    one pass of a body several kernels share pins the pass, and neutral values for the constexprs that
    pass does not read); ``launch_constexprs`` names the ones a launch still gives."""

    name: str
    family: str
    fn: Any
    configs: tuple[Config, ...]
    rule: Callable[[Problem], Config]
    arg_types: Mapping[str, str]
    fits: Callable[[Problem, Config], bool] | None = None
    constexprs: Mapping[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, Kernel] = {}
_FORCED: dict[str, Config] = {}
_LAST: dict[str, Config] = {}


def register(
    name: str,
    *,
    family: str,
    fn: Any,
    configs: list[Config] | tuple[Config, ...],
    rule: Callable[[Problem], Config],
    arg_types: Mapping[str, str],
    fits: Callable[[Problem, Config], bool] | None = None,
    constexprs: Mapping[str, Any] | None = None,
) -> Kernel:
    """Register kernel ``name`` (unique) and return its handle for ``run``. Re-registering the same
    function under the same name (a module reload) replaces the entry. ``constexprs``: what every launch
    of it takes (see ``Kernel``)."""
    if not configs:
        raise ValueError(f"kernel {name!r} needs at least one config")
    old = _REGISTRY.get(name)
    if old is not None and old.fn.__name__ != fn.__name__:
        raise ValueError(f"kernel name {name!r} is already registered for {old.fn.__name__}")
    missing = set(_runtime_arg_names(fn)) ^ set(arg_types)
    if missing:
        raise ValueError(
            f"arg_types of {name!r} must list exactly its non-constexpr arguments: {sorted(missing)}"
        )
    pinned = dict(constexprs or {})
    unknown = set(pinned) - set(constexpr_names(fn))
    if unknown:
        raise ValueError(f"constexprs of {name!r} pins arguments that are not constexprs: {sorted(unknown)}")
    kernel = Kernel(name, family, fn, tuple(configs), rule, dict(arg_types), fits, pinned)
    _REGISTRY[name] = kernel
    return kernel


def kernels(family: str | None = None) -> list[Kernel]:
    """Every registered kernel (of ``family`` when given), in registration order."""
    return [k for k in _REGISTRY.values() if family is None or k.family == family]


def config_lists() -> dict[str, list[Config]]:
    """Every registered kernel's name -> its full config list."""
    return {name: list(k.configs) for name, k in _REGISTRY.items()}


def last_config(name: str) -> Config | None:
    """The config of the latest launch of kernel ``name`` in this process (None before the first)."""
    return _LAST.get(name)


@contextlib.contextmanager
def force_config(name: str, config: Config) -> Iterator[None]:
    """Inside the block every launch of kernel ``name`` uses ``config`` (one of its list)."""
    kernel = _REGISTRY.get(name)
    if kernel is None:
        raise ValueError(f"no kernel named {name!r} is registered; known: {sorted(_REGISTRY)}")
    if config not in kernel.configs:
        raise ValueError(f"{config} is not in the config list of {name!r}")
    previous = _FORCED.get(name)
    _FORCED[name] = config
    try:
        yield
    finally:
        if previous is None:
            _FORCED.pop(name, None)
        else:
            _FORCED[name] = previous


# ----------------------------------------------------------------------------------------------------
# Devices, interpreter
# ----------------------------------------------------------------------------------------------------


def interprets(t: Tensor) -> bool:
    """Whether a launch on ``t``'s device runs under Triton's interpreter (CPU tensors, or every tensor
    when ``TRITON_INTERPRET=1`` made ``triton.jit`` return interpreted functions). Meta tensors are never
    launched; they take the compiled path's choices."""
    return t.device.type not in ("cuda", "meta") or _interpret_env()


def _interpret_env() -> bool:
    return bool(triton.knobs.runtime.interpret)


@contextlib.contextmanager
def device_guard(device: torch.device) -> Iterator[None]:
    """Make ``device`` current for a CUDA launch, so Triton uses it and its current stream."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def _twin(fn: JITFunction) -> InterpretedFunction:
    """The interpreted twin of one ``@triton.jit`` function (same Python function, same globals)."""
    entry = _TWINS.get(id(fn))
    if entry is None:  # keyed by id: hashing a JITFunction walks its dependencies
        entry = _TWINS[id(fn)] = (fn, InterpretedFunction(fn.fn))
    return entry[1]


_TWINS: dict[int, tuple[JITFunction, InterpretedFunction]] = {}


def _jit_slots(fn: JITFunction) -> list[tuple[Any, str, JITFunction]]:
    """Every place a ``@triton.jit`` function that ``fn``'s body can reach is looked up by name: ``fn``'s
    module globals, the ``triton.language`` modules (``tl.sum``, ``tl.sigmoid``, ... are jit functions
    themselves) and the tensor class (``x.sum()``). Entries are (dict or class, name, function)."""
    owners: list[Any] = [fn.fn.__globals__, tl.core.tensor]
    owners += [vars(m) for name, m in list(sys.modules.items()) if name.startswith("triton.language") and m]
    slots = []
    for owner in owners:
        items = owner.items() if isinstance(owner, dict) else vars(owner).items()
        slots += [(owner, name, value) for name, value in list(items) if isinstance(value, JITFunction)]
    return slots


def _set(owner: Any, name: str, value: Any) -> None:
    if isinstance(owner, dict):
        owner[name] = value
    else:
        setattr(owner, name, value)


def _language_state() -> list[tuple[Any, dict[str, Any]]]:
    """What Triton's interpreter patches while a kernel runs: the attributes of the ``triton.language``
    modules and of its tensor classes, as (owner, copy of its attributes)."""
    owners = [m for name, m in list(sys.modules.items()) if name.startswith("triton.language") and m]
    owners += [tl.core.tensor, getattr(tl.core, "tensor_descriptor_base", None)]
    return [(owner, dict(vars(owner))) for owner in owners if owner is not None]


def _restore_language(state: list[tuple[Any, dict[str, Any]]]) -> None:
    """Put back every attribute ``_language_state`` saw that has changed since. Triton's interpreter
    restores its patches of ``triton.language`` after a kernel (triton-lang/triton#8735) but not after a
    device function the kernel calls (``InterpretedFunction.__call__`` drops them, in 3.6 and 3.9), and the
    patched ``tl.program_id``,
    ``tl.full``, ... then break every later compile in the process (``'value' object has no attribute
    'dtype'``). Names it added (helpers its rewritten functions look up) stay."""
    for owner, before in state:
        now = vars(owner)
        for name, value in before.items():
            if now.get(name, _MISSING) is not value:
                setattr(owner, name, value)


_MISSING = object()


@contextlib.contextmanager
def interpreting(fn: Any) -> Iterator[Any]:
    """Run ``fn``'s interpreted twin inside the block: yields it, with every ``@triton.jit`` function
    its body can reach swapped for its twin until the block ends (Triton's interpreter does the same
    to ``triton.language`` while a kernel runs). Under ``TRITON_INTERPRET=1`` ``fn`` already is one.
    Whatever the interpreter left patched in ``triton.language`` is put back when the block ends."""
    state = _language_state()
    if isinstance(fn, InterpretedFunction):
        try:
            yield fn
        finally:
            _restore_language(state)
        return
    if not isinstance(fn, JITFunction):
        raise TypeError(f"expected a @triton.jit function, got {type(fn).__name__}")
    slots = _jit_slots(fn)
    for owner, name, value in slots:
        _set(owner, name, _twin(value))
    try:
        yield _twin(fn)
    finally:
        for owner, name, value in slots:
            _set(owner, name, value)
        _restore_language(state)


def _runtime_arg_names(fn: Any) -> list[str]:
    """Arguments of a kernel that are not ``tl.constexpr``."""
    py = getattr(fn, "fn", fn)
    names = list(py.__code__.co_varnames[: py.__code__.co_argcount])
    annotations = py.__annotations__
    return [n for n in names if "constexpr" not in str(annotations.get(n, ""))]


def constexpr_names(fn: Any) -> list[str]:
    """Arguments of a kernel declared ``tl.constexpr``."""
    py = getattr(fn, "fn", fn)
    names = list(py.__code__.co_varnames[: py.__code__.co_argcount])
    runtime = set(_runtime_arg_names(fn))
    return [n for n in names if n not in runtime]


def launch_constexprs(kernel: Kernel) -> list[str]:
    """The constexprs a launch of ``kernel`` gives: its function's, less those the registration pins."""
    return [n for n in constexpr_names(kernel.fn) if n not in kernel.constexprs]


# ----------------------------------------------------------------------------------------------------
# Config choice
# ----------------------------------------------------------------------------------------------------

_AUTOTUNE_OVERRIDE: bool | None = None


def set_autotune(enabled: bool | None) -> None:
    """Turn CUDA autotuning on or off for this process (None: follow ``FASTDIFF_AUTOTUNE``)."""
    global _AUTOTUNE_OVERRIDE
    _AUTOTUNE_OVERRIDE = enabled


def autotune_enabled() -> bool:
    """Whether CUDA launches are autotuned: asked for (``set_autotune`` or ``FASTDIFF_AUTOTUNE=1``) and
    ``torch.use_deterministic_algorithms`` is off."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    if _AUTOTUNE_OVERRIDE is not None:
        return _AUTOTUNE_OVERRIDE
    return os.environ.get(AUTOTUNE_ENV, "0") == "1"


def device_arch(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device; None for CPU."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def size_bucket(n: int) -> int:
    """The power of two at or above ``n`` (0 for 0): the granularity of autotune keys."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def _specialization(value: Any) -> str:
    """What Triton's JIT specialises on for one runtime argument: a tensor's dtype and 16-byte alignment,
    an integer's width and whether it is 1 or a multiple of 16."""
    if isinstance(value, Tensor):
        return f"{value.dtype}".replace("torch.", "") + (":16" if value.data_ptr() % 16 == 0 else "")
    if isinstance(value, bool):
        return f"b{int(value)}"
    if isinstance(value, int):
        width = "" if -(2**31) <= value < 2**31 else "i64:"
        return width + ("1" if value == 1 else ("i16" if value % 16 == 0 else "i"))
    if isinstance(value, float):
        return "f"
    return type(value).__name__


def autotune_key(kernel: Kernel, args: tuple, constexprs: Mapping[str, Any], sizes: Mapping[str, int]) -> str:
    """The autotune cache key of one launch (a string, as stored on disk)."""
    const = ",".join(f"{k}={constexprs[k]}" for k in sorted(constexprs))
    spec = ",".join(_specialization(a) for a in args)
    bucketed = ",".join(f"{k}={size_bucket(v)}" for k, v in sorted(sizes.items()))
    return f"{kernel.name}|{const}|{spec}|{bucketed}"


# ----------------------------------------------------------------------------------------------------
# Compile counter
# ----------------------------------------------------------------------------------------------------

_COMPILE_KEYS: dict[str, None] = {}  # an ordered set: first launch first


def compile_key(
    kernel: Kernel, args: tuple, constexprs: Mapping[str, Any], config: Config, device: torch.device
) -> str:
    """What one launch compiles on a GPU, as a string: the device (``cuda:0``; CPU and meta launches are
    keyed as ``cuda``, the binary they stand for), the kernel's function, its constexprs with the config's
    tiles, warps and stages, and each runtime argument's specialisation (none for the arguments the
    kernel's ``do_not_specialize`` names). Kernels registered under several
    names that share one function and constexprs share a binary, so the key names the function. (An
    interpreted bf16 attention launch dots in fp32, see ``kernels.attention``: its key says so.)"""
    fn = getattr(kernel.fn, "fn", kernel.fn)
    name = f"{fn.__module__}.{getattr(fn, '__name__', type(fn).__name__)}"
    const = {**constexprs, **config.meta}
    plain = _unspecialised(kernel)
    specs = [
        ("i64" if abs(int(a)) >= 2**31 else "i") if n in plain else _specialization(a)
        for n, a in zip(kernel.arg_types, args, strict=False)
    ]
    where = str(device) if device.type == "cuda" else "cuda"
    return "|".join(
        (
            where,
            name,
            ",".join(f"{k}={const[k]}" for k in sorted(const)),
            f"w{config.num_warps},s{config.num_stages}",
            ",".join(specs),
        )
    )


def _unspecialised(kernel: Kernel) -> set[str]:
    """Runtime arguments of ``kernel`` that its ``@triton.jit(do_not_specialize=...)`` leaves alone."""
    names = list(kernel.arg_types)
    return {
        names[i] if isinstance(i, int) and i < len(names) else i
        for i in getattr(kernel.fn, "do_not_specialize", ())
    }


def _record_compile(
    kernel: Kernel, args: tuple, constexprs: Mapping[str, Any], config: Config, like: Tensor
) -> None:
    key = compile_key(kernel, args, constexprs, config, like.device)
    _COMPILE_KEYS.setdefault(key)
    for launched in _REPLAYS:
        launched.append((kernel.name, config, key))


_REPLAYS: list[list[tuple[str, Config, str]]] = []  # the lists of the active ``replaying`` blocks


@contextlib.contextmanager
def replaying() -> Iterator[list[tuple[str, Config, str]]]:
    """Inside the block, every launch appends (kernel name, config, compile key) to the yielded list, and
    the block leaves the compile counter and ``last_config`` as they were: what a planner uses to see which
    kernels and configs some op calls would launch (on ``meta`` tensors nothing runs) without those
    launches counting as compilations of the process."""
    keys, last = dict(_COMPILE_KEYS), dict(_LAST)
    launched: list[tuple[str, Config, str]] = []
    _REPLAYS.append(launched)
    try:
        yield launched
    finally:
        _REPLAYS.remove(launched)
        _COMPILE_KEYS.clear()
        _COMPILE_KEYS.update(keys)
        _LAST.clear()
        _LAST.update(last)


def compile_count() -> int:
    """Distinct kernel compilations the launches of this process ask for (since the last reset)."""
    return len(_COMPILE_KEYS)


def compile_keys() -> list[str]:
    """The distinct compile keys counted by ``compile_count``, in order of first launch."""
    return list(_COMPILE_KEYS)


def reset_compile_count() -> None:
    """Forget the recorded compile keys (``compile_count()`` is 0 afterwards)."""
    _COMPILE_KEYS.clear()


def choose(kernel: Kernel, problem: Problem) -> Config:
    """The fixed choice for ``problem``: a forced config, else the kernel's rule."""
    forced = _FORCED.get(kernel.name)
    if forced is not None:
        return forced
    config = kernel.rule(problem)
    if config not in kernel.configs:
        raise RuntimeError(f"the rule of {kernel.name!r} chose {config}, which is not in its config list")
    return config


def run(
    kernel: Kernel,
    grid: tuple[int, ...] | Callable[[Config], tuple[int, ...]],
    args: tuple,
    constexprs: Mapping[str, Any],
    *,
    like: Tensor,
    sizes: Mapping[str, int] | None = None,
    config: Config | None = None,
) -> Config:
    """Launch ``kernel`` on ``args`` (positional, every runtime argument) with ``constexprs``.

    ``like``: a tensor of the launch (its device picks the mode and the device guard, its dtype is the
    Problem's). ``grid``: a tuple, or a function of the chosen config. ``sizes``: named problem sizes for
    the rule and the autotune key. ``config``: an explicit config (not necessarily from the list) that
    overrides the choice unless ``force_config`` is active. Returns the config launched.
    """
    constexprs = {**kernel.constexprs, **constexprs}
    problem = Problem(dict(sizes or {}), constexprs, like.dtype, device_arch(like.device))
    interpret = interprets(like)
    if config is None or kernel.name in _FORCED:
        if not interpret and kernel.name not in _FORCED and autotune_enabled():
            config = _autotuned(kernel, grid, args, problem, like)
        else:
            config = choose(kernel, problem)
    _LAST[kernel.name] = config
    _record_compile(kernel, args, constexprs, config, like)
    if like.device.type == "meta":
        if _COMPILING_META:
            _launch_one(kernel.fn, grid, args, constexprs, config, compile_only=True)
        return config
    with device_guard(like.device):
        if interpret:
            with interpreting(kernel.fn) as fn:
                _launch_one(fn, grid, args, constexprs, config)
        else:
            _launch_one(kernel.fn, grid, args, constexprs, config)
    return config


COMPILE_OPTIONS = {"enable_fp_fusion": True}
"""Triton compile options every launch (and the compile report) passes: multiply-adds fused into FMAs,
Triton's default before 3.10 and what fastdiff's numerics and compile report were proven with. Triton 3.9
warns that 3.10 turns it off by default; passed explicitly, a newer Triton compiles the same kernels."""


def _launch_one(fn, grid, args, constexprs, config: Config, compile_only: bool = False) -> None:
    grid = grid(config) if callable(grid) else grid
    settings = {**constexprs, **config.meta, "num_warps": config.num_warps, "num_stages": config.num_stages}
    settings.update(COMPILE_OPTIONS)
    if compile_only:
        _COMPILED_ONLY.add(fn)
        fn.warmup(*args, grid=grid, **settings)
    else:
        fn[grid](*args, **settings)


_COMPILING_META = False
_COMPILED_ONLY: set = set()  # the functions compiled inside ``compiling_meta_launches``


@contextlib.contextmanager
def compiling_meta_launches() -> Iterator[None]:
    """Inside the block a launch on ``meta`` tensors compiles its kernel (Triton's ``warmup``: built and
    stored in Triton's cache, never run) for the target of Triton's active driver, where it would do
    nothing: how ``fastdiff.selftest.precompile`` fills a GPU's Triton cache on a machine without one.
    Leaving the block drops those functions' in-memory kernels (built for that target), so a later launch
    on a real device loads or builds its own."""
    global _COMPILING_META
    previous, _COMPILING_META = _COMPILING_META, True
    try:
        yield
    finally:
        _COMPILING_META = previous
        while _COMPILED_ONLY:
            fn = _COMPILED_ONLY.pop()
            while not hasattr(fn, "device_caches") and hasattr(fn, "fn"):  # a wrapper's jit function
                fn = fn.fn
            getattr(fn, "device_caches", {}).clear()


# ----------------------------------------------------------------------------------------------------
# Autotuning with picks persisted per GPU name and Triton version
# ----------------------------------------------------------------------------------------------------


def autotune_cache_path(gpu_name: str) -> Path:
    """``$FASTDIFF_CACHE_DIR/autotune/<gpu>-triton<ver>.json`` (default ``~/.cache/fastdiff``)."""
    root = Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "fastdiff")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", gpu_name).strip("_") or "gpu"
    return root / "autotune" / f"{safe}-triton{triton.__version__}.json"


class AutotuneCache:
    """Autotune picks of one GPU name and Triton version, kept in memory and in one JSON file.

    File: ``{"gpu": name, "triton": version, "picks": {key: Config.to_json()}}``. A file that cannot be
    read, or one written for another GPU or Triton version, is ignored with a warning (and replaced on
    the next write). Writes merge with what is on disk (other ranks) and replace the file atomically.
    """

    def __init__(self, gpu_name: str, path: Path | None = None) -> None:
        self.gpu_name = gpu_name
        self.path = path or autotune_cache_path(gpu_name)
        self.picks: dict[str, Config] = self._read()

    def _read(self) -> dict[str, Config]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("gpu") != self.gpu_name or data.get("triton") != triton.__version__:
                warnings.warn(
                    f"ignoring autotune cache {self.path}: written for GPU {data.get('gpu')!r} and Triton "
                    f"{data.get('triton')!r}, this is {self.gpu_name!r} and Triton {triton.__version__}",
                    stacklevel=3,
                )
                return {}
            return {key: Config.from_json(value) for key, value in data["picks"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            warnings.warn(f"ignoring unreadable autotune cache {self.path}: {error}", stacklevel=3)
            return {}

    def get(self, key: str) -> Config | None:
        return self.picks.get(key)

    def put(self, key: str, config: Config) -> None:
        """Record a pick and write the file (atomically; a failed write only warns)."""
        self.picks[key] = config
        merged = {**self._read_quietly(), **self.picks}
        data = {
            "gpu": self.gpu_name,
            "triton": triton.__version__,
            "picks": {k: v.to_json() for k, v in sorted(merged.items())},
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as error:
            warnings.warn(f"could not write autotune cache {self.path}: {error}", stacklevel=2)

    def _read_quietly(self) -> dict[str, Config]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._read()

    def pick(self, key: str, candidates: list[Config], measure: Callable[[Config], float]) -> Config:
        """The cached pick for ``key`` if it is still a candidate, else the candidate with the least
        ``measure`` (ties: the earlier one), recorded."""
        cached = self.get(key)
        if cached is not None and cached in candidates:
            return cached
        times = [measure(c) for c in candidates]
        best = candidates[min(range(len(candidates)), key=lambda i: (times[i], i))]
        self.put(key, best)
        return best


_CACHES: dict[str, AutotuneCache] = {}


def _cache_for(device: torch.device) -> AutotuneCache:
    name = torch.cuda.get_device_name(device)
    path = autotune_cache_path(name)
    cache = _CACHES.get(str(path))
    if cache is None:
        cache = _CACHES[str(path)] = AutotuneCache(name, path)
    return cache


def _autotuned(kernel: Kernel, grid, args: tuple, problem: Problem, like: Tensor) -> Config:
    candidates = [c for c in kernel.configs if kernel.fits is None or kernel.fits(problem, c)]
    if not candidates:
        return choose(kernel, problem)
    key = autotune_key(kernel, args, problem.constexprs, problem.sizes)

    import triton.testing  # only where autotuning runs

    def measure(config: Config) -> float:
        _record_compile(kernel, args, problem.constexprs, config, like)
        with device_guard(like.device):
            try:
                return float(
                    triton.testing.do_bench(
                        lambda: _launch_one(kernel.fn, grid, args, problem.constexprs, config),
                        warmup=5,
                        rep=20,
                    )
                )
            except Exception:  # a config the compiler rejects (e.g. out of shared memory) never wins
                return math.inf

    return _cache_for(like.device).pick(key, candidates, measure)


# ----------------------------------------------------------------------------------------------------
# Compile specs from explicit argument types
# ----------------------------------------------------------------------------------------------------


def arg_types(
    fn: Any,
    *,
    storage: tuple[str, ...] = (),
    fp32_pointers: tuple[str, ...] = (),
    i32: tuple[str, ...] = (),
    fp32: tuple[str, ...] = (),
) -> dict[str, str]:
    """Explicit Triton types of every non-constexpr argument of ``fn``: ``storage`` pointers take the
    launch's dtype (``"*storage"``), the others as named. Every runtime argument must be listed once."""
    types_by_name: dict[str, str] = {}
    for names, kind in ((storage, "*storage"), (fp32_pointers, "*fp32"), (i32, "i32"), (fp32, "fp32")):
        for name in names:
            if name in types_by_name:
                raise ValueError(f"argument {name!r} of {fn.__name__} is listed twice")
            types_by_name[name] = kind
    expected = _runtime_arg_names(fn)
    if set(types_by_name) != set(expected):
        diff = sorted(set(types_by_name) ^ set(expected))
        raise ValueError(f"arg types of {fn.__name__} must list exactly its runtime arguments; off: {diff}")
    return {name: types_by_name[name] for name in expected}


def compile_spec(
    kernel: Kernel,
    name: str,
    storage: str,
    config: Config,
    constexprs: Mapping[str, Any],
    unit_strides: tuple[str, ...] = (),
) -> CompileSpec:
    """The ``CompileSpec`` of ``kernel`` for ``storage`` (``"fp32"``, ``"fp16"``, ``"bf16"``) tensors,
    ``config`` and ``constexprs``; ``unit_strides`` are compiled as the constant 1, as Triton's JIT
    specialises integer arguments equal to 1."""
    fn = kernel.fn
    constants = {**kernel.constexprs, **constexprs, **config.meta, **{s: 1 for s in unit_strides}}
    py = getattr(fn, "fn", fn)
    signature = {}
    for arg in py.__code__.co_varnames[: py.__code__.co_argcount]:
        if arg in constants:
            signature[arg] = "constexpr"
        else:
            kind = kernel.arg_types[arg]
            signature[arg] = "*" + storage if kind == "*storage" else kind
    return CompileSpec(
        name=name,
        fn=fn,
        signature=signature,
        constexprs=constants,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
