"""auto's CPU policy (fastdiff.ops.cpu_policy): its picks per instruction set, dtype, size and grad (a
mocked CPU), what the ops run for them, and the correctness of the ``math`` attention it can pick."""

import pytest
import torch

from fastdiff import ops
from fastdiff.ops import backend as backends
from fastdiff.ops import cpu_policy

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}
"""Max error relative to the reference's largest magnitude (at least 1), as the attention kernel tests."""


def test_isa_levels_from_cpu_flags():
    avx512 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}
    assert cpu_policy.isa_from_flags(avx512 | {"avx512_bf16", "amx_tile", "amx_bf16"}) == "amx"
    assert cpu_policy.isa_from_flags(avx512 | {"avx512_bf16"}) == "avx512_bf16"  # AMD EPYC (Zen 4)
    assert cpu_policy.isa_from_flags(avx512 | {"amx_tile"}) == "avx512"  # AMX tiles without bf16
    assert cpu_policy.isa_from_flags({"avx2", "fma"}) == "avx2"
    assert cpu_policy.isa_from_flags({"sse4_2"}) == "default"
    assert cpu_policy.cpu_isa() in cpu_policy.ISAS


@pytest.mark.parametrize("isa", cpu_policy.ISAS)
def test_attention_picks_on_every_level(isa):
    choose = cpu_policy.attention_choice
    t256, t64 = 256 * 256, 64 * 64
    # bf16 with gradients: the flash kernel's bf16 backward is the slow one here: math below 512 x 512
    assert choose(torch.bfloat16, t256, 64 * t256, True, isa) == "math"
    assert choose(torch.bfloat16, t64, 64 * t64, True, isa) == "math"
    assert choose(torch.bfloat16, 512 * 512 - 1, 1, True, isa) == "math"
    assert choose(torch.bfloat16, 512 * 512, 1, True, isa) == "cpp"
    # forward only, and fp32: flash from 256 x 256 scores per head, math below
    for dtype, grad in ((torch.bfloat16, False), (torch.float32, False), (torch.float32, True)):
        assert choose(dtype, t256, 64 * t256, grad, isa) == "cpp"
        assert choose(dtype, t64, 64 * t64, grad, isa) == "math"
        assert choose(dtype, 256 * 256 - 1, 1, grad, isa) == "math"
    # math would store too many weights: flash
    assert choose(torch.bfloat16, t64, cpu_policy.MATH_MAX_SCORES + 1, True, isa) == "cpp"
    assert choose(torch.bfloat16, t64, cpu_policy.MATH_MAX_SCORES, True, isa) == "math"
    # not measured: the flash kernel, as before
    assert choose(torch.float64, t64, 1, True, isa) == "cpp"
    assert choose(torch.float16, t64, 1, True, isa) == "cpp"


def test_group_norm_keeps_cpp_on_every_level():
    for isa in cpu_policy.ISAS:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            assert cpu_policy.group_norm_choice(dtype, isa) == "cpp"


def test_unknown_isa_is_refused():
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu_policy.attention_choice(torch.float32, 1, 1, False, "sse9")
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu_policy.group_norm_choice(torch.float32, "avx1024")


def test_describe_names_every_pick():
    picks = cpu_policy.describe("avx512_bf16")
    assert picks["isa"] == "avx512_bf16"
    assert picks["group_norm/bfloat16"] == "cpp"
    assert picks["attention/bfloat16/forward+backward"] == "math below Tq*Tk = 512x512, cpp from it"
    assert picks["attention/float32/forward"] == "math below Tq*Tk = 256x256, cpp from it"
    assert {**cpu_policy.describe("amx"), "isa": "avx512_bf16"} == picks  # AMX: the same table
    assert cpu_policy.describe()["isa"] == cpu_policy.cpu_isa()


def test_resolve_follows_the_policy_on_cpu_tensors():
    qkv = torch.randn(2, 3 * 4 * 8, 64, dtype=torch.bfloat16)
    assert backends.resolve_attention(qkv, 8) == backends.MATH  # T = 64
    assert backends.resolve_attention(torch.randn(2, 96, 256), 8) == "cpp"  # fp32, T = 256
    long = torch.randn(2, 96, 256, dtype=torch.bfloat16)
    assert backends.resolve_attention(long, 8) == "cpp"  # bf16 T = 256, no grad
    assert backends.resolve_attention(long.requires_grad_(), 8) == backends.MATH  # the same with grad
    with torch.no_grad():  # grad=None: read from grad mode and requires_grad
        assert backends.resolve_attention(long, 8) == "cpp"
    assert backends.resolve_attention(long, 8, grad=False) == "cpp"
    q = torch.randn(1, 2, 200, 8, dtype=torch.bfloat16)
    assert backends.resolve_attention(q, 8, keys=10, grad=False) == backends.MATH  # 200 x 10 scores
    assert backends.resolve_attention(q, 8, keys=400, grad=False) == "cpp"  # 200 x 400
    assert backends.resolve_attention(q, 8, keys=400, grad=True) == backends.MATH
    assert backends.resolve_attention(q.to("meta"), 8) == "torch"
    with ops.use_backend("cpp"):  # forced: what was asked
        assert backends.resolve_attention(qkv, 8) == "cpp"
    with ops.use_backend("torch"):
        assert backends.resolve_attention(qkv, 8) == "torch"
    assert backends.resolve_group_norm(torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)) == "cpp"


def _reference(q, k, v, scale, dout):
    """float64 attention: out and the gradients of sum(out * dout) w.r.t. q, k, v."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = torch.softmax(scale * leaves[0] @ leaves[1].transpose(-1, -2), dim=-1) @ leaves[2]
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.double()))


def _assert_close(actual, expected, dtype, what, factor=1.0):
    error = (actual.double() - expected).abs().max().item()
    bound = factor * TOLERANCE[dtype] * max(1.0, expected.abs().max().item())
    assert error <= bound, f"{what} {dtype}: max error {error:.3e} > {bound:.3e}"


def _math_accuracy_factor(dtype):
    """math rounds the scores and weights to the input dtype between its matmuls (as improved-diffusion's
    attention does): 2x the kernels' bf16 bound for that (measured worst over 40 seeds: 0.25 of it); fp32
    and float64 keep the kernels' bounds."""
    return 2.0 if dtype == torch.bfloat16 else 1.0


@pytest.mark.parametrize("order", ["legacy", "split"])
@pytest.mark.parametrize(
    ("batch", "heads", "head_dim", "length"), [(2, 2, 16, 1), (1, 3, 40, 37), (2, 4, 32, 64)]
)
def test_math_qkv_attention_matches_float64(order, batch, heads, head_dim, length):
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        qkv = torch.randn(batch, 3 * heads * head_dim, length).to(dtype).requires_grad_()
        policy = backends.MATH if dtype != torch.float64 else "cpp"
        assert backends.resolve_attention(qkv, head_dim) == policy
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(backends, "resolve_attention", lambda *args, **kwargs: backends.MATH)
            out = ops.qkv_attention(qkv, heads, order)
        assert out.shape == (batch, heads * head_dim, length) and out.dtype == dtype
        dout = torch.randn_like(out)
        (grad,) = torch.autograd.grad(out, qkv, dout)
        assert grad.dtype == dtype

        leaf = qkv.detach().double().requires_grad_()
        with ops.use_backend("torch"):
            expected = ops.qkv_attention(leaf, heads, order)
        (expected_grad,) = torch.autograd.grad(expected, leaf, dout.double())
        factor = _math_accuracy_factor(dtype)
        _assert_close(out.detach(), expected.detach(), dtype, "out", factor)
        _assert_close(grad, expected_grad, dtype, "dqkv", 4 * factor)


def test_math_flash_attention_matches_float64_with_cross_attention():
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        q = torch.randn(2, 3, 19, 24).to(dtype).requires_grad_()
        k, v = (torch.randn(2, 3, 7, 24).to(dtype).requires_grad_() for _ in range(2))
        if dtype != torch.float64:
            assert backends.resolve_attention(q, 24, keys=7) == backends.MATH
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(backends, "resolve_attention", lambda *args, **kwargs: backends.MATH)
            out = ops.flash_attention(q, k, v, scale=0.3)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        expected = _reference(q, k, v, 0.3, dout)
        factor = _math_accuracy_factor(dtype)
        actuals = (out.detach(), *grads)
        for what, actual, want in zip(("out", "dq", "dk", "dv"), actuals, expected, strict=True):
            assert actual.dtype == dtype
            _assert_close(actual, want, dtype, what, factor if what == "out" else 4 * factor)


def test_math_attention_keeps_the_input_dtype_under_autocast():
    qkv = torch.randn(2, 24, 6, dtype=torch.bfloat16, requires_grad=True)
    assert backends.resolve_attention(qkv, 4) == backends.MATH
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.qkv_attention(qkv, 2)
        fp32 = ops.qkv_attention(qkv.detach().float().requires_grad_(), 2)
    assert out.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    out.sum().backward()
    assert qkv.grad.dtype == torch.bfloat16 and torch.isfinite(qkv.grad).all()


def test_math_attention_on_empty_inputs():
    qkv = torch.randn(0, 24, 5, requires_grad=True)
    out = ops.qkv_attention(qkv, 2)
    assert out.shape == (0, 8, 5)
    (grad,) = torch.autograd.grad(out.sum(), qkv)
    assert grad.shape == qkv.shape


def test_selftest_versions_name_the_cpu_and_autos_picks():
    from fastdiff.selftest.records import Options
    from fastdiff.selftest.versions import _check_versions

    result = _check_versions(Options(torch.device("cpu"), quick=True))
    assert result.data["cpu_model"] == cpu_policy.cpu_model() and result.data["cpu_model"]
    assert result.data["cpu_auto"] == cpu_policy.describe()
    assert cpu_policy.cpu_model() in result.detail and cpu_policy.cpu_isa() in result.detail


def test_auto_traces_in_one_graph():
    """auto's choice is made while torch.compile traces the op: it must not break the graph."""
    qkv = torch.randn(2, 3 * 2 * 8, 16, requires_grad=True)

    def attention(x):
        return ops.qkv_attention(x, 2)

    torch._dynamo.reset()
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    with ops.use_backend("auto"):
        torch.testing.assert_close(compiled(qkv), attention(qkv))
    torch._dynamo.reset()
