"""Flash attention in Triton: forward and backward over tensors of any strides.

``q, k, v, out`` are ``[B, H, T, D]`` views; the UNet passes views of its ``qkv: [B, 3*H*D, T]``
activation, where T is the contiguous axis. Every tile is therefore loaded as ``[BLOCK_D, BLOCK_T]``
(consecutive lanes walk T) and transposed in registers where a dot wants ``[BLOCK_T, BLOCK_D]``; a
K tile loaded that way is already K^T. When D is the unit stride instead (plain ``[B, H, T, D]``
tensors) Triton's specialisation of unit strides lets its coalescing pass order the lanes along D.

Forward: online softmax in base 2 with fp32 accumulators; one fp32 natural-log logsumexp per row is
saved for the backward. Backward: ``delta = rowsum(dO * O)``, then one kernel per key block for
dK/dV (loop over queries) and one per query block for dQ (loop over keys): no atomics, so gradients
are bitwise reproducible.

Launch configurations are data (``FORWARD_CONFIGS``, ``DKDV_CONFIGS``, ``DQ_CONFIGS``); on CUDA they
are autotuned, under ``TRITON_INTERPRET=1`` the first config of each list is launched. In the
backward lists only the block owned by a program and the warps/stages vary; the block the loop
steps over is fixed per head-dim bucket, so the summation order, and with it every bit of the
gradients, does not depend on which config the autotuner picks.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from fastdiff.kernels.compile_spec import CompileSpec

MAX_HEAD_DIM = 256

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


@dataclass(frozen=True)
class TileConfig:
    """Tile lengths along T (queries ``block_m``, keys ``block_n``), warps and software-pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    @property
    def tag(self) -> str:
        return f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}"

    def as_triton(self) -> triton.Config:
        return triton.Config(
            {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n},
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )


_C = TileConfig
# Keys: ("half" for fp16/bf16 | "fp32", head-dim bucket = BLOCK_D). The first entry of each list is
# the one launched when no autotuner can run (the interpreter). Every entry compiles for sm_80 and
# sm_90 without register spills, both when no stride is divisible by 16 (T = 36, say), where each
# lane keeps its own 64-bit address, and when every pointer and stride is (vector loads; the compile
# report builds both). fp32 dots run in IEEE fp32 on the CUDA cores (TF32 would cost about three
# decimal digits) and hold both operands in registers, so their tiles are smaller. Head dims above 128
# share the 256 bucket: its half-precision tiles keep BLOCK_M x 256 fp32 accumulators in registers, so
# they are short along the loop axis (16 or 32 keys/queries per step).
FORWARD_CONFIGS: dict[tuple[str, int], tuple[TileConfig, ...]] = {
    ("half", 16): (_C(128, 64, 8, 3), _C(64, 64, 4, 3), _C(128, 32, 4, 3), _C(128, 128, 8, 3)),
    ("half", 32): (_C(128, 64, 8, 3), _C(64, 64, 4, 3), _C(128, 32, 8, 3), _C(128, 128, 8, 3)),
    ("half", 64): (_C(64, 64, 8, 3), _C(128, 64, 8, 3), _C(128, 32, 8, 3), _C(64, 32, 4, 3)),
    ("half", 128): (_C(64, 32, 8, 3), _C(128, 32, 8, 3), _C(128, 16, 8, 3)),
    ("half", 256): (_C(64, 16, 8, 2), _C(32, 32, 8, 2), _C(32, 16, 8, 2)),
    ("fp32", 16): (_C(64, 32, 8, 2), _C(32, 32, 4, 2), _C(64, 16, 8, 2)),
    ("fp32", 32): (_C(32, 32, 4, 2), _C(32, 32, 8, 2), _C(64, 32, 4, 1)),
    ("fp32", 64): (_C(32, 32, 8, 2), _C(32, 16, 8, 2)),
    ("fp32", 128): (_C(32, 16, 8, 2), _C(16, 16, 4, 2)),
    ("fp32", 256): (_C(16, 16, 8, 2), _C(32, 16, 8, 2)),
}
# dK/dV: a program owns block_n keys and steps over queries block_m at a time; block_m is the same
# across each list, so the autotuner's pick never changes the order of the sums.
DKDV_CONFIGS: dict[tuple[str, int], tuple[TileConfig, ...]] = {
    ("half", 16): (_C(64, 64, 4, 2), _C(64, 128, 8, 2), _C(64, 64, 4, 3)),
    ("half", 32): (_C(32, 64, 4, 2), _C(32, 128, 8, 2), _C(32, 64, 8, 2), _C(32, 128, 8, 3)),
    ("half", 64): (_C(32, 64, 4, 2), _C(32, 128, 8, 2), _C(32, 64, 8, 2), _C(32, 128, 8, 3)),
    ("half", 128): (_C(32, 64, 8, 2), _C(32, 32, 8, 2), _C(32, 64, 8, 3)),
    ("half", 256): (_C(16, 32, 8, 2), _C(16, 16, 8, 2)),
    ("fp32", 16): (_C(32, 32, 8, 2), _C(32, 32, 4, 1)),
    ("fp32", 32): (_C(32, 32, 8, 2),),
    ("fp32", 64): (_C(16, 32, 4, 2),),
    ("fp32", 128): (_C(16, 16, 8, 2), _C(16, 16, 4, 1)),
    ("fp32", 256): (_C(16, 16, 8, 2), _C(16, 16, 8, 1)),
}
# dQ: a program owns block_m queries and steps over keys block_n at a time (block_n fixed per list).
DQ_CONFIGS: dict[tuple[str, int], tuple[TileConfig, ...]] = {
    ("half", 16): (_C(64, 64, 4, 2), _C(128, 64, 8, 2), _C(64, 64, 8, 2)),
    ("half", 32): (_C(64, 64, 4, 2), _C(128, 64, 8, 3), _C(64, 64, 8, 3)),
    ("half", 64): (_C(64, 32, 4, 2), _C(128, 32, 8, 2), _C(64, 32, 4, 3)),
    ("half", 128): (_C(32, 32, 8, 2), _C(32, 32, 8, 3), _C(16, 32, 8, 2)),
    ("half", 256): (_C(16, 16, 8, 2), _C(16, 16, 8, 3)),
    ("fp32", 16): (_C(32, 32, 4, 2), _C(64, 32, 8, 2), _C(32, 32, 8, 2)),
    ("fp32", 32): (_C(32, 32, 4, 2), _C(32, 32, 8, 2)),
    ("fp32", 64): (_C(32, 32, 8, 2), _C(32, 32, 4, 2)),
    ("fp32", 128): (_C(32, 32, 8, 2), _C(16, 32, 8, 2)),
    ("fp32", 256): (_C(16, 16, 8, 2), _C(32, 16, 8, 2)),
}
# delta = rowsum(dO * O): rows per program, one config per head-dim bucket (4 warps).
DELTA_BLOCK_M: dict[int, int] = {16: 64, 32: 64, 64: 32, 128: 16, 256: 8}
HEAD_DIM_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256)


def head_dim_bucket(head_dim: int) -> int:
    """BLOCK_D for a head dim: the next power of two, at least 16 (the smallest dot)."""
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}] for the Triton attention, got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


def _precision_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


# --------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------

_INTERPRETED = isinstance(_attn_fwd_kernel, InterpretedFunction)
_AUTOTUNERS: dict[tuple[str, tuple[TileConfig, ...]], triton.runtime.Autotuner] = {}


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand dtype of every tl.dot: the input's, except bf16 under the interpreter (raw uint16 there)."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and _INTERPRETED):
        return tl.float32
    return tl.float16 if dtype == torch.float16 else tl.bfloat16


def _launch(
    kernel, configs: tuple[TileConfig, ...], owned_block: str, grid_rows: int, T: int, *args, **constexprs
):
    """Run ``kernel`` over ``grid_rows`` (batch * head) rows of ceil(T / owned block) programs each.

    On CUDA the config is autotuned (one autotuner per kernel and config list); otherwise the first
    config of the list is launched as is.
    """
    if _INTERPRETED:
        config = configs[0]
        grid = (grid_rows * triton.cdiv(T, getattr(config, owned_block)),)
        kernel[grid](
            *args,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
            **constexprs,
        )
        return
    key = (kernel.__name__, configs)
    tuner = _AUTOTUNERS.get(key)
    if tuner is None:
        tuner = triton.autotune(configs=[c.as_triton() for c in configs], key=["T_Q", "T_K", "HEAD_DIM"])(
            kernel
        )
        _AUTOTUNERS[key] = tuner
    meta_key = "BLOCK_M" if owned_block == "block_m" else "BLOCK_N"
    tuner[lambda meta: (grid_rows * triton.cdiv(T, meta[meta_key]),)](*args, **constexprs)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise unless q [B, H, Tq, D], k and v [B, H, Tk, D] (Tk >= 1) share dtype and device and the
    Triton kernels can run them (ValueError / TypeError naming the argument)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape [B, H, Tk, D], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q [B, H, Tq, D] and k, v [B, H, Tk, D] must agree in B, H and D, "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"q, k and v must be float16, bfloat16 or float32, got {q.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[2] == 0 and q.numel() > 0:
        raise ValueError(
            f"k has no keys (Tk = 0, shape {tuple(k.shape)}): a softmax over zero keys is undefined"
        )
    head_dim_bucket(q.shape[3])
    if not _INTERPRETED and not q.is_cuda:
        raise ValueError(
            f"q is on {q.device}: the Triton attention runs CUDA tensors, or CPU tensors when "
            "TRITON_INTERPRET=1 is set before fastdiff.kernels.attention is imported"
        )


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
    (fp16/bf16/fp32), D <= MAX_HEAD_DIM, any strides (read in place).
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
    _launch(
        _attn_fwd_kernel,
        FORWARD_CONFIGS[(_precision_class(q.dtype), bucket)],
        "block_m",
        B * H,
        Tq,
        q,
        k,
        v,
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        H,
        Tq,
        Tk,
        D,
        float(scale) * _LOG2E.value,
        BLOCK_D=bucket,
        DOT_DTYPE=_dot_dtype(q.dtype),
    )
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
    B, H, Tq, D = q.shape
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
    delta_rows = DELTA_BLOCK_M[bucket]
    _attn_bwd_delta_kernel[(B * H * triton.cdiv(Tq, delta_rows),)](
        out, dout, delta, *out.stride(), *dout.stride(), H, Tq, D, BLOCK_M=delta_rows, BLOCK_D=bucket
    )
    precision = _precision_class(q.dtype)
    scale = float(scale)
    dot_dtype = _dot_dtype(q.dtype)
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    _launch(
        _attn_bwd_dkdv_kernel,
        DKDV_CONFIGS[(precision, bucket)],
        "block_n",
        B * H,
        Tk,
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        *common,
        *dk.stride(),
        *dv.stride(),
        H,
        Tq,
        Tk,
        D,
        scale * _LOG2E.value,
        scale,
        BLOCK_D=bucket,
        DOT_DTYPE=dot_dtype,
    )
    _launch(
        _attn_bwd_dq_kernel,
        DQ_CONFIGS[(precision, bucket)],
        "block_m",
        B * H,
        Tq,
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        *common,
        *dq.stride(),
        H,
        Tq,
        Tk,
        D,
        scale * _LOG2E.value,
        scale,
        BLOCK_D=bucket,
        DOT_DTYPE=dot_dtype,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# Compile specifications (for the compile report)
# --------------------------------------------------------------------------------------------------

_FLOAT_ARGS = ("qk_scale_log2", "scale")
_FP32_POINTERS = ("LSE", "DELTA")
_TENSOR_POINTERS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
# Which stride Triton's JIT specialises to the constant 1: T in the UNet's qkv views, D in [B, H, T, D].
LAYOUTS: dict[str, str] = {"qkv": "t", "bthd": "d"}


def _signature(kernel, dtype: str, constexprs: dict, unit_axis: str) -> tuple[dict[str, str], dict]:
    """ASTSource signature of ``kernel`` for ``dtype`` tensors whose ``unit_axis`` stride is 1."""
    signature: dict[str, str] = {}
    constexprs = dict(constexprs)
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.startswith("stride_") and name.endswith(unit_axis):
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in _FP32_POINTERS:
            signature[name] = "*fp32"
        elif name in _TENSOR_POINTERS:
            signature[name] = f"*{dtype}"
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature, constexprs


def compile_specs(layouts: tuple[str, ...] = ("qkv", "bthd")) -> list[CompileSpec]:
    """Every kernel x dtype x head-dim bucket x config x layout, as ``triton.compile`` takes them.

    The unit stride of each layout is a constexpr 1, as Triton's JIT specialises it. Compiling
    needs a process without TRITON_INTERPRET=1 (the interpreter replaces Triton's own jit helpers).
    """
    specs: list[CompileSpec] = []
    tables = (
        ("attention_fwd", _attn_fwd_kernel, FORWARD_CONFIGS),
        ("attention_bwd_dkdv", _attn_bwd_dkdv_kernel, DKDV_CONFIGS),
        ("attention_bwd_dq", _attn_bwd_dq_kernel, DQ_CONFIGS),
    )
    for layout in layouts:
        unit_axis = LAYOUTS[layout]
        for torch_dtype, dtype in _TRITON_DTYPES.items():
            dot_dtype = tl.float32 if torch_dtype == torch.float32 else getattr(tl, str(torch_dtype)[6:])
            for bucket in HEAD_DIM_BUCKETS:
                for name, kernel, table in tables:
                    for config in table[(_precision_class(torch_dtype), bucket)]:
                        constexprs = {
                            "BLOCK_M": config.block_m,
                            "BLOCK_N": config.block_n,
                            "BLOCK_D": bucket,
                            "DOT_DTYPE": dot_dtype,
                        }
                        signature, constexprs = _signature(kernel, dtype, constexprs, unit_axis)
                        specs.append(
                            CompileSpec(
                                name=f"{name}[{dtype},d{bucket},{layout},{config.tag}]",
                                fn=kernel,
                                signature=signature,
                                constexprs=constexprs,
                                num_warps=config.num_warps,
                                num_stages=config.num_stages,
                            )
                        )
                constexprs = {"BLOCK_M": DELTA_BLOCK_M[bucket], "BLOCK_D": bucket}
                signature, constexprs = _signature(_attn_bwd_delta_kernel, dtype, constexprs, unit_axis)
                specs.append(
                    CompileSpec(
                        name=f"attention_bwd_delta[{dtype},d{bucket},{layout},m{DELTA_BLOCK_M[bucket]}w4]",
                        fn=_attn_bwd_delta_kernel,
                        signature=signature,
                        constexprs=constexprs,
                    )
                )
    return specs
