"""Kernel compilations: how many (the launch layer's counter) and how long (a clock around launches).

``fastdiff.kernels.launch`` counts distinct kernel compilations (``compile_count()``, ``compile_keys()``,
``reset_compile_count()``) in versions that have them; older ones cannot, and then the count is reported
as unavailable (None), never guessed.

Compile seconds: a Triton launch that compiles does so on the host, synchronously, before the launch is
queued; a launch that does not compile returns in microseconds. So the wall time of a launch through
``launch.run`` that added a compilation is that compilation's time (or its load from Triton's on-disk
cache), with no device synchronisation that would disturb the timings. Which launches compiled: the
launch layer's counter when it has one, else the first launch of each compile key (kernel, device,
constexprs, config, argument specialisation) this process saw. Only CUDA launches compile; the
interpreter (CPU tensors) does not. ``torch.compile``'s first calls are added by the checks that make them.
"""

import contextlib
import time
from collections.abc import Iterator
from types import ModuleType

import torch

from fastdiff.ops import backend as backends


def triton_problem() -> str:
    """Why fastdiff's Triton kernels cannot run in this process at all ('' when they can): Triton missing
    or older than the kernels take. One message for a whole run; the CPU backends still run under auto."""
    return backends.backend_refusal("triton", torch.device("cpu"))


def launch_layer() -> ModuleType | None:
    """``fastdiff.kernels.launch`` when a usable Triton is installed, else None."""
    if triton_problem():
        return None
    try:
        from fastdiff.kernels import launch
    except ImportError:
        return None
    return launch


def count() -> int | None:
    """Distinct kernel compilations so far in this process; None when the launch layer cannot count."""
    launch = launch_layer()
    counter = getattr(launch, "compile_count", None)
    return None if counter is None else int(counter())


def keys() -> set[str] | None:
    """The compile keys so far (as strings); None when the launch layer cannot list them."""
    launch = launch_layer()
    lister = getattr(launch, "compile_keys", None)
    return None if lister is None else {str(key) for key in lister()}


def difference(before: int | None, after: int | None) -> int | None:
    """``after - before``, None when either is unavailable."""
    return None if before is None or after is None else after - before


_ACTIVE: list["CompileClock"] = []  # the clock whose ``installed`` block is running


def add_compile_seconds(seconds: float) -> None:
    """Count ``seconds`` (e.g. a ``torch.compile`` first call) as compile time of the running check
    (nothing outside a runner)."""
    if _ACTIVE:
        _ACTIVE[-1].add(seconds)


def counted_seconds() -> float:
    """Compile seconds the running clock has counted so far (0 outside a runner)."""
    return _ACTIVE[-1].seconds if _ACTIVE else 0.0


class CompileClock:
    """Seconds spent compiling: Triton launches that compiled (see the module doc) and what checks add
    with :meth:`add` (``torch.compile``'s first calls). ``seconds`` only grows; read it before and after."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._seen: set[tuple] = set()

    def add(self, seconds: float) -> None:
        """Count ``seconds`` (a first call that compiled) as compile time."""
        self.seconds += seconds

    @contextlib.contextmanager
    def installed(self) -> Iterator["CompileClock"]:
        """Inside the block, every launch through ``launch.run`` is watched (nothing when Triton cannot
        run here)."""
        launch = launch_layer()
        _ACTIVE.append(self)
        if launch is None:
            try:
                yield self
            finally:
                _ACTIVE.remove(self)
            return
        original = launch.run
        counter = getattr(launch, "compile_count", None)
        specialization = getattr(launch, "_specialization", None)

        def run(kernel, grid, args, constexprs, *, like, **kwargs):
            before = counter() if counter is not None else None
            began = time.perf_counter()
            config = original(kernel, grid, args, constexprs, like=like, **kwargs)
            elapsed = time.perf_counter() - began
            if like.device.type != "cuda":
                return config
            if counter is not None:
                compiled = counter() > before
            else:
                spec = specialization or (lambda value: type(value).__name__)
                key = (
                    kernel.name,
                    str(like.device),
                    tuple(sorted((str(k), str(v)) for k, v in constexprs.items())),
                    str(config),
                    tuple(spec(a) for a in args),
                )
                compiled = key not in self._seen
                self._seen.add(key)
            if compiled:
                self.seconds += elapsed
            return config

        launch.run = run
        try:
            yield self
        finally:
            launch.run = original
            _ACTIVE.remove(self)
