"""``python -m fastdiff.selftest.precompile --out DIR [--arch 90]``: compile, on a machine without a GPU,
the Triton kernels the selftest's first five groups launch on a GPU of compute capability ``arch`` (90:
H100/H200, 80: A100), into ``DIR`` as a Triton cache. A GPU machine that runs the selftest with
``TRITON_CACHE_DIR`` pointing at a copy of it loads those kernels instead of compiling them.

How: the groups' launches are replayed on ``meta`` tensors (``fastdiff.selftest.cold``) with
``launch.compiling_meta_launches`` and a stand-in for Triton's CUDA driver that reports the target and
launches nothing. Triton keys its cache by its own build and version, the ptxas it carries, the target,
the kernel's source and its specialisation (the argument types, and which pointers and integers divide by
16). Meta tensors' addresses count as aligned, as a fresh CUDA allocation's are, so the stored kernels
serve the launches whose arguments are aligned on the GPU, under the same Triton wheel; any other launch
compiles as it would have. Run it with the Triton the GPU machine has (tools/side_env.sh builds Triton
3.6's stack).
"""

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


class CompileOnlyDriver:
    """Triton's active-driver interface for compiling only: CUDA of compute capability ``arch``, device 0,
    stream 0; nothing can be launched through it."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@contextlib.contextmanager
def compile_only(arch: int, cache_dir: Path) -> Iterator[None]:
    """Inside the block, meta launches compile for ``arch`` into ``cache_dir`` (Triton's cache)."""
    from triton.runtime import driver

    from fastdiff.kernels import launch

    previous_cache = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir)
    driver.set_active(CompileOnlyDriver(arch))
    try:
        with launch.compiling_meta_launches():
            yield
    finally:
        with contextlib.suppress(RuntimeError):  # no GPU: Triton finds no default driver, none to restore
            driver.reset_active()
        if previous_cache is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = previous_cache


def cache_entries(cache_dir: Path) -> int:
    """Compiled kernels in a Triton cache directory (one ``__grp__*.json`` each)."""
    return sum(1 for _ in cache_dir.glob("*/__grp__*.json"))


def stack_users(cache_dir: Path) -> list[str]:
    """The compiled kernels in a Triton cache whose cubin uses a stack frame or local memory (spilled
    registers, as ``cuobjdump --dump-resource-usage`` reads the cubin Triton built): ``name (dir): REG
    r, STACK s, LOCAL l`` each. The compile report checks every config in two variants of alignment;
    this checks the specialisations real launches compile."""
    from fastdiff.kernels.report import resource_usage

    found = []
    for cubin in sorted(cache_dir.glob("*/*.cubin")):
        usage = resource_usage(cubin.read_bytes())
        stack, local = usage.get("stack", 0), usage.get("local", 0)
        if stack or local:
            where = f"{cubin.stem} ({cubin.parent.name[:12]})"
            found.append(f"{where}: REG {usage['reg']}, STACK {stack}, LOCAL {local}")
    return found


def parse_arch(value: str) -> int:
    """``90`` or ``9.0`` -> 90; an argparse error for anything but a CUDA compute capability."""
    try:
        arch = round(float(value) * 10) if "." in value else int(value)
    except ValueError:
        arch = 0
    if not 70 <= arch < 200:
        raise argparse.ArgumentTypeError(
            f"expected a CUDA compute capability such as 90 or 8.0, got {value!r}"
        )
    return arch


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastdiff.selftest.precompile",
        description="Compile the selftest's first five groups' Triton kernels for a GPU, without one, into a "
        "Triton cache directory (carry it to the GPU machine as TRITON_CACHE_DIR).",
    )
    parser.add_argument("--out", required=True, type=Path, help="the Triton cache directory to fill")
    parser.add_argument("--arch", default=90, type=parse_arch, help="compute capability (default: 90)")
    args = parser.parse_args(argv)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"argument --out: cannot create {str(args.out)!r}: {error.strerror or error}")
    import triton

    from fastdiff.selftest import cold

    before, began = cache_entries(args.out), time.perf_counter()
    workloads = cold.group_workloads()  # planned here: planning's own replays compile nothing
    with compile_only(args.arch, args.out):
        groups = {name: cold.launches(workload) for name, workload in workloads.items()}
    keys = set().union(*groups.values())
    size = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    print(
        f"triton {triton.__version__}, sm_{args.arch}: {len(keys)} distinct launches of the first five "
        "groups "
        f"({', '.join(f'{name} {len(group)}' for name, group in groups.items() if group)}); "
        f"{cache_entries(args.out) - before} kernels compiled into {args.out} ({size / 2**20:.1f} MiB) "
        f"in {time.perf_counter() - began:.0f} s",
        flush=True,
    )
    spilled = stack_users(args.out)
    print(f"{len(spilled)} kernels use a stack frame or local memory", *spilled, sep="\n  ", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
