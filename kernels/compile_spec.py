"""What the compile report needs to build one Triton kernel for a GPU it does not have."""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CompileSpec:
    """One kernel in one dtype and one launch configuration.

    ``signature`` maps every argument name of ``fn`` to a Triton type string (``"*fp16"``, ``"i32"``,
    ``"fp32"``, ...; ``"constexpr"`` for the arguments given in ``constexprs``), as
    ``triton.compiler.ASTSource`` takes them.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
