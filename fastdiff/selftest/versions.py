"""Group ``versions``: Python, torch, Triton, CUDA, the GPU, and which fastdiff backends serve here."""

import platform
from importlib import metadata
from typing import Any

import torch

from fastdiff import ops
from fastdiff.ops import backend as backends
from fastdiff.ops import cpu_policy
from fastdiff.selftest import compiles
from fastdiff.selftest.records import Check, Options, Result, not_run

GROUP = "versions"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions(options: Options) -> dict[str, Any]:
    """Python, torch, triton, CUDA, the GPU (name, architecture, memory) and fastdiff's backends."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "device": str(options.device),
        "fastdiff_backends": ops.available_backends(),
        "triton_interpreter": backends.TRITON_INTERPRET,
        "cpp_extension": "built" if backends.cpp_extension is not None else backends.CPP_IMPORT_ERROR,
        "cpu_threads": torch.get_num_threads(),
        "cpu_model": cpu_policy.cpu_model(),
        "cpu_auto": cpu_policy.describe(),
        "compile_counter": "launch.compile_count" if compiles.count() is not None else "unavailable",
    }
    if options.is_cuda:
        props = torch.cuda.get_device_properties(options.device)
        info["gpu"] = {
            "name": props.name,
            "arch": f"sm_{props.major}{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
        }
    return info


def _check_versions(options: Options) -> Result:
    info = versions(options)
    gpu = info.get("gpu")
    where = f"CPU {info['cpu_model']} ({info['cpu_auto']['isa']}), {info['cpu_threads']} threads"
    if gpu:
        where = f"{gpu['name']} ({gpu['arch']}, {gpu['memory_gib']} GiB)"
    detail = (
        f"{where}; Python {info['python']}, torch {info['torch']}, triton {info['triton']}, "
        f"CUDA {info['cuda']}; backends {', '.join(info['fastdiff_backends'])}; "
        f"compile counter {info['compile_counter']}"
    )
    return Result(GROUP, "versions", "info", detail, info)


def _check_triton(options: Options) -> Result:
    problem = compiles.triton_problem()
    if problem:
        where = "CUDA falls back to PyTorch's kernels" if options.is_cuda else "the CPU backends still run"
        return not_run(GROUP, "triton kernels", "unavailable", f"{problem}; {where}")
    mode = "compiled" if options.is_cuda else "interpreted (CPU tensors)"
    return Result(GROUP, "triton kernels", "info", f"triton {_version('triton')} runs the kernels {mode}")


def _check_cpp(options: Options) -> Result:
    if backends.cpp_extension is None:
        return not_run(GROUP, "cpp extension", "unavailable", backends.CPP_IMPORT_ERROR)
    return Result(
        GROUP, "cpp extension", "info", "fastdiff._C is built: the C++ GroupNorm kernels serve CPUs"
    )


def plan(options: Options) -> list[Check]:
    return [
        Check("versions", lambda: _check_versions(options)),
        Check("triton kernels", lambda: _check_triton(options)),
        Check("cpp extension", lambda: _check_cpp(options)),
    ]
