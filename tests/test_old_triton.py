"""A Triton older than the kernels take (``MIN_TRITON``, 3.4): one message everywhere, CPU ops unaffected.

A GPU machine cannot upgrade what it carries, so an old Triton must not stop the CPU backends under
``auto``, and every place that refuses Triton (a forced backend, the CLI check, autotuning) must say the
same thing: the version found and the version needed.
"""

import warnings

import pytest
import torch

from fastdiff import ops
from fastdiff.ops import backend as backends

MESSAGE = "triton 3.3 is too old: the kernels need triton >= 3.4"


@pytest.fixture
def triton_3_3(monkeypatch):
    """This process as if Triton 3.3 were installed (the version is read once, at import)."""
    monkeypatch.setattr(backends, "HAS_TRITON", True)
    monkeypatch.setattr(backends, "TRITON_VERSION", (3, 3))


def test_every_refusal_says_the_same_thing(triton_3_3):
    assert backends.MIN_TRITON == (3, 4)
    assert "triton" not in ops.available_backends()
    assert backends.backend_refusal("triton", torch.device("cpu")) == MESSAGE
    x, qkv, q = torch.randn(2, 4, 3), torch.randn(1, 6, 3), torch.randn(1, 1, 3, 2)
    calls = [
        lambda: ops.group_norm(x, 2, None, None),
        lambda: ops.group_norm_silu(x, 2, None, None),
        lambda: ops.qkv_attention(qkv, 1),
        lambda: ops.flash_attention(q, q, q),
    ]
    for call in calls:
        with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailableError) as caught:
            call()
        assert str(caught.value).endswith(f": {MESSAGE}")
    with pytest.raises(ValueError, match=f"autotuning needs the Triton kernels: {MESSAGE}"):
        backends.set_autotune(True)
    backends.set_autotune(False)  # turning it off needs no Triton


def test_cpu_ops_still_run_under_auto_without_a_warning(triton_3_3):
    x = torch.randn(2, 8, 5, requires_grad=True)
    qkv = torch.randn(2, 3 * 2 * 4, 6, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CPU never needed Triton: nothing to warn about
        assert ops.get_backend() == "auto"
        y = ops.group_norm_silu(x, 4, None, None)
        out = ops.qkv_attention(qkv, 2)
        (y.square().sum() + out.square().sum()).backward()
    with ops.use_backend("torch"):
        x_ref = x.detach().requires_grad_()
        qkv_ref = qkv.detach().requires_grad_()
        y_ref = ops.group_norm_silu(x_ref, 4, None, None)
        out_ref = ops.qkv_attention(qkv_ref, 2)
        (y_ref.square().sum() + out_ref.square().sum()).backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(qkv.grad, qkv_ref.grad)
