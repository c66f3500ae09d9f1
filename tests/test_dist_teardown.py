"""Leaving the process group joins gloo's threads while the interpreter is alive.

A gloo worker that drops a finished collective's tensors after interpreter shutdown began aborts the process
("terminate called without an active exception"): seen under torchrun at exit on loaded CPUs. Once
``cleanup_dist`` returns, no gloo thread may be left, even after DDP (whose import would otherwise pin the
group for good) has run a backward pass.
"""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import os
import torch
from torch.nn.parallel import DistributedDataParallel

from fastdiff import dist_util

def threads():
    return len(os.listdir("/proc/self/task"))

torch.set_num_threads(1)
before = threads()
dist_util.setup_dist("cpu")
model = DistributedDataParallel(torch.nn.Linear(3, 3))
model(torch.randn(2, 3)).sum().backward()
dist_util.all_reduce_sum_(torch.ones(4))
dist_util.barrier()
during = threads()
del model
dist_util.cleanup_dist()
print(before, during, threads())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_cleanup_joins_the_gloo_threads_after_ddp():
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=environment, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before, during, after = map(int, result.stdout.split()[-3:])
    assert during > before, "the group started no threads: this test would prove nothing"
    assert after == before, f"{after - before} thread(s) of the process group outlived cleanup_dist"
