"""The ``fastdiff`` operator namespace: lean ``torch.library`` registration of fastdiff's ops.

``torch.library.custom_op`` wraps every call in generic Python (argument re-filling, pytree walks, a
dynamo guard around the kernel) that costs about 0.2 ms per forward+backward on a CPU, more than a
whole GroupNorm+SiLU of a 16x16 UNet level. Each op here is defined from its schema with:

* one kernel for every device (it runs the backend named by one of its arguments);
* a fake kernel, so ``torch.compile`` traces the op without running it;
* optionally an autograd kernel that applies a plain ``torch.autograd.Function``.
"""

from collections.abc import Callable

import torch
from torch._ops import OpOverload

NAMESPACE = "fastdiff"
LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def define(schema: str, kernel: Callable, fake: Callable) -> OpOverload:
    """Defines ``fastdiff::<schema>`` with ``kernel`` on every device and ``fake`` for tracing."""
    name = schema.split("(", 1)[0]
    LIBRARY.define(schema)
    LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIBRARY)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def call_below_autograd(op: OpOverload, *args: object) -> object:
    """``op(*args)`` with autograd skipped: what an autograd.Function's forward runs."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def register_autograd(op: OpOverload, function: type[torch.autograd.Function]) -> None:
    """Makes ``op`` differentiable: ``function.apply(*args)`` runs when an input requires grad.

    ``function.forward(ctx, *args)`` takes the op's arguments and returns its outputs; it computes them
    with ``call_below_autograd(op, *args)``.
    """

    def autograd_kernel(*args: object) -> object:
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args)
        return call_below_autograd(op, *args)

    LIBRARY.impl(op._schema.name.split("::", 1)[1], autograd_kernel, "Autograd")
