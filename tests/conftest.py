"""Test-wide settings: Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton decorates any kernel, so it is set here, at collection.
Inputs are fresh each run: the session seed is random unless FASTDIFF_TEST_SEED is given, and is
printed in the report header so a failure can be replayed. With FASTDIFF_REQUIRE_BACKENDS=1 (set by
.ci/run) a test that asks for a backend this machine lacks fails instead of skipping, so CI cannot pass
by skipping the kernels.
"""

import os
import random
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from fastdiff import ops

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


SESSION_SEED = int(os.environ.get("FASTDIFF_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config) -> str:
    return f"fastdiff: FASTDIFF_TEST_SEED={SESSION_SEED} (set it to replay these inputs)"


@pytest.fixture(autouse=True)
def _seed(request) -> None:
    """Seed torch per test from the session seed and the test's id."""
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
