"""fastdiff's ops under ``torch.compile(fullgraph=True)`` with the default inductor backend.

``fastdiff.train --compile True`` compiles the training forward with inductor, which (unlike
``aot_eager``) generates and builds code around the ops: C++ on a CPU (a compiler is needed), Triton on
CUDA. Each op must stay one opaque ``fastdiff::`` call in that code, with the strides its fake
implementation promised, and forward and backward must agree with eager mode and with the float64
reference. CPU backends run here; the Triton kernels run interpreted on CPU tensors and compiled on a
GPU (skipped without one, as in ``conftest.kernel_device``).
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import NO_CUDA_REASON, require_backend
from error_bounds import max_error
from tiny_run import TINY_RUN_ARGV
from torch._inductor.utils import run_and_get_code

from fastdiff import ops

Tensor = torch.Tensor
FASTDIFF_OPS = ("group_norm_fwd", "qkv_attention_fwd", "attention_fwd")
"""The forward ops the compiled step calls (the backward ones appear in the backward graph)."""


def step(x, weight, bias, scale, shift, qkv, q, k, v) -> tuple[Tensor, Tensor, Tensor]:
    """Every public op once, with plain torch ops between them for inductor to fuse around the calls."""
    h = ops.group_norm_scale_shift_silu(x, 4, weight, bias, scale, shift)
    h = ops.group_norm_silu(h * 0.5, 4, weight, None) + ops.group_norm(h, 4, None, bias)
    a = ops.qkv_attention(qkv, 2, "legacy")
    f = ops.flash_attention(q, k, v)
    return h, a.tanh(), f


def make_inputs(device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """x [2, 16, 3, 5] channels_last, weight/bias [16], scale/shift [2, 16], qkv [2, 48, 7] (2 heads of
    8), q/k/v [2, 2, 7, 8] / [2, 2, 5, 8]; every input requires grad."""
    shapes = [(16,), (16,), (2, 16), (2, 16), (2, 48, 7), (2, 2, 7, 8), (2, 2, 5, 8), (2, 2, 5, 8)]
    x = torch.randn(2, 16, 3, 5).to(memory_format=torch.channels_last)
    tensors = [x, *(torch.randn(s) for s in shapes)]
    return [t.to(device, dtype).requires_grad_() for t in tensors]


def forward_backward(fn, inputs: list[Tensor], cotangents: list[Tensor]) -> list[Tensor]:
    """The outputs of ``fn(*inputs)`` and the gradients of every input for the given output cotangents."""
    outputs = fn(*inputs)
    grads = torch.autograd.grad(outputs, inputs, cotangents)
    return [o.detach() for o in outputs] + list(grads)


def float64_reference(inputs: list[Tensor], cotangents: list[Tensor]) -> list[Tensor]:
    """``forward_backward`` of the eager step on float64 CPU copies through the reference backend."""
    with ops.use_backend("torch"):
        wide = [t.detach().cpu().double().requires_grad_() for t in inputs]
        return forward_backward(step, wide, [c.cpu().double() for c in cotangents])


CASES = [
    pytest.param("cpu", "cpp", torch.float32, id="cpu-cpp-fp32"),
    pytest.param("cpu", "cpp", torch.bfloat16, id="cpu-cpp-bf16"),
    pytest.param("cpu", "torch", torch.float32, id="cpu-torch-fp32"),
    pytest.param("cpu", "triton", torch.float32, id="cpu-interpreter-triton-fp32"),
    pytest.param("cuda", "triton", torch.float32, id="cuda-triton-fp32"),
    pytest.param("cuda", "triton", torch.bfloat16, id="cuda-triton-bf16"),
]
TOLERANCE = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=6e-2, rtol=4e-2)}
ROUNDOFF = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8}
"""Against float64; bf16 is checked in bf16 resolution (inputs are rounded to bf16 first)."""


@pytest.mark.parametrize(("device", "backend", "dtype"), CASES)
def test_ops_under_inductor_match_eager_and_float64(device, backend, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(NO_CUDA_REASON)
    require_backend(backend)
    torch._dynamo.reset()
    inputs = make_inputs(torch.device(device), dtype)
    with torch.no_grad():
        shapes = [o.shape for o in step(*inputs)]
    cotangents = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
    with ops.use_backend(backend):
        compiled = torch.compile(step, fullgraph=True)  # the default backend: inductor
        got, (code, *_) = run_and_get_code(forward_backward, compiled, inputs, cotangents)
        eager = forward_backward(step, inputs, cotangents)
    for name in FASTDIFF_OPS:
        assert f"torch.ops.fastdiff.{name}.default" in code, f"inductor did not call fastdiff::{name}"
    expected = float64_reference(inputs, cotangents)
    names = ["h", "a", "f", *(f"grad {i}" for i in range(len(inputs)))]
    for name, g, e, x in zip(names, got, eager, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        # inductor fuses the torch ops around the calls and may round them differently from eager
        torch.testing.assert_close(g, e, **TOLERANCE[dtype], msg=lambda m, n=name: f"{n} vs eager: {m}")
        # against float64: no further from it than twice the eager ops in the same dtype, plus one unit of
        # the dtype's roundoff of the largest value (a fixed bound fails on cancellations: in one full run a
        # bf16 gradient element was 0.068 off, 41% of its value)
        limit = 2 * max_error(e, x) + ROUNDOFF[dtype] * x.abs().max().item()
        assert max_error(g, x) <= limit, (
            f"{name}: {max_error(g, x):.3g} from float64 (eager: {max_error(e, x):.3g})"
        )
    assert got[0].is_contiguous(memory_format=torch.channels_last), "x's layout is kept through the graph"


@pytest.mark.slow
def test_train_cli_compile_step_on_cpu(tmp_path):
    """Two training steps of the tiny UNet through ``python -m fastdiff.train --compile True``."""
    command = [
        sys.executable, "-m", "fastdiff.train", *TINY_RUN_ARGV,
        "--batch_size", "2", "--num_workers", "0", "--max_steps", "2", "--log_interval", "1",
        "--save_interval", "2", "--sample_interval", "0", "--compile", "True", "--log_dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "model000002.pt").exists()
    state = torch.load(tmp_path / "model000002.pt", weights_only=True)
    assert all(torch.isfinite(value).all() for value in state.values())
