"""Compile report: build every Triton kernel configuration for GPUs this machine does not have.

    python -m fastdiff.kernels.report [--arch 80 90] [--json PATH] [--jobs K]

Each ``CompileSpec`` from the kernel modules' ``compile_specs()`` is compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)``, as given (no argument known to be aligned) and with every pointer and
integer argument divisible by 16 (what most launches specialise); no GPU is needed. Per kernel and
architecture the report gives registers, spill bytes and shared memory, read with the tools Triton's
wheel ships in ``triton/backends/nvidia/bin``: ``cuobjdump --dump-resource-usage`` on the cubin Triton built
(registers, stack, local memory) and ``ptxas-blackwell -v`` on its PTX (spill stores and loads; the
plain ``ptxas`` there rejects the PTX version Triton 3.9 emits). Shared memory is Triton's dynamic
allocation plus the cubin's static one.

Triton compiles only real ``@triton.jit`` functions, which ``TRITON_INTERPRET=1`` replaces at import
time; in such a process ``compile_report`` reruns itself in subprocesses without that variable.
"""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

KERNEL_MODULES = ("fastdiff.kernels.group_norm", "fastdiff.kernels.attention")
DEFAULT_ARCHS = (80, 90)
_PTXAS_ARCH = {90: "sm_90a", 100: "sm_100a"}


def _interpreting() -> bool:
    from triton import knobs

    return os.environ.get("TRITON_INTERPRET") == "1" or bool(knobs.runtime.interpret)


def collect_specs(modules: Sequence[str] = KERNEL_MODULES) -> list:
    """``compile_specs()`` of every importable module in ``modules`` (a missing kernel module is skipped),
    each also in its aligned variant (every pointer and integer argument divisible by 16)."""
    specs = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        for spec in module.compile_specs():
            specs += [spec, spec.aligned_variant()]
    return specs


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas_command(arch: int, metadata: Any) -> list[str]:
    """The ptxas command Triton itself runs for ``sm_<arch>`` (ptxas-blackwell from sm_90), plus -v."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        tool, gpu_name = get_ptxas(arch).path, sm_arch_from_capability(arch)
    except ImportError:  # another Triton layout: the tool the design notes name
        tool, gpu_name = _tool("ptxas-blackwell"), _PTXAS_ARCH.get(arch, f"sm_{arch}")
    fmad = [] if getattr(metadata, "enable_fp_fusion", True) else ["--fmad=false"]
    return [tool, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu_name}"]


def _parse_cuobjdump(text: str) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the (single) function in ``cuobjdump --dump-resource-usage`` output."""
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return {key.lower(): int(value) for key, value in fields.items()}


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``reg``, ``stack``, ``shared``, ``local`` of a cubin's kernel, as ``cuobjdump --dump-resource-usage``
    reads them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.cubin")
        path.write_bytes(cubin)
        command = [_tool("cuobjdump"), "--dump-resource-usage", str(path)]
        usage = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return _parse_cuobjdump(usage)


def _parse_ptxas(text: str) -> dict[str, int]:
    """Registers, spill stores/loads and stack frame from ``ptxas -v`` output."""
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    registers = re.search(r"Used (\d+) registers", text)
    if spills is None or registers is None:
        raise RuntimeError(f"ptxas -v printed no register/spill summary:\n{text}")
    return {
        "ptxas_registers": int(registers.group(1)),
        "stack_frame": int(spills.group(1)),
        "spill_stores": int(spills.group(2)),
        "spill_loads": int(spills.group(3)),
    }


def compile_one(spec: Any, arch: int) -> dict[str, Any]:
    """Compile ``spec`` for ``sm_<arch>`` and measure it; a failure is reported in the row's ``error``."""
    import triton
    from fastdiff.kernels.launch import COMPILE_OPTIONS
    from triton.backends.compiler import GPUTarget

    row: dict[str, Any] = {
        "kernel": spec.name,
        "arch": f"sm_{arch}",
        "num_warps": spec.num_warps,
        "error": None,
    }
    try:
        source = triton.compiler.ASTSource(spec.fn, spec.signature, spec.constexprs, attrs=spec.attrs())
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **COMPILE_OPTIONS}
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp, "kernel.ptx")
            ptx.write_text(kernel.asm["ptx"])
            ptxas = subprocess.run(
                [*_ptxas_command(arch, kernel.metadata), str(ptx), "-o", os.devnull],
                capture_output=True,
                text=True,
                check=True,
            )
        resources = resource_usage(kernel.asm["cubin"])
        row.update(_parse_ptxas(ptxas.stdout + ptxas.stderr))
        row.update(
            registers=resources["reg"],
            local=resources.get("local", 0),
            stack=resources.get("stack", 0),
            shared=int(kernel.metadata.shared) + resources.get("shared", 0),
        )
        row["spills"] = row["spill_stores"] + row["spill_loads"]
    except Exception as error:  # a kernel the compiler rejects is a finding, not a crash of the report
        row["error"] = f"{type(error).__name__}: {error}".strip()[:2000]
    return row


def _compile_in_subprocesses(archs: Sequence[int], jobs: int, modules: Sequence[str]) -> list[dict[str, Any]]:
    """Run this module in ``jobs`` subprocesses without TRITON_INTERPRET, each compiling one shard."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        outputs = [Path(tmp, f"shard{i}.json") for i in range(jobs)]
        base = [sys.executable, "-m", "fastdiff.kernels.report", "--quiet", "--modules", *modules, "--arch"]
        procs = [
            subprocess.Popen([*base, *map(str, archs), "--shard", f"{i}/{jobs}", "--json", str(out)], env=env)
            for i, out in enumerate(outputs)
        ]
        codes = [proc.wait() for proc in procs]
        # a shard exits 1 when a kernel failed to compile (a row with an error): its rows are the report
        if any(code and not (code == 1 and out.exists()) for code, out in zip(codes, outputs, strict=True)):
            raise RuntimeError(f"compile report subprocesses failed with exit codes {codes}")
        for out in outputs:
            rows.extend(json.loads(out.read_text()))
    order = {spec.name: i for i, spec in enumerate(collect_specs(modules))}
    return sorted(rows, key=lambda row: (order.get(row["kernel"], len(order)), row["kernel"], row["arch"]))


def compile_report(
    archs: Sequence[int] = DEFAULT_ARCHS,
    jobs: int = 1,
    modules: Sequence[str] = KERNEL_MODULES,
    shard: tuple[int, int] = (0, 1),
) -> list[dict[str, Any]]:
    """One row per (spec, arch): kernel, arch, num_warps, registers, spills (bytes), shared (bytes), local,
    stack, spill_stores, spill_loads, ptxas_registers, error (None when it compiled).

    ``jobs`` > 1 compiles in that many subprocesses; ``shard=(i, k)`` compiles the i-th of k disjoint parts.
    """
    if jobs > 1 or _interpreting():
        return _compile_in_subprocesses(archs, max(1, jobs), modules)
    index, count = shard
    specs = [spec for spec in collect_specs(modules) if _shard_of(spec.name, count) == index]
    return [compile_one(spec, arch) for spec in specs for arch in archs]


def _shard_of(name: str, count: int) -> int:
    """The shard (of ``count``) that compiles the spec called ``name``: stable across processes."""
    return zlib.crc32(name.encode()) % count


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of the report rows."""
    header = f"{'kernel':<98} {'arch':<6} {'warps':>5} {'regs':>5} {'spills':>6} {'smem':>7} {'local':>5}"
    lines = [header, "-" * len(header)]
    for row in rows:
        if row["error"]:
            lines.append(f"{row['kernel']:<98} {row['arch']:<6} {row['num_warps']:>5} FAILED: {row['error']}")
            continue
        lines.append(
            f"{row['kernel']:<98} {row['arch']:<6} {row['num_warps']:>5} {row['registers']:>5} "
            f"{row['spills']:>6} {row['shared']:>7} {row['local']:>5}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastdiff.kernels.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="SM versions, e.g. 80 90"
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this path")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--modules", nargs="+", default=list(KERNEL_MODULES), help="kernel modules to walk")
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help="print no table")
    args = parser.parse_args(argv)
    index, count = (int(v) for v in args.shard.split("/"))
    rows = compile_report(args.arch, args.jobs, args.modules, (index, count))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if not args.quiet:
        print(format_table(rows))
        failed = sum(1 for row in rows if row["error"])
        spilled = sum(1 for row in rows if not row["error"] and row["spills"])
        print(f"\n{len(rows)} compiles: {failed} failed, {spilled} with spills")
    return 1 if any(row["error"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
