"""Op cases: which op, at which shape, dtype and layout; their inputs, and one forward+backward.

Shapes come from real models: each UNet is built on the ``meta`` device (nothing allocated) and run once
with hooks on its norm and attention modules, which record every distinct per-sample shape.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fastdiff import ops
from fastdiff.nn import count_op_calls
from fastdiff.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

Tensor = torch.Tensor

NORM_OPS = ("group_norm", "group_norm_silu", "group_norm_scale_shift_silu")
LAYOUTS = ("contiguous", "channels_last")
ORDERS = ("legacy", "split")

MODELS: dict[str, tuple[dict, bool]] = {  # name -> (flags, super-resolution)
    "cifar10-32": (dict(image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True), False),
    "imagenet-64": (dict(image_size=64, num_channels=128, num_res_blocks=3, learn_sigma=True), False),
    "upsampler-256": (dict(num_channels=192, num_res_blocks=2, learn_sigma=True, class_cond=True), True),
}
"""improved-diffusion's published runs (its README): flags over ``model_and_diffusion_defaults`` (or the
super-resolution defaults for the 64->256 upsampler, whose attention has 768 channels / 4 heads = 192)."""


@dataclass(frozen=True)
class OpCase:
    """One op call: ``shape`` is x ``[N, C, *spatial]``, qkv ``[B, 3*H*D, T]`` or q ``[B, H, Tq, D]``;
    ``groups`` is num_groups (norms) or num_heads (qkv_attention); ``kv_tokens`` is Tk of flash_attention.
    ``layout``: ``contiguous`` or ``channels_last`` (norms); ``contiguous`` or ``bthd`` (flash_attention:
    q, k, v as ``[B, T, H, D]`` tensors viewed as ``[B, H, T, D]``, as diffusers passes them)."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    groups: int = 32
    layout: str = "contiguous"
    order: str = "legacy"
    kv_tokens: int | None = None
    model: str = ""

    @property
    def label(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        parts = [self.op, dtype, "x".join(map(str, self.shape))]
        if self.op in NORM_OPS:
            parts += [f"G{self.groups}", self.layout]
        elif self.op == "qkv_attention":
            parts += [f"H{self.groups}(D{self.shape[1] // (3 * self.groups)})", self.order]
        else:
            if self.kv_tokens is not None and self.kv_tokens != self.shape[2]:
                parts.append(f"Tk{self.kv_tokens}")
            if self.layout != "contiguous":
                parts.append(self.layout)
        return " ".join(parts) + (f" [{self.model}]" if self.model else "")

    def inputs(self, device: torch.device, generator: torch.Generator) -> dict[str, Tensor]:
        """Fresh random inputs (and ``dy``, the output gradient) in this case's dtype and layout, drawn
        on ``device`` with ``generator`` (a generator of that device)."""

        def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
            t = torch.randn(shape, generator=generator, device=device) * scale + shift
            return t.to(self.dtype)

        if self.op in NORM_OPS:
            n, c = self.shape[:2]
            found = {"x": randn(*self.shape, scale=2.0, shift=0.5)}
            found["weight"], found["bias"] = randn(c, scale=0.2, shift=1.0), randn(c, scale=0.2)
            if self.op == "group_norm_scale_shift_silu":
                found["scale"], found["shift"] = randn(n, c, scale=0.3), randn(n, c, scale=0.3)
            found["dy"] = randn(*self.shape)
            if self.layout == "channels_last":
                for key in ("x", "dy"):
                    found[key] = found[key].contiguous(memory_format=torch.channels_last)
            return found
        if self.op == "qkv_attention":
            b, width, t = self.shape
            return {"qkv": randn(*self.shape), "dy": randn(b, width // 3, t)}
        b, h, t, d = self.shape
        tk = self.kv_tokens or t
        if self.layout == "bthd":
            q, k, v = (randn(b, tokens, h, d).transpose(1, 2) for tokens in (t, tk, tk))
        else:
            q, k, v = randn(b, h, t, d), randn(b, h, tk, d), randn(b, h, tk, d)
        return {"q": q, "k": k, "v": v, "dy": randn(*self.shape)}

    def call(self, inputs: dict[str, Tensor]) -> Tensor:
        """The op's output for ``inputs`` (on whatever backend is in force)."""
        if self.op == "group_norm_scale_shift_silu":
            return ops.group_norm_scale_shift_silu(
                inputs["x"], self.groups, inputs["weight"], inputs["bias"], inputs["scale"], inputs["shift"]
            )
        if self.op in NORM_OPS:
            return getattr(ops, self.op)(inputs["x"], self.groups, inputs["weight"], inputs["bias"])
        if self.op == "qkv_attention":
            return ops.qkv_attention(inputs["qkv"], self.groups, self.order)
        return ops.flash_attention(inputs["q"], inputs["k"], inputs["v"])


def as_float64(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same values in float64, memory layout kept."""
    return {key: t.to(torch.float64) for key, t in inputs.items()}


def forward_backward(case: OpCase, inputs: dict[str, Tensor], backend: str) -> dict[str, Tensor]:
    """``{"out": y, "grad_<input>": ...}`` of one forward and one backward (with ``inputs["dy"]``) on
    ``backend``; the inputs are not modified."""
    leaves = {key: t.detach().clone().requires_grad_(True) for key, t in inputs.items() if key != "dy"}
    with ops.use_backend(backend):
        out = case.call(leaves)
        grads = torch.autograd.grad(out, list(leaves.values()), inputs["dy"])
    return {"out": out.detach(), **{f"grad_{key}": g for key, g in zip(leaves, grads, strict=True)}}


def unet_calls(model: str) -> list[tuple[str, tuple[int, ...], int]]:
    """Every distinct ``(op, per-sample shape, num_groups or num_heads)`` of one forward of ``model``."""
    flags, super_res = MODELS[model]
    defaults = sr_model_and_diffusion_defaults() if super_res else model_and_diffusion_defaults()
    factory = sr_create_model_and_diffusion if super_res else create_model_and_diffusion
    with torch.device("meta"):
        unet, _ = factory(**{**defaults, **flags})
    size = defaults["large_size"] if super_res else flags["image_size"]
    kwargs = {}
    if super_res:
        small = defaults["small_size"]
        kwargs["low_res"] = torch.zeros(1, 3, small, small, device="meta")
    if flags.get("class_cond"):
        kwargs["y"] = torch.zeros(1, dtype=torch.long, device="meta")
    x = torch.zeros(1, 3, size, size, device="meta")
    return list(count_op_calls(unet, x, torch.zeros(1, device="meta"), **kwargs))


def unet_cases(batch: int, dtypes: tuple[torch.dtype, ...]) -> Iterator[OpCase]:
    """Every op call of the three real models at ``batch``: norms in both layouts, attention in both
    qkv orders and as flash_attention ``[B, H, T, D]``."""
    for model in MODELS:
        for op, shape, groups in unet_calls(model):
            for dtype in dtypes:
                if op == "qkv_attention":
                    width, tokens = shape
                    for order in ORDERS:
                        yield OpCase(op, (batch, *shape), dtype, groups, order=order, model=model)
                    head_dim = width // (3 * groups)
                    yield OpCase("flash_attention", (batch, groups, tokens, head_dim), dtype, model=model)
                else:
                    for layout in LAYOUTS:
                        yield OpCase(op, (batch, *shape), dtype, groups, layout, model=model)


def quick_cases(dtypes: tuple[torch.dtype, ...]) -> Iterator[OpCase]:
    """Small odd shapes: each op, dtype and layout; head dims 16, 40, 48 and the upsampler's 192."""
    for dtype in dtypes:
        for op in NORM_OPS:
            for layout in LAYOUTS:
                yield OpCase(op, (2, 12, 5, 7), dtype, 4, layout)
        for order in ORDERS:
            yield OpCase("qkv_attention", (2, 3 * 2 * 16, 37), dtype, 2, order=order)
        yield OpCase("qkv_attention", (1, 3 * 192, 19), dtype, 1, model="upsampler-256 head dim")
        yield OpCase("flash_attention", (1, 2, 33, 48), dtype)
        yield OpCase("flash_attention", (2, 3, 29, 40), dtype, layout="bthd")
