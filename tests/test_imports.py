"""Every module of fastdiff, its kernels (``fastdiff.kernels``) included, imports on this stack.

A module that only a GPU run, a CLI or a report touches would otherwise first fail on the machine that
runs it, and a GPU machine cannot install a fix; this is what proves an interpreter and torch/Triton pair
(the range setup.py declares) before any kernel runs.
"""

import importlib
import importlib.util
import os
from pathlib import Path

import pytest

import fastdiff


def _module_names(root: Path, package: str) -> list[str]:
    """Dotted names of every ``.py`` file of ``package``, whose files are under ``root``."""
    names = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if (Path(folder, d) / "__init__.py").exists())
        parts = (package, *Path(folder).relative_to(root).parts)
        for file in sorted(files):
            if file.endswith(".py"):
                stem = file.removesuffix(".py")
                names.append(".".join(parts if stem == "__init__" else (*parts, stem)))
    return names


KERNELS_ROOT = Path(importlib.util.find_spec("fastdiff.kernels").origin).parent
"""Where fastdiff.kernels lives: kernels/ of the repository (setup.py's package_dir), or a link to it."""
MODULES = sorted(
    set(_module_names(Path(fastdiff.__file__).parent, "fastdiff"))
    | set(_module_names(KERNELS_ROOT, "fastdiff.kernels"))
)
OPTIONAL = {"fastdiff.integrations.diffusers": "diffusers", "fastdiff.latents": "diffusers"}
"""Modules that need an optional extra, and the package whose absence skips them."""


def test_walk_finds_the_packages_and_the_kernels():
    assert {"fastdiff", "fastdiff.ops.backend", "fastdiff.kernels", "fastdiff.selftest.run"} <= set(MODULES)
    files = {f"fastdiff.kernels.{p.stem}" for p in KERNELS_ROOT.glob("*.py") if p.stem != "__init__"}
    assert files and files <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    extra = OPTIONAL.get(name)
    if extra is not None and importlib.util.find_spec(extra) is None:
        pytest.skip(f"{name} needs the optional package {extra}, not installed here")
    module = importlib.import_module(name)
    assert module.__name__ == name
