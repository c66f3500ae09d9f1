"""fastdiff's kernels in diffusers' UNets and VAEs: ``apply_fastdiff(model)``, ``remove_fastdiff(model)``.

``apply_fastdiff`` changes a model in place (a ``UNet2DModel``, ``UNet2DConditionModel``, ``AutoencoderKL``
or any module holding their blocks), in four ways, and lists every change and every skip:

* each ``ResnetBlock2D`` becomes a :class:`FastdiffResnetBlock2D` (the same object, its class swapped):
  ``norm1`` + SiLU and ``norm2`` + SiLU run as ``fastdiff.ops.group_norm_silu``, and with
  ``time_embedding_norm="scale_shift"`` the second pair with the FiLM step runs as
  ``group_norm_scale_shift_silu``. The rest of the forward is diffusers' own, step for step (up/down
  sampling, time embedding or none (``temb=None``, as in the VAE's blocks), dropout, ``conv_shortcut``,
  ``output_scale_factor``).
* each self- and cross-attention ``Attention`` whose processor is diffusers' ``AttnProcessor2_0`` gets a
  :class:`FastdiffAttnProcessor`: that processor's steps with ``fastdiff.ops.flash_attention`` in place
  of ``scaled_dot_product_attention`` (cross-attention: keys and values from ``encoder_hidden_states``,
  of another length than the queries; the VAE's mid-block attention: one head as wide as the block).
  A call with an ``attention_mask`` runs the replaced processor.
* the VAE's ``Encoder`` and ``Decoder`` (``AutoencoderKL.encoder`` / ``.decoder``): ``conv_norm_out``
  followed by ``conv_act`` (SiLU) become ``GroupNorm32SiLU`` + ``nn.Identity``, one fused pass.
* every other ``nn.GroupNorm`` (attention ``group_norm``, ``Transformer2DModel.norm``, a UNet's
  ``conv_norm_out``) goes through :func:`fastdiff.patch.fuse_group_norm`'s rewrite.

The fused forward and processor mirror diffusers' source, and the VAE fusion relies on ``Encoder.forward``
and ``Decoder.forward`` applying ``conv_act`` right after ``conv_norm_out``. ``apply_fastdiff`` checks, by a
fingerprint of that source (its syntax tree, without docstrings and annotations), that the installed
diffusers has the code they were checked against; when it does not, those blocks are left as they are and
reported as skipped, with the version. Blocks it cannot serve (another activation than SiLU, hooks on the
norms, ``ResnetBlockCondNorm2D`` for ``"ada_group"``/``"spatial"``, a ``SpatialNorm`` ``conv_norm_out``,
custom processors) are reported the same way. Nothing is skipped silently. ``remove_fastdiff(model)`` or
``report.unpatch()`` restores the classes, processors and modules.
"""

import ast
import hashlib
import inspect
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastdiff import ops
from fastdiff.nn import GroupNorm32, GroupNorm32SiLU
from fastdiff.patch import (
    Change,
    PatchReport,
    Skipped,
    check_module,
    group_norm_refusal,
    has_hooks,
    join,
    patches,
    register,
    rewrite_group_norms,
    swap,
)

try:
    import diffusers
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    from diffusers.models.autoencoders.vae import Decoder, Encoder
    from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D
    from diffusers.utils import deprecate
except ImportError as error:  # the optional dependency is missing
    raise ImportError(
        "fastdiff.integrations.diffusers needs diffusers: pip install 'fastdiff[diffusers]'"
    ) from error

Tensor = torch.Tensor

DIFFUSERS_VERSION = diffusers.__version__

_IGNORED_AST_FIELDS = frozenset({"ctx", "type_comment", "type_params", "kind", "annotation", "returns"})


def _canonical(node: object) -> str:
    """A Python-version-independent text of an AST: node names and fields, no positions or annotations."""
    if isinstance(node, ast.AST):
        fields = [
            f"{name}={_canonical(value)}"
            for name, value in ast.iter_fields(node)
            if name not in _IGNORED_AST_FIELDS
        ]
        return f"{type(node).__name__}({','.join(fields)})"
    if isinstance(node, list):
        return f"[{','.join(_canonical(item) for item in node)}]"
    return repr(node)


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def code_fingerprint(function: Callable) -> str:
    """16 hex digits identifying ``function``'s code (comments, docstrings, annotations left out); '' when
    its source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return ""
    return hashlib.sha256(_canonical(_without_docstrings(ast.parse(source))).encode()).hexdigest()[:16]


MIRRORED_CODE = {
    "ResnetBlock2D.forward": (ResnetBlock2D.forward, {"484a456a176ec4a7": "diffusers 0.38 to 0.42"}),
    "AttnProcessor2_0.__call__": (AttnProcessor2_0.__call__, {"523cacbe27f2f5c3": "diffusers 0.35 to 0.42"}),
    "Encoder.forward": (Encoder.forward, {"d962b2f52f015e60": "diffusers 0.35 to 0.42"}),
    "Decoder.forward": (
        Decoder.forward,
        {"0a6cb2e8a3948b80": "diffusers 0.35", "8bb44d1a91ffc672": "diffusers 0.36 to 0.42"},
    ),
}
"""Code that fastdiff's replacements mirror or rely on: the installed function and the fingerprints of the
versions whose code they were checked against. (The VAE's ``Encoder.forward`` and ``Decoder.forward`` are
not replaced; the fusion of their ``conv_norm_out`` and ``conv_act`` relies on their calling one right after
the other and ``conv_act`` nowhere else.)"""


def mirror_refusal(name: str) -> str:
    """Why diffusers' ``name`` here cannot be replaced by fastdiff's mirror of it ('' when it can)."""
    function, known = MIRRORED_CODE[name]
    fingerprint = code_fingerprint(function)
    if fingerprint in known:
        return ""
    if not fingerprint:
        return f"the source of diffusers {DIFFUSERS_VERSION}'s {name} cannot be read, so it cannot be checked"
    return (
        f"diffusers {DIFFUSERS_VERSION}'s {name} (fingerprint {fingerprint}) is not the code fastdiff "
        f"mirrors ({', '.join(known.values())})"
    )


# --- ResnetBlock2D ---------------------------------------------------------------------------------


def _norm_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    return ops.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, eps=norm.eps)


def _scale_shift_norm_silu(norm: nn.GroupNorm, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return ops.group_norm_scale_shift_silu(
        x, norm.num_groups, norm.weight, norm.bias, scale, shift, eps=norm.eps
    )


SCALE_DEPRECATION = (
    "The `scale` argument is ignored; pass it to the pipeline through `cross_attention_kwargs` instead."
)


class FastdiffResnetBlock2D(ResnetBlock2D):
    """diffusers' ``ResnetBlock2D`` with its norm + SiLU pairs as fastdiff's fused ops.

    ``forward(input_tensor [N, C_in, H, W], temb [N, temb_channels] or None) -> [N, C_out, H', W']``,
    the same function as ``ResnetBlock2D.forward`` up to kernel rounding. ``apply_fastdiff`` swaps a
    block's class to this one (parameters, buffers and state-dict keys are untouched); ``remove_fastdiff``
    swaps it back.
    """

    def forward(self, input_tensor: Tensor, temb: Tensor | None, *args, **kwargs) -> Tensor:
        if len(args) > 0 or kwargs.get("scale") is not None:
            deprecate("scale", "1.0.0", SCALE_DEPRECATION)

        hidden_states = _norm_silu(self.norm1, input_tensor)

        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:  # as diffusers: its nearest-neighbour NHWC upsample needs this
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)

        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]

        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(
                    f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}"
                )
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = _scale_shift_norm_silu(self.norm2, hidden_states, time_scale, time_shift)
        else:
            if self.time_embedding_norm == "default" and temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = _norm_silu(self.norm2, hidden_states)

        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)

        if self.conv_shortcut is not None:
            if self.training:  # as diffusers: a contiguous input only in training (DDP gradient strides)
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)

        return (input_tensor + hidden_states) / self.output_scale_factor


def _norm_refusal(block: nn.Module, name: str) -> str:
    norm = getattr(block, name)
    if type(norm) is GroupNorm32:
        return "" if not has_hooks(norm) else f"{name} has hooks, which the fused forward would bypass"
    if not isinstance(norm, nn.GroupNorm):
        return f"{name} is {type(norm).__name__}, not a GroupNorm"
    why = group_norm_refusal(norm, (nn.GroupNorm,))
    return f"{name} {why}" if why else ""


def resnet_refusal(block: nn.Module) -> str:
    """Why ``block`` (a ResnetBlock2D) cannot become a :class:`FastdiffResnetBlock2D` ('' when it can)."""
    if type(block) is not ResnetBlock2D:
        return f"{type(block).__name__} subclasses ResnetBlock2D and may run another forward"
    if "forward" in block.__dict__:
        return "its forward was replaced on the instance"
    why = mirror_refusal("ResnetBlock2D.forward")
    if why:
        return why
    if type(block.nonlinearity) is not nn.SiLU:
        return f"nonlinearity is {type(block.nonlinearity).__name__}; the fused kernels apply SiLU"
    if has_hooks(block.nonlinearity):
        return "nonlinearity has hooks, which the fused forward would bypass"
    for name in ("norm1", "norm2"):
        why = _norm_refusal(block, name)
        if why:
            return why
    if block.time_embedding_norm == "scale_shift" and block.time_emb_proj is None:
        return 'time_embedding_norm="scale_shift" without time_emb_proj (temb_channels=None)'
    return ""


COND_NORM_REASON = (
    "ResnetBlockCondNorm2D (time_embedding_norm 'ada_group' or 'spatial') normalises with AdaGroupNorm or "
    "SpatialNorm, whose conditioning fastdiff's kernels do not implement"
)


@dataclass(eq=False)
class ClassSwap(Change):
    """``module``'s class was ``original_class`` and is now ``new_class`` (same object, same state)."""

    module: nn.Module
    original_class: type
    new_class: type

    def is_in_place(self) -> bool:
        return type(self.module) is self.new_class

    def undo(self) -> None:
        self.module.__class__ = self.original_class

    def describe(self) -> str:
        return f"{self.original_class.__name__} -> {self.new_class.__name__} ({self.kind})"


# --- attention -------------------------------------------------------------------------------------


class FastdiffAttnProcessor:
    """diffusers attention processor: ``AttnProcessor2_0``'s steps with fastdiff's flash attention.

    Serves self- and cross-attention without a mask: ``hidden_states [B, T, C]`` or ``[B, C, H, W]`` ->
    same shape, keys and values from ``encoder_hidden_states [B, T_enc, C_enc]`` when given. A call with
    an ``attention_mask`` goes to ``fallback`` (the processor this one replaced), with a warning the
    first time; ``fallback_calls`` counts such calls.
    """

    def __init__(self, fallback: AttnProcessor2_0) -> None:
        self.fallback = fallback
        self.fallback_calls = 0

    def _fall_back(self, reason: str) -> None:
        if self.fallback_calls == 0:
            warnings.warn(
                f"fastdiff attention processor: {reason}; this call runs diffusers' "
                f"{type(self.fallback).__name__}",
                stacklevel=4,
            )
        self.fallback_calls += 1

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        if attention_mask is not None:
            self._fall_back("attention_mask given, which flash_attention does not take")
            return self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        if len(args) > 0 or kwargs.get("scale") is not None:
            deprecate("scale", "1.0.0", SCALE_DEPRECATION)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # [B, heads, T, head_dim], keys [B, heads, T_enc, head_dim]; scale 1/sqrt(head_dim)
        hidden_states = ops.flash_attention(query, key, value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_refusal(attn: nn.Module) -> str:
    """Why ``attn`` cannot get a :class:`FastdiffAttnProcessor` ('' when it can)."""
    if type(attn) is not Attention:
        return f"{type(attn).__name__} is not diffusers' Attention class"
    processor = attn.processor
    if type(processor) is not AttnProcessor2_0:
        return (
            f"its processor is {type(processor).__name__}, not AttnProcessor2_0 "
            "(custom, LoRA, IP-adapter, xformers, sliced and added-KV processors are kept)"
        )
    why = mirror_refusal("AttnProcessor2_0.__call__")
    if why:
        return why
    if attn.to_k is None or attn.to_v is None or attn.added_kv_proj_dim is not None:
        return "added key/value projections (only_cross_attention / added_kv_proj_dim)"
    if attn.inner_kv_dim != attn.inner_dim:
        return f"kv_heads differ from heads (key/value width {attn.inner_kv_dim}, query {attn.inner_dim})"
    return ""


@dataclass(eq=False)
class ProcessorSwap(Change):
    """``attention``'s processor was ``original`` and is now ``replacement``."""

    attention: Attention
    original: object
    replacement: FastdiffAttnProcessor

    def is_in_place(self) -> bool:
        return self.attention.processor is self.replacement

    def undo(self) -> None:
        self.attention.set_processor(self.original)

    def describe(self) -> str:
        return f"{type(self.original).__name__} -> {type(self.replacement).__name__} ({self.kind})"


# --- AutoencoderKL's Encoder and Decoder ----------------------------------------------------------


def post_norm_refusal(coder: nn.Module) -> str:
    """Why ``coder``'s (a VAE Encoder's or Decoder's) ``conv_norm_out`` + ``conv_act`` cannot run as one
    ``group_norm_silu`` ('' when they can)."""
    name = type(coder).__name__
    if type(coder) not in (Encoder, Decoder):
        return f"{name} subclasses diffusers' {'Encoder' if isinstance(coder, Encoder) else 'Decoder'}"
    if "forward" in coder.__dict__:
        return "its forward was replaced on the instance"
    why = mirror_refusal(f"{name}.forward")
    if why:
        return why
    act = coder.conv_act
    if type(act) is not nn.SiLU:
        return f"conv_act is {type(act).__name__}; the fused kernel applies SiLU"
    if has_hooks(act):
        return "conv_act has hooks, which the fused norm would bypass"
    norm = coder.conv_norm_out
    if not isinstance(norm, nn.GroupNorm):
        return f"conv_norm_out is {type(norm).__name__}, not a GroupNorm"
    why = group_norm_refusal(norm, (nn.GroupNorm,))
    return f"conv_norm_out {why}" if why else ""


def _patch_post_norm(report: PatchReport, path: str, coder: nn.Module, exclude: set[int]) -> None:
    """``conv_norm_out`` + ``conv_act`` of a VAE Encoder or Decoder -> ``GroupNorm32SiLU`` + Identity."""
    if isinstance(coder.conv_norm_out, GroupNorm32):  # fastdiff's already: the GroupNorm rewrite says so
        return
    norm_path = join(path, "conv_norm_out")
    why = post_norm_refusal(coder)
    if why:
        report.skipped.append(Skipped(norm_path, f"not fused with conv_act: {why}"))
        return
    fused = GroupNorm32SiLU.from_module(coder.conv_norm_out)
    swap(report, coder, "conv_norm_out", norm_path, fused, "group_norm_silu")
    identity = nn.Identity()
    identity.train(coder.conv_act.training)
    swap(report, coder, "conv_act", join(path, "conv_act"), identity, "silu_fused_into_previous")
    exclude.update((id(fused), id(identity)))


# --- the patch -------------------------------------------------------------------------------------

REPORT_NAME = "apply_fastdiff"


def _patch_resnet(report: PatchReport, path: str, block: nn.Module, exclude: set[int]) -> None:
    if type(block) is FastdiffResnetBlock2D:
        report.already_patched.append(path)
        exclude.update((id(block.norm1), id(block.norm2)))
        return
    why = resnet_refusal(block)
    if why:
        report.skipped.append(Skipped(path, why))
        return
    block.__class__ = FastdiffResnetBlock2D
    second = "scale_shift+silu" if block.time_embedding_norm == "scale_shift" else "silu"
    kind = f"norm1+silu, norm2+{second}"
    report.changes.append(ClassSwap(path, kind, block, ResnetBlock2D, FastdiffResnetBlock2D))
    exclude.update((id(block.norm1), id(block.norm2)))


def _patch_attention(report: PatchReport, path: str, attn: nn.Module) -> None:
    if isinstance(attn.processor, FastdiffAttnProcessor):
        report.already_patched.append(path)
        return
    why = attention_refusal(attn)
    if why:
        report.skipped.append(Skipped(path, why))
        return
    original = attn.processor
    replacement = FastdiffAttnProcessor(original)
    attn.set_processor(replacement)
    report.changes.append(ProcessorSwap(path, "flash_attention", attn, original, replacement))


def apply_fastdiff(unet: nn.Module) -> PatchReport:
    """Run ``unet``'s ResnetBlock2D norms, attention and GroupNorms through fastdiff, in place.

    Made for diffusers' ``UNet2DModel``, ``UNet2DConditionModel`` and ``AutoencoderKL`` (its encoder and
    decoder; the VAE's ``conv_norm_out`` + ``conv_act`` fused too); any module is walked the same way.
    Returns the :class:`~fastdiff.patch.PatchReport` (changed paths, skips with reasons); a model with
    nothing left to patch (e.g. patched already) gives an empty report and a ``NothingToPatchWarning``.
    Parameters, buffers and state-dict keys do not change.
    """
    check_module("unet", unet)
    report = PatchReport(REPORT_NAME, unet)
    served_norms: set[int] = set()
    for path, module in list(unet.named_modules()):
        if isinstance(module, ResnetBlock2D):
            _patch_resnet(report, path, module, served_norms)
        elif isinstance(module, ResnetBlockCondNorm2D):
            report.skipped.append(Skipped(path, COND_NORM_REASON))
        elif hasattr(module, "set_processor") and hasattr(module, "processor"):
            _patch_attention(report, path, module)
        elif isinstance(module, (Encoder, Decoder)):
            _patch_post_norm(report, path, module, served_norms)
    rewrite_group_norms(unet, report, (nn.GroupNorm,), served_norms)
    return register(report)


def remove_fastdiff(unet: nn.Module) -> list[PatchReport]:
    """Undo every active ``apply_fastdiff`` on ``unet``, newest first; returns the undone reports.

    Raises ``ValueError`` when ``unet`` has no active ``apply_fastdiff`` patch.
    """
    active = [report for report in patches(unet) if report.name == REPORT_NAME]
    if not active:
        raise ValueError(f"unet ({type(unet).__name__}) has no active apply_fastdiff patch to remove")
    for report in reversed(active):
        report.unpatch()
    return active
