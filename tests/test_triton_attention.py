"""Triton flash attention (fastdiff.kernels.attention) against a float64 reference.

Kernel tests take the ``kernel_device`` fixture (tests/conftest.py): CPU tensors under Triton's
interpreter, and CUDA tensors compiled (skipped without a GPU). Inputs are views of one qkv activation
[B, 3*H*D, T] in both channel orders (q views of [B, H*D, Tq] and k, v views of one [B, 2*H*D, Tk] when
the lengths differ) and plain [B, H, T, D] tensors; outputs and gradients land in views of NaN-filled
buffers, so an element left unwritten fails. Inputs come from torch's global generator, which
tests/conftest.py seeds afresh each session.
"""

import types

import pytest
import torch
from fastdiff.kernels import attention as attn
from fastdiff.kernels import launch
from fastdiff.kernels.attention import MAX_HEAD_DIM, attention_backward, attention_forward
from fastdiff.kernels.attention import configs as attn_configs

from fastdiff import ops
from fastdiff.ops import backend as backends

# Max error allowed, relative to the largest magnitude of the reference (at least 1).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _heads_of(channels: torch.Tensor, num_heads: int, order: str, parts: int = 3) -> tuple[torch.Tensor, ...]:
    """``parts`` [B, H, T, D] views (T the unit stride) of ``channels`` [B, parts*H*D, T]: q, k, v (3) or
    k, v (2) of one activation."""
    B, width, T = channels.shape
    D = width // (parts * num_heads)
    if order == "legacy":  # per head: its q, k, v channels side by side
        views = channels.reshape(B * num_heads, parts * D, T).split(D, dim=1)
    else:  # "split": all q channels, then all k, then all v
        views = [view.reshape(B * num_heads, D, T) for view in channels.chunk(parts, dim=1)]
    return tuple(view.view(B, num_heads, D, T).transpose(2, 3) for view in views)


def _make_case(
    B: int,
    H: int,
    T: int,
    D: int,
    dtype: torch.dtype,
    layout: str,
    T_k: int | None = None,
    device: torch.device | str = "cpu",
):
    """Inputs, dout and NaN-poisoned destinations for one layout ("legacy" | "split" | "bthd").

    q has T queries, k and v ``T_k`` keys (T when None). In the UNet layouts q, k, v are views of one
    [B, 3*H*D, T] activation when T_k == T, else q views [B, H*D, T] and k, v view one [B, 2*H*D, T_k].
    """
    T_k = T if T_k is None else T_k

    def randn(*shape: int, spread: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape) * spread).to(dtype).to(device)

    def nans(*shape: int) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    if layout == "bthd":
        q = randn(B, H, T, D, spread=1.5)
        k, v = (randn(B, H, T_k, D, spread=1.5) for _ in range(2))
        dout = randn(B, H, T, D)
        return (q, k, v), dout, nans(B, H, T, D), (nans(B, H, T, D), *(nans(B, H, T_k, D) for _ in range(2)))
    dout = randn(B, H * D, T).view(B, H, D, T).transpose(2, 3)
    out = nans(B, H * D, T).view(B, H, D, T).transpose(2, 3)
    # spread 1.5: scale * q.k has a standard deviation of about 2, so each softmax row is peaked
    if T_k == T:
        q, k, v = _heads_of(randn(B, 3 * H * D, T, spread=1.5), H, layout)
        grads = _heads_of(nans(B, 3 * H * D, T), H, layout)
    else:
        (q,) = _heads_of(randn(B, H * D, T, spread=1.5), H, layout, parts=1)
        k, v = _heads_of(randn(B, 2 * H * D, T_k, spread=1.5), H, layout, parts=2)
        grads = (
            *_heads_of(nans(B, H * D, T), H, layout, 1),
            *_heads_of(nans(B, 2 * H * D, T_k), H, layout, 2),
        )
    return (q, k, v), dout, out, grads


def _reference(q, k, v, scale: float, dout, dtype: torch.dtype = torch.float64):
    """Attention in ``dtype`` (float64): out, lse and the gradients of sum(out * dout) w.r.t. q, k, v."""
    qr, kr, vr = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    scores = scale * qr @ kr.transpose(-1, -2)
    out = torch.softmax(scores, dim=-1) @ vr
    out.backward(dout.to(dtype))
    return out.detach(), torch.logsumexp(scores, dim=-1).detach(), qr.grad, kr.grad, vr.grad


def _flash_formula_conditioning(
    q, k, v, scale: float, dout, out, lse, reference
) -> tuple[float, float, float]:
    """Twice the max errors of dq, dk, dv computed in fp32 PyTorch by the flash backward formula from the
    backward's own inputs (``out`` and ``lse`` included), against the float64 ``reference`` gradients.

    dS = P * (dO V^T - rowsum(dO * O)) subtracts two nearly equal fp32 sums when a row's softmax is
    peaked (exactly so with one key), so its rounding is the error any fp32 backward must be allowed.
    Twice, because another summation order of the same cancellation lands up to 3.6x from this
    one (max of 700 draws with one key, head dim 40), and ``_assert_close`` allows 4x its conditioning.
    """
    qf, kf, vf, dof, of = (t.detach().float() for t in (q, k, v, dout, out))
    p = torch.exp(scale * qf @ kf.transpose(-1, -2) - lse.unsqueeze(-1))
    ds = p * (dof @ vf.transpose(-1, -2) - (dof * of).sum(-1, keepdim=True))
    grads = (scale * ds @ kf, scale * ds.transpose(-1, -2) @ qf, p.transpose(-1, -2) @ dof)
    return tuple(2 * (g.double() - r).abs().max().item() for g, r in zip(grads, reference, strict=True))


def _assert_close(
    actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str, conditioning: float = 0.0
) -> None:
    """Max error within ``tolerance`` x the reference's largest magnitude (at least 1), or within
    ``conditioning``: the error the inputs force on plain fp32 PyTorch, times 4."""
    assert not actual.isnan().any(), f"{what}: NaN (an element was not written)"
    error = (actual.to(torch.float64) - expected).abs().max().item()
    bound = max(tolerance * max(1.0, expected.abs().max().item()), 4 * conditioning)
    assert error <= bound, f"{what}: max error {error:.3e} > {bound:.3e}"


# (dtype, head dim, Tq, Tk, layout): every head dim bucket and dtype, each dtype in every layout and with
# Tq = 1 and Tk = 1; T odd / not a multiple of any block, and above 64 so that several query and key
# blocks are visited; Tk below and above Tq. Head dims above 128 (bucket 256) in every dtype.
CASES = [
    (torch.float32, 16, 1, 1, "legacy"),
    (torch.float32, 40, 37, 37, "split"),
    (torch.float32, 96, 70, 70, "bthd"),
    (torch.float32, 128, 45, 45, "legacy"),
    (torch.float16, 32, 70, 70, "legacy"),
    (torch.float16, 48, 17, 17, "bthd"),
    (torch.float16, 64, 67, 67, "split"),
    (torch.float16, 128, 1, 1, "split"),
    (torch.bfloat16, 64, 70, 70, "legacy"),
    (torch.bfloat16, 80, 29, 29, "split"),
    (torch.bfloat16, 16, 1, 1, "bthd"),
    (torch.bfloat16, 128, 33, 33, "legacy"),
    # Tq != Tk (cross-attention)
    (torch.float32, 64, 1, 70, "legacy"),
    (torch.float32, 40, 70, 1, "bthd"),
    (torch.float32, 24, 19, 83, "split"),
    (torch.float16, 64, 19, 83, "split"),
    (torch.float16, 32, 83, 19, "bthd"),
    (torch.float16, 128, 35, 67, "legacy"),
    (torch.bfloat16, 16, 70, 1, "split"),
    (torch.bfloat16, 96, 21, 50, "bthd"),
    # head dims 160, 192, 256
    (torch.float32, 160, 37, 37, "legacy"),
    (torch.float32, 192, 20, 45, "bthd"),
    (torch.float32, 256, 33, 1, "split"),
    (torch.float16, 160, 29, 70, "bthd"),
    (torch.float16, 192, 33, 33, "split"),
    (torch.float16, 256, 40, 1, "legacy"),
    (torch.bfloat16, 160, 45, 19, "split"),
    (torch.bfloat16, 192, 1, 37, "legacy"),
    (torch.bfloat16, 256, 17, 17, "bthd"),
]


@pytest.mark.parametrize(
    ("dtype", "head_dim", "T", "T_k", "layout"),
    [
        pytest.param(*case, id=f"{str(case[0])[6:]}-d{case[1]}-Tq{case[2]}-Tk{case[3]}-{case[4]}")
        for case in CASES
    ],
)
def test_forward_and_backward_match_float64(kernel_device, dtype, head_dim, T, T_k, layout):
    B, H = (2, 2) if head_dim <= 128 else (1, 2)
    case = _make_case(B, H, T, head_dim, dtype, layout, T_k, kernel_device)
    (q, k, v), dout, out_buf, (dq_buf, dk_buf, dv_buf) = case
    scale = head_dim**-0.5

    out, lse = attention_forward(q, k, v, scale, out=out_buf)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, scale, dq=dq_buf, dk=dk_buf, dv=dv_buf)

    assert out is out_buf and dq is dq_buf and dk is dk_buf and dv is dv_buf
    assert lse.shape == (B, H, T) and lse.dtype == torch.float32
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = _reference(q, k, v, scale, dout)
    tolerance = TOLERANCE[dtype]
    _assert_close(out, ref_out, tolerance, "out")
    _assert_close(lse, ref_lse, 1e-5, "lse")  # fp32 whatever the input dtype
    conditionings = _flash_formula_conditioning(q, k, v, scale, dout, out, lse, (ref_dq, ref_dk, ref_dv))
    for name, actual, expected, conditioning in zip(
        ("dq", "dk", "dv"), (dq, dk, dv), (ref_dq, ref_dk, ref_dv), conditionings, strict=True
    ):
        _assert_close(actual, expected, tolerance, name, conditioning)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_allocates_outputs_in_the_inputs_layout(kernel_device, dtype):
    (q, k, v), dout, _, _ = _make_case(1, 3, 21, 24, dtype, "legacy", 30, kernel_device)
    out, lse = attention_forward(q, k, v, 0.3)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, 0.3)
    for tensor, like in ((out, q), (dq, q), (dk, k), (dv, v)):
        assert tensor.shape == like.shape and tensor.dtype == dtype and tensor.stride(2) == 1
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = _reference(q, k, v, 0.3, dout)
    for name, actual, expected in zip(
        ("out", "lse", "dq", "dk", "dv"),
        (out, lse, dq, dk, dv),
        (ref_out, ref_lse, ref_dq, ref_dk, ref_dv),
        strict=True,
    ):
        _assert_close(actual, expected, TOLERANCE[dtype], name)


def _config_cases():
    """(kernel_device, kernel, config) for every entry of every attention config list on CUDA; under the
    interpreter, which ignores warps and stages, every entry with tiles not seen before in its list."""
    cases = []
    for kernel in attn.KERNELS.values():
        seen = set()
        for index, config in enumerate(kernel.configs):
            tag = f"{kernel.name}-{index}-{attn_configs._tag(config)}"
            cases.append(pytest.param("cuda", kernel, config, id=f"cuda-{tag}"))
            if config.tiles not in seen:
                seen.add(config.tiles)
                cases.append(pytest.param("cpu-interpreter", kernel, config, id=f"cpu-{tag}"))
    return cases


@pytest.mark.parametrize(("kernel_device", "kernel", "config"), _config_cases(), indirect=["kernel_device"])
def test_every_config_of_every_list_is_correct(kernel_device, kernel, config):
    """Whatever the fixed rule or the autotuner picks on a GPU must give right answers: each config,
    forced, over several blocks along both axes (the last one partial), with Tq != Tk."""
    (_, precision, bucket), *_ = (key for key, k in attn.KERNELS.items() if k is kernel)
    dtype = torch.float32 if precision == "fp32" else torch.float16
    head_dim = bucket - bucket // 4  # below the bucket: the padded D lanes are masked
    T, T_k = 2 * config.meta["BLOCK_M"] + 3, 2 * config.meta.get("BLOCK_N", 16) + 5
    (q, k, v), dout, _, grads = _make_case(1, 1, T, head_dim, dtype, "legacy", T_k, kernel_device)
    scale = head_dim**-0.5
    with launch.force_config(kernel.name, config):
        out, lse = attention_forward(q, k, v, scale)
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, scale, *grads)
    assert launch.last_config(kernel.name) == config
    tolerance = TOLERANCE[dtype]
    expected = _reference(q, k, v, scale, dout)
    for what, actual, reference in zip(
        ("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), expected, strict=True
    ):
        _assert_close(actual, reference, 1e-5 if what == "lse" else tolerance, what)


# The dK/dV kernel lets padded key rows overflow (they are never stored); NumPy warns about them.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_rows_whose_scores_are_all_very_negative():
    """exp(-lse) overflows fp32 here: padded key lanes must still weigh exactly zero in dQ."""
    T, D = 37, 32
    noise = torch.randn(3, 1, 1, T, D)
    q = 4.5 + 0.1 * noise[0]
    k = -4.5 + 0.1 * noise[1]  # scale * q.k is about -115 for every pair, so exp(-lse) > 1e49
    v, dout = noise[2], torch.randn(1, 1, T, D)
    scale = D**-0.5
    out, lse = attention_forward(q, k, v, scale)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, scale)
    assert lse.max() < -100
    # scores near -115 from q and k near +-4.5: fp32 rounding of the scores is amplified in dk
    for name, actual, expected, fp32 in zip(
        ("out", "lse", "dq", "dk", "dv"),
        (out, lse, dq, dk, dv),
        _reference(q, k, v, scale, dout),
        _reference(q, k, v, scale, dout, torch.float32),
        strict=True,
    ):
        conditioning = (fp32.double() - expected).abs().max().item()
        _assert_close(actual, expected, TOLERANCE[torch.float32], name, conditioning)


def test_gradients_are_bitwise_reproducible(kernel_device):
    (q, k, v), dout, out_buf, _ = _make_case(2, 2, 70, 64, torch.bfloat16, "split", device=kernel_device)
    out, lse = attention_forward(q, k, v, 0.125, out=out_buf)
    first = attention_backward(dout, q, k, v, out, lse, 0.125)
    nans = torch.full((2, 3 * 2 * 64, 70), float("nan"), dtype=torch.bfloat16, device=kernel_device)
    second = attention_backward(dout, q, k, v, out, lse, 0.125, *_heads_of(nans, 2, "split"))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_head_dim_above_the_maximum_is_refused_at_the_op():
    assert MAX_HEAD_DIM == backends.MAX_TRITON_HEAD_DIM == 256
    q = torch.zeros(1, 1, 4, MAX_HEAD_DIM + 1)
    with (
        ops.use_backend("triton"),
        pytest.raises(ops.BackendUnavailableError, match=f"head dim {MAX_HEAD_DIM + 1}"),
    ):
        ops.flash_attention(q, q, q)
    with pytest.raises(AssertionError, match=str(MAX_HEAD_DIM + 1)):  # the kernels' own invariant
        attention_forward(q, q, q, 0.1)


def test_kernels_assert_their_invariants_and_serve_empty_queries():
    """Bad input is the op's to name (test_flash_attention_bad_input); the kernel host asserts."""
    q, k = torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 7, 16)
    with pytest.raises(AssertionError, match="zero keys"):
        attention_forward(q, k[:, :, :0], k[:, :, :0], 0.1)
    with pytest.raises(AssertionError):
        attention_forward(q, k.half(), k, 0.1)
    with pytest.raises(AssertionError, match="one device"):
        attention_forward(q, k, k.to("meta"), 0.1)
    with pytest.raises(AssertionError):
        attention_forward(q, k, k[:, :, :3], 0.1)
    # Tq = 0: nothing to compute, and k, v get zero gradients (no query reads them)
    empty = q[:, :, :0]
    out, lse = attention_forward(empty, k, k, 0.1)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)
    dq, dk, dv = attention_backward(empty, empty, k, k, out, lse, 0.1)
    assert dq.shape == empty.shape and not dk.any() and not dv.any() and dk.shape == k.shape


def test_wrong_destination_is_asserted():
    q = torch.zeros(1, 1, 4, 16)
    with pytest.raises(AssertionError, match="out"):
        attention_forward(q, q, q, 0.1, out=torch.zeros(1, 1, 4, 16, dtype=torch.float16))
    with pytest.raises(AssertionError, match="dk"):
        attention_backward(q, q, q, q, q, torch.zeros(1, 1, 4), 0.1, dk=torch.zeros(1, 1, 5, 16))


def test_empty_batch_gives_empty_results():
    q = torch.zeros(0, 2, 5, 32)
    out, lse = attention_forward(q, q, q, 0.1)
    assert out.shape == q.shape and lse.shape == (0, 2, 5)
    grads = attention_backward(q, q, q, q, out, lse, 0.1)
    assert all(g.shape == q.shape for g in grads)


def test_every_attention_list_is_registered_with_the_launch_layer():
    lists = launch.config_lists()
    for (kind, precision, bucket), kernel in attn.KERNELS.items():
        assert kernel.family == "attention" and lists[kernel.name] == list(kernel.configs)
        assert kernel.name == attn.kernel_name(kind, precision, bucket)
    buckets, kinds = len(attn.HEAD_DIM_BUCKETS), 3 * len(attn.PRECISIONS) + 1  # + delta
    assert len([name for name in lists if name.startswith("attention_")]) == buckets * kinds


def test_fixed_rule_fills_the_gpu_and_is_a_function_of_the_shape():
    kernel = attn.KERNELS[("fwd", "half", 64)]

    def pick(rows: int, length: int) -> launch.Config:
        sizes = {"rows": rows, "owned_length": length}
        return kernel.rule(launch.Problem(sizes, {}, torch.float16, (9, 0)))

    assert pick(64, 4096) == kernel.configs[0]  # enough programs: the list's first config
    small = pick(1, 100)  # too few programs for any config: the smallest query block
    assert small.meta["BLOCK_M"] == min(c.meta["BLOCK_M"] for c in kernel.configs)
    assert pick(1, 100) == small


def test_autotune_key_tells_layouts_and_key_lengths_apart(monkeypatch):
    """A config autotuned for one layout or key length must not serve another: their keys differ."""
    keys = []
    original = launch.run

    def recording(kernel, grid, args, constexprs, **kwargs):
        keys.append(launch.autotune_key(kernel, args, constexprs, kwargs.get("sizes") or {}))
        return original(kernel, grid, args, constexprs, **kwargs)

    monkeypatch.setattr(launch, "run", recording)
    for layout, T_k in (("legacy", 20), ("bthd", 20), ("bthd", 300)):
        (q, k, v), *_ = _make_case(1, 2, 20, 32, torch.float16, layout, T_k)
        attention_forward(q, k, v, 0.1)
    assert len(keys) == 3 and len(set(keys)) == 3
    assert all(key.startswith("attention_fwd[half,d32]|") for key in keys)


def test_compile_specs_cover_every_kernel_dtype_bucket_and_config():
    specs = attn.compile_specs()
    names = {spec.name for spec in specs}
    assert len(names) == len(specs)
    expected = 0
    for (_, precision, _), kernel in attn.KERNELS.items():
        dtypes = {"fp32": 1, "half": 2, "": 3}[precision]  # half: fp16 and bf16; delta: every dtype
        expected += dtypes * len(kernel.configs)
    assert len(specs) == expected * len(attn.LAYOUTS)
    assert any(",d256," in name for name in names)
    for spec in specs:
        dtype = spec.name.split("[")[1].split(",")[0]
        assert list(spec.signature) == list(spec.fn.arg_names)
        assert {n for n, t in spec.signature.items() if t == "constexpr"} == set(spec.constexprs)
        assert spec.signature.get("Q", f"*{dtype}") == f"*{dtype}"
        assert spec.signature.get("LSE", "*fp32") == "*fp32"
        assert spec.constexprs["BLOCK_D"] in attn.HEAD_DIM_BUCKETS


def test_backward_loop_blocks_are_fixed_per_list():
    """Determinism whatever config runs: the block a backward kernel loops over never varies."""
    for key, configs in attn.DKDV_CONFIGS.items():
        assert len({c.meta["BLOCK_M"] for c in configs}) == 1, key
    for key, configs in attn.DQ_CONFIGS.items():
        assert len({c.meta["BLOCK_N"] for c in configs}) == 1, key


# --- fastdiff.ops.flash_attention: every backend, Tq != Tk, and auto's CUDA fallback ---------------


@pytest.mark.parametrize(("T", "T_k", "head_dim"), [(9, 1, 16), (5, 23, 40), (17, 6, 160)])
def test_flash_attention_with_other_key_length_matches_float64(backend, T, T_k, head_dim):
    q = torch.randn(2, 2, T, head_dim, requires_grad=True)
    k, v = (torch.randn(2, 2, T_k, head_dim, requires_grad=True) for _ in range(2))
    dout = torch.randn(2, 2, T, head_dim)
    out = ops.flash_attention(q, k, v, scale=0.3)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_out, _, *ref_grads = _reference(q, k, v, 0.3, dout)
    for what, actual, reference in zip(
        ("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), strict=True
    ):
        _assert_close(actual.detach(), reference, TOLERANCE[torch.float32], f"{backend} {what}")


def test_flash_attention_bad_input():
    q, k = torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 7, 16)
    with pytest.raises(ValueError, match="k has no keys"):
        ops.flash_attention(q, k[:, :, :0], k[:, :, :0])
    with pytest.raises(TypeError, match="same dtype"):
        ops.flash_attention(q, k, k.double())
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        ops.flash_attention(q, k.to("meta"), k.to("meta"))
    with pytest.raises(ValueError, match="agree in B, H and D"):
        ops.flash_attention(q, k[:1, :1], k[:1, :1])
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        ops.flash_attention(q, k, k[:, :, :3])
    with ops.use_backend("triton"), pytest.raises(ValueError, match="k has no keys"):
        ops.flash_attention(q, k[:, :, :0], k[:, :, :0])


def test_auto_falls_back_to_sdpa_on_cuda_once_and_forced_triton_says_why(monkeypatch):
    def on_cuda(dtype: torch.dtype) -> types.SimpleNamespace:  # resolve_attention reads device and dtype
        return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype)

    monkeypatch.setattr(backends, "_warned", set())
    with ops.use_backend("auto"):
        assert backends.resolve_attention(on_cuda(torch.bfloat16), 256) == "triton"
        with pytest.warns(UserWarning, match="scaled_dot_product_attention.*head dim 320"):
            assert backends.resolve_attention(on_cuda(torch.bfloat16), 320) == backends.NATIVE
        assert backends.resolve_attention(on_cuda(torch.bfloat16), 320) == backends.NATIVE  # warned once
        with pytest.warns(UserWarning, match="float64"):
            assert backends.resolve_attention(on_cuda(torch.float64), 64) == backends.NATIVE
    with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailableError, match="head dim 320"):
        backends.resolve_attention(on_cuda(torch.float16), 320)


def test_native_fallback_matches_float64(monkeypatch):
    """What auto runs on CUDA where Triton cannot: F.scaled_dot_product_attention under torch's autograd
    (run here on CPU tensors), for flash_attention (Tq != Tk) and qkv_attention."""
    q = torch.randn(1, 2, 7, 24, requires_grad=True)
    k, v = (torch.randn(1, 2, 3, 24, requires_grad=True) for _ in range(2))
    qkv = torch.randn(2, 3 * 2 * 8, 11, requires_grad=True)
    dout = torch.randn(1, 2, 7, 24)
    ref_out, _, *ref_grads = _reference(q, k, v, 24**-0.5, dout)
    with ops.use_backend("torch"):
        qkv_reference = ops.qkv_attention(qkv.double(), 2, "split")
    monkeypatch.setattr(backends, "resolve_attention", lambda q, head_dim, **_: backends.NATIVE)
    out = ops.flash_attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for what, actual, reference in zip(
        ("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), strict=True
    ):
        _assert_close(actual.detach(), reference, TOLERANCE[torch.float32], f"flash_attention {what}")
    out = ops.qkv_attention(qkv, 2, "split")
    assert out.shape == (2, 2 * 8, 11)
    _assert_close(out.detach(), qkv_reference.detach(), TOLERANCE[torch.float32], "qkv_attention out")
