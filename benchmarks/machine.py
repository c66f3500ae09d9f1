"""What machine and software a benchmark run used, for the summary's header."""

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fastdiff.ops import available_backends, cpu_policy
from fastdiff.ops import backend as backends


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit(root: Path) -> str | None:
    """HEAD of the repository holding ``root`` (read only), or None outside git."""
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, GPU, library versions, fastdiff's backends and the git commit."""
    info: dict[str, Any] = {
        "cpu_model": cpu_policy.cpu_model(),
        "cpu_auto": cpu_policy.describe(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "pytest_benchmark": _version("pytest-benchmark"),
        "fastdiff_backends": available_backends(),
        "cpp_extension": "built"
        if backends.cpp_extension is not None
        else f"not built: {backends.CPP_IMPORT_ERROR}",
        "git_commit": _git_commit(Path(__file__).resolve().parent),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"sm_{props.major}{props.minor}",
            "cuda": torch.version.cuda,
        }
    return info


def describe(info: dict[str, Any]) -> str:
    """One line naming the machine: CPU (cores) or GPU, and torch/triton versions."""
    where = f"{info['cpu_model']} ({info['usable_cpus']} cores)"
    if info.get("gpu"):
        where = f"{info['gpu']['name']} + {where}"
    return f"{where}; torch {info['torch']}, triton {info['triton']}"
