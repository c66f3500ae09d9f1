"""Cold compiles of a training step: distinct Triton kernel compilations of one bf16 train step (forward and
backward) of improved-diffusion's UNets, counted through the launch layer without a GPU.

The model runs on the ``meta`` device with the ``triton`` backend forced: every kernel launch is recorded
(``launch.compile_keys``) with the choices a CUDA launch makes, and nothing runs. bf16 autocast is
emulated the way CUDA autocast lowers a step: convolutions and matmuls take bf16 operands, parameters stay
fp32 (autocast does not run on the meta device).
"""

import os

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    if os.environ.get("FASTDIFF_REQUIRE_BACKENDS") == "1":
        raise
    pytest.skip("triton is not installed", allow_module_level=True)

from fastdiff.kernels import launch

from benchmarks.configs import IMAGENET_64, UPSAMPLER_256, UNetConfig
from fastdiff import ops
from fastdiff.selftest.cold import MetaBf16Autocast

# At most this many distinct compilations per train step (issue 19: fewer cold compiles on a GPU).
BUDGETS = {IMAGENET_64.name: 40, UPSAMPLER_256.name: 60}


def train_step_compiles(config: UNetConfig, batch: int | None = None) -> list[str]:
    """The compile keys of one bf16 forward + backward of ``config``'s UNet at its GPU batch."""
    with torch.device("meta"):
        model, _ = config.create()
    batch = batch or config.cuda_batch
    x, kwargs = config.model_inputs(batch, "meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    launch.reset_compile_count()
    with ops.use_backend("triton"), MetaBf16Autocast():
        out = model(x, t, **kwargs)
        out.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad), "the backward ran"
    return launch.compile_keys()


def _pass(key: str) -> str | None:
    """The ``PASS`` constexpr of a compile key (GroupNorm kernels), else None."""
    constexprs = dict(item.split("=", 1) for item in key.split("|")[2].split(","))
    return constexprs.get("PASS")


@pytest.mark.parametrize("config", [IMAGENET_64, UPSAMPLER_256], ids=lambda c: c.name)
def test_train_step_compiles_few_kernels(config):
    keys = train_step_compiles(config)
    assert launch.compile_count() == len(keys) == len(set(keys))
    families = {(key.split("|")[1].rsplit(".", 1)[1], _pass(key)) for key in keys}
    # the step runs every GroupNorm path of a UNet this size and the attention forward and backward
    assert {
        ("_gn_fwd_kernel", "fused"),
        ("_gn_bwd_kernel", "fused"),
        ("_attn_fwd_kernel", None),
        ("_attn_bwd_dq_kernel", None),
    } <= families
    assert all("bfloat16" in key for key in keys), "a bf16 step launches bf16 kernels only"
    budget = BUDGETS[config.name]
    assert len(keys) <= budget, f"{config.name}: {len(keys)} compiles > {budget}:\n" + "\n".join(keys)


def test_counting_does_not_depend_on_what_ran_before():
    first = train_step_compiles(IMAGENET_64, batch=8)
    assert train_step_compiles(IMAGENET_64, batch=8) == first
    assert len(first) > 0
