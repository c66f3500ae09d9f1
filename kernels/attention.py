"""Flash attention in Triton: forward and backward over tensors of any strides.

``q`` is ``[B, H, Tq, D]``, ``k, v`` are ``[B, H, Tk, D]`` (Tk >= 1, Tq and Tk independent: self- and
cross-attention), ``out`` is shaped like q; all may be views. The UNet passes views of its
``qkv: [B, 3*H*D, T]`` activation, where T is the contiguous axis. Every tile is therefore loaded as
``[BLOCK_D, BLOCK_T]`` (consecutive lanes walk T) and transposed in registers where a dot wants
``[BLOCK_T, BLOCK_D]``; a K tile loaded that way is already K^T. When D is the unit stride instead (plain
``[B, H, T, D]`` tensors) Triton's specialisation of unit strides lets its coalescing pass order the lanes
along D. Head dims up to ``MAX_HEAD_DIM`` = 256 are padded to the next power of two (the bucket).

Forward: online softmax in base 2 with fp32 accumulators; one fp32 natural-log logsumexp per row is
saved for the backward. Backward: ``delta = rowsum(dO * O)``, then one kernel per key block for
dK/dV (loop over queries) and one per query block for dQ (loop over keys): no atomics, so gradients
are bitwise reproducible. fp32 inputs run every dot in IEEE fp32 (``input_precision="ieee"``, FMAs on
the CUDA cores): TF32 would lose about three decimal digits, which fp32 attention is asked not to.

Launches go through ``fastdiff.kernels.launch``: each kernel is registered once per precision ("half"
for fp16/bf16, "fp32") and head-dim bucket, e.g. ``attention_fwd[half,d64]``, with its config list
(``FORWARD_CONFIGS``, ``DKDV_CONFIGS``, ``DQ_CONFIGS``, ``DELTA_CONFIGS``) and a fixed rule
(``_rule``); autotuning, when asked for, keys on the kernel name, every constexpr and the layout. In
the backward lists only the block owned by a program and the warps/stages vary; the block the loop
steps over is fixed per list, so the summation order, and with it every bit of the gradients, does not
depend on which config runs.
"""

import math

import torch
import triton
import triton.language as tl
from fastdiff.kernels import launch
from fastdiff.kernels.compile_spec import CompileSpec

from fastdiff.ops.backend import MAX_TRITON_HEAD_DIM as MAX_HEAD_DIM
from fastdiff.ops.validate import check_attention_shapes

# Module constants read inside the kernels must be tl.constexpr.
_LOG2E = tl.constexpr(math.log2(math.e))
_LN2 = tl.constexpr(math.log(2.0))

_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    H,
    T_Q,
    T_K,
    HEAD_DIM,
    qk_scale_log2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head) over all T_K keys (T_K >= 1).

    Writes an O [D, BLOCK_M] tile and LSE[b, h, t] (fp32, natural log).
    """
    num_blocks = tl.cdiv(T_Q, BLOCK_M)
    start_m = (tl.program_id(0) % num_blocks) * BLOCK_M
    bh = tl.program_id(0) // num_blocks  # b * H + h
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    LSE += bh.to(tl.int64) * T_Q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T_Q
    d_ok = offs_d < HEAD_DIM

    q_t = tl.load(
        Q + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qt,
        mask=d_ok[:, None] & m_ok[None, :],
        other=0.0,
    )
    q = tl.trans(q_t.to(DOT_DTYPE))  # [BLOCK_M, BLOCK_D]

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of scores, log2 units
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, T_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T_K
        tile_mask = d_ok[:, None] & n_ok[None, :]
        k_t = tl.load(
            K + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kt, mask=tile_mask, other=0.0
        )
        scores = tl.dot(q, k_t.to(DOT_DTYPE), input_precision="ieee") * qk_scale_log2  # [BLOCK_M, BLOCK_N]
        scores = tl.where(n_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        p = tl.math.exp2(scores - new_max[:, None])
        correction = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(p, 1)
        v_t = tl.load(
            V + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vt, mask=tile_mask, other=0.0
        )
        acc = acc * correction[:, None]
        acc = tl.dot(p.to(DOT_DTYPE), tl.trans(v_t.to(DOT_DTYPE)), acc, input_precision="ieee")
        row_max = new_max

    acc = acc / row_sum[:, None]
    tl.store(LSE + offs_m, (row_max + tl.math.log2(row_sum)) * _LN2, mask=m_ok)
    tl.store(
        O + offs_d[:, None] * stride_od + offs_m[None, :] * stride_ot,
        tl.trans(acc).to(O.dtype.element_ty),
        mask=d_ok[:, None] & m_ok[None, :],
    )


@triton.jit
def _attn_bwd_delta_kernel(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    H,
    T,
    HEAD_DIM,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """DELTA[b, h, t] = sum_d dO[b, h, t, d] * O[b, h, t, d] in fp32, BLOCK_M rows per program."""
    num_blocks = tl.cdiv(T, BLOCK_M)
    start_m = (tl.program_id(0) % num_blocks) * BLOCK_M
    bh = tl.program_id(0) // num_blocks  # b * H + h
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    O += b * stride_ob + h * stride_oh
    DO += b * stride_dob + h * stride_doh
    DELTA += bh.to(tl.int64) * T

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    tile_mask = (offs_d < HEAD_DIM)[:, None] & m_ok[None, :]
    o_t = tl.load(O + offs_d[:, None] * stride_od + offs_m[None, :] * stride_ot, mask=tile_mask, other=0.0)
    do_t = tl.load(
        DO + offs_d[:, None] * stride_dod + offs_m[None, :] * stride_dot, mask=tile_mask, other=0.0
    )
    delta = tl.sum(o_t.to(tl.float32) * do_t.to(tl.float32), 0)
    tl.store(DELTA + offs_m, delta, mask=m_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    stride_dvd,
    H,
    T_Q,
    T_K,
    HEAD_DIM,
    qk_scale_log2,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """One program: dK, dV for BLOCK_N of the T_K keys of one (batch, head), stepping over the T_Q
    queries BLOCK_M at a time.

    Padded query columns load q = dO = 0, lse = delta = 0, so they add exactly zero; padded key rows
    only touch rows of dK/dV that are never stored.
    """
    num_blocks = tl.cdiv(T_K, BLOCK_N)
    start_n = (tl.program_id(0) % num_blocks) * BLOCK_N
    bh = tl.program_id(0) // num_blocks  # b * H + h
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    LSE += bh.to(tl.int64) * T_Q
    DELTA += bh.to(tl.int64) * T_Q

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = d_ok[:, None] & (offs_n < T_K)[None, :]
    k_t = tl.load(K + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kt, mask=kv_mask, other=0.0)
    v_t = tl.load(V + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vt, mask=kv_mask, other=0.0)
    k = tl.trans(k_t.to(DOT_DTYPE))  # [BLOCK_N, BLOCK_D]
    v = tl.trans(v_t.to(DOT_DTYPE))

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, T_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T_Q
        q_mask = d_ok[:, None] & m_ok[None, :]
        q_t = tl.load(Q + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qt, mask=q_mask, other=0.0)
        do_t = tl.load(
            DO + offs_d[:, None] * stride_dod + offs_m[None, :] * stride_dot, mask=q_mask, other=0.0
        )
        q_t = q_t.to(DOT_DTYPE)
        do_t = do_t.to(DOT_DTYPE)
        lse_log2 = tl.load(LSE + offs_m, mask=m_ok, other=0.0) * _LOG2E
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
        scores_t = tl.dot(k, q_t, input_precision="ieee")  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(scores_t * qk_scale_log2 - lse_log2[None, :])
        dv = tl.dot(p_t.to(DOT_DTYPE), tl.trans(do_t), dv, input_precision="ieee")
        dp_t = tl.dot(v, do_t, input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(DOT_DTYPE), tl.trans(q_t), dk, input_precision="ieee")

    dk = dk * scale
    tl.store(
        DK + offs_d[:, None] * stride_dkd + offs_n[None, :] * stride_dkt,
        tl.trans(dk).to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + offs_d[:, None] * stride_dvd + offs_n[None, :] * stride_dvt,
        tl.trans(dv).to(DV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    stride_dqd,
    H,
    T_Q,
    T_K,
    HEAD_DIM,
    qk_scale_log2,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """One program: dQ for BLOCK_M of the T_Q queries of one (batch, head), stepping over the T_K keys
    BLOCK_N at a time."""
    num_blocks = tl.cdiv(T_Q, BLOCK_M)
    start_m = (tl.program_id(0) % num_blocks) * BLOCK_M
    bh = tl.program_id(0) // num_blocks  # b * H + h
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh
    LSE += bh.to(tl.int64) * T_Q
    DELTA += bh.to(tl.int64) * T_Q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T_Q
    d_ok = offs_d < HEAD_DIM
    q_mask = d_ok[:, None] & m_ok[None, :]
    q_t = tl.load(Q + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qt, mask=q_mask, other=0.0)
    do_t = tl.load(DO + offs_d[:, None] * stride_dod + offs_m[None, :] * stride_dot, mask=q_mask, other=0.0)
    q = tl.trans(q_t.to(DOT_DTYPE))  # [BLOCK_M, BLOCK_D]
    do = tl.trans(do_t.to(DOT_DTYPE))
    lse_log2 = tl.load(LSE + offs_m, mask=m_ok, other=0.0) * _LOG2E
    delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, T_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T_K
        kv_mask = d_ok[:, None] & n_ok[None, :]
        k_t = tl.load(K + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kt, mask=kv_mask, other=0.0)
        v_t = tl.load(V + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vt, mask=kv_mask, other=0.0)
        k_t = k_t.to(DOT_DTYPE)
        scores = tl.dot(q, k_t, input_precision="ieee")  # [BLOCK_M, BLOCK_N]
        # Padded keys must weigh exactly zero: exp2(-lse) overflows when every score is very negative.
        p = tl.where(n_ok[None, :], tl.math.exp2(scores * qk_scale_log2 - lse_log2[:, None]), 0.0)
        dp = tl.dot(do, v_t.to(DOT_DTYPE), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT_DTYPE), tl.trans(k_t), dq, input_precision="ieee")

    dq = dq * scale
    tl.store(
        DQ + offs_d[:, None] * stride_dqd + offs_m[None, :] * stride_dqt,
        tl.trans(dq).to(DQ.dtype.element_ty),
        mask=q_mask,
    )


# --------------------------------------------------------------------------------------------------
# Launch configurations (data)
# --------------------------------------------------------------------------------------------------


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
# (16 or 32 along T, 8 warps); in the checked candidates every 64-long half tile and 4-warp tile
# spilled, as did three 8-warp ones in some variant.
FORWARD_CONFIGS: dict[tuple[str, int], tuple[launch.Config, ...]] = {
    ("half", 16): (_C(128, 64, 8, 3), _C(64, 64, 4, 3), _C(128, 32, 4, 3), _C(128, 128, 8, 3)),
    ("half", 32): (_C(128, 64, 8, 3), _C(64, 64, 4, 3), _C(128, 32, 8, 3), _C(128, 128, 8, 3)),
    ("half", 64): (_C(64, 64, 8, 3), _C(128, 64, 8, 3), _C(128, 32, 8, 3), _C(64, 32, 4, 3)),
    ("half", 128): (_C(64, 32, 8, 3), _C(128, 32, 8, 3), _C(128, 16, 8, 3)),
    ("half", 256): (_C(32, 32, 8, 2), _C(32, 16, 8, 2)),
    ("fp32", 16): (_C(64, 32, 8, 2), _C(32, 32, 4, 2), _C(64, 16, 8, 2)),
    ("fp32", 32): (_C(32, 32, 4, 2), _C(32, 32, 8, 2), _C(64, 32, 4, 1)),
    ("fp32", 64): (_C(32, 32, 8, 2), _C(32, 16, 8, 2)),
    ("fp32", 128): (_C(32, 16, 8, 2), _C(16, 16, 4, 2)),
    ("fp32", 256): (_C(32, 16, 8, 2),),
}
# dK/dV: a program owns block_n keys and steps over queries block_m at a time; block_m is the same
# across each list, so whichever config runs, the order of the sums is the same.
DKDV_CONFIGS: dict[tuple[str, int], tuple[launch.Config, ...]] = {
    ("half", 16): (_C(64, 64, 4, 2), _C(64, 128, 8, 2), _C(64, 64, 4, 3)),
    ("half", 32): (_C(32, 64, 4, 2), _C(32, 128, 8, 2), _C(32, 64, 8, 2), _C(32, 128, 8, 3)),
    ("half", 64): (_C(32, 64, 4, 2), _C(32, 128, 8, 2), _C(32, 64, 8, 2), _C(32, 128, 8, 3)),
    ("half", 128): (_C(32, 64, 8, 2), _C(32, 32, 8, 2), _C(32, 64, 8, 3)),
    ("half", 256): (_C(16, 16, 8, 2), _C(16, 16, 8, 3)),
    ("fp32", 16): (_C(32, 32, 8, 2), _C(32, 32, 4, 1)),
    ("fp32", 32): (_C(32, 32, 8, 2),),
    ("fp32", 64): (_C(16, 32, 4, 2),),
    ("fp32", 128): (_C(16, 16, 8, 2), _C(16, 16, 4, 1)),
    ("fp32", 256): (_C(16, 16, 8, 1),),
}
# dQ: a program owns block_m queries and steps over keys block_n at a time (block_n fixed per list).
DQ_CONFIGS: dict[tuple[str, int], tuple[launch.Config, ...]] = {
    ("half", 16): (_C(64, 64, 4, 2), _C(128, 64, 8, 2), _C(64, 64, 8, 2)),
    ("half", 32): (_C(64, 64, 4, 2), _C(128, 64, 8, 3), _C(64, 64, 8, 3)),
    ("half", 64): (_C(64, 32, 4, 2), _C(128, 32, 8, 2), _C(64, 32, 4, 3)),
    ("half", 128): (_C(32, 32, 8, 2), _C(32, 32, 8, 3), _C(16, 32, 8, 2)),
    ("half", 256): (_C(16, 16, 8, 2), _C(16, 16, 8, 3)),
    ("fp32", 16): (_C(32, 32, 4, 2), _C(64, 32, 8, 2), _C(32, 32, 8, 2)),
    ("fp32", 32): (_C(32, 32, 4, 2), _C(32, 32, 8, 2)),
    ("fp32", 64): (_C(32, 32, 8, 2), _C(32, 32, 4, 2)),
    ("fp32", 128): (_C(32, 32, 8, 2), _C(16, 32, 8, 2)),
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
    """BLOCK_D for a head dim: the next power of two, at least 16 (the smallest dot)."""
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}] for the Triton attention, got {head_dim}")
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
        _attn_fwd_kernel,
        storage=("Q", "K", "V", "O"),
        fp32_pointers=("LSE",),
        i32=(*_strides("q", "k", "v", "o"), "H", "T_Q", "T_K", "HEAD_DIM"),
        fp32=("qk_scale_log2",),
    ),
    "bwd_delta": launch.arg_types(
        _attn_bwd_delta_kernel,
        storage=("O", "DO"),
        fp32_pointers=("DELTA",),
        i32=(*_strides("o", "do"), "H", "T", "HEAD_DIM"),
    ),
    "bwd_dkdv": launch.arg_types(
        _attn_bwd_dkdv_kernel,
        storage=("Q", "K", "V", "DO", "DK", "DV"),
        fp32_pointers=("LSE", "DELTA"),
        i32=(*_strides("q", "k", "v", "do", "dk", "dv"), "H", "T_Q", "T_K", "HEAD_DIM"),
        fp32=_SCALARS,
    ),
    "bwd_dq": launch.arg_types(
        _attn_bwd_dq_kernel,
        storage=("Q", "K", "V", "DO", "DQ"),
        fp32_pointers=("LSE", "DELTA"),
        i32=(*_strides("q", "k", "v", "do", "dq"), "H", "T_Q", "T_K", "HEAD_DIM"),
        fp32=_SCALARS,
    ),
}
_FUNCTIONS = {
    "fwd": _attn_fwd_kernel,
    "bwd_delta": _attn_bwd_delta_kernel,
    "bwd_dkdv": _attn_bwd_dkdv_kernel,
    "bwd_dq": _attn_bwd_dq_kernel,
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


# --------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------


def _dot_dtype(x: torch.Tensor) -> tl.dtype:
    """Operand dtype of every tl.dot: the input's, except bf16 under the interpreter (raw uint16 there)."""
    if x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and launch.interprets(x)):
        return tl.float32
    return tl.float16 if x.dtype == torch.float16 else tl.bfloat16


def _launch(kind: str, like: torch.Tensor, t_q: int, t_k: int, args: tuple, **constexprs) -> None:
    """Run the ``kind`` kernel of ``like``'s precision and head-dim bucket (``BLOCK_D``) over B * H rows
    of ceil(Tq or Tk / owned block) programs each; ``like`` [B, H, T, D] also gives the layout."""
    bucket = constexprs["BLOCK_D"]
    kernel = KERNELS[(kind, "" if kind == "bwd_delta" else _precision_class(like.dtype), bucket)]
    owned = _OWNED_BLOCK[kind]
    rows = like.shape[0] * like.shape[1]
    owned_length = t_k if kind == "bwd_dkdv" else t_q
    # Triton specialises unit strides, so the layout is in the autotune key already; named here too
    t_unit_stride = int(like.stride(2) == 1 and like.shape[3] > 1)
    launch.run(
        kernel,
        lambda config: (rows * triton.cdiv(owned_length, config.meta[owned]),),
        args,
        constexprs,
        like=like,
        sizes={
            "rows": rows,
            "owned_length": owned_length,
            "T_Q": t_q,
            "T_K": t_k,
            "t_unit_stride": t_unit_stride,
        },
    )


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise unless q [B, H, Tq, D], k and v [B, H, Tk, D] (Tk >= 1) share dtype and device and the
    Triton kernels can run them (ValueError / TypeError naming the argument)."""
    check_attention_shapes(q, k, v)
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"q, k and v must be float16, bfloat16 or float32, got {q.dtype}")
    launch.check_same_device(q=q, k=k, v=v)
    if q.device.type not in ("cuda", "cpu", "meta"):
        raise ValueError(f"q is on {q.device}: the Triton attention runs CUDA tensors (CPU: interpreted)")
    if k.shape[2] == 0 and q.numel() > 0:
        raise ValueError(
            f"k has no keys (Tk = 0, shape {tuple(k.shape)}): a softmax over zero keys is undefined"
        )
    head_dim_bucket(q.shape[3])


def _check_output(buf: torch.Tensor, like: torch.Tensor, name: str) -> None:
    if buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
        raise ValueError(
            f"{name} must be a {like.dtype} tensor of shape {tuple(like.shape)} on {like.device}, "
            f"got {buf.dtype} {tuple(buf.shape)} on {buf.device}"
        )


def _empty_in_layout_of(x: torch.Tensor) -> torch.Tensor:
    """A new [B, H, T, D] tensor whose unit-stride axis is T when x's is (the qkv layout), else D."""
    if x.stride(2) == 1 and x.stride(3) != 1:
        B, H, T, D = x.shape
        return torch.empty((B, H, D, T), dtype=x.dtype, device=x.device).transpose(2, 3)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal ``softmax(scale * q k^T) v`` per (batch, head).

    q: [B, H, Tq, D]; k, v: [B, H, Tk, D] with Tk >= 1 (Tk = 0 is a ValueError naming k); one dtype
    (fp16/bf16/fp32) and device, D <= MAX_HEAD_DIM, any strides (read in place).
    out: optional [B, H, Tq, D] destination of any strides.
    Returns (out [B, H, Tq, D], lse [B, H, Tq] fp32, the natural-log logsumexp of scale * q.k over keys).
    """
    check_inputs(q, k, v)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    bucket = head_dim_bucket(D)
    if out is None:
        out = _empty_in_layout_of(q)
    else:
        _check_output(out, q, "out")
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    args = (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), H, Tq, Tk, D)
    _launch("fwd", q, Tq, Tk, (*args, float(scale) * _LOG2E.value), BLOCK_D=bucket, DOT_DTYPE=_dot_dtype(q))
    return out, lse


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of ``attention_forward`` given dout = dL/dout.

    dout, out: [B, H, Tq, D]; q [B, H, Tq, D]; k, v [B, H, Tk, D]; any strides; lse: [B, H, Tq] fp32
    from the forward. dq, dk, dv: optional destinations shaped like q, k, v, of any strides (e.g. views
    of one [B, 3*H*D, T]). Deterministic: each gradient element is written by one program in a fixed
    summation order.
    """
    check_inputs(q, k, v)
    launch.check_same_device(q=q, dout=dout, out=out, lse=lse, dq=dq, dk=dk, dv=dv)
    _, H, Tq, D = q.shape
    Tk = k.shape[2]
    bucket = head_dim_bucket(D)
    grads = []
    for name, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if buf is None:
            buf = _empty_in_layout_of(like)
        else:
            _check_output(buf, like, name)
        grads.append(buf)
    dq, dk, dv = grads
    if q.numel() == 0:
        if k.numel() > 0:  # no query reads any key
            dk.zero_()
            dv.zero_()
        return dq, dk, dv
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    delta_args = (out, dout, delta, *out.stride(), *dout.stride(), H, Tq, D)
    _launch("bwd_delta", out, Tq, 0, delta_args, BLOCK_D=bucket)
    scale = float(scale)
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    sizes_and_scales = (H, Tq, Tk, D, scale * _LOG2E.value, scale)
    constexprs = {"BLOCK_D": bucket, "DOT_DTYPE": _dot_dtype(q)}
    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(), *sizes_and_scales)
    _launch("bwd_dkdv", q, Tq, Tk, dkdv_args, **constexprs)
    dq_args = (q, k, v, dout, lse, delta, dq, *common, *dq.stride(), *sizes_and_scales)
    _launch("bwd_dq", q, Tq, Tk, dq_args, **constexprs)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# Compile specifications (for the compile report)
# --------------------------------------------------------------------------------------------------

# Which stride Triton's JIT specialises to the constant 1: T in the UNet's qkv views, D in [B, H, T, D].
LAYOUTS: dict[str, str] = {"qkv": "t", "bthd": "d"}


def compile_specs(layouts: tuple[str, ...] = ("qkv", "bthd")) -> list[CompileSpec]:
    """Every registered attention kernel x dtype x config x layout, as ``triton.compile`` takes them.

    The unit stride of each layout is a constexpr 1, as Triton's JIT specialises it. Compiling
    needs a process without TRITON_INTERPRET=1 (the interpreter replaces Triton's own jit helpers).
    """
    specs: list[CompileSpec] = []
    for layout in layouts:
        axis = LAYOUTS[layout]
        for torch_dtype, storage in _TRITON_DTYPES.items():
            dot_dtype = tl.float32 if torch_dtype == torch.float32 else getattr(tl, str(torch_dtype)[6:])
            precision = _precision_class(torch_dtype)
            for (kind, kernel_precision, bucket), kernel in KERNELS.items():
                if kernel_precision not in ("", precision):
                    continue
                constexprs = {"BLOCK_D": bucket}
                if kind != "bwd_delta":
                    constexprs["DOT_DTYPE"] = dot_dtype
                unit = tuple(
                    n for n, t in kernel.arg_types.items() if n.startswith("stride_") and n.endswith(axis)
                )
                for config in kernel.configs:
                    name = f"attention_{kind}[{storage},d{bucket},{layout},{_tag(config)}]"
                    specs.append(launch.compile_spec(kernel, name, storage, config, constexprs, unit))
    return specs
