"""fastdiff._C GroupNorm kernels (forward and backward) against a float64 reference written here.

Covers float32 / bfloat16 / float16 / float64, contiguous and channels-last (2-D and 3-D spatial, and the
channels-innermost layout of 1-D inputs), 0 to 3 spatial dims, odd sizes, affine-free, scale-shift, SiLU,
large means, empty batches, every kernel set this CPU can run, thread-count independence, and the C++
autograd node (``group_norm_autograd``) with gradcheck.
"""

import math

import pytest
import torch

_C = pytest.importorskip("fastdiff._C")

Tensor = torch.Tensor
OptTensor = Tensor | None

EPS = 1e-5
# Relative tolerance per dtype (errors are measured against max(1, max |reference|)).
TOL = {torch.float32: 2e-5, torch.float64: 1e-11, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}
# GroupNorm variants: (affine, scale_shift, silu).
VARIANTS = {
    "gn": (True, False, False),
    "gn_silu": (True, False, True),
    "scale_shift_silu": (True, True, True),
    "scale_shift": (True, True, False),
    "plain_silu": (False, False, True),
}


def reference(
    x: Tensor, groups: int, w: OptTensor, b: OptTensor, s: OptTensor, h: OptTensor, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """float64 (y, mean [N, G], rstd [N, G]) by plain torch math; differentiable in every input."""
    n, c = x.shape[:2]
    xd = x.double()
    grouped = xd.reshape(n, groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    var = ((grouped - mean) ** 2).mean(-1, keepdim=True)
    rstd = (var + EPS).rsqrt()
    z = ((grouped - mean) * rstd).reshape(xd.shape)
    per_channel = (1, c) + (1,) * (x.dim() - 2)
    per_sample = (n, c) + (1,) * (x.dim() - 2)
    if w is not None:
        z = z * w.double().reshape(per_channel)
    if b is not None:
        z = z + b.double().reshape(per_channel)
    if s is not None:
        z = z * (1 + s.double().reshape(per_sample)) + h.double().reshape(per_sample)
    y = z * torch.sigmoid(z) if silu else z
    return y, mean.reshape(n, groups), rstd.reshape(n, groups)


def reference_grads(
    dy: Tensor, x: Tensor, groups: int, params: list[OptTensor], silu: bool
) -> list[OptTensor]:
    """float64 gradients w.r.t. (x, weight, bias, scale, shift) of `reference`; None for absent inputs."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in [x, *params]]
    y, _, _ = reference(leaves[0], groups, *leaves[1:], silu)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, dy.double()))
    return [next(grads) if t is not None else None for t in leaves]


def in_layout(t: Tensor, layout: str) -> Tensor:
    """t stored contiguously or channels-last (channels innermost; channels_last(_3d) for 4-D/5-D)."""
    if layout == "contiguous":
        return t.contiguous()
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def make_inputs(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    layout: str,
    variant: str,
    gen: torch.Generator,
    offset: float = 0.5,
    spread: float = 2.0,
) -> tuple[Tensor, list[OptTensor]]:
    """x (offset + spread * randn, in `layout`) and [weight, bias, scale, shift] (float32 for reduced x)."""
    affine, scale_shift, _ = VARIANTS[variant]
    n, c = shape[:2]
    x = in_layout(
        (offset + spread * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype), layout
    )
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32

    def rand(*size: int) -> Tensor:
        return torch.randn(size, generator=gen, dtype=pdtype)

    w, b = (1 + 0.5 * rand(c), rand(c)) if affine else (None, None)
    s, h = (0.5 * rand(n, c), rand(n, c)) if scale_shift else (None, None)
    return x, [w, b, s, h]


def assert_close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def run_and_compare(
    x: Tensor,
    groups: int,
    params: list[OptTensor],
    silu: bool,
    gen: torch.Generator,
    tol: float | None = None,
) -> None:
    """Forward and backward through fastdiff._C, each output and gradient checked against float64."""
    tol = TOL[x.dtype] if tol is None else tol
    y, mean, rstd = _C.group_norm_forward(x, groups, *params, EPS, silu)
    y_ref, mean_ref, rstd_ref = reference(x, groups, *params, silu)
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert y.dtype == x.dtype and y.stride() == x.stride()
    assert mean.dtype == rstd.dtype == stats_dtype
    assert_close(y, y_ref, tol, "y")
    assert_close(mean, mean_ref, TOL[stats_dtype], "mean")
    assert_close(rstd, rstd_ref, TOL[stats_dtype] * 10, "rstd")

    dy = torch.empty_like(x).copy_(torch.randn(x.shape, generator=gen, dtype=torch.float64))
    grads = _C.group_norm_backward(dy, x, groups, *params, mean, rstd, silu, [True] * 5)
    expected = reference_grads(dy, x, groups, params, silu)
    for name, grad, ref, inp in zip(
        ("dx", "dweight", "dbias", "dscale", "dshift"), grads, expected, [x, *params], strict=True
    ):
        if inp is None:
            assert grad is None, f"{name} must be None for an absent input"
            continue
        assert grad.dtype == inp.dtype and grad.shape == inp.shape, name
        # dx = rstd * (a difference of O(dy) terms): its rounding error grows with rstd. Parameter
        # gradients sum over the batch and space.
        factor = max(1.0, rstd_ref.max().item()) if name == "dx" else 4.0
        assert_close(grad, ref, tol * factor, name)
    assert grads[0].stride() == x.stride()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(20240611)


@pytest.fixture
def isa_restored():
    yield
    _C._set_group_norm_isa("auto")


# (shape, groups): odd sizes, every spatial rank, group sizes from 1 to several statistics chunks.
CASES = [
    ((2, 6, 7, 7), 3),
    ((3, 64, 33), 32),
    ((2, 6), 3),
    ((2, 8, 3, 4, 5), 4),
    ((2, 32, 1, 1), 8),
    ((1, 12, 5, 9), 12),
    ((2, 20, 17, 19), 2),
]


# Without spatial dims there is only one layout.
LAYOUT_CASES = [
    (shape, groups, layout)
    for shape, groups in CASES
    for layout in (["contiguous"] if len(shape) == 2 else ["contiguous", "channels_last"])
]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    ("shape", "groups", "layout"), LAYOUT_CASES, ids=[f"{s}-g{g}-{lay}" for s, g, lay in LAYOUT_CASES]
)
def test_matches_float64_reference(shape, groups, dtype, layout, variant, gen):
    x, params = make_inputs(shape, dtype, layout, variant, gen)
    run_and_compare(x, groups, params, VARIANTS[variant][2], gen)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("isa", _C._group_norm_isas())
def test_every_kernel_set_matches_reference(isa, dtype, layout, gen, isa_restored):
    _C._set_group_norm_isa(isa)
    assert _C._group_norm_isa() == isa
    for shape, groups in [((2, 6, 7, 7), 3), ((2, 40, 9, 11), 8), ((3, 10, 1, 1), 5)]:
        for variant in ("gn_silu", "scale_shift_silu"):
            x, params = make_inputs(shape, dtype, layout, variant, gen)
            run_and_compare(x, groups, params, True, gen)


@pytest.mark.parametrize("isa", _C._group_norm_isas())
def test_silu_at_extreme_pre_activations(isa, gen, isa_restored):
    """|u| up to 1e30: sigmoid must neither overflow nor lose 1 - sigmoid(u) (it sets silu'(u) * u)."""
    _C._set_group_norm_isa(isa)
    x = torch.randn(2, 5, 40, generator=gen)
    w = torch.tensor([1.0, 30.0, 100.0, 1e10, 1e30])
    b = torch.tensor([0.0, 0.0, -150.0, 0.0, 0.0])
    y, mean, rstd = _C.group_norm_forward(x, 5, w, b, None, None, EPS, True)
    dy = torch.randn(x.shape, generator=gen)
    dx, dw, db, _, _ = _C.group_norm_backward(dy, x, 5, w, b, None, None, mean, rstd, True, [True] * 5)
    y_ref = reference(x, 5, w, b, None, None, True)[0]
    dx_ref, dw_ref, db_ref = reference_grads(dy, x, 5, [w, b, None, None], True)[:3]
    for c in range(5):  # channel by channel: their scales differ by 30 orders of magnitude
        assert_close(y[:, c], y_ref[:, c], 1e-5, f"y[:, {c}]")
        assert_close(dx[:, c], dx_ref[:, c], 1e-4, f"dx[:, {c}]")
    assert_close(dw, dw_ref, 1e-4, "dweight")
    assert_close(db, db_ref, 1e-4, "dbias")


def test_unknown_kernel_set_is_refused(isa_restored):
    with pytest.raises(ValueError, match="isa"):
        _C._set_group_norm_isa("avx9000")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_improved_diffusion_shape(layout, gen):
    x, params = make_inputs((2, 128, 32, 32), torch.float32, layout, "scale_shift_silu", gen)
    run_and_compare(x, 32, params, True, gen)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("variant", ["gn_silu", "scale_shift_silu"])
def test_large_mean_is_accurate(layout, variant, gen):
    """mean 1e3, std 1: a one-pass E[x^2] - E[x]^2 loses every digit of the variance in float32."""
    x, params = make_inputs((2, 32, 24, 24), torch.float32, layout, variant, gen, offset=1e3, spread=1.0)
    _, mean, rstd = _C.group_norm_forward(x, 8, *params, EPS, True)
    _, mean_ref, rstd_ref = reference(x, 8, *params, True)
    assert_close(mean, mean_ref, 1e-7, "mean")
    torch.testing.assert_close(rstd.double(), rstd_ref, rtol=1e-5, atol=0)
    # The saved float32 mean is itself rounded by up to 3e-5 at 1e3, which shifts xhat by as much.
    run_and_compare(x, 8, params, VARIANTS[variant][2], gen, tol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channels_with_distant_means_in_one_group(layout, gen):
    """Each channel has its own large mean; the group's variance is mostly between channels."""
    x, params = make_inputs(
        (2, 16, 20, 20), torch.float32, "contiguous", "gn_silu", gen, offset=0.0, spread=1.0
    )
    x = in_layout(x + 500.0 * torch.arange(16, dtype=torch.float32).reshape(1, 16, 1, 1), layout)
    run_and_compare(x, 4, params, True, gen)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_inputs_surrounded_by_nan_memory(layout, gen):
    """x and dy are views into NaN-filled storage: a read past either end of a row would show up."""
    shape = (2, 12, 7, 5)
    x0, params = make_inputs(shape, torch.float32, layout, "scale_shift_silu", gen)
    dy0 = torch.randn(shape, generator=gen)

    def embedded(t: Tensor) -> Tensor:
        storage = torch.full((t.numel() + 64,), math.nan)
        strides = in_layout(torch.empty(shape), layout).stride()
        view = storage.as_strided(shape, strides, storage_offset=32)
        return view.copy_(t)

    x, dy = embedded(x0), embedded(dy0)
    y, mean, rstd = _C.group_norm_forward(x, 3, *params, EPS, True)
    assert_close(y, reference(x0, 3, *params, True)[0], TOL[torch.float32], "y")
    grads = _C.group_norm_backward(dy, x, 3, *params, mean, rstd, True, [True] * 5)
    expected = reference_grads(dy0, x0, 3, params, True)
    for grad, ref in zip(grads, expected, strict=True):
        assert torch.isfinite(grad).all()
        assert_close(grad, ref, 1e-4, "grad")


def test_nan_in_group_stays_in_group():
    x = torch.randn(2, 8, 5, 5)
    x[0, 0, 2, 3] = math.nan
    y, mean, _ = _C.group_norm_forward(x, 4, None, None, None, None, EPS, True)
    assert torch.isnan(mean[0, 0]) and torch.isnan(y[0, :2]).all()
    assert torch.isfinite(y[0, 2:]).all() and torch.isfinite(y[1]).all()


def test_strided_input_is_handled(gen):
    """Neither contiguous nor channels-last: read through one contiguous copy."""
    x, params = make_inputs((2, 6, 8, 14), torch.float32, "contiguous", "scale_shift_silu", gen)
    x = x[..., ::2]
    y, _, _ = _C.group_norm_forward(x, 3, *params, EPS, True)
    assert_close(y, reference(x, 3, *params, True)[0], TOL[torch.float32], "y")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dy_in_another_layout(layout, gen):
    x, params = make_inputs((2, 8, 6, 5), torch.float32, layout, "scale_shift_silu", gen)
    _, mean, rstd = _C.group_norm_forward(x, 4, *params, EPS, True)
    dy = torch.randn(x.shape, generator=gen)
    other = "channels_last" if layout == "contiguous" else "contiguous"
    same = _C.group_norm_backward(in_layout(dy, layout), x, 4, *params, mean, rstd, True, [True] * 5)
    mixed = _C.group_norm_backward(in_layout(dy, other), x, 4, *params, mean, rstd, True, [True] * 5)
    for a, b in zip(same, mixed, strict=True):
        assert torch.equal(a, b)
    assert mixed[0].stride() == x.stride()


def test_needs_input_grad_selects_outputs(gen):
    x, params = make_inputs((2, 8, 4, 4), torch.float32, "contiguous", "scale_shift_silu", gen)
    _, mean, rstd = _C.group_norm_forward(x, 4, *params, EPS, True)
    dy = torch.randn(x.shape, generator=gen)
    full = _C.group_norm_backward(dy, x, 4, *params, mean, rstd, True, [True] * 5)
    for i in range(5):
        needs = [j == i for j in range(5)]
        grads = _C.group_norm_backward(dy, x, 4, *params, mean, rstd, True, needs)
        for j, g in enumerate(grads):
            assert (g is not None) == (j == i)
        assert torch.equal(grads[i], full[i])
    assert _C.group_norm_backward(dy, x, 4, *params, mean, rstd, True, [False] * 5) == (None,) * 5
    absent = _C.group_norm_backward(dy, x, 4, None, None, None, None, mean, rstd, True, [True] * 5)
    assert absent[0] is not None and absent[1:] == (None,) * 4


def test_mixed_parameter_dtypes(gen):
    """bfloat16 x with float64 weights and float16 scale/shift: each gradient in its input's dtype."""
    x, (w, b, s, h) = make_inputs((2, 8, 5, 5), torch.bfloat16, "contiguous", "scale_shift_silu", gen)
    params = [w.double(), b.double(), s.half(), h.half()]
    y, mean, rstd = _C.group_norm_forward(x, 4, *params, EPS, True)
    assert y.dtype == torch.bfloat16 and mean.dtype == torch.float32
    assert_close(y, reference(x, 4, *params, True)[0], TOL[torch.bfloat16], "y")
    grads = _C.group_norm_backward(torch.ones_like(x), x, 4, *params, mean, rstd, True, [True] * 5)
    assert [g.dtype for g in grads] == [
        torch.bfloat16,
        torch.float64,
        torch.float64,
        torch.float16,
        torch.float16,
    ]


def test_scale_shift_with_trailing_unit_dims(gen):
    x, (w, b, s, h) = make_inputs((2, 8, 5, 5), torch.float32, "contiguous", "scale_shift_silu", gen)
    y, mean, rstd = _C.group_norm_forward(x, 4, w, b, s[..., None, None], h[..., None, None], EPS, True)
    assert torch.equal(y, _C.group_norm_forward(x, 4, w, b, s, h, EPS, True)[0])
    grads = _C.group_norm_backward(
        torch.ones_like(x), x, 4, w, b, s[..., None, None], h, mean, rstd, True, [True] * 5
    )
    assert grads[3].shape == (2, 8, 1, 1) and grads[4].shape == (2, 8)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_batch(layout):
    x = in_layout(torch.randn(0, 8, 5, 5), layout)
    w, b, s, h = torch.randn(8), torch.randn(8), torch.randn(0, 8), torch.randn(0, 8)
    y, mean, rstd = _C.group_norm_forward(x, 4, w, b, s, h, EPS, True)
    assert y.shape == x.shape and mean.shape == rstd.shape == (0, 4)
    dx, dw, db, ds, dh = _C.group_norm_backward(
        torch.empty_like(x), x, 4, w, b, s, h, mean, rstd, True, [True] * 5
    )
    assert dx.shape == x.shape and ds.shape == dh.shape == (0, 8)
    assert torch.equal(dw, torch.zeros(8)) and torch.equal(db, torch.zeros(8))


def test_empty_spatial_dims():
    x = torch.randn(2, 8, 0, 3)
    y, mean, rstd = _C.group_norm_forward(x, 4, None, None, None, None, EPS, False)
    assert y.shape == x.shape and torch.equal(mean, torch.zeros(2, 4)) and torch.isfinite(rstd).all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_thread_count(layout, dtype, gen):
    """Bitwise equal with 1 and 2 threads: several statistics chunks and row blocks per group/sample."""
    x, params = make_inputs((3, 64, 24, 24), dtype, layout, "scale_shift_silu", gen)
    dy = in_layout(torch.randn(x.shape, generator=gen).to(dtype), layout)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, mean, rstd = _C.group_norm_forward(x, 4, *params, EPS, True)
            grads = _C.group_norm_backward(dy, x, 4, *params, mean, rstd, True, [True] * 5)
            results.append([y, mean, rstd, *grads])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_bad_input_raises():
    x = torch.randn(2, 6, 4)
    with pytest.raises(TypeError, match="x must be"):
        _C.group_norm_forward(x.int(), 3, None, None, None, None, EPS, False)
    with pytest.raises(ValueError, match="num_groups"):
        _C.group_norm_forward(x, 4, None, None, None, None, EPS, False)
    with pytest.raises(ValueError, match="scale and shift"):
        _C.group_norm_forward(x, 3, None, None, torch.randn(2, 6), None, EPS, False)
    with pytest.raises(ValueError, match="weight"):
        _C.group_norm_forward(x, 3, torch.randn(5), None, None, None, EPS, False)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("variant", ["gn", "gn_silu", "scale_shift_silu", "plain_silu"])
def test_gradcheck_float64(layout, variant, gen):
    x, params = make_inputs((2, 6, 3, 4), torch.float64, layout, variant, gen)
    inputs = [t.requires_grad_() if t is not None else None for t in [x, *params]]
    assert torch.autograd.gradcheck(
        lambda x, *p: _C.group_norm_autograd(x, 3, *p, EPS, VARIANTS[variant][2]), inputs, eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_autograd_node_matches_float64_reference(variant, dtype, layout, gen):
    """_C.group_norm_autograd: one C++ autograd node, output and every gradient against float64."""
    silu = VARIANTS[variant][2]
    x, params = make_inputs((3, 12, 5, 7), dtype, layout, variant, gen)
    leaves = [t.requires_grad_() if t is not None else None for t in [x, *params]]
    y = _C.group_norm_autograd(leaves[0], 4, *leaves[1:], EPS, silu)
    y_ref, _, rstd_ref = reference(x, 4, *params, silu)
    assert y.dtype == x.dtype and y.stride() == x.stride()
    assert_close(y, y_ref, TOL[dtype], "y")
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, present, dy)
    expected = [r for r in reference_grads(dy, x, 4, params, silu) if r is not None]
    for index, (grad, ref, leaf) in enumerate(zip(grads, expected, present, strict=True)):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        factor = max(1.0, rstd_ref.max().item()) if index == 0 else 4.0
        assert_close(grad, ref, TOL[dtype] * factor, f"gradient {index}")
    assert grads[0].stride() == x.stride()


def test_autograd_node_computes_the_gradients_asked_for(gen):
    """Only some inputs require grad (weight and shift here): those gradients, matching float64."""
    x, params = make_inputs((2, 8, 3, 3), torch.float32, "contiguous", "scale_shift_silu", gen)
    weight, bias, scale, shift = params
    weight.requires_grad_()
    shift.requires_grad_()
    y = _C.group_norm_autograd(x, 4, weight, bias, scale, shift, EPS, True)
    dy = torch.randn(x.shape, generator=gen)
    dweight, dshift = torch.autograd.grad(y, (weight, shift), dy)
    _, want_weight, _, _, want_shift = reference_grads(dy, x, 4, params, True)
    assert_close(dweight, want_weight, TOL[torch.float32] * 4, "dweight")
    assert_close(dshift, want_shift, TOL[torch.float32] * 4, "dshift")
    with torch.no_grad():
        assert _C.group_norm_autograd(x, 4, weight, bias, scale, shift, EPS, True).grad_fn is None
