"""Device code of flash attention: the ``@triton.jit`` forward and the three backward kernels.

Tiles are loaded as ``[BLOCK_D, BLOCK_T]`` (consecutive lanes walk T) and transposed in registers where a
dot wants ``[BLOCK_T, BLOCK_D]``; ``DOT_DTYPE`` is the operand dtype of every ``tl.dot`` (fp32 for fp32
inputs and for bf16 under the interpreter).
"""

import math

import triton
import triton.language as tl

# Module constants read inside the kernels must be tl.constexpr.
_LOG2E = tl.constexpr(math.log2(math.e))
_LN2 = tl.constexpr(math.log(2.0))


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
