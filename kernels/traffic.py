"""Count the global-memory bytes that Triton kernels move under the interpreter (CPU tensors, which the
launch layer always interprets, or any tensors with ``TRITON_INTERPRET=1``).

Fused norms are memory-bound, so bytes moved predict their speed on a GPU. Inside ``count_traffic()``
every load and store the interpreter executes adds the bytes of its active (unmasked) lanes:

    with count_traffic() as traffic:
        y, mean, rstd = group_norm_forward(x, ...)
    traffic.bytes_read, traffic.bytes_written

Unmasked ``tl.load``/``tl.store`` reach the counters too: the interpreter routes them through the masked
paths with an all-true mask. Only Triton kernels are counted; PyTorch ops running beside them are not.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from triton.runtime import interpreter

_lock = threading.Lock()


@dataclass
class Traffic:
    """Bytes read and written by active lanes, and the number of load and store instructions executed."""

    bytes_read: int = 0
    bytes_written: int = 0
    loads: int = 0
    stores: int = 0

    @property
    def bytes_total(self) -> int:
        return self.bytes_read + self.bytes_written


def _active_bytes(ptrs, mask) -> int:
    """Bytes covered by the lanes of ``ptrs`` (a pointer TensorHandle) whose ``mask`` is true."""
    lanes = int(np.count_nonzero(np.broadcast_to(mask.data, np.shape(ptrs.data))))
    return lanes * (ptrs.get_element_ty().primitive_bitwidth // 8)


@contextmanager
def count_traffic() -> Iterator[Traffic]:
    """Count interpreter loads and stores made inside the ``with`` block; yields the running ``Traffic``.

    Nested or concurrent counters are refused (the interpreter's builder is process-wide).
    """
    builder = interpreter.InterpreterBuilder
    if not _lock.acquire(blocking=False):
        raise RuntimeError("count_traffic() is already active; counters cannot be nested")
    traffic = Traffic()
    masked_load = builder.create_masked_load
    masked_store = builder.create_masked_store

    # the cache arguments after the mask differ between Triton versions (3.6: cache_modifier and
    # eviction_policy, 3.9: cache_policy); they are passed through as given
    def counting_load(self, ptrs, mask, *rest):
        traffic.bytes_read += _active_bytes(ptrs, mask)
        traffic.loads += 1
        return masked_load(self, ptrs, mask, *rest)

    def counting_store(self, ptrs, value, mask, *rest):
        traffic.bytes_written += _active_bytes(ptrs, mask)
        traffic.stores += 1
        return masked_store(self, ptrs, value, mask, *rest)

    builder.create_masked_load = counting_load
    builder.create_masked_store = counting_store
    try:
        yield traffic
    finally:
        builder.create_masked_load = masked_load
        builder.create_masked_store = masked_store
        _lock.release()
