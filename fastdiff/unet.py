"""improved-diffusion's UNet, with guided-diffusion's options, on fastdiff's fused ops.

Module names, Sequential indices and parameter shapes are exactly the reference's, so improved-diffusion
(and guided-diffusion) checkpoints load with ``strict=True`` and give the same outputs. What differs is
inside: every GroupNorm(+SiLU)(+scale-shift) is one fused :mod:`fastdiff.ops` call, attention is
:func:`fastdiff.ops.qkv_attention` (the flash kernels never store the T x T matrix; ``auto`` stores it
on CPUs where PyTorch's matmuls are faster, see ``fastdiff.ops.cpu_policy``), gradient checkpointing is
``torch.utils.checkpoint`` (RNG state restored on recompute), and precision is left to ``torch.amp``.

Where the reference's ``nn.Sequential`` held ``GroupNorm32, SiLU`` the fused module sits at the norm's
index and an ``nn.Identity`` at the SiLU's, so the keys (``in_layers.0``, ``out_layers.3``, ``out.2``, ...)
and the meaning of calling the Sequential are unchanged.
"""

from abc import abstractmethod
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastdiff.nn import (
    GroupNorm32,
    GroupNorm32SiLU,
    QKVAttention,
    ScaleShiftGroupNormSiLU,
    avg_pool_nd,
    conv_nd,
    timestep_embedding,
    zero_module,
)

Tensor = torch.Tensor

NUM_GROUPS = 32
"""GroupNorm groups everywhere in the UNet (the reference's ``normalization``)."""


def _checkpointing(module: nn.Module, enabled: bool) -> bool:
    """Recompute activations in backward only when asked, training, and building a graph."""
    return enabled and module.training and torch.is_grad_enabled()


class TimestepBlock(nn.Module):
    """A module whose ``forward(x, emb)`` also takes the timestep embedding ``emb [N, E]``."""

    @abstractmethod
    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x [N, C, *spatial]`` conditioned on ``emb [N, E]``."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """``nn.Sequential`` that hands ``emb`` to the children that are :class:`TimestepBlock`."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution if ``use_conv``.

    ``[N, channels, *S] -> [N, out_channels, *2S]``; for ``dims=3`` only the inner two dims double.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError(f"out_channels must equal channels ({channels}) without use_conv")

    def forward(self, x: Tensor) -> Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution (``use_conv``) or average pooling.

    ``[N, channels, *S] -> [N, out_channels, *S/2]``; for ``dims=3`` only the inner two dims halve.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        elif self.out_channels != channels:
            raise ValueError(f"out_channels must equal channels ({channels}) without use_conv")
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally changing channels or resolution.

    ``forward(x [N, channels, *S], emb [N, emb_channels]) -> [N, out_channels, *S']`` where ``S'`` is
    ``S`` (default), ``2S`` (``up``) or ``S/2`` (``down``). With ``use_scale_shift_norm`` the embedding
    gives ``scale, shift`` and the output norm is ``silu(gn(h) * (1 + scale) + shift)``; otherwise it is
    added to ``h`` before ``silu(gn(h))``. The skip path is identity, a 1x1 convolution, or a 3x3 one
    (``use_conv``) when the channel count changes.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        out = self.out_channels

        self.in_layers = nn.Sequential(
            GroupNorm32SiLU(NUM_GROUPS, channels),
            nn.Identity(),  # the reference's SiLU, fused into the norm
            conv_nd(dims, channels, out, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out if use_scale_shift_norm else out),
        )
        out_norm = ScaleShiftGroupNormSiLU if use_scale_shift_norm else GroupNorm32SiLU
        self.out_layers = nn.Sequential(
            out_norm(NUM_GROUPS, out),
            nn.Identity(),  # the reference's SiLU, fused into the norm
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, out, out, 3, padding=1)),
        )
        if out == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, out, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if _checkpointing(self, self.use_checkpoint):
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers[0](x)
        if self.updown:
            h = self.h_upd(h)
            x = self.x_upd(x)
        h = self.in_layers[2](h)
        emb_out = self.emb_layers(emb).to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h, scale, shift)
        else:
            h = self.out_layers[0](h + emb_out.reshape(emb_out.shape + (1,) * (h.dim() - 2)))
        h = self.out_layers[3](self.out_layers[2](h))
        return self.skip_connection(x) + h


def attention_heads(
    channels: int, num_heads: int, num_head_channels: int, heads_name: str = "num_heads"
) -> int:
    """Heads of an attention layer over ``channels``: ``num_heads``, or ``channels // num_head_channels``
    when ``num_head_channels`` is not -1. Raises ValueError when the heads do not divide ``channels``;
    ``heads_name`` is the argument the error names for ``num_heads``."""
    if num_head_channels != -1:
        if (
            isinstance(num_head_channels, bool)
            or not isinstance(num_head_channels, int)
            or num_head_channels < 1
        ):
            raise ValueError(f"num_head_channels must be -1 or a positive int, got {num_head_channels!r}")
        if channels % num_head_channels:
            raise ValueError(
                f"num_head_channels={num_head_channels} must divide the attention channels ({channels})"
            )
        return channels // num_head_channels
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{heads_name} must be a positive int, got {num_heads!r}")
    if channels % num_heads:
        raise ValueError(f"{heads_name}={num_heads} must divide the attention channels ({channels})")
    return num_heads


class AttentionBlock(nn.Module):
    """Residual self-attention over all positions: ``[N, C, *spatial] -> [N, C, *spatial]``.

    ``x + proj_out(attention(qkv(norm(x))))`` with ``T = prod(spatial)`` positions; heads as in
    :func:`attention_heads`; ``use_new_attention_order`` picks guided-diffusion's ``[3, H, D]`` channel
    split instead of improved-diffusion's ``[H, 3, D]``. ``heads_name`` only names ``num_heads`` in errors.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
        heads_name: str = "num_heads",
    ) -> None:
        super().__init__()
        self.channels = channels
        self.num_heads = attention_heads(channels, num_heads, num_head_channels, heads_name)
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(NUM_GROUPS, channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads, "split" if use_new_attention_order else "legacy")
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        if _checkpointing(self, self.use_checkpoint):
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        qkv = self.qkv(self.norm(x).reshape(b, c, -1))
        h = self.proj_out(self.attention(qkv))
        return x + h.reshape(x.shape)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _image_sides(image_size: int | Sequence[int]) -> tuple[int, ...]:
    """The sides an ``image_size`` names: ``(s,)`` for an int, ``(height, width)`` for a pair."""
    if isinstance(image_size, Sequence) and not isinstance(image_size, str) and len(image_size) == 2:
        return tuple(_check_int("image_size (height, width)", side, 1) for side in image_size)
    if isinstance(image_size, Sequence) and not isinstance(image_size, str):
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    return (_check_int("image_size", image_size, 1),)


class UNetModel(nn.Module):
    """The UNet of improved-diffusion with guided-diffusion's options: ``(x, timesteps, y) -> out``.

    ``forward(x [N, in_channels, *spatial], timesteps [N], y [N] | None) -> [N, out_channels, *spatial]``
    in ``x``'s dtype. ``spatial`` has ``dims`` entries, and every downsampled one (all of them, or the
    inner two for ``dims=3``) must be divisible by ``2 ** (len(channel_mult) - 1)``.

    :param image_size: the training resolution (a side, or ``(height, width)``), or None. Only used to
        check ``attention_resolutions`` and ``channel_mult`` against it at construction (every side
        divisible by the total downsampling and by each attention factor); inputs of other sizes are
        accepted.
    :param in_channels: channels of ``x``.
    :param model_channels: base width; level ``i`` has ``int(channel_mult[i] * model_channels)``
        channels, each divisible by 32 (the GroupNorm groups).
    :param out_channels: channels of the output (2x the image channels to learn the variance).
    :param num_res_blocks: ResBlocks per level on the way down (one more on the way up).
    :param attention_resolutions: downsample factors (1, 2, 4, ...) at which an AttentionBlock follows
        each ResBlock; every one must be a factor this model reaches (``2 ** level``).
    :param dropout: dropout probability inside the ResBlocks.
    :param channel_mult: width multiplier per level; ``len(channel_mult)`` levels.
    :param conv_resample: learned 3x3 convolutions for up/downsampling (else nearest / average pool).
    :param dims: 1, 2 or 3 spatial dims (for 3, only the inner two are resampled).
    :param num_classes: class-conditional with this many classes (``y`` required), or None.
    :param use_checkpoint: recompute ResBlock and AttentionBlock activations in backward
        (``torch.utils.checkpoint``, non-reentrant; dropout masks are reproduced) while training.
    :param num_heads: attention heads (ignored when ``num_head_channels`` is set).
    :param num_head_channels: channels per head, or -1 to use ``num_heads``.
    :param num_heads_upsample: heads on the way up, or -1 for ``num_heads`` (deprecated upstream).
    :param use_scale_shift_norm: FiLM-like ``gn(h) * (1 + scale) + shift`` conditioning in ResBlocks.
    :param resblock_updown: ResBlocks with ``up``/``down`` resample instead of Upsample/Downsample.
    :param use_new_attention_order: split q, k, v before heads (guided-diffusion's ``QKVAttention``).
    :param null_class: one more label-embedding row, the label ``num_classes`` (``null_label``): "no
        class", for classifier-free guidance. False keeps improved-diffusion's state dict.

    The argument order is guided-diffusion's (``image_size`` first). improved-diffusion's constructor
    has no ``image_size``; its keyword calls work unchanged once ``image_size`` (or None) is added.

    Precision: there is no ``use_fp16`` / ``convert_to_fp16`` / ``convert_to_fp32``; run the model under
    ``torch.autocast`` instead (GroupNorm statistics and softmax stay in float32 inside the fused ops).
    A model cast as a whole (``model.to(torch.bfloat16)``) also works; the input is cast to the
    parameters' dtype and the output back to the input's.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] | None,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        null_class: bool = False,
    ) -> None:
        super().__init__()
        if null_class and num_classes is None:
            raise ValueError("null_class=True needs a class-conditional model (num_classes set)")
        if not isinstance(attention_resolutions, str):
            attention_resolutions = tuple(attention_resolutions)
        self._check_arguments(
            image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
            dropout, channel_mult, dims, num_classes,
        )  # fmt: skip
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.dims = dims
        self.num_classes = num_classes
        self.null_label = num_classes if null_class else None
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        attention_ds = set(attention_resolutions)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + (1 if null_class else 0), time_embed_dim)

        def res_block(
            channels: int, out: int | None = None, up: bool = False, down: bool = False
        ) -> ResBlock:
            return ResBlock(
                channels, time_embed_dim, dropout, out_channels=out, dims=dims, use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm, up=up, down=down,
            )  # fmt: skip

        def attention(channels: int, upsample: bool = False) -> AttentionBlock:
            return AttentionBlock(
                channels, num_heads=num_heads_upsample if upsample else num_heads,
                num_head_channels=num_head_channels, use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
                heads_name="num_heads_upsample" if upsample else "num_heads",
            )  # fmt: skip

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))]
        )
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch), attention(ch), res_block(ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_ds:
                    layers.append(attention(ch, upsample=True))
                if level and i == num_res_blocks:
                    up = res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32SiLU(NUM_GROUPS, ch),
            nn.Identity(),  # the reference's SiLU, fused into the norm
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    @staticmethod
    def _check_arguments(
        image_size: int | tuple[int, int] | None,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float,
        channel_mult: Sequence[float],
        dims: int,
        num_classes: int | None,
    ) -> None:
        _check_int("in_channels", in_channels, 1)
        _check_int("model_channels", model_channels, 1)
        _check_int("out_channels", out_channels, 1)
        _check_int("num_res_blocks", num_res_blocks, 0)
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if num_classes is not None:
            _check_int("num_classes", num_classes, 1)
        if isinstance(channel_mult, str) or len(channel_mult) == 0:
            raise ValueError(f"channel_mult must be a non-empty sequence of numbers, got {channel_mult!r}")
        for i, mult in enumerate(channel_mult):
            width = int(mult * model_channels)
            if width < 1 or width % NUM_GROUPS:
                raise ValueError(
                    f"model_channels * channel_mult[{i}] = {model_channels} * {mult} -> {width} channels; "
                    f"expected a positive multiple of {NUM_GROUPS} (the GroupNorm groups)"
                )
        factors = [2**level for level in range(len(channel_mult))]
        sides = _image_sides(image_size) if image_size is not None else ()
        if isinstance(attention_resolutions, str):
            raise ValueError(
                "attention_resolutions must be downsample factors (ints such as (2, 4)), got a string; "
                "script_util.create_model converts resolution strings like '16,8'"
            )
        for ds in attention_resolutions:
            if isinstance(ds, bool) or not isinstance(ds, int) or ds < 1:
                raise ValueError(
                    f"attention_resolutions must hold positive int downsample factors, got {ds!r}"
                )
            if any(side % ds for side in sides):
                raise ValueError(
                    f"attention_resolutions entry {ds} (a downsample factor) must divide "
                    f"image_size={image_size}" + (" on both sides" if len(sides) == 2 else "")
                )
            if ds not in factors:
                raise ValueError(
                    f"attention_resolutions entry {ds} is not a downsample factor of this model; with "
                    f"len(channel_mult)={len(channel_mult)} levels the factors are {factors}"
                )
        bad = [side for side in sides if side % factors[-1]]
        if bad:
            raise ValueError(
                f"image_size={image_size} must be divisible by 2 ** (len(channel_mult) - 1) = {factors[-1]}, "
                f"the total downsampling, on every side (--image_size): {bad[0]} is not"
            )

    @property
    def inner_dtype(self) -> torch.dtype:
        """The dtype of the model's torso parameters."""
        return self.input_blocks[0][0].weight.dtype

    def _check_inputs(self, x: Tensor, timesteps: Tensor, y: Tensor | None) -> None:
        if not isinstance(x, Tensor) or x.dim() != self.dims + 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"x must be [N, C, *spatial] with {self.dims} spatial dims (dims={self.dims}), got {shape}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have in_channels={self.in_channels} channels, got shape {tuple(x.shape)}"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        resampled = x.shape[3:] if self.dims == 3 else x.shape[2:]
        if any(size % factor for size in resampled):
            raise ValueError(
                f"x's spatial size {tuple(x.shape[2:])} must be divisible by 2 ** (len(channel_mult) - 1) = "
                f"{factor}" + (" in its last two dims (dims=3)" if self.dims == 3 else "")
            )
        if not isinstance(timesteps, Tensor) or timesteps.shape != (x.shape[0],):
            shape = tuple(timesteps.shape) if isinstance(timesteps, Tensor) else type(timesteps).__name__
            raise ValueError(f"timesteps must be a 1-D tensor [N] with N={x.shape[0]}, got {shape}")
        if self.num_classes is None:
            if y is not None:
                raise ValueError("y must be None: this model is unconditional (num_classes=None)")
        elif y is None:
            raise ValueError(
                f"y (class labels [N]) is required: this model has num_classes={self.num_classes}"
            )
        elif not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"y must be an integer tensor [N] with N={x.shape[0]}, got {shape}")

    def _embedding(self, timesteps: Tensor, y: Tensor | None) -> Tensor:
        """Timestep (+ class) embedding ``[N, 4 * model_channels]``."""
        sinusoid = timestep_embedding(timesteps, self.model_channels)
        emb = self.time_embed(sinusoid.to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        """``x [N, in_channels, *spatial]``, ``timesteps [N]`` (may be fractional), ``y [N]`` labels
        if class-conditional -> ``[N, out_channels, *spatial]`` in x's dtype."""
        self._check_inputs(x, timesteps, y)
        emb = self._embedding(timesteps, y)
        skips = []
        h = x.to(self.inner_dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)

    def get_feature_vectors(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> dict:
        """Every block's output, in x's dtype: ``{"down": [...], "middle": tensor, "up": [...]}``."""
        self._check_inputs(x, timesteps, y)
        emb = self._embedding(timesteps, y)
        result: dict = {"down": [], "up": []}
        skips = []
        h = x.to(self.inner_dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
            result["down"].append(h.to(x.dtype))
        h = self.middle_block(h, emb)
        result["middle"] = h.to(x.dtype)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
            result["up"].append(h.to(x.dtype))
        return result


class SuperResModel(UNetModel):
    """A 2-D UNet conditioned on a low-resolution image, upsampled bilinearly and stacked onto ``x``.

    Takes the UNetModel's arguments with ``in_channels`` the image channels (the network sees twice as
    many). ``forward(x [N, C, H, W], timesteps [N], low_res [N, C, h, w], y=None) -> [N, out, H, W]``.
    """

    def __init__(self, image_size: int | None, in_channels: int, *args, **kwargs) -> None:
        _check_int("in_channels", in_channels, 1)
        super().__init__(image_size, in_channels * 2, *args, **kwargs)
        if self.dims != 2:
            raise ValueError(f"SuperResModel needs dims=2, got {self.dims}")

    def _stack_low_res(self, x: Tensor, low_res: Tensor | None) -> Tensor:
        image_channels = self.in_channels // 2
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != image_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [N, {image_channels}, H, W], got {shape}")
        if not isinstance(low_res, Tensor) or low_res.dim() != 4 or low_res.shape[:2] != x.shape[:2]:
            shape = tuple(low_res.shape) if isinstance(low_res, Tensor) else type(low_res).__name__
            raise ValueError(f"low_res must be [N, {image_channels}, h, w] with N={x.shape[0]}, got {shape}")
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return torch.cat([x, upsampled.to(x.dtype)], dim=1)

    def forward(  # type: ignore[override]
        self, x: Tensor, timesteps: Tensor, low_res: Tensor | None = None, y: Tensor | None = None
    ) -> Tensor:
        return super().forward(self._stack_low_res(x, low_res), timesteps, y=y)

    def get_feature_vectors(  # type: ignore[override]
        self, x: Tensor, timesteps: Tensor, low_res: Tensor | None = None, y: Tensor | None = None
    ) -> dict:
        return super().get_feature_vectors(self._stack_low_res(x, low_res), timesteps, y=y)
