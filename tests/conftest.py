"""Test-wide settings and fixtures.

Triton kernels run in two tiers: compiled on CUDA tensors (``kernel_device`` "cuda", skipped with a
reason on machines without a GPU, also under FASTDIFF_REQUIRE_BACKENDS=1) and under Triton's interpreter
on CPU tensors ("cpu-interpreter"). The launch layer (fastdiff.kernels.launch) picks the mode per call
from the tensors' device, so both tiers run in one process with no flag, the same way on a CPU-only
machine and on a GPU machine. TRITON_INTERPRET=1, set by hand, still works (every kernel is then an
interpreted function, CUDA tensors included).
Inputs are fresh each run: the session seed is random unless FASTDIFF_TEST_SEED is given, and is
printed in the report header so a failure can be replayed. With FASTDIFF_REQUIRE_BACKENDS=1 (set by
.ci/run) a test that asks for a backend this machine lacks fails instead of skipping, so CI cannot pass
by skipping the kernels. FASTDIFF_TEST_SHARD=i/n keeps every n-th selected test from the i-th
(tools/gpu_check.sh runs n pytest processes side by side that way).
"""

import os
import random
import zlib

import pytest
import setuptools  # noqa: F401  (before any test imports the stdlib distutils: see below)
import torch

from fastdiff import ops

# torch.compile's inductor builds C++ with setuptools, whose distutils shim asserts when the standard
# library's distutils (deprecated in Python 3.11) was imported first, as some earlier test in a full run
# did (tests/test_inductor.py failed only after the suite's other tests). Importing setuptools first puts
# its distutils in place for the whole session.

KERNEL_BACKENDS = ("torch", "cpp", "triton")


def require_backend(name: str) -> None:
    """Skip (or, in CI, fail) the calling test when backend ``name`` cannot run on CPU tensors here."""
    if name in ops.available_backends():
        return
    message = f"backend {name!r} is not available on this machine"
    if os.environ.get("FASTDIFF_REQUIRE_BACKENDS") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request) -> str:
    """Each backend in turn, forced for the duration of the test."""
    require_backend(request.param)
    with ops.use_backend(request.param):
        yield request.param


KERNEL_DEVICES = ("cpu-interpreter", "cuda")
NO_CUDA_REASON = "no CUDA device: compiled Triton kernels run only on a GPU machine (pytest tests there)"


@pytest.fixture(params=KERNEL_DEVICES)
def kernel_device(request) -> torch.device:
    """Where a Triton kernel test runs: CPU tensors through the interpreter, or CUDA tensors compiled.

    The CUDA case is a skip (never a failure, even with FASTDIFF_REQUIRE_BACKENDS=1) without a GPU; the
    interpreter case needs Triton (a skip, or a failure under FASTDIFF_REQUIRE_BACKENDS=1, without it).
    """
    require_backend("triton")
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip(NO_CUDA_REASON)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def parse_shard(value: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with 0 <= i < n; a UsageError naming FASTDIFF_TEST_SHARD otherwise."""
    index, slash, count = value.partition("/")
    if slash and index.isdigit() and count.isdigit() and int(index) < int(count):
        return int(index), int(count)
    raise pytest.UsageError(f"FASTDIFF_TEST_SHARD: expected i/n with 0 <= i < n, got {value!r}")


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected theirs
def pytest_collection_modifyitems(config, items) -> None:
    """Under FASTDIFF_TEST_SHARD=i/n, deselect all but items i, i + n, i + 2n, ... of the selection."""
    value = os.environ.get("FASTDIFF_TEST_SHARD")
    if value is None:
        return
    index, count = parse_shard(value)
    config.hook.pytest_deselected(
        items=[item for position, item in enumerate(items) if position % count != index]
    )
    items[:] = items[index::count]


SESSION_SEED = int(os.environ.get("FASTDIFF_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config) -> str:
    return f"fastdiff: FASTDIFF_TEST_SEED={SESSION_SEED} (set it to replay these inputs)"


@pytest.fixture(autouse=True)
def _seed(request) -> None:
    """Seed torch per test from the session seed and the test's id."""
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def quiet_diffusers():
    """diffusers logs notes on loading and dtype casts (low_cpu_mem_usage, ``model.to(dtype)``) that say
    nothing about fastdiff: silence them for one test."""
    from diffusers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(previous)
