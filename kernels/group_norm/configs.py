"""Compile-time parameters of the GroupNorm kernels: config lists, the tuning of problem cuts, the fixed
rules that pick a config, argument types, and the registration of every kernel with the launch layer."""

from dataclasses import dataclass

import triton

from .. import launch
from ..limits import DTYPES
from . import device

SUPPORTED_DTYPES = DTYPES


# Launch configurations, kept as data: the CUDA autotuner and the compile report walk the same lists.
# Limits found with the compile report (sm_80 and sm_90, every block shape and layout): at 16 warps ptxas
# caps a thread at 64 to 128 registers and large tiles spill, so fused kernels use at most 8 warps with at
# most 32 (forward) or 16 (backward: x and dy) tile elements per thread, and split kernels at most 8.
FUSED_CONFIGS: tuple[launch.Config, ...] = tuple(launch.Config(num_warps=w) for w in (1, 2, 4, 8))
SPLIT_CONFIGS: tuple[launch.Config, ...] = tuple(
    launch.Config(num_warps=warps, tiles={"TILE": tile}) for tile, warps in ((512, 2), (1024, 4), (2048, 8))
)
FUSED_FORWARD_ELEMENTS_PER_THREAD = 32
FUSED_BACKWARD_ELEMENTS_PER_THREAD = 16
SPLIT_ELEMENTS_PER_THREAD = 8
BACKWARD_CHANNELS_PER_WARP = 8
"""A fused backward program takes at least BLOCK_C / 8 warps: Triton 3.6's ptxas spilled the [32 x 32]
channels_last tile at 2 warps on sm_80 (the per-channel vectors of 32 channels over 64 threads), and 4
warps hold it with no spill under 3.6 and 3.9."""
MAX_WARPS = max(c.num_warps for c in FUSED_CONFIGS)
MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis (chunks of a group)


@dataclass(frozen=True)
class GroupNormTuning:
    """How problems are cut into programs (tile sizes count elements after padding each axis to a power of 2).

    A group whose padded tile has at most ``fused_always`` elements is always held by one program; up to
    ``fused_max_forward`` / ``fused_max_backward`` elements only when there are at least
    ``min_fused_programs`` (sample, group) programs to fill the GPU; larger groups are split.
    Split programs cover between ``min_chunk_elements`` and ``chunk_elements`` elements, aiming at
    ``target_programs`` programs in all. ``max_block_c``: widest channel block of the split kernels;
    ``max_block_c_spatial_major``: the same where the spatial axis is the unit stride (contiguous x), so
    that a split launch takes one of few tile shapes whatever the channels per group (long rows along S,
    a chunk spans whole tiles);
    ``block_p``: partials merged per step; ``split_tile``: elements per split tile (None: autotuned on
    CUDA, 2048 elsewhere).
    """

    fused_always: int = 4096
    fused_max_forward: int = FUSED_FORWARD_ELEMENTS_PER_THREAD * 32 * MAX_WARPS
    fused_max_backward: int = FUSED_BACKWARD_ELEMENTS_PER_THREAD * 32 * MAX_WARPS
    min_fused_programs: int = 128
    chunk_elements: int = 8192
    min_chunk_elements: int = 2048
    target_programs: int = 512
    max_block_c: int = 32
    max_block_c_spatial_major: int = 4
    block_p: int = 32
    split_tile: int | None = None

    def __post_init__(self) -> None:
        powers_of_two = ("fused_always", "fused_max_forward", "fused_max_backward", "max_block_c", "block_p")
        for name in (*powers_of_two, "max_block_c_spatial_major"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"GroupNormTuning.{name} must be a power of two, got {value}")
        if self.split_tile is not None and (self.split_tile < 1 or self.split_tile & (self.split_tile - 1)):
            raise ValueError(
                f"GroupNormTuning.split_tile must be a power of two or None, got {self.split_tile}"
            )
        for name in ("min_fused_programs", "chunk_elements", "min_chunk_elements", "target_programs"):
            if getattr(self, name) < 1:
                raise ValueError(f"GroupNormTuning.{name} must be positive, got {getattr(self, name)}")
        if self.fused_max_forward > FUSED_FORWARD_ELEMENTS_PER_THREAD * 32 * MAX_WARPS:
            raise ValueError("GroupNormTuning.fused_max_forward exceeds what 8 warps hold without spilling")
        if self.fused_max_backward > FUSED_BACKWARD_ELEMENTS_PER_THREAD * 32 * MAX_WARPS:
            raise ValueError("GroupNormTuning.fused_max_backward exceeds what 8 warps hold without spilling")
        if self.max_block_c > min(c.meta["TILE"] for c in SPLIT_CONFIGS):
            raise ValueError("GroupNormTuning.max_block_c must not exceed the smallest split tile")


DEFAULT_TUNING = GroupNormTuning()


# ----------------------------------------------------------------------------------------------------
# Launching: registration with the launch layer (configs, fixed rule, argument types)
# ----------------------------------------------------------------------------------------------------

_AFFINE_POINTERS = ("weight_ptr", "bias_ptr", "scale_ptr", "shift_ptr")
_SHAPE_ARGS = ("num_groups", "group_channels", "spatial")
_CHUNK_ARGS = ("chunk_spatial", "num_chunks")
_AFFINE_STRIDES = ("stride_scale_n", "stride_scale_c", "stride_shift_n", "stride_shift_c")


def _strides(*names: str) -> tuple[str, ...]:
    """The [N, C, S] stride arguments of the named activation tensors, e.g. ``stride_xn``."""
    return tuple(f"stride_{name}{axis}" for name in names for axis in "ncs")


def min_fused_warps(block_c: int, backward: bool) -> int:
    """The fewest warps a fused program of ``block_c`` channels takes (``BACKWARD_CHANNELS_PER_WARP``)."""
    return max(1, block_c // BACKWARD_CHANNELS_PER_WARP) if backward else 1


def _budget(elements_per_thread: int, fused: bool, backward: bool):
    """Autotune pruning: a config may hold at most ``elements_per_thread`` tile elements per thread (a
    tile is BLOCK_C * BLOCK_S for a fused pass, TILE for a split one), and a fused one has at least
    ``min_fused_warps`` warps."""

    def fits(problem: launch.Problem, config: launch.Config) -> bool:
        meta = {**problem.constexprs, **config.meta}
        tile = meta["BLOCK_C"] * meta["BLOCK_S"] if fused else meta["TILE"]
        if fused and config.num_warps < min_fused_warps(meta["BLOCK_C"], backward):
            return False
        return tile <= elements_per_thread * 32 * config.num_warps

    return fits


def _fused_rule(elements_per_thread: int, backward: bool):
    """Fixed warps for a fused kernel (one program per (sample, group), the whole group in registers).

    Not measured (no GPU was at hand when it was written): a group of ``tile`` padded elements is spread
    over warps so that each thread holds 8 elements when there are fewer programs than two per SM of an
    H100 (``launch.TARGET_SMS``; latency-bound, so more threads per group help) and 16 when there are
    more (the SMs are full, fewer warps per program keep more programs resident), never above the
    kernel's register budget ``elements_per_thread`` and never above 8 warps. The same rule serves
    sm_80 and sm_90.
    """

    def rule(problem: launch.Problem) -> launch.Config:
        tile = problem.sizes["tile"]
        per_thread = 8 if problem.sizes["programs"] < 2 * launch.TARGET_SMS else 16
        warps = max(
            min_fused_warps(problem.constexprs["BLOCK_C"], backward),
            tile // (32 * per_thread),
            -(-tile // (32 * elements_per_thread)),
        )
        warps = min(MAX_WARPS, triton.next_power_of_2(warps))
        return next(c for c in FUSED_CONFIGS if c.num_warps == warps)

    return rule


def _split_rule(problem: launch.Problem) -> launch.Config:
    """Fixed tile for a split kernel: the largest TILE that does not exceed the chunk's padded elements
    (BLOCK_C x next power of 2 of the chunk's positions), so that few tile elements are masked.

    The split grid (N * G programs times the chunks) already fills the GPU by itself: chunks are cut so
    that there are about ``GroupNormTuning.target_programs`` programs, about four per SM of an H100, so the
    tile only sets how much of the chunk one loop step covers. Not measured (no GPU was at hand).
    """
    chunk = problem.constexprs["BLOCK_C"] * triton.next_power_of_2(problem.sizes["chunk_spatial"])
    fitting = [c for c in SPLIT_CONFIGS if c.meta["TILE"] <= chunk]
    return max(fitting, key=lambda c: c.meta["TILE"]) if fitting else SPLIT_CONFIGS[0]


_FWD_TYPES = launch.arg_types(
    device._gn_fwd_kernel,
    storage=("x_ptr", "y_ptr"),
    fp32_pointers=(
        *_AFFINE_POINTERS,
        "mean_ptr",
        "rstd_ptr",
        "part_count_ptr",
        "part_mean_ptr",
        "part_m2_ptr",
    ),
    i32=(*_SHAPE_ARGS, *_CHUNK_ARGS, *_strides("x", "y"), *_AFFINE_STRIDES),
    fp32=("eps",),
)
_BWD_TYPES = launch.arg_types(
    device._gn_bwd_kernel,
    storage=("dy_ptr", "x_ptr", "dx_ptr"),
    fp32_pointers=(
        *_AFFINE_POINTERS,
        "mean_ptr",
        "rstd_ptr",
        "part_a_ptr",
        "part_b_ptr",
        "sum_a_ptr",
        "sum_b_ptr",
    ),
    i32=(*_SHAPE_ARGS, *_CHUNK_ARGS, *_strides("dy", "x", "dx"), *_AFFINE_STRIDES),
)

# What each pass of the two kernels leaves unread: its launches pin these constexprs to neutral values and
# pass None for these runtime arguments (``pass_args``), which Triton compiles as constexprs, so a pass
# compiles to one binary whatever the variant (the partial passes serve GroupNorm, +SiLU and +scale-shift
# alike) and to the code, parameter list included, it had as a kernel of its own: with the unread
# arguments as parameters, ptxas allocated registers differently (-6 to +5 in 27 fused-forward binaries
# for sm_90, an identical LLVM IR body).
_FLAGS = ("HAS_WEIGHT", "HAS_BIAS", "HAS_SCALE_SHIFT", "SILU")
_NEUTRAL_CONSTEXPRS = {
    **dict.fromkeys(_FLAGS, False),
    "WRITE_DX": False,
    "WRITE_SUMS": False,
    "BLOCK_S": 1,
    "BLOCK_P": 1,
    "TILE": 1,
}
_UNREAD: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {
    # (direction, pass): (constexprs, runtime arguments)
    ("fwd", "fused"): (("BLOCK_P", "TILE"), ("part_count_ptr", "part_mean_ptr", "part_m2_ptr", *_CHUNK_ARGS)),
    ("fwd", "partial"): (
        (*_FLAGS, "BLOCK_S", "BLOCK_P"),
        ("y_ptr", *_AFFINE_POINTERS, "mean_ptr", "rstd_ptr", *_strides("y"), *_AFFINE_STRIDES, "eps"),
    ),
    ("fwd", "apply"): (("BLOCK_S",), ()),
    ("bwd", "fused"): (("BLOCK_P", "TILE"), ("part_a_ptr", "part_b_ptr", *_CHUNK_ARGS)),
    ("bwd", "partial"): (
        ("WRITE_DX", "WRITE_SUMS", "BLOCK_S", "BLOCK_P"),
        ("dx_ptr", "sum_a_ptr", "sum_b_ptr", *_strides("dx")),
    ),
    ("bwd", "apply"): (("BLOCK_S",), ()),
}
_UNREAD_ARGS: dict[launch.Kernel, frozenset[str]] = {}


def _register(name: str, direction: str, pass_: str, elements_per_thread: int) -> launch.Kernel:
    """The launch-layer kernel ``name``: pass ``pass_`` of ``device._gn_<direction>_kernel``."""
    fused = pass_ == "fused"
    fn, types = (
        (device._gn_fwd_kernel, _FWD_TYPES) if direction == "fwd" else (device._gn_bwd_kernel, _BWD_TYPES)
    )
    unread_constexprs, unread = _UNREAD[(direction, pass_)]
    kernel = launch.register(
        name,
        family="group_norm",
        fn=fn,
        configs=FUSED_CONFIGS if fused else SPLIT_CONFIGS,
        rule=_fused_rule(elements_per_thread, direction == "bwd") if fused else _split_rule,
        arg_types=types,
        fits=_budget(elements_per_thread, fused, direction == "bwd"),
        constexprs={"PASS": pass_, **{k: _NEUTRAL_CONSTEXPRS[k] for k in unread_constexprs}},
    )
    _UNREAD_ARGS[kernel] = frozenset(unread)
    return kernel


def unread_args(kernel: launch.Kernel) -> frozenset[str]:
    """Runtime arguments of GroupNorm ``kernel`` that its pass does not read."""
    return _UNREAD_ARGS[kernel]


def pass_args(kernel: launch.Kernel, **named: object) -> tuple:
    """``kernel``'s positional runtime arguments from ``named`` (argument name -> value); the ones its pass
    does not read may be left out and are ``None``, which Triton's JIT compiles as a constexpr: they are not
    parameters of the binary, whose parameter list is then the one the pass had as a kernel of its own."""
    unread = _UNREAD_ARGS[kernel]
    return tuple(None if name in unread else named[name] for name in kernel.arg_types)


FWD_FUSED = _register("gn_fwd_fused", "fwd", "fused", FUSED_FORWARD_ELEMENTS_PER_THREAD)
FWD_PARTIAL_STATS = _register("gn_fwd_partial_stats", "fwd", "partial", SPLIT_ELEMENTS_PER_THREAD)
FWD_SPLIT_APPLY = _register("gn_fwd_split_apply", "fwd", "apply", SPLIT_ELEMENTS_PER_THREAD)
BWD_FUSED = _register("gn_bwd_fused", "bwd", "fused", FUSED_BACKWARD_ELEMENTS_PER_THREAD)
BWD_PARTIAL_SUMS = _register("gn_bwd_partial_sums", "bwd", "partial", SPLIT_ELEMENTS_PER_THREAD)
BWD_SPLIT_APPLY = _register("gn_bwd_split_apply", "bwd", "apply", SPLIT_ELEMENTS_PER_THREAD)
KERNELS = (FWD_FUSED, FWD_PARTIAL_STATS, FWD_SPLIT_APPLY, BWD_FUSED, BWD_PARTIAL_SUMS, BWD_SPLIT_APPLY)
ELEMENTS_PER_THREAD = {
    FWD_FUSED: FUSED_FORWARD_ELEMENTS_PER_THREAD,
    BWD_FUSED: FUSED_BACKWARD_ELEMENTS_PER_THREAD,
    **{
        k: SPLIT_ELEMENTS_PER_THREAD
        for k in (FWD_PARTIAL_STATS, FWD_SPLIT_APPLY, BWD_PARTIAL_SUMS, BWD_SPLIT_APPLY)
    },
}
