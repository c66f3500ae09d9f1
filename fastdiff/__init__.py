"""fastdiff: improved-diffusion's UNet and Gaussian diffusion around fused GPU kernels.

The top-level names load on first use, so ``import fastdiff`` stays cheap (no Triton, no model code).
"""

import importlib
from typing import TYPE_CHECKING

__all__ = ["UNetModel", "create_model_and_diffusion", "model_and_diffusion_defaults"]

_EXPORTS = {
    "UNetModel": "fastdiff.unet",
    "create_model_and_diffusion": "fastdiff.script_util",
    "model_and_diffusion_defaults": "fastdiff.script_util",
}

if TYPE_CHECKING:
    from fastdiff.script_util import create_model_and_diffusion, model_and_diffusion_defaults
    from fastdiff.unet import UNetModel


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
