"""The ``fastdiff`` operator namespace: lean ``torch.library`` registration of fastdiff's ops.

``torch.library.custom_op`` wraps every call in generic Python (argument re-filling, pytree walks, a
dynamo guard around the kernel) that costs about 0.2 ms per forward+backward on a CPU, more than a
whole GroupNorm+SiLU of a 16x16 UNet level. Each op here is defined from its schema with:

* one kernel for every device (it runs the backend named by one of its arguments);
* a fake kernel, so ``torch.compile`` traces the op without running it;
* optionally an autograd kernel that applies a plain ``torch.autograd.Function``.

Calling an ``Op`` in plain eager mode (real tensors, no compile, no dispatch mode) runs its Python kernel
directly, skipping the dispatcher's round trips; anything else (``torch.compile``, ``torch.jit.trace``,
fake or other subclass tensors, dispatch modes such as a FLOP counter's) goes through the registered op,
so tracers and modes see one opaque ``fastdiff::`` call.
"""

from collections.abc import Callable

import torch
from torch._ops import OpOverload
from torch.utils._python_dispatch import _get_current_dispatch_mode

NAMESPACE = "fastdiff"
LIBRARY = torch.library.Library(NAMESPACE, "DEF")


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a Parameter overrides neither torch function nor dispatch


def plain_eager(args: tuple) -> bool:
    """True when ``args`` hold only plain tensors or parameters and nothing traces or intercepts the call."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


class Op:
    """One ``fastdiff::`` op: its dispatcher overload, its Python kernel and, once registered, its
    ``torch.autograd.Function``."""

    def __init__(self, overload: OpOverload, kernel: Callable) -> None:
        self.overload = overload
        self.kernel = kernel
        self.function: type[torch.autograd.Function] | None = None

    def __call__(self, *args: object) -> object:
        if not plain_eager(args):
            return self.overload(*args)
        return self._with_autograd(*args)

    def _with_autograd(self, *args: object) -> object:
        """``function.apply(*args)`` when an input requires grad, else the outputs below autograd."""
        if self.function is not None and torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return self.function.apply(*args)
        return self.below_autograd(*args)

    def below_autograd(self, *args: object) -> object:
        """The outputs, with autograd skipped: what the autograd.Function's forward computes them with."""
        if plain_eager(args):
            return self.kernel(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return self.overload(*args)

    def register_autograd(self, function: type[torch.autograd.Function]) -> None:
        """Makes the op differentiable: ``function.apply(*args)`` runs when an input requires grad.

        ``function.forward(ctx, *args)`` takes the op's arguments and returns its outputs, computed with
        ``self.below_autograd(*args)``.
        """
        self.function = function
        LIBRARY.impl(self.overload._schema.name.split("::", 1)[1], self._with_autograd, "Autograd")


def define(schema: str, kernel: Callable, fake: Callable) -> Op:
    """Defines ``fastdiff::<schema>`` with ``kernel`` on every device and ``fake`` for tracing."""
    name = schema.split("(", 1)[0]
    LIBRARY.define(schema)
    LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIBRARY)
    return Op(getattr(getattr(torch.ops, NAMESPACE), name).default, kernel)
