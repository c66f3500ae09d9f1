"""Compile specs of flash attention: every registered kernel x dtype x config x layout, for the compile
report (``fastdiff.kernels.report``)."""

import torch
import triton.language as tl

from .. import launch
from ..compile_spec import CompileSpec
from .configs import KERNELS, _precision_class, _tag

_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# Which stride Triton's JIT specialises to the constant 1: T in the UNet's qkv views, D in [B, H, T, D].
LAYOUTS: dict[str, str] = {"qkv": "t", "bthd": "d"}


def compile_specs(layouts: tuple[str, ...] = ("qkv", "bthd")) -> list[CompileSpec]:
    """Every registered attention kernel x dtype x config x layout, as ``triton.compile`` takes them.

    The unit stride of each layout is a constexpr 1, as Triton's JIT specialises it. Compiling
    needs a process without TRITON_INTERPRET=1 (the interpreter replaces Triton's own jit helpers).
    """
    specs: list[CompileSpec] = []
    for layout in layouts:
        axis = LAYOUTS[layout]
        for torch_dtype, storage in _TRITON_DTYPES.items():
            dot_dtype = tl.float32 if torch_dtype == torch.float32 else getattr(tl, str(torch_dtype)[6:])
            precision = _precision_class(torch_dtype)
            for (kind, kernel_precision, bucket), kernel in KERNELS.items():
                if kernel_precision not in ("", precision):
                    continue
                constexprs = {"BLOCK_D": bucket}
                if kind != "bwd_delta":
                    constexprs["DOT_DTYPE"] = dot_dtype
                unit = tuple(
                    n for n, t in kernel.arg_types.items() if n.startswith("stride_") and n.endswith(axis)
                )
                for config in kernel.configs:
                    name = f"attention_{kind}[{storage},d{bucket},{layout},{_tag(config)}]"
                    specs.append(launch.compile_spec(kernel, name, storage, config, constexprs, unit))
    return specs
