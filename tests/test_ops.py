"""The fastdiff.ops contract: every backend against float64 PyTorch, bad input, backend choice, compile."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import require_backend

from fastdiff import ops
from fastdiff.ops import backend as backends

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def reference_group_norm(x, groups, weight, bias, scale=None, shift=None, silu=False, dtype=torch.float64):
    """GroupNorm(+scale-shift)(+SiLU) from torch's own F.group_norm, computed in ``dtype`` (float64)."""
    y = F.group_norm(
        x.to(dtype),
        groups,
        None if weight is None else weight.to(dtype),
        None if bias is None else bias.to(dtype),
        eps=1e-5,
    )
    if scale is not None:
        expand = (*scale.shape[:2],) + (1,) * (x.dim() - 2)
        y = y * (1 + scale.to(dtype).reshape(expand)) + shift.to(dtype).reshape(expand)
    return F.silu(y) if silu else y


def reference_attention(q, k, v, scale):
    weights = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1)
    return weights @ v.double()


def assert_close(actual, expected, dtype, scale=1.0):
    tol = TOLERANCE[dtype] * scale
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol)


def dtypes_for(backend):
    return {
        "torch": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
        "cpp": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
        "triton": (torch.float32, torch.bfloat16, torch.float16),
    }[backend]


CASES = [  # (shape, groups, kind, channels_last)
    ((2, 6), 3, "norm", False),
    ((3, 32, 33), 8, "silu", False),
    ((2, 64, 7, 7), 32, "scale_shift", False),
    ((2, 64, 7, 7), 32, "silu", True),
    ((1, 12, 3, 4, 5), 4, "scale_shift", True),
    ((2, 32, 1, 1), 32, "norm", True),
]


@pytest.mark.parametrize(("shape", "groups", "kind", "channels_last"), CASES)
def test_group_norm_family_matches_float64(backend, shape, groups, kind, channels_last):
    check_group_norm_family(dtypes_for(backend), shape, groups, kind, channels_last)


@pytest.mark.parametrize(
    ("shape", "groups", "kind", "channels_last"),
    [case for case in CASES if math.prod(case[0][1:]) > case[1]],
)
def test_native_fallback_matches_float64(monkeypatch, shape, groups, kind, channels_last):
    """auto's CUDA fallback (F.group_norm, scale-shift, SiLU by plain autograd), run here on CPU tensors.

    Groups of one element are left out: PyTorch's CPU F.group_norm is off by ~1e-4 there in fp32 (its
    variance is not exactly 0), which says nothing about the fallback's composition."""
    monkeypatch.setattr(backends, "resolve_group_norm", lambda x, *params: backends.NATIVE)
    check_group_norm_family(
        (torch.float64, torch.float32, torch.bfloat16), shape, groups, kind, channels_last, native=True
    )


def check_group_norm_family(dtypes, shape, groups, kind, channels_last, native=False):
    """Outputs and every gradient of the op ``kind`` against float64, in each of ``dtypes``.

    ``native``: the op under test is composed of PyTorch's own ops in the input dtype, so it is also
    allowed their rounding (PyTorch's CPU bf16 GroupNorm backward is far off in a group of two nearly
    equal values, where fp32 code is not)."""
    for dtype in dtypes:
        c = shape[1]
        x = (torch.randn(shape) * 3 + 2).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        x.requires_grad_()
        # parameters stay fp32 under autocast
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        weight = torch.randn(c, dtype=param_dtype, requires_grad=True)
        bias = torch.randn(c, dtype=param_dtype, requires_grad=True)
        scale = shift = None
        if kind == "scale_shift":
            scale = (torch.randn(shape[0], c) * 0.5).to(dtype).requires_grad_()
            shift = torch.randn(shape[0], c).to(dtype).requires_grad_()
            y = ops.group_norm_scale_shift_silu(x, groups, weight, bias, scale, shift)
        elif kind == "silu":
            y = ops.group_norm_silu(x, groups, weight, bias)
        else:
            y = ops.group_norm(x, groups, weight, bias)
        assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
        inputs = [t for t in (x, weight, bias, scale, shift) if t is not None]
        dy = torch.randn(shape, dtype=dtype)
        grads = torch.autograd.grad(y, inputs, dy)

        leaves = [t.detach().double().requires_grad_() for t in inputs]
        expected = reference_group_norm(
            leaves[0], groups, leaves[1], leaves[2], *leaves[3:], silu=kind != "norm"
        )
        expected_grads = torch.autograd.grad(expected, leaves, dy.double())
        assert_close(y, expected, dtype)
        # PyTorch's own GroupNorm in the compute dtype, for the rounding error the inputs force: a group
        # whose values nearly coincide has a huge 1/std, and its dx is ill-conditioned in any fp32 code
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        eager_errors = [
            _eager_gradient_errors(inputs, dy, groups, kind, eager_dtype, expected_grads)
            for eager_dtype in ({compute, dtype} if native else {compute})
        ]
        for grad, want, leaf, *errors in zip(grads, expected_grads, inputs, *eager_errors, strict=True):
            assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
            # parameter gradients sum over N*spatial products of rounded values: looser in low precision
            scale = 1 if dtype == torch.float64 else 8
            conditioning = 4 * max(errors)
            assert_close(grad, want, dtype, scale=max(scale, conditioning / TOLERANCE[dtype]))


def _eager_gradient_errors(inputs, dy, groups, kind, dtype, expected_grads) -> list[float]:
    """Max error of each gradient of PyTorch's own GroupNorm family computed in ``dtype`` (activations
    cast to it, parameters as given and cast inside), against the float64 ``expected_grads``."""
    x_dtype = inputs[0].dtype
    leaves = [(t.to(dtype) if t.dtype == x_dtype else t).detach().requires_grad_() for t in inputs]
    eager = reference_group_norm(leaves[0], groups, *leaves[1:], silu=kind != "norm", dtype=dtype)
    grads = torch.autograd.grad(eager, leaves, dy.to(dtype))
    return [
        (grad.double() - want).abs().max().item() for grad, want in zip(grads, expected_grads, strict=True)
    ]


def test_group_norm_without_affine_and_with_4d_scale(backend):
    x = torch.randn(2, 8, 5, 3, requires_grad=True)
    scale, shift = torch.randn(2, 8, 1, 1), torch.randn(2, 8, 1, 1)
    y = ops.group_norm_scale_shift_silu(x, 2, None, None, scale, shift)
    assert_close(y, reference_group_norm(x, 2, None, None, scale, shift, silu=True), torch.float32)


def test_group_norm_large_mean_is_accurate(backend):
    x = torch.randn(2, 16, 9, 9, dtype=torch.float32) + 1e3
    y = ops.group_norm(x, 4, None, None)
    torch.testing.assert_close(y.double(), reference_group_norm(x, 4, None, None), atol=2e-3, rtol=0)


def test_group_norm_empty_batch(backend):
    x = torch.randn(0, 8, 4, 4, requires_grad=True)
    weight = torch.randn(8, requires_grad=True)
    y = ops.group_norm_silu(x, 4, weight, None)
    assert y.shape == x.shape
    dx, dw = torch.autograd.grad(y.sum(), (x, weight))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros(8))


@pytest.mark.parametrize("order", ["legacy", "split"])
@pytest.mark.parametrize(
    ("batch", "heads", "head_dim", "length"), [(2, 2, 16, 1), (1, 3, 40, 37), (2, 1, 64, 20)]
)
def test_qkv_attention_matches_float64(backend, order, batch, heads, head_dim, length):
    for dtype in (torch.float32, torch.bfloat16):
        if dtype not in dtypes_for(backend) and backend != "cpp":
            continue
        qkv = (torch.randn(batch, 3 * heads * head_dim, length) * 2).to(dtype).requires_grad_()
        out = ops.qkv_attention(qkv, heads, order)
        assert out.shape == (batch, heads * head_dim, length) and out.dtype == dtype
        dout = torch.randn_like(out)
        (grad,) = torch.autograd.grad(out, qkv, dout)

        leaf = qkv.detach().double().requires_grad_()
        if order == "legacy":
            q, k, v = leaf.reshape(batch * heads, 3 * head_dim, length).split(head_dim, dim=1)
        else:
            q, k, v = (p.reshape(batch * heads, head_dim, length) for p in leaf.chunk(3, dim=1))
        expected = reference_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), head_dim**-0.5
        )
        expected = expected.transpose(1, 2).reshape(batch, heads * head_dim, length)
        (expected_grad,) = torch.autograd.grad(expected, leaf, dout.double())
        assert_close(out, expected, dtype, scale=2)
        assert_close(grad, expected_grad, dtype, scale=8)


def test_flash_attention_matches_float64_on_strided_inputs(backend):
    base = torch.randn(2, 19, 3, 32) * 2  # [B, T, H, D]: q/k/v are strided views
    q, k, v = (base.transpose(1, 2) + i for i in range(3))
    q, k, v = (t.requires_grad_() for t in (q.detach(), k.detach(), v.detach()))
    q = q.transpose(-1, -2).contiguous().transpose(-1, -2).detach().requires_grad_()  # D not unit-stride
    out = ops.flash_attention(q, k, v, scale=0.2)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*leaves, 0.2)
    expected_grads = torch.autograd.grad(expected, leaves, dout.double())
    assert_close(out, expected, torch.float32)
    for g, e in zip(grads, expected_grads, strict=True):
        assert_close(g, e, torch.float32, scale=4)


def test_attention_empty_batch(backend):
    qkv = torch.randn(0, 24, 5, requires_grad=True)
    out = ops.qkv_attention(qkv, 2)
    assert out.shape == (0, 8, 5)
    (grad,) = torch.autograd.grad(out.sum(), qkv)
    assert grad.shape == qkv.shape


def test_reference_gradcheck_float64():
    with ops.use_backend("torch"):
        x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
        params = [torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        scale, shift = (torch.randn(2, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
        assert torch.autograd.gradcheck(
            lambda *a: ops.group_norm_scale_shift_silu(a[0], 3, *a[1:]), (x, *params, scale, shift)
        )
        qkv = torch.randn(2, 3 * 2 * 4, 7, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: ops.qkv_attention(t, 2, "split"), (qkv,))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ops.group_norm(torch.randn(2, 6, 4), 4, None, None), "num_groups=4 must divide"),
        (lambda: ops.group_norm(torch.randn(2, 6, 4), 0, None, None), "num_groups must be a positive int"),
        (lambda: ops.group_norm(torch.randn(6), 3, None, None), "x must be"),
        (lambda: ops.group_norm(torch.randn(2, 6, 1, 1, 1, 1), 3, None, None), "x must be"),
        (lambda: ops.group_norm(torch.ones(2, 6, 4, dtype=torch.int64), 3, None, None), "x must be float16"),
        (
            lambda: ops.group_norm(torch.randn(2, 6, 4, dtype=torch.complex64), 3, None, None),
            "x must be float16",
        ),
        (lambda: ops.group_norm([1.0], 3, None, None), "x must be a torch.Tensor"),
        (
            lambda: ops.group_norm(torch.randn(2, 6, 4), 3, torch.randn(5), None),
            r"weight must have shape \[C\]",
        ),
        (
            lambda: ops.group_norm(torch.randn(2, 6, 4), 3, None, torch.randn(6, 1)),
            r"bias must have shape \[C\]",
        ),
        (lambda: ops.group_norm(torch.randn(2, 6, 4), 3, None, None, eps=-1.0), "eps must be"),
        (
            lambda: ops.group_norm_scale_shift_silu(
                torch.randn(2, 6, 4), 3, None, None, torch.randn(6), torch.randn(2, 6)
            ),
            r"scale must have shape \[N, C\]",
        ),
        (
            lambda: ops.group_norm_scale_shift_silu(
                torch.randn(2, 6, 4), 3, None, None, torch.randn(2, 6), None
            ),
            "scale and shift",
        ),
        (
            lambda: ops.group_norm_scale_shift_silu(
                torch.randn(2, 6, 4), 3, None, None, torch.randn(2, 6), torch.randn(2, 6, 2)
            ),
            r"shift must have shape \[N, C\]",
        ),
        (lambda: ops.qkv_attention(torch.randn(2, 20, 5), 2), "multiple of 3 \\* num_heads"),
        (lambda: ops.qkv_attention(torch.randn(2, 24), 2), "qkv must be"),
        (lambda: ops.qkv_attention(torch.randn(2, 24, 5), 2, "other"), "order must be one of"),
        (lambda: ops.flash_attention(*[torch.randn(1, 2, 3, 4)] * 2, torch.randn(1, 2, 4, 4)), "same shape"),
        (
            lambda: ops.flash_attention(
                torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4).half()
            ),
            "same dtype",
        ),
        (lambda: ops.flash_attention(*[torch.randn(2, 3, 4)] * 3), r"q must be \[B, H, T, D\]"),
        (lambda: ops.set_backend("cuda"), "backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_forced_backend_that_cannot_serve_says_why(monkeypatch):
    monkeypatch.setattr(backends, "cpp_extension", None)
    monkeypatch.setattr(backends, "CPP_IMPORT_ERROR", "not built in this test")
    with ops.use_backend("cpp"), pytest.raises(ops.BackendUnavailableError, match="not built in this test"):
        ops.group_norm(torch.randn(2, 4, 3), 2, None, None)
    monkeypatch.setattr(backends, "TRITON_VERSION", (2, 1))
    with (
        ops.use_backend("triton"),
        pytest.raises(ops.BackendUnavailableError, match=r"triton 2\.1 is too old"),
    ):
        ops.qkv_attention(torch.randn(1, 6, 3), 1)
    with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailableError, match=r"triton >= 3\.4"):
        ops.group_norm(torch.randn(2, 4, 3), 2, None, None)
    monkeypatch.setattr(backends, "HAS_TRITON", False)
    with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailableError, match="not installed"):
        ops.group_norm_silu(torch.randn(2, 4, 3), 2, None, None)


def test_auto_backend_choice(monkeypatch):
    x = torch.randn(2, 4, 3)
    monkeypatch.setattr(backends, "cpp_extension", None)
    assert backends.resolve_group_norm(x) == "torch"
    monkeypatch.setattr(backends, "cpp_extension", object())
    assert backends.resolve_group_norm(x) == "cpp"
    assert backends.resolve_group_norm(x.to("meta")) == "torch"  # not a CPU tensor: the reference serves it
    assert backends.resolve_attention(x, 64) == backends.MATH  # the CPU policy: tests/test_cpu_policy.py


class FakeCudaTensor:
    """What the backend choice reads of a CUDA tensor (device, dtype, sizes), on a machine without CUDA."""

    def __init__(self, shape, dtype=torch.float32):
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device("cuda", 1)

    def dim(self):
        return len(self.shape)

    def numel(self):
        return math.prod(self.shape)

    def __getitem__(self, index):
        assert index == slice(None, 1)
        return FakeCudaTensor((min(1, self.shape[0]), *self.shape[1:]), self.dtype)


def test_group_norm_on_cuda_falls_back_to_native_once_with_a_warning(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    x = FakeCudaTensor((2, 64, 8, 8))
    assert backends.resolve_group_norm(x) == "triton"
    with pytest.warns(
        UserWarning, match=r"group_norm on CUDA falls back to PyTorch's F\.group_norm.*float64"
    ):
        assert backends.resolve_group_norm(FakeCudaTensor((2, 64, 8), torch.float64)) == backends.NATIVE
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert backends.resolve_group_norm(FakeCudaTensor((2, 64, 8), torch.float64)) == backends.NATIVE
    with pytest.warns(UserWarning, match="fewer than 2\\*\\*31"):
        assert backends.resolve_group_norm(FakeCudaTensor((2, 2**16, 2**15))) == backends.NATIVE
    monkeypatch.setattr(backends, "TRITON_VERSION", (3, 1))
    with pytest.warns(UserWarning, match=r"triton 3\.1 is too old"):
        assert backends.resolve_group_norm(x) == backends.NATIVE
    with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailableError, match="too old"):
        backends.resolve_group_norm(x)
    monkeypatch.setattr(backends, "HAS_TRITON", False)
    with pytest.warns(UserWarning, match="triton is not installed"):
        assert backends.resolve_group_norm(x) == backends.NATIVE
    with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailableError, match="not installed"):
        backends.resolve_group_norm(x)
    assert "triton" not in backends.available_backends()


def test_backend_refusal_answers_the_cli_check(monkeypatch):
    assert backends.backend_refusal("auto", torch.device("cpu")) == ""
    assert backends.backend_refusal("torch", torch.device("cuda", 0)) == ""
    monkeypatch.setattr(backends, "cpp_extension", object())  # built or not, the device is refused
    assert "CPU tensors only" in backends.backend_refusal("cpp", torch.device("cuda", 0))
    assert backends.backend_refusal("triton", torch.device("cpu")) == ""  # the interpreter
    if not torch.cuda.is_available():
        assert backends.backend_refusal("triton", torch.device("cuda")) == "no CUDA device is available"


def test_use_backend_restores_and_env_is_validated(monkeypatch):
    before = ops.get_backend()
    with ops.use_backend("torch"):
        assert ops.get_backend() == "torch"
        with pytest.raises(RuntimeError), ops.use_backend("cpp"):
            raise RuntimeError
        assert ops.get_backend() == "torch"
    assert ops.get_backend() == before
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND must be one of"):
        backends._check_name("gpu", "FASTDIFF_BACKEND")


def test_channels_last_is_read_in_place_by_fast_backends(monkeypatch):
    """The op hands a channels_last tensor to its backend's kernel without a copy (the C++ autograd
    path reads it in place too: test_cpp_group_norm)."""
    seen = {}
    reference = backends.implementation("torch")

    class Spy(backends.ModuleBackend):
        def group_norm_forward(self, x, *args):
            seen["x"] = x
            return reference.group_norm_forward(x, *args)

    spy: backends.Backend = Spy("torch", lambda: None, lambda: None)
    x = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
    monkeypatch.setitem(backends.IMPLEMENTATIONS, "torch", spy)
    with ops.use_backend("torch"):
        ops.group_norm(x, 4, None, None)
    assert seen["x"].data_ptr() == x.data_ptr()


def test_custom_ops_are_registered_with_fakes():
    for name in (
        "group_norm_fwd",
        "group_norm_bwd",
        "qkv_attention_fwd",
        "qkv_attention_bwd",
        "attention_fwd",
        "attention_bwd",
    ):
        op = getattr(torch.ops.fastdiff, name).default
        assert torch._library.utils.has_fake_kernel(op), name


def test_dispatch_modes_see_one_fastdiff_op_per_call(backend):
    """Plain eager calls skip the dispatcher; under a dispatch mode each call is one opaque op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    qkv = torch.randn(1, 12, 5, requires_grad=True)
    expected = ops.group_norm_silu(x, 4, None, None), ops.qkv_attention(qkv, 2)
    with Recorder():
        y, out = ops.group_norm_silu(x, 4, None, None), ops.qkv_attention(qkv, 2)
        (y.sum() + out.sum()).backward()
    for name in ("group_norm_fwd", "group_norm_bwd", "qkv_attention_fwd", "qkv_attention_bwd"):
        assert seen.count(f"fastdiff.{name}.default") == 1, (name, seen)
    torch.testing.assert_close((y, out), expected, rtol=0, atol=0)


def test_cpp_eager_calls_are_one_cpp_autograd_node():
    """Plain eager calls on the cpp backend skip Python autograd; other backends use the op's Function."""
    require_backend("cpp")
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    with ops.use_backend("cpp"):
        y = ops.group_norm_silu(x, 4, None, None)
    assert "fastdiff::gn" in y.grad_fn.name()
    with ops.use_backend("torch"):
        assert "_GroupNormFunction" in ops.group_norm_silu(x, 4, None, None).grad_fn.name()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_records_the_fastdiff_op(backend):
    """torch.jit.trace (deprecated, still used for exports) must see the op, not the kernel behind it."""
    traced = torch.jit.trace(lambda x: ops.group_norm_silu(x, 4, None, None), torch.randn(2, 8, 3, 3))
    assert "fastdiff::group_norm_fwd" in str(traced.graph)
    x = torch.randn(3, 8, 5, 2)
    torch.testing.assert_close(traced(x), ops.group_norm_silu(x, 4, None, None), rtol=0, atol=0)


def _opcheck_cases(backend):
    x = torch.randn(2, 8, 5, 3, requires_grad=True)
    weight, bias = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    scale, shift = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    qkv = torch.randn(2, 36, 7, requires_grad=True)
    q, k, v = (torch.randn(2, 3, 7, 16, requires_grad=True) for _ in range(3))
    return [
        (torch.ops.fastdiff.group_norm_fwd, (x, 4, weight, bias, scale, shift, 1e-5, True, backend)),
        (torch.ops.fastdiff.group_norm_fwd, (x, 4, None, None, None, None, 1e-5, False, backend)),
        (torch.ops.fastdiff.qkv_attention_fwd, (qkv, 2, "split", backend)),
        (torch.ops.fastdiff.attention_fwd, (q, k, v, 0.25, backend)),
    ]


def test_ops_pass_torch_library_opcheck(backend):
    """Schema, fake, autograd registration and AOT dispatch agree with the real kernels."""
    for op, args in _opcheck_cases(backend):
        torch.library.opcheck(op, args)


def test_autocast_keeps_input_dtype():
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    weight = torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.group_norm_silu(x, 4, weight, None)
        out = ops.qkv_attention(torch.randn(2, 24, 6, dtype=torch.bfloat16), 2)
    assert y.dtype == torch.bfloat16 and out.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_compile_fullgraph_traces_every_op(name):
    require_backend(name)

    def step(x, weight, scale, shift, qkv):
        h = ops.group_norm_scale_shift_silu(x, 4, weight, None, scale, shift)
        h = ops.group_norm_silu(h, 4, weight, weight) + ops.group_norm(h, 4, None, None)
        a = ops.qkv_attention(qkv, 2, "split")
        q, k, v = qkv.view(2, 3, 2, 8, 9).transpose(-1, -2).unbind(1)
        return h.square().sum() + a.square().sum() + ops.flash_attention(q, k, v).sum()

    inputs = [
        torch.randn(2, 16, 3, 3, requires_grad=True),
        torch.randn(16, requires_grad=True),
        torch.randn(2, 16),
        torch.randn(2, 16),
        torch.randn(2, 48, 9, requires_grad=True),
    ]
    with ops.use_backend(name):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        loss = compiled(*inputs)
        grads = torch.autograd.grad(loss, [inputs[0], inputs[1], inputs[4]])
        expected = step(*inputs)
        expected_grads = torch.autograd.grad(expected, [inputs[0], inputs[1], inputs[4]])
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)
