"""Backward kernels of the unpadded FlashAttention-2 (kernels/attention.py holds the forward, the
launchers and the autograd): a preprocess kernel for delta = rowsum(dO * O), then one fused kernel
with FlashAttention-2's five GEMMs per tile (S = Q K^T, dP = dO V^T, dV += P^T dO, dK += dS^T Q,
dQ += dS K), drawing the dropout mask once (the split dK/dV + dQ form recomputes S and dP and draws
the mask twice: seven GEMMs).

A program owns one (sequence, head), so dQ needs no atomics and is deterministic:
- a sequence that fits one query tile (BLOCK_M >= max_seqlen, BERT's phase 1 at seq 128) keeps its
  queries and dQ on chip while key tiles stream past, storing each key tile's dK and dV once;
- a longer one keeps a key tile's dK and dV on chip while query tiles stream past, and gathers
  each key tile's dQ share in a float32 workspace row range that only this program touches: the
  first key tile stores it, middle ones add with a fire-and-forget `red.add` (no load, no
  registers held), the last loads, adds, scales and writes dQ in the input dtype. Every element
  has one writer thread whose operations on it are ordered by PTX's per-location coherence, so
  the sum's order, and its result, are fixed: deterministic, unlike a cross-program atomic sum.
The probabilities are recomputed from the forward's log-sum-exp; dropout regenerates the forward's
mask through kernels/dropout.py. Its 1 / (1 - p) is folded into the FMA that forms dS and into
dV's final scale, so dropout costs the mask alone.
"""

from __future__ import annotations

import triton
import triton.language as tl

from bert_fast.kernels import dropout


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
def _bwd_tile(q, do, lse, delta, k, v, q_base, k_base, qk_scale, drop, dropout_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              INPUT_PRECISION: tl.constexpr):
    """One [BLOCK_M queries, BLOCK_N keys] tile: (P with dropout applied, dS / dropout_scale),
    both in the input dtype, ready for the dV, dK and dQ GEMMs (callers scale dV, dK and dQ by
    dropout_scale at the end). With keep mask Z and scale s, dS = P (s Z dP - delta) = s (Z P dP -
    P delta / s): masking P once serves dV and dS, and s leaves the inner loop.
    Padded queries have lse = +inf (P = 0) and dO = 0. Padded keys have K = V = 0: their P and dS
    are not 0, but they only reach dK and dV rows that are never stored, and dQ through K = 0."""
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    if HAS_DROPOUT:
        seed_lo, seed_hi, stream, site, t_low, t_top_clear = drop
        flags, byte = dropout.tile_flags(seed_lo, seed_hi, stream, site, t_low, t_top_clear,
                                         q_base, tl.arange(0, BLOCK_M), k_base, tl.arange(0, BLOCK_N))
        p_kept = dropout.apply(p, flags, byte)
        ds = p_kept * dp - p * (delta * (1.0 / dropout_scale))[:, None]
    else:
        p_kept = p
        ds = p * (dp - delta[:, None])
    return p_kept.to(q.dtype), ds.to(q.dtype)


@triton.jit
def _tile(P, rows, stride_tok, HEAD_DIM: tl.constexpr):
    """Pointers to rows `rows` of a [tokens, HEAD_DIM] slice."""
    return P + rows[:, None] * stride_tok + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _bwd_queries_resident(ptrs, strides, seqlen, qk_scale, sm_scale, drop, dropout_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """A sequence of at most BLOCK_M tokens: its queries and dQ stay on chip while key tiles
    stream past; each key tile's dK and dV are complete at once and stored."""
    Q, K, V, DOut, DQ, DK, DV, DQAcc, Lse, Delta = ptrs
    s_q, s_k, s_v, s_do, s_dq, s_dk, s_dv, s_acc = strides
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < seqlen
    q_ptrs = _tile(Q, offs_m, s_q, HEAD_DIM)
    do_ptrs = _tile(DOut, offs_m, s_do, HEAD_DIM)
    q_mask = mask_m[:, None]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(do_ptrs, mask=q_mask, other=0.0)
    lse = tl.load(Lse + offs_m, mask=mask_m, other=float("inf"))
    delta = tl.load(Delta + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = _tile(K, offs_n, s_k, HEAD_DIM)
        v_ptrs = _tile(V, offs_n, s_v, HEAD_DIM)
        k_mask = (offs_n < seqlen)[:, None]
        k = tl.load(k_ptrs, mask=k_mask, other=0.0)
        v = tl.load(v_ptrs, mask=k_mask, other=0.0)
        p, ds = _bwd_tile(q, do, lse, delta, k, v, 0, start_n, qk_scale, drop, dropout_scale,
                          BLOCK_M, BLOCK_N, HAS_DROPOUT, INPUT_PRECISION)
        dv = tl.dot(tl.trans(p), do, input_precision=INPUT_PRECISION)
        dk = tl.dot(tl.trans(ds), q, input_precision=INPUT_PRECISION)
        dq = tl.dot(ds, k, dq, input_precision=INPUT_PRECISION)
        dv_ptrs = _tile(DV, offs_n, s_dv, HEAD_DIM)
        dk_ptrs = _tile(DK, offs_n, s_dk, HEAD_DIM)
        tl.store(dv_ptrs, (dv * dropout_scale).to(DV.dtype.element_ty), mask=k_mask)
        tl.store(dk_ptrs, (dk * (sm_scale * dropout_scale)).to(DK.dtype.element_ty), mask=k_mask)
    dq_ptrs = _tile(DQ, offs_m, s_dq, HEAD_DIM)
    tl.store(dq_ptrs, (dq * (sm_scale * dropout_scale)).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_key_tile(ptrs, strides, seqlen, start_n, qk_scale, sm_scale, drop, dropout_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """dK and dV of one key tile from every query tile of the sequence, and that key tile's share
    of dQ: stored to the float32 workspace (FIRST), added to it (red.add), or added to what it
    holds and written out (LAST)."""
    Q, K, V, DOut, DQ, DK, DV, DQAcc, Lse, Delta = ptrs
    s_q, s_k, s_v, s_do, s_dq, s_dk, s_dv, s_acc = strides
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_ptrs = _tile(K, offs_n, s_k, HEAD_DIM)
    v_ptrs = _tile(V, offs_n, s_v, HEAD_DIM)
    k_mask = (offs_n < seqlen)[:, None]
    k = tl.load(k_ptrs, mask=k_mask, other=0.0)
    v = tl.load(v_ptrs, mask=k_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seqlen
        q_ptrs = _tile(Q, offs_m, s_q, HEAD_DIM)
        do_ptrs = _tile(DOut, offs_m, s_do, HEAD_DIM)
        q_mask = mask_m[:, None]
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
        do = tl.load(do_ptrs, mask=q_mask, other=0.0)
        lse = tl.load(Lse + offs_m, mask=mask_m, other=float("inf"))
        delta = tl.load(Delta + offs_m, mask=mask_m, other=0.0)
        p, ds = _bwd_tile(q, do, lse, delta, k, v, start_m, start_n, qk_scale, drop, dropout_scale,
                          BLOCK_M, BLOCK_N, HAS_DROPOUT, INPUT_PRECISION)
        dv = tl.dot(tl.trans(p), do, dv, input_precision=INPUT_PRECISION)
        dk = tl.dot(tl.trans(ds), q, dk, input_precision=INPUT_PRECISION)
        dq = tl.dot(ds, k, input_precision=INPUT_PRECISION)
        acc_ptrs = _tile(DQAcc, offs_m, s_acc, HEAD_DIM)
        if FIRST:
            tl.store(acc_ptrs, dq, mask=q_mask)
        elif LAST:
            dq += tl.load(acc_ptrs, mask=q_mask, other=0.0)
            dq_ptrs = _tile(DQ, offs_m, s_dq, HEAD_DIM)
            tl.store(dq_ptrs, (dq * (sm_scale * dropout_scale)).to(DQ.dtype.element_ty), mask=q_mask)
        else:
            tl.atomic_add(acc_ptrs, dq, mask=q_mask, sem="relaxed")
    dv_ptrs = _tile(DV, offs_n, s_dv, HEAD_DIM)
    dk_ptrs = _tile(DK, offs_n, s_dk, HEAD_DIM)
    tl.store(dv_ptrs, (dv * dropout_scale).to(DV.dtype.element_ty), mask=k_mask)
    tl.store(dk_ptrs, (dk * (sm_scale * dropout_scale)).to(DK.dtype.element_ty), mask=k_mask)


@triton.jit
def _attn_bwd_kernel(
    Q,  # [T, heads, HEAD_DIM]
    K,  # [T, heads, HEAD_DIM]
    V,  # [T, heads, HEAD_DIM]
    DOut,  # [T, heads, HEAD_DIM]
    DQ,  # [T, heads, HEAD_DIM]
    DK,  # [T, heads, HEAD_DIM]
    DV,  # [T, heads, HEAD_DIM]
    DQAcc,  # [T, heads, HEAD_DIM] float32 workspace (read only when not ONE_Q_BLOCK)
    Lse,  # [heads, T] float32, base 2 (kernels/attention.py)
    Delta,  # [heads, T] float32
    CuSeqlens,  # [B + 1] int32
    Seed,  # [1] int64, read only when HAS_DROPOUT
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_do_tok, stride_do_head, stride_dq_tok, stride_dq_head, stride_dk_tok, stride_dk_head,
    stride_dv_tok, stride_dv_head, stride_acc_tok, stride_acc_head, stride_lse_head,
    num_heads, max_seqlen, seqlen_bucket, qk_scale, sm_scale, threshold, site, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ONE_Q_BLOCK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    off_bh = tl.program_id(0)
    off_b = off_bh // num_heads
    off_h = (off_bh % num_heads).to(tl.int64)
    seq_start = tl.load(CuSeqlens + off_b).to(tl.int64)
    seqlen = tl.load(CuSeqlens + off_b + 1) - seq_start.to(tl.int32)
    Q += seq_start * stride_q_tok + off_h * stride_q_head
    K += seq_start * stride_k_tok + off_h * stride_k_head
    V += seq_start * stride_v_tok + off_h * stride_v_head
    DOut += seq_start * stride_do_tok + off_h * stride_do_head
    DQ += seq_start * stride_dq_tok + off_h * stride_dq_head
    DK += seq_start * stride_dk_tok + off_h * stride_dk_head
    DV += seq_start * stride_dv_tok + off_h * stride_dv_head
    DQAcc += seq_start * stride_acc_tok + off_h * stride_acc_head
    Lse += off_h * stride_lse_head + seq_start
    Delta += off_h * stride_lse_head + seq_start
    drop = (0, 0, 0, 0, 0, 0)
    if HAS_DROPOUT:
        seed_lo, seed_hi = dropout.seed_words(Seed)
        t_low, t_top_clear = dropout.threshold_words(threshold)
        drop = (seed_lo, seed_hi, off_bh.to(tl.uint32), site.to(tl.uint32), t_low, t_top_clear)

    ptrs = (Q, K, V, DOut, DQ, DK, DV, DQAcc, Lse, Delta)
    strides = (stride_q_tok, stride_k_tok, stride_v_tok, stride_do_tok, stride_dq_tok, stride_dk_tok,
               stride_dv_tok, stride_acc_tok)
    if ONE_Q_BLOCK:
        _bwd_queries_resident(ptrs, strides, seqlen, qk_scale, sm_scale, drop, dropout_scale,
                              HEAD_DIM, BLOCK_M, BLOCK_N, HAS_DROPOUT, INPUT_PRECISION)
    elif seqlen <= BLOCK_M:  # a short sequence in a batch of long ones
        _bwd_queries_resident(ptrs, strides, seqlen, qk_scale, sm_scale, drop, dropout_scale,
                              HEAD_DIM, BLOCK_M, BLOCK_N, HAS_DROPOUT, INPUT_PRECISION)
    else:
        # Key tiles in three kinds, so the dQ bookkeeping is decided at compile time: the first
        # stores its share, middle ones add to it, the last adds and writes dQ. A sequence longer
        # than BLOCK_M >= BLOCK_N has at least two key tiles.
        last_n = ((seqlen - 1) // BLOCK_N) * BLOCK_N
        _bwd_key_tile(ptrs, strides, seqlen, 0, qk_scale, sm_scale, drop, dropout_scale,
                      HEAD_DIM, BLOCK_M, BLOCK_N, HAS_DROPOUT, True, False, INPUT_PRECISION)
        for start_n in range(BLOCK_N, last_n, BLOCK_N):
            _bwd_key_tile(ptrs, strides, seqlen, start_n, qk_scale, sm_scale, drop, dropout_scale,
                          HEAD_DIM, BLOCK_M, BLOCK_N, HAS_DROPOUT, False, False, INPUT_PRECISION)
        _bwd_key_tile(ptrs, strides, seqlen, last_n, qk_scale, sm_scale, drop, dropout_scale,
                      HEAD_DIM, BLOCK_M, BLOCK_N, HAS_DROPOUT, False, True, INPUT_PRECISION)
