"""Bidirectional multi-head attention for packed (unpadded) BERT batches: FlashAttention-2 in Triton.

What is fused, and why: `softmax(Q K^T * scale) V` with attention-probability dropout runs in one
kernel per direction, tile by tile, so the [S, S] score and probability matrices never reach
global memory (the eager form writes and re-reads them several times, which dominates its time and
memory at seq 512). The forward keeps an online softmax in float32 (running max and sum, exp2 with
log2(e) folded into the scale) and saves only the log-sum-exp per row; the backward
(kernels/attention_bwd.py) recomputes the probabilities from it in one fused kernel of five GEMMs.
Dropout masks come from kernels/dropout.py (Philox4x32-7, 16 decisions per call, never stored):
element (query i, key j) of sequence b, head h uses stream b * heads + h, and `site` tells call
sites (layers) apart under one per-forward seed; p = 0 compiles a variant without any RNG.

Layout: q, k, v are [T, heads, head_dim] (T = real tokens of the whole batch; rows may be strided,
e.g. views of one fused QKV GEMM output), `cu_seqlens` [B + 1] int32 marks where each sequence
starts, and `max_seqlen` sizes the grid (programs past their sequence's end exit at once), so
padding costs nothing. `attention_varlen_qkvpacked` takes that QKV output [T, 3, heads, head_dim]
itself and returns its gradient as one buffer of the same layout (no stack of dq, dk, dv).

Host side: the public functions here validate their arguments once; `attention_varlen_unchecked`
is the entry for bert_fast.ops, which has validated them already. Eager calls run a plain
`torch.autograd.Function` (a few microseconds of Python per call); under torch.compile and
torch.export the same launchers run inside the registered `bert_fast::attention_varlen_fwd/bwd`
triton_ops, which tracing needs.

References: Dao et al., FlashAttention (2022) and FlashAttention-2 (2023), arXiv:2205.14135 and
arXiv:2307.08691; the Triton fused-attention tutorial
(https://triton-lang.org/main/getting-started/tutorials/06-fused-attention.html); flash-attn's
varlen API (`flash_attn_varlen_func`, https://github.com/Dao-AILab/flash-attention).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from bert_fast.kernels import dropout
from bert_fast.kernels.attention_bwd import _attn_bwd_kernel, _attn_bwd_preprocess_kernel
from bert_fast.kernels.attention_tiles import _INTERPRET, LN2, LOG2E, autotuned, candidates
from bert_fast.kernels.checks import check_same, check_tensor
from bert_fast.kernels.launch import launch as _launch
from bert_fast.kernels.launch import traced as _traced
from bert_fast.kernels.launch import traced_body

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_k_tok, stride_v_tok, seqlen, lo, hi, qk_scale,
                    q_base, drop,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Fold key tiles [lo, hi) into the running (acc, l_i, m_i); MASK_N for the ragged last tile."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = K + offs_n[None, :] * stride_k_tok + offs_d[:, None]
        v_ptrs = V + offs_n[:, None] * stride_v_tok + offs_d[None, :]
        if MASK_N:
            kt = tl.load(kt_ptrs, mask=offs_n[None, :] < seqlen, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < seqlen, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale
        if MASK_N:
            s = tl.where(offs_n[None, :] < seqlen, s, float("-inf"))
        # The tail tile holds at least one real key, so m_new is finite and no row becomes NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        p = p.to(v.dtype)
        if HAS_DROPOUT:  # l_i sums the kept and the dropped: dropout follows the softmax
            seed_lo, seed_hi, stream, site, t_low, t_top_clear = drop
            flags, byte = dropout.tile_flags(seed_lo, seed_hi, stream, site, t_low, t_top_clear,
                                             q_base, tl.arange(0, BLOCK_M), start_n, tl.arange(0, BLOCK_N))
            p = dropout.apply(p, flags, byte)
        acc = tl.dot(p, v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,  # [T, heads, HEAD_DIM]
    K,  # [T, heads, HEAD_DIM]
    V,  # [T, heads, HEAD_DIM]
    Out,  # [T, heads, HEAD_DIM]
    Lse,  # [heads, T] float32: log2 of sum(exp2(scores * scale * log2(e))) (base 2 saves two roundings)
    CuSeqlens,  # [B + 1] int32
    Seed,  # [1] int64, read only when HAS_DROPOUT
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_o_tok, stride_o_head, stride_lse_head,
    num_heads, max_seqlen, seqlen_bucket, qk_scale, threshold, site, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // num_heads
    off_h = (off_bh % num_heads).to(tl.int64)
    seq_start = tl.load(CuSeqlens + off_b).to(tl.int64)
    seqlen = tl.load(CuSeqlens + off_b + 1) - seq_start.to(tl.int32)
    q_base = start_m * BLOCK_M
    if q_base >= seqlen:
        return
    offs_m = q_base + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = seq_start + offs_m
    mask_m = offs_m < seqlen
    q = tl.load(Q + rows[:, None] * stride_q_tok + off_h * stride_q_head + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    K += seq_start * stride_k_tok + off_h * stride_k_head
    V += seq_start * stride_v_tok + off_h * stride_v_head
    drop = (0, 0, 0, 0, 0, 0)
    if HAS_DROPOUT:
        seed_lo, seed_hi = dropout.seed_words(Seed)
        t_low, t_top_clear = dropout.threshold_words(threshold)
        drop = (seed_lo, seed_hi, off_bh.to(tl.uint32), site.to(tl.uint32), t_low, t_top_clear)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_k_tok, stride_v_tok, seqlen,
                                    0, n_full, qk_scale, q_base, drop,
                                    HEAD_DIM, BLOCK_M, BLOCK_N, False, HAS_DROPOUT, INPUT_PRECISION)
    if n_full < seqlen:
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_k_tok, stride_v_tok, seqlen,
                                        n_full, seqlen, qk_scale, q_base, drop,
                                        HEAD_DIM, BLOCK_M, BLOCK_N, True, HAS_DROPOUT, INPUT_PRECISION)
    out = acc * (dropout_scale / l_i)[:, None]
    tl.store(Out + rows[:, None] * stride_o_tok + off_h * stride_o_head + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask_m[:, None])
    tl.store(Lse + off_h * stride_lse_head + rows, m_i + tl.math.log2(l_i), mask=mask_m)


# ----------------------------------------------------------------------------------- launchers

_attn_fwd = autotuned(_attn_fwd_kernel, "fwd")
_attn_bwd = autotuned(_attn_bwd_kernel, "bwd",
                      heuristics={"ONE_Q_BLOCK": lambda args: args["max_seqlen"] <= args["BLOCK_M"]})


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 unless torch allows TF32 for matmuls (its own rule)."""
    if dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _seqlen_bucket(max_seqlen: int) -> int:
    """Autotune key: the next power of two, so 128 and 512 tune separately but 500 and 512 not."""
    return triton.next_power_of_2(max(max_seqlen, 16))


def _forward(q, k, v, cu_seqlens, seed, max_seqlen: int, site: int, softmax_scale: float,
             dropout_p: float, traced: bool = False):
    """out [T, heads, head_dim], lse [heads, T] float32 in base 2 (what the backward reads)."""
    total, heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    out = torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    if total == 0 or max_seqlen == 0:
        return out, lse
    threshold = dropout.keep_threshold(dropout_p)

    def grid(meta):
        return (-(-max_seqlen // meta["BLOCK_M"]), batch * heads)

    _launch(_attn_fwd, grid, traced)(
        q, k, v, out, lse, cu_seqlens, seed,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        heads, max_seqlen, _seqlen_bucket(max_seqlen), softmax_scale * LOG2E.value, threshold, site,
        dropout.dropout_scale(dropout_p),
        HEAD_DIM=head_dim, HAS_DROPOUT=threshold > 0, INPUT_PRECISION=_input_precision(q.dtype))
    return out, lse


def _backward(dout, q, k, v, out, lse, cu_seqlens, seed, max_seqlen: int, site: int,
              softmax_scale: float, dropout_p: float, dqkv: torch.Tensor, traced: bool = False) -> None:
    """Writes dq, dk, dv into dqkv [T, 3, heads, head_dim]."""
    total, heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    if total == 0 or max_seqlen == 0:
        return
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    delta = torch.empty_like(lse)
    block_t = 64 if not _INTERPRET else 16
    _launch(_attn_bwd_preprocess_kernel, (-(-total // block_t), heads), traced)(
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        delta.stride(0), total, HEAD_DIM=head_dim, BLOCK_T=block_t)
    threshold = dropout.keep_threshold(dropout_p)
    # The float32 dQ workspace serves sequences longer than one query tile.
    block_m = min(c.kwargs["BLOCK_M"] for c in candidates("bwd", head_dim, threshold > 0))
    acc = (torch.empty((total, heads, head_dim), dtype=torch.float32, device=q.device)
           if max_seqlen > block_m else lse)
    acc_strides = (acc.stride(0), acc.stride(1)) if acc.dim() == 3 else (0, 0)
    dq, dk, dv = dqkv.unbind(1)
    _launch(_attn_bwd, (batch * heads,), traced)(
        q, k, v, dout, dq, dk, dv, acc, lse, delta, cu_seqlens, seed,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1),
        dv.stride(0), dv.stride(1), *acc_strides, lse.stride(0),
        heads, max_seqlen, _seqlen_bucket(max_seqlen), softmax_scale * LOG2E.value, softmax_scale,
        threshold, site, dropout.dropout_scale(dropout_p),
        HEAD_DIM=head_dim, HAS_DROPOUT=threshold > 0, INPUT_PRECISION=_input_precision(q.dtype))


# ------------------------------------------------------------------ autograd: eager and traced

class _Attention(torch.autograd.Function):
    """Eager autograd for separate q, k, v; their gradients are views of one [T, 3, ...] buffer."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, seed, max_seqlen, site, softmax_scale, dropout_p):
        out, lse = _forward(q, k, v, cu_seqlens, seed, max_seqlen, site, softmax_scale, dropout_p)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed)
        ctx.args = (max_seqlen, site, softmax_scale, dropout_p)
        ctx.mark_non_differentiable(lse)
        # No zero-filled gradient for lse (a [heads, T] float32 memset per layer and step).
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens, seed = ctx.saved_tensors
        dqkv = torch.empty((q.shape[0], 3, *q.shape[1:]), dtype=q.dtype, device=q.device)
        _backward(dout, q, k, v, out, lse, cu_seqlens, seed, *ctx.args, dqkv)
        return (*dqkv.unbind(1), None, None, None, None, None, None)


class _AttentionQKV(torch.autograd.Function):
    """Eager autograd for the packed [T, 3, heads, head_dim] QKV; its gradient is one buffer."""

    @staticmethod
    def forward(ctx, qkv, cu_seqlens, seed, max_seqlen, site, softmax_scale, dropout_p):
        q, k, v = qkv.unbind(1)
        out, lse = _forward(q, k, v, cu_seqlens, seed, max_seqlen, site, softmax_scale, dropout_p)
        ctx.save_for_backward(qkv, out, lse, cu_seqlens, seed)
        ctx.args = (max_seqlen, site, softmax_scale, dropout_p)
        ctx.mark_non_differentiable(lse)
        # No zero-filled gradient for lse (a [heads, T] float32 memset per layer and step).
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        qkv, out, lse, cu_seqlens, seed = ctx.saved_tensors
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        _backward(dout, *qkv.unbind(1), out, lse, cu_seqlens, seed, *ctx.args, dqkv)
        return dqkv, None, None, None, None, None, None


@triton_op("bert_fast::attention_varlen_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      seed: torch.Tensor, max_seqlen: int, site: int, softmax_scale: float,
                      dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, cu_seqlens, seed, max_seqlen, site, softmax_scale, dropout_p,
                    traced=traced_body(q))


@triton_op("bert_fast::attention_varlen_bwd", mutates_args=())
def _attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                      seed: torch.Tensor, max_seqlen: int, site: int, softmax_scale: float,
                      dropout_p: float) -> torch.Tensor:
    dqkv = torch.empty((q.shape[0], 3, *q.shape[1:]), dtype=q.dtype, device=q.device)
    _backward(dout, q, k, v, out, lse, cu_seqlens, seed, max_seqlen, site, softmax_scale, dropout_p,
              dqkv, traced=traced_body(dqkv))
    return dqkv


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, seed, max_seqlen, site, softmax_scale, dropout_p = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed)
    ctx.args = (max_seqlen, site, softmax_scale, dropout_p)
    ctx.mark_non_differentiable(lse)


def _op_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, seed = ctx.saved_tensors
    dqkv = _attention_bwd_op(dout, q, k, v, out, lse, cu_seqlens, seed, *ctx.args)
    return (*dqkv.unbind(1), None, None, None, None, None, None)


_attention_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------------- public

def attention_varlen_unchecked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens: torch.Tensor, max_seqlen: int, *, dropout_p: float = 0.0,
                               softmax_scale: float | None = None, seed: torch.Tensor | None = None,
                               site: int = 0, qkv: torch.Tensor | None = None):
    """`attention_varlen` for callers that validated the arguments (bert_fast.ops). With `qkv`
    ([T, 3, heads, head_dim], whose unbind(1) are q, k, v) the gradient flows to it as one buffer.
    Returns (out, the log-sum-exp in base 2: [heads, T] float32)."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if seed is None:
        seed = dropout.new_seed(q.device) if dropout_p > 0 else cu_seqlens  # unread without dropout
    args = (cu_seqlens, seed, int(max_seqlen), int(site), float(softmax_scale), float(dropout_p))
    if _traced(q):
        return _attention_fwd_op(q, k, v, *args)
    if qkv is not None:
        return _AttentionQKV.apply(qkv, *args)
    return _Attention.apply(q, k, v, *args)


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when its base is 16-byte aligned and its strides are multiples of 16, as Triton
    specialises them (vectorised, pipelined loads; what kernels/attention_aot.py builds); else a
    contiguous copy, which always is (head_dim is a multiple of 16). Traced tensors (torch.compile,
    export) have no data pointer and Inductor aligns its own buffers: leave them."""
    if _traced(x):
        return x
    if x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s % 16 == 0 for s in x.stride()[:-1]):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _check_qkv(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed, site):
    check_tensor("q", q, ndim=3, dtypes=DTYPES)
    for name, value in (("k", k), ("v", v)):
        check_tensor(name, value, shape=tuple(q.shape))
    check_same(("q", "k", "v"), (q, k, v), "dtype")
    check_same(("q", "k", "v"), (q, k, v), "device")
    for name, value in (("q", q), ("k", k), ("v", v)):
        if value.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1), "
                             f"got strides {value.stride()}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"q has head_dim {q.shape[-1]}; supported: {HEAD_DIMS}")
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 entries (B + 1), got {cu_seqlens.shape[0]}")
    if (cu_seqlens.shape[0] - 1) * q.shape[1] > 65535:  # the forward grid's second axis
        raise ValueError(f"batch * heads = {(cu_seqlens.shape[0] - 1) * q.shape[1]} exceeds 65535; "
                         "split the batch")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    # Offsets within one sequence are int32 (cheaper addresses); the sequence base is int64.
    if (max_seqlen + 128) * max(q.stride(0), k.stride(0), v.stride(0), q.shape[1] * q.shape[2]) >= 2**31:
        raise ValueError(f"max_seqlen={max_seqlen} is too long for int32 offsets within a sequence "
                         f"at token strides {q.stride(0)}, {k.stride(0)}, {v.stride(0)}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive float or None, got {softmax_scale!r}")
    if seed is not None:
        check_tensor("seed", seed, shape=(1,), dtypes=(torch.int64,), device=q.device)
    if isinstance(site, bool) or not isinstance(site, int) or not 0 <= site < 2**32:
        raise ValueError(f"site must be an int in [0, 2**32), got {site!r}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """cu_seqlens starts at 0, never decreases, ends at T, and no sequence is longer than
    max_seqlen (else the kernels would read out of bounds or leave rows unwritten). Needs one
    device->host copy, so callers that built cu_seqlens themselves with `bert_fast.ops.padding.unpad`
    (the encoder, the padded form) pass `check=False` to `attention_varlen`."""
    diffs = cu_seqlens.diff()
    first, last, low, high = torch.stack([cu_seqlens[0], cu_seqlens[-1], diffs.min(),
                                          diffs.max()]).tolist()
    if first != 0 or last != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={total}, got {first} .. {last}")
    if low < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    if high > max_seqlen:
        raise ValueError(f"cu_seqlens holds a sequence of length {high} > max_seqlen={max_seqlen}")


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, dropout_p: float = 0.0, softmax_scale: float | None = None,
                     seed: torch.Tensor | None = None, site: int = 0, check: bool = True,
                     return_lse: bool = False):
    """Attention within each packed sequence. q, k, v: [T, heads, head_dim] (head_dim in
    HEAD_DIMS, stride(-1) == 1; token and head strides are free, so views of a fused QKV output
    need no copy); cu_seqlens [B + 1] int32; max_seqlen >= the longest sequence.

    dropout_p drops attention probabilities (p rounded to a multiple of 1/256, kept ones scaled by
    1 / (1 - that p): kernels/dropout.py) with Philox numbers keyed by `seed` ([1] int64 on q's
    device; drawn from torch's generator when None) and `site` (an int that separates call sites
    sharing a seed, e.g. layers). `check` validates cu_seqlens' values (one host sync; skip it only
    for cu_seqlens from `unpad`). Returns out [T, heads, head_dim], and with return_lse also the
    float32 log-sum-exp of the scaled scores, [heads, T] (what the backward recomputes the
    probabilities from)."""
    _check_qkv(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed, site)
    if check:
        check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    out, lse2 = attention_varlen_unchecked(_aligned(q), _aligned(k), _aligned(v), cu_seqlens, max_seqlen,
                                           dropout_p=dropout_p, softmax_scale=softmax_scale, seed=seed,
                                           site=site)
    return (out, lse2 * LN2.value) if return_lse else out


def attention_varlen_qkvpacked(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
                               dropout_p: float = 0.0, softmax_scale: float | None = None,
                               seed: torch.Tensor | None = None, site: int = 0,
                               check: bool = True) -> torch.Tensor:
    """`attention_varlen` on qkv [T, 3, heads, head_dim] (the fused QKV GEMM's output viewed so),
    whose gradient comes back as one buffer of that layout. Returns out [T, heads, head_dim]."""
    check_tensor("qkv", qkv, ndim=4, dtypes=DTYPES, shape=(None, 3, None, None))
    q, k, v = qkv.unbind(1)
    _check_qkv(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed, site)
    if check:
        check_cu_seqlens(cu_seqlens, qkv.shape[0], max_seqlen)
    packed = _aligned(qkv)
    return attention_varlen_unchecked(*packed.unbind(1), cu_seqlens, max_seqlen, dropout_p=dropout_p,
                                      softmax_scale=softmax_scale, seed=seed, site=site, qkv=packed)[0]


# ----------------------------------------------------------------------------------- reference

def dropout_mask(cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int, dropout_p: float,
                 seed: torch.Tensor, site: int = 0) -> list[torch.Tensor]:
    """The keep-mask the kernels draw, per sequence b: bool [heads, len_b, len_b] (tests only;
    the kernels never store it), from kernels/dropout.py's `keep_mask` with stream b * heads + h."""
    lengths = cu_seqlens.diff().tolist()
    return [torch.stack([dropout.keep_mask(seed, n, n, dropout_p, stream=b * num_heads + h, site=site)
                         for h in range(num_heads)]) if n else
            torch.zeros((num_heads, 0, 0), dtype=torch.bool, device=seed.device)
            for b, n in enumerate(lengths)]


def attention_varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens: torch.Tensor, *, softmax_scale: float | None = None,
                               dropout_masks: list[torch.Tensor] | None = None,
                               dropout_p: float = 0.0) -> torch.Tensor:
    """Plain PyTorch, one sequence at a time: softmax(q k^T * scale) (* keep * dropout_scale(p)) v,
    with the kernels' rounding of p (kernels/dropout.py)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    outs = []
    bounds = cu_seqlens.tolist()
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [heads, len, head_dim]
        p = torch.softmax((qs @ ks.transpose(-1, -2)) * scale, dim=-1)
        if dropout_masks is not None:
            p = p * dropout_masks[b] * dropout.dropout_scale(dropout_p)
        outs.append((p @ vs).transpose(0, 1))
    return torch.cat(outs) if outs else torch.empty_like(q)
