"""What the compile report needs to build one Triton kernel for a GPU it does not have."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ALIGNED_SUFFIX = "+aligned16"


@dataclass(frozen=True)
class CompileSpec:
    """One kernel in one dtype and one launch configuration.

    ``signature`` maps every argument name of ``fn`` to a Triton type string (``"*fp16"``, ``"i32"``,
    ``"fp32"``, ...; ``"constexpr"`` for the arguments given in ``constexprs``), as
    ``triton.compiler.ASTSource`` takes them. ``aligned`` names the arguments compiled as divisible by 16
    (pointers to 16-byte aligned data, ints that are multiples of 16): Triton's launcher specialises
    such arguments, and the vector loads this allows change registers and shared memory.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    aligned: tuple[str, ...] = ()

    def attrs(self) -> dict[tuple[int, ...], list[list[Any]]]:
        """``ASTSource``'s ``attrs``: the divisibility hints of the ``aligned`` arguments."""
        return {(self.fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in self.aligned}

    def aligned_variant(self) -> "CompileSpec":
        """This spec with every pointer and integer argument divisible by 16, as a launch on tensors
        from PyTorch's allocator with multiple-of-16 sizes and strides specialises it (except the
        arguments the kernel's ``do_not_specialize`` names, which Triton never specialises)."""
        unspecialised = {
            self.fn.arg_names[i] if isinstance(i, int) else i
            for i in getattr(self.fn, "do_not_specialize", ())
        }
        runtime = tuple(
            name
            for name, kind in self.signature.items()
            if (kind.startswith("*") or kind in ("i32", "i64")) and name not in unspecialised
        )
        return dataclasses.replace(self, name=self.name + ALIGNED_SUFFIX, aligned=runtime)
