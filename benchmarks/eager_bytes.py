"""Bytes moved by eager PyTorch: per aten op, the tensors it reads plus the tensors it writes.

``count_eager_bytes()`` is a ``TorchDispatchMode``; every aten op dispatched inside it adds its input tensors
to ``bytes_read`` and its outputs to ``bytes_written``. Ops that move no data are skipped: views and other
aliasing ops (outputs sharing an input's storage) and ``empty*`` allocations. A mutating op (``copy_``,
``fill_``) counts its mutated argument as written only. A broadcast (stride-0) dimension counts once.
This is the model memory-bound kernels are judged by: it ignores caches, and ops that read their input more
than once internally (``native_group_norm`` makes two passes over x) are counted as one read.
"""

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_ALLOCATING = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t``: broadcast (stride-0) dims count once."""
    distinct = math.prod(size for size, stride in zip(t.shape, t.stride(), strict=True) if stride != 0)
    return distinct * t.element_size()


@dataclass
class EagerBytes:
    """Totals and a per-op breakdown ``{op name: [calls, bytes read, bytes written]}``."""

    bytes_read: int = 0
    bytes_written: int = 0
    per_op: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))

    @property
    def bytes_total(self) -> int:
        return self.bytes_read + self.bytes_written


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _ByteCounter(TorchDispatchMode):
    def __init__(self, totals: EagerBytes) -> None:
        super().__init__()
        self.totals = totals

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func.overloadpacket.__name__ in _ALLOCATING:
            return out
        mutated, read = [], []
        for index, argument in enumerate(func._schema.arguments):
            value = args[index] if index < len(args) else kwargs.get(argument.name)
            tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
            is_write = argument.alias_info is not None and argument.alias_info.is_write
            (mutated if is_write else read).extend(tensors)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        input_storages = {_storage(t) for t in read}
        if not mutated and outputs and all(_storage(t) in input_storages for t in outputs):
            return out  # an aliasing op that is not flagged as a view (e.g. _unsafe_view)
        written = mutated if mutated else outputs
        op = self.totals.per_op[str(func.overloadpacket.__name__)]
        op[0] += 1
        op[1] += sum(tensor_bytes(t) for t in read)
        op[2] += sum(tensor_bytes(t) for t in written)
        self.totals.bytes_read += sum(tensor_bytes(t) for t in read)
        self.totals.bytes_written += sum(tensor_bytes(t) for t in written)
        return out


@contextmanager
def count_eager_bytes() -> Iterator[EagerBytes]:
    """Count the bytes every aten op inside the ``with`` block reads and writes."""
    totals = EagerBytes()
    with _ByteCounter(totals):
        yield totals
