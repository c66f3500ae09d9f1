"""Compile-time parameters of flash attention: config lists per precision class and head-dim bucket, the
fixed rule that picks a config, argument types, and the registration of every kernel with the launch layer.
"""

import torch
import triton

from .. import launch
from ..limits import MAX_HEAD_DIM
from . import device


def _C(block_m: int, block_n: int, num_warps: int, num_stages: int) -> launch.Config:
    """A tile config: ``block_m`` queries and ``block_n`` keys per tile, warps, pipeline stages."""
    return launch.Config(num_warps, num_stages, {"BLOCK_M": block_m, "BLOCK_N": block_n})


def _tag(config: launch.Config) -> str:
    """Short name of a config, e.g. ``m64n32w8s3``."""
    meta = config.meta
    blocks = "".join(
        f"{axis}{meta[key]}" for axis, key in (("m", "BLOCK_M"), ("n", "BLOCK_N")) if key in meta
    )
    return f"{blocks}w{config.num_warps}s{config.num_stages}"


# Keys: ("half" for fp16/bf16 | "fp32", head-dim bucket = BLOCK_D). Each list is ordered by expected
# speed at the UNet's sizes; the fixed rule (``_rule``) takes the first that fills the GPU. Every entry
# compiles for sm_80 and
# sm_90 without register spills, both when no stride is divisible by 16 (T = 36, say), where each
# lane keeps its own 64-bit address, and when every pointer and stride is (vector loads; the compile
# report builds both). fp32 dots run in IEEE fp32 on the CUDA cores (TF32 would cost about three
# decimal digits) and hold both operands in registers, so their tiles are smaller. Head dims above 128
# share the 256 bucket: its tiles keep BLOCK x 256 fp32 accumulators in registers, so they are short
# (16 or 32 along T, 8 warps); in the checked candidates every 64-long half tile and most 4-warp
# tiles spilled, as did several 8-warp ones in some variant.
# Left out because Triton 3.6 (what the GPU machines in reach carry; none spills under 3.9) spilled 8-40 B
# with them: half d16/d32 m128n64w8s3 (bthd, aligned, sm_80: m64n64w4s3 now leads, the same 16 query rows
# per warp and twice the K/V tile reloads, twice the programs), half d256 m32n32w8s2 (qkv, aligned, sm_80:
# m32n16w8s2 serves, half the keys per step, 128 registers either way), fp32 d128 m32n16w8s2 (m16n16w4s2).
# fp32 d256 m32n16w8s2 spilled 48 B under 3.6 (bthd, sm_80); of 23 tiles tried in its place only
# m16n32w8s1 and m16n16w4s1 spill in no variant under either Triton. m16n32w8s1 serves: 8 warps as before,
# half the queries per program (twice the programs, twice the K/V reloads), twice the keys per step (half
# the steps), one stage (the next K/V tile is not prefetched), 51-52 KB of shared memory instead of 68.
# fp32 d64 dQ m32n32w8s2 spilled 4-16 B (sm_80 under both Tritons, sm_90 under 3.6) in a launch whose
# strides are divisible by 16 in some tensors and not others (flash_attention with K and V of other
# layouts than Q), which neither report variant builds; fastdiff.selftest.precompile compiles the
# selftest's real launches and found it. m32n16w8s2 replaces it (the same 32 query rows and 8 warps,
# half the keys per step): no spill in either report variant or in those launches. (m32n64w8s2 was
# clean too, but a dQ list keeps one BLOCK_N, the block its loop accumulates over, for determinism.)
FORWARD_CONFIGS: dict[tuple[str, int], tuple[launch.Config, ...]] = {
    ("half", 16): (_C(64, 64, 4, 3), _C(128, 32, 4, 3), _C(128, 128, 8, 3)),
    ("half", 32): (_C(64, 64, 4, 3), _C(128, 32, 8, 3), _C(128, 128, 8, 3)),
    ("half", 64): (_C(64, 64, 8, 3), _C(128, 64, 8, 3), _C(128, 32, 8, 3), _C(64, 32, 4, 3)),
    ("half", 128): (_C(64, 32, 8, 3), _C(128, 32, 8, 3), _C(128, 16, 8, 3)),
    ("half", 256): (_C(32, 16, 8, 2),),
    ("fp32", 16): (_C(64, 32, 8, 2), _C(32, 32, 4, 2), _C(64, 16, 8, 2)),
    ("fp32", 32): (_C(32, 32, 4, 2), _C(32, 32, 8, 2), _C(64, 32, 4, 1)),
    ("fp32", 64): (_C(32, 32, 8, 2), _C(32, 16, 8, 2)),
    ("fp32", 128): (_C(16, 16, 4, 2),),
    ("fp32", 256): (_C(16, 32, 8, 1),),
}
# dK/dV: a program owns block_n keys and steps over queries block_m at a time; block_m is the same
# across each list, so whichever config runs, the order of the sums is the same. Under Triton 3.6 (what
# the GPU machines in reach carry) m32n64w8 spilled 8 B at head dim 128 on sm_90, m32n64w8s2 /
# m32n128w8s3 12 B at head dim 64 on sm_80 (255 registers, no spill under 3.9) and fp32 d16 m32n32w8s2
# 8 B (qkv, sm_90; m32n32w4s1 serves): those are left out.
DKDV_CONFIGS: dict[tuple[str, int], tuple[launch.Config, ...]] = {
    ("half", 16): (_C(64, 64, 4, 2), _C(64, 128, 8, 2), _C(64, 64, 4, 3)),
    ("half", 32): (_C(32, 64, 4, 2), _C(32, 128, 8, 2), _C(32, 64, 8, 2), _C(32, 128, 8, 3)),
    ("half", 64): (_C(32, 64, 4, 2), _C(32, 128, 8, 2)),
    ("half", 128): (_C(32, 32, 8, 2),),
    ("half", 256): (_C(16, 16, 8, 2), _C(16, 16, 8, 3)),
    ("fp32", 16): (_C(32, 32, 4, 1),),
    ("fp32", 32): (_C(32, 32, 8, 2),),
    ("fp32", 64): (_C(16, 32, 4, 2),),
    ("fp32", 128): (_C(16, 16, 8, 2), _C(16, 16, 4, 1)),
    ("fp32", 256): (_C(16, 16, 8, 1),),
}
# dQ: a program owns block_m queries and steps over keys block_n at a time (block_n fixed per list).
# Left out for Triton 3.6's spills (8-32 B): fp32 d64 m32n32w4s2 (qkv, sm_90) and fp32 d128 m32n32w8s2
# (aligned; m16n32w8s2 serves, half the queries per program, the same keys per step).
DQ_CONFIGS: dict[tuple[str, int], tuple[launch.Config, ...]] = {
    ("half", 16): (_C(64, 64, 4, 2), _C(128, 64, 8, 2), _C(64, 64, 8, 2)),
    ("half", 32): (_C(64, 64, 4, 2), _C(128, 64, 8, 3), _C(64, 64, 8, 3)),
    ("half", 64): (_C(64, 32, 4, 2), _C(128, 32, 8, 2), _C(64, 32, 4, 3)),
    ("half", 128): (_C(32, 32, 8, 2), _C(32, 32, 8, 3), _C(16, 32, 8, 2)),
    ("half", 256): (_C(16, 16, 8, 2), _C(16, 16, 8, 3)),
    ("fp32", 16): (_C(32, 32, 4, 2), _C(64, 32, 8, 2), _C(32, 32, 8, 2)),
    ("fp32", 32): (_C(32, 32, 4, 2), _C(32, 32, 8, 2)),
    ("fp32", 64): (_C(32, 16, 8, 2),),
    ("fp32", 128): (_C(16, 32, 8, 2),),
    ("fp32", 256): (_C(32, 16, 8, 2),),
}
# delta = rowsum(dO * O): rows per program, one config per head-dim bucket.
DELTA_CONFIGS: dict[int, tuple[launch.Config, ...]] = {
    bucket: (launch.Config(4, 1, {"BLOCK_M": rows}),)
    for bucket, rows in {16: 64, 32: 64, 64: 32, 128: 16, 256: 8}.items()
}
HEAD_DIM_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256)
PRECISIONS: tuple[str, ...] = ("half", "fp32")


def head_dim_bucket(head_dim: int) -> int:
    """BLOCK_D for a head dim in [1, ``MAX_HEAD_DIM``] (the op boundary checks it): the next power of two,
    at least 16 (the smallest dot)."""
    assert 1 <= head_dim <= MAX_HEAD_DIM, f"head dim {head_dim} is outside [1, {MAX_HEAD_DIM}]"
    return max(16, triton.next_power_of_2(head_dim))


def _precision_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


# --------------------------------------------------------------------------------------------------
# Registration with the launch layer
# --------------------------------------------------------------------------------------------------


def _strides(*names: str) -> tuple[str, ...]:
    """The [B, H, T, D] stride arguments of the named tensors, e.g. ``stride_qb``."""
    return tuple(f"stride_{name}{axis}" for name in names for axis in "bhtd")


_SCALARS = ("qk_scale_log2", "scale")
_ARG_TYPES = {
    "fwd": launch.arg_types(
        device._attn_fwd_kernel,
        storage=("Q", "K", "V", "O"),
        fp32_pointers=("LSE",),
        i32=(*_strides("q", "k", "v", "o"), "H", "T_Q", "T_K", "HEAD_DIM"),
        fp32=("qk_scale_log2",),
    ),
    "bwd_delta": launch.arg_types(
        device._attn_bwd_delta_kernel,
        storage=("O", "DO"),
        fp32_pointers=("DELTA",),
        i32=(*_strides("o", "do"), "H", "T", "HEAD_DIM"),
    ),
    "bwd_dkdv": launch.arg_types(
        device._attn_bwd_dkdv_kernel,
        storage=("Q", "K", "V", "DO", "DK", "DV"),
        fp32_pointers=("LSE", "DELTA"),
        i32=(*_strides("q", "k", "v", "do", "dk", "dv"), "H", "T_Q", "T_K", "HEAD_DIM"),
        fp32=_SCALARS,
    ),
    "bwd_dq": launch.arg_types(
        device._attn_bwd_dq_kernel,
        storage=("Q", "K", "V", "DO", "DQ"),
        fp32_pointers=("LSE", "DELTA"),
        i32=(*_strides("q", "k", "v", "do", "dq"), "H", "T_Q", "T_K", "HEAD_DIM"),
        fp32=_SCALARS,
    ),
}
_FUNCTIONS = {
    "fwd": device._attn_fwd_kernel,
    "bwd_delta": device._attn_bwd_delta_kernel,
    "bwd_dkdv": device._attn_bwd_dkdv_kernel,
    "bwd_dq": device._attn_bwd_dq_kernel,
}
# The tile a program owns (the grid axis); the other block is the loop step.
_OWNED_BLOCK = {"fwd": "BLOCK_M", "bwd_delta": "BLOCK_M", "bwd_dkdv": "BLOCK_N", "bwd_dq": "BLOCK_M"}


def _rule(owned: str, configs: tuple[launch.Config, ...]):
    """The fixed config choice of one list (no stopwatch; not measured, no GPU was at hand): the first
    config of the list (ordered by the expected speed at the UNet's sizes) whose grid has at least
    ``launch.TARGET_SMS`` programs; when none has, the one with the most programs (the smallest owned
    block, the earlier on ties), so small problems still spread over the SMs. It reads ``rows`` (B * H)
    and ``owned_length`` (Tq or Tk, the axis the grid walks), the same on every GPU, so the pick, and
    with it every bit, is too."""

    def rule(problem: launch.Problem) -> launch.Config:
        rows, length = problem.sizes["rows"], problem.sizes["owned_length"]
        programs = [rows * triton.cdiv(length, c.meta[owned]) for c in configs]
        for config, count in zip(configs, programs, strict=True):
            if count >= launch.TARGET_SMS:
                return config
        return configs[max(range(len(configs)), key=lambda i: (programs[i], -i))]

    return rule


def _register(kind: str, precision: str, bucket: int, configs: tuple[launch.Config, ...]) -> launch.Kernel:
    return launch.register(
        kernel_name(kind, precision, bucket),
        family="attention",
        fn=_FUNCTIONS[kind],
        configs=configs,
        rule=_rule(_OWNED_BLOCK[kind], configs),
        arg_types=_ARG_TYPES[kind],
    )


def kernel_name(kind: str, precision: str, bucket: int) -> str:
    """The launch-layer name of one attention kernel list, e.g. ``attention_fwd[half,d64]``
    (``kind``: fwd, bwd_delta, bwd_dkdv, bwd_dq; the delta kernel has no precision class)."""
    if kind == "bwd_delta":
        return f"attention_bwd_delta[d{bucket}]"
    return f"attention_{kind}[{precision},d{bucket}]"


_TABLES = {"fwd": FORWARD_CONFIGS, "bwd_dkdv": DKDV_CONFIGS, "bwd_dq": DQ_CONFIGS}
KERNELS: dict[tuple[str, str, int], launch.Kernel] = {}
for _bucket in HEAD_DIM_BUCKETS:
    for _kind, _table in _TABLES.items():
        for _precision in PRECISIONS:
            KERNELS[(_kind, _precision, _bucket)] = _register(
                _kind, _precision, _bucket, _table[(_precision, _bucket)]
            )
    KERNELS[("bwd_delta", "", _bucket)] = _register("bwd_delta", "", _bucket, DELTA_CONFIGS[_bucket])
