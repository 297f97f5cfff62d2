"""Backward kernels of the unpadded FlashAttention-2 (kernels/attention.py holds the forward, the
launchers and the autograd registration): a preprocess kernel for delta = rowsum(dO * O), one
kernel for dK and dV per key block, another for dQ per query block. No atomics: deterministic.
The probabilities are recomputed from the forward's log-sum-exp, and dropout regenerates the
forward's mask from the same Philox offsets.
"""

from __future__ import annotations

import triton
import triton.language as tl

from bert_fast.kernels.attention_tiles import LOG2E, _dropout_keep


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out,  # [T, heads, HEAD_DIM]
    DOut,  # [T, heads, HEAD_DIM]
    Delta,  # [heads, T] float32
    stride_o_tok, stride_o_head, stride_do_tok, stride_do_head, stride_delta_head, total_tokens,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """delta = rowsum(dO * O) = rowsum(P * dP), the softmax backward's correction term."""
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    off_h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_t = offs_t < total_tokens
    o = tl.load(Out + offs_t[:, None] * stride_o_tok + off_h * stride_o_head + offs_d[None, :],
                mask=mask_t[:, None], other=0.0).to(tl.float32)
    do = tl.load(DOut + offs_t[:, None] * stride_do_tok + off_h * stride_do_head + offs_d[None, :],
                 mask=mask_t[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + off_h * stride_delta_head + offs_t, tl.sum(o * do, 1), mask=mask_t)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # [T, heads, HEAD_DIM]
    K,  # [T, heads, HEAD_DIM]
    V,  # [T, heads, HEAD_DIM]
    DOut,  # [T, heads, HEAD_DIM]
    DK,  # [T, heads, HEAD_DIM]
    DV,  # [T, heads, HEAD_DIM]
    Lse,  # [heads, T] float32
    Delta,  # [heads, T] float32
    CuSeqlens,  # [B + 1] int32
    Seed,  # [1] int64, read only when HAS_DROPOUT
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_dk_tok, stride_dk_head, stride_dv_tok, stride_dv_head,
    stride_lse_head,
    num_heads, max_seqlen, seqlen_bucket, qk_scale, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dV = P_drop^T dO and dK = dS^T Q * scale for one tile of BLOCK_N keys, all queries."""
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // num_heads
    off_h = (off_bh % num_heads).to(tl.int64)
    seq_start = tl.load(CuSeqlens + off_b).to(tl.int64)
    seqlen = tl.load(CuSeqlens + off_b + 1) - seq_start.to(tl.int32)
    if start_n * BLOCK_N >= seqlen:
        return
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = seq_start + offs_n
    mask_n = offs_n < seqlen
    k = tl.load(K + keys[:, None] * stride_k_tok + off_h * stride_k_head + offs_d[None, :],
                mask=mask_n[:, None], other=0.0)
    v = tl.load(V + keys[:, None] * stride_v_tok + off_h * stride_v_head + offs_d[None, :],
                mask=mask_n[:, None], other=0.0)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    Q += seq_start * stride_q_tok + off_h * stride_q_head
    DOut += seq_start * stride_do_tok + off_h * stride_do_head
    Lse += off_h * stride_lse_head + seq_start
    Delta += off_h * stride_lse_head + seq_start

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Padded query rows get lse = +inf, so their probabilities (and all they add) are exactly 0.
    # Padded key rows (k = v = 0) are computed but never stored; rows of a product do not mix.
    for start_m in range(0, seqlen, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seqlen
        qt = tl.load(Q + offs_m[None, :] * stride_q_tok + offs_d[:, None],
                     mask=mask_m[None, :], other=0.0)
        do = tl.load(DOut + offs_m[:, None] * stride_do_tok + offs_d[None, :],
                     mask=mask_m[:, None], other=0.0)
        lse = tl.load(Lse + offs_m, mask=mask_m, other=float("inf")) * LOG2E
        delta = tl.load(Delta + offs_m, mask=mask_m, other=0.0)
        pt = tl.math.exp2(tl.dot(k, qt, input_precision=INPUT_PRECISION) * qk_scale - lse[None, :])
        dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            # The forward's (query, key) draws, generated directly in this tile's [keys, queries] order.
            rng_col = ((seq_start + offs_m) * num_heads + off_h) * max_seqlen
            keep = tl.rand(seed, rng_col[None, :] + offs_n[:, None]) >= dropout_p
            scale = 1.0 / (1.0 - dropout_p)
            pt_drop = tl.where(keep, pt * scale, 0.0)
            dpt = tl.where(keep, dpt * scale, 0.0)
        else:
            pt_drop = pt
        dv = tl.dot(pt_drop.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=INPUT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + keys[:, None] * stride_dk_tok + off_h * stride_dk_head + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(DV + keys[:, None] * stride_dv_tok + off_h * stride_dv_head + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask_n[:, None])


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_k_tok, stride_v_tok, seqlen, lo, hi,
                       qk_scale, seed, rng_row, dropout_p,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = K + offs_n[None, :] * stride_k_tok + offs_d[:, None]
        vt_ptrs = V + offs_n[None, :] * stride_v_tok + offs_d[:, None]
        if MASK_N:
            kt = tl.load(kt_ptrs, mask=offs_n[None, :] < seqlen, other=0.0)
            vt = tl.load(vt_ptrs, mask=offs_n[None, :] < seqlen, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
        p = tl.math.exp2(tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale - lse[:, None])
        if MASK_N:
            p = tl.where(offs_n[None, :] < seqlen, p, 0.0)
        dp = tl.dot(do, vt, input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_row, offs_n, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,  # [T, heads, HEAD_DIM]
    K,  # [T, heads, HEAD_DIM]
    V,  # [T, heads, HEAD_DIM]
    DOut,  # [T, heads, HEAD_DIM]
    DQ,  # [T, heads, HEAD_DIM]
    Lse,  # [heads, T] float32
    Delta,  # [heads, T] float32
    CuSeqlens,  # [B + 1] int32
    Seed,  # [1] int64, read only when HAS_DROPOUT
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_dq_tok, stride_dq_head, stride_lse_head,
    num_heads, max_seqlen, seqlen_bucket, qk_scale, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dQ = dS K * scale for one tile of BLOCK_M queries, all keys."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // num_heads
    off_h = (off_bh % num_heads).to(tl.int64)
    seq_start = tl.load(CuSeqlens + off_b).to(tl.int64)
    seqlen = tl.load(CuSeqlens + off_b + 1) - seq_start.to(tl.int32)
    if start_m * BLOCK_M >= seqlen:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = seq_start + offs_m
    mask_m = offs_m < seqlen
    q = tl.load(Q + rows[:, None] * stride_q_tok + off_h * stride_q_head + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    do = tl.load(DOut + rows[:, None] * stride_do_tok + off_h * stride_do_head + offs_d[None, :],
                 mask=mask_m[:, None], other=0.0)
    lse = tl.load(Lse + off_h * stride_lse_head + rows, mask=mask_m, other=0.0) * LOG2E
    delta = tl.load(Delta + off_h * stride_lse_head + rows, mask=mask_m, other=0.0)
    K += seq_start * stride_k_tok + off_h * stride_k_head
    V += seq_start * stride_v_tok + off_h * stride_v_head
    seed = 0
    rng_row = rows
    if HAS_DROPOUT:
        seed = tl.load(Seed)
        rng_row = (rows * num_heads + off_h) * max_seqlen

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_k_tok, stride_v_tok, seqlen,
                            0, n_full, qk_scale, seed, rng_row, dropout_p,
                            HEAD_DIM, BLOCK_N, False, HAS_DROPOUT, INPUT_PRECISION)
    if n_full < seqlen:
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_k_tok, stride_v_tok, seqlen,
                                n_full, seqlen, qk_scale, seed, rng_row, dropout_p,
                                HEAD_DIM, BLOCK_N, True, HAS_DROPOUT, INPUT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + rows[:, None] * stride_dq_tok + off_h * stride_dq_head + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask_m[:, None])
