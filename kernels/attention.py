"""Bidirectional multi-head attention for packed (unpadded) BERT batches: FlashAttention-2 in Triton.

What is fused, and why: `softmax(Q K^T * scale) V` with attention-probability dropout runs in one
kernel per direction, tile by tile, so the [S, S] score and probability matrices never reach
global memory (the eager form writes and re-reads them several times, which dominates its time and
memory at seq 512). The forward keeps an online softmax in float32 (running max and sum, exp2 with
log2(e) folded into the scale) and saves only the log-sum-exp per row; the backward recomputes the
probabilities from it. Dropout draws Philox numbers with `tl.rand(seed, offset)` where the offset
is a function of (query token, head, key index), so the backward regenerates the forward's mask
without storing it; p = 0 compiles a variant without any RNG.

Layout: q, k, v are [T, heads, head_dim] (T = real tokens of the whole batch; rows may be strided,
e.g. views of one fused QKV GEMM output), `cu_seqlens` [B + 1] int32 marks where each sequence
starts, and `max_seqlen` sizes the grid (programs past their sequence's end exit at once), so
padding costs nothing. Backward: a preprocess kernel computes delta = rowsum(dO * O), one kernel
computes dK and dV per key block, another dQ per query block: no atomics, deterministic.

Files: this one holds the forward kernel, launchers, autograd, public functions and reference;
kernels/attention_bwd.py the backward kernels; kernels/attention_tiles.py the autotune candidates,
their register-budget pruning and the device helpers both directions share.

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
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from bert_fast.checks import check_same, check_tensor
from bert_fast.kernels.attention_bwd import (
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_bwd_preprocess_kernel,
)
from bert_fast.kernels.attention_tiles import (  # noqa: F401 (configs re-exported for attention_aot)
    _INTERPRET,
    _INTERPRETER_CONFIGS,
    BWD_KV_CONFIGS,
    BWD_Q_CONFIGS,
    FWD_CONFIGS,
    LN2,
    LOG2E,
    _autotuned,
    _dropout_keep,
    kept_configs,
)
from bert_fast.padding import unpad

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_k_tok, stride_v_tok, seqlen, lo, hi, qk_scale,
                    seed, rng_row, dropout_p,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
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
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, rng_row, offs_n, dropout_p), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,  # [T, heads, HEAD_DIM]
    K,  # [T, heads, HEAD_DIM]
    V,  # [T, heads, HEAD_DIM]
    Out,  # [T, heads, HEAD_DIM]
    Lse,  # [heads, T] float32, natural log
    CuSeqlens,  # [B + 1] int32
    Seed,  # [1] int64, read only when HAS_DROPOUT
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_o_tok, stride_o_head, stride_lse_head,
    num_heads, max_seqlen, seqlen_bucket, qk_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
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
    K += seq_start * stride_k_tok + off_h * stride_k_head
    V += seq_start * stride_v_tok + off_h * stride_v_head
    seed = 0
    rng_row = rows
    if HAS_DROPOUT:
        seed = tl.load(Seed)
        rng_row = (rows * num_heads + off_h) * max_seqlen

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_k_tok, stride_v_tok, seqlen,
                                    0, n_full, qk_scale, seed, rng_row, dropout_p,
                                    HEAD_DIM, BLOCK_N, False, HAS_DROPOUT, INPUT_PRECISION)
    if n_full < seqlen:
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_k_tok, stride_v_tok, seqlen,
                                        n_full, seqlen, qk_scale, seed, rng_row, dropout_p,
                                        HEAD_DIM, BLOCK_N, True, HAS_DROPOUT, INPUT_PRECISION)
    out = acc / l_i[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    tl.store(Out + rows[:, None] * stride_o_tok + off_h * stride_o_head + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask_m[:, None])
    tl.store(Lse + off_h * stride_lse_head + rows, (m_i + tl.math.log2(l_i)) * LN2, mask=mask_m)


@triton.jit
def _dropout_mask_kernel(
    Keep,  # [heads, max_seqlen, max_seqlen] per sequence b, int8 (tests only)
    CuSeqlens,  # [B + 1] int32
    Seed,  # [1] int64
    off_b, num_heads, max_seqlen, dropout_p,
    BLOCK: tl.constexpr,
):
    """The kernels' dropout mask for one sequence, drawn with the same offsets (tests only)."""
    off_h = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1)
    seq_start = tl.load(CuSeqlens + off_b).to(tl.int64)
    offs_m = start_m * BLOCK + tl.arange(0, BLOCK)
    rng_row = ((seq_start + offs_m) * num_heads + off_h) * max_seqlen
    for start_n in range(0, max_seqlen, BLOCK):
        offs_n = start_n + tl.arange(0, BLOCK)
        keep = _dropout_keep(tl.load(Seed), rng_row, offs_n, dropout_p)
        mask = (offs_m[:, None] < max_seqlen) & (offs_n[None, :] < max_seqlen)
        tl.store(Keep + (off_h * max_seqlen + offs_m[:, None]) * max_seqlen + offs_n[None, :],
                 keep.to(tl.int8), mask=mask)


# ----------------------------------------------------------------------------------- launchers

_attn_fwd = _autotuned(_attn_fwd_kernel, "fwd", _INTERPRETER_CONFIGS if _INTERPRET else FWD_CONFIGS)
_attn_bwd_dkdv = _autotuned(_attn_bwd_dkdv_kernel, "bwd_dkdv",
                            _INTERPRETER_CONFIGS if _INTERPRET else BWD_KV_CONFIGS)
_attn_bwd_dq = _autotuned(_attn_bwd_dq_kernel, "bwd_dq",
                          _INTERPRETER_CONFIGS if _INTERPRET else BWD_Q_CONFIGS)


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 unless torch allows TF32 for matmuls (its own rule)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _seqlen_bucket(max_seqlen: int) -> int:
    """Autotune key: the next power of two, so 128 and 512 tune separately but 500 and 512 not."""
    return triton.next_power_of_2(max(max_seqlen, 16))


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when its base is 16-byte aligned and its strides are multiples of 16, as Triton
    specialises them (vectorised, pipelined loads; what kernels/attention_aot.py builds); else a
    contiguous copy, which always is (head_dim is a multiple of 16). Traced tensors (torch.compile,
    export) have no data pointer and Inductor aligns its own buffers: leave them."""
    if torch.compiler.is_compiling() or is_fake(x):
        return x
    if x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s % 16 == 0 for s in x.stride()[:-1]):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _check_qkv(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
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
    if (cu_seqlens.shape[0] - 1) * q.shape[1] > 65535:  # the grid's second axis
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


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """cu_seqlens starts at 0, never decreases, ends at T, and no sequence is longer than
    max_seqlen (else the kernels would read out of bounds or leave rows unwritten). Needs one
    device->host copy, so callers that built cu_seqlens themselves with `bert_fast.padding.unpad`
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


@triton_op("bert_fast::attention_varlen_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                   seed: torch.Tensor, max_seqlen: int, softmax_scale: float,
                   dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    total, heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    out = torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    if total == 0 or max_seqlen == 0:
        return out, lse

    def grid(meta):
        return (triton.cdiv(max_seqlen, meta["BLOCK_M"]), batch * heads)

    wrap_triton(_attn_fwd)[grid](
        q, k, v, out, lse, cu_seqlens, seed,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        heads, max_seqlen, _seqlen_bucket(max_seqlen), softmax_scale * LOG2E.value, dropout_p,
        HEAD_DIM=head_dim, INPUT_PRECISION=_input_precision(q.dtype))
    return out, lse


@triton_op("bert_fast::attention_varlen_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                   seed: torch.Tensor, max_seqlen: int, softmax_scale: float,
                   dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    total, heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    dq, dk, dv = (torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device)
                  for _ in range(3))
    if total == 0 or max_seqlen == 0:
        return dq, dk, dv
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    delta = torch.empty_like(lse)
    block_t = 64 if not _INTERPRET else 16
    wrap_triton(_attn_bwd_preprocess_kernel)[(triton.cdiv(total, block_t), heads)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        delta.stride(0), total, HEAD_DIM=head_dim, BLOCK_T=block_t)
    common = dict(HEAD_DIM=head_dim, INPUT_PRECISION=_input_precision(q.dtype))
    scalars = (heads, max_seqlen, _seqlen_bucket(max_seqlen), softmax_scale * LOG2E.value, softmax_scale,
               dropout_p)

    def grid_kv(meta):
        return (triton.cdiv(max_seqlen, meta["BLOCK_N"]), batch * heads)

    wrap_triton(_attn_bwd_dkdv)[grid_kv](
        q, k, v, dout, dk, dv, lse, delta, cu_seqlens, seed,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), *scalars, **common)

    def grid_q(meta):
        return (triton.cdiv(max_seqlen, meta["BLOCK_M"]), batch * heads)

    wrap_triton(_attn_bwd_dq)[grid_q](
        q, k, v, dout, dq, lse, delta, cu_seqlens, seed,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        *scalars, **common)
    return dq, dk, dv


# ------------------------------------------------------------------------------------ autograd

def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, seed, max_seqlen, softmax_scale, dropout_p = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed)
    ctx.max_seqlen, ctx.softmax_scale, ctx.dropout_p = max_seqlen, softmax_scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, cu_seqlens, seed, ctx.max_seqlen,
                                ctx.softmax_scale, ctx.dropout_p)
    return dq, dk, dv, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------------- public

def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, dropout_p: float = 0.0, softmax_scale: float | None = None,
                     seed: torch.Tensor | None = None, check: bool = True,
                     return_lse: bool = False):
    """Attention within each packed sequence. q, k, v: [T, heads, head_dim] (head_dim in
    HEAD_DIMS, stride(-1) == 1; token and head strides are free, so views of a fused QKV output
    need no copy); cu_seqlens [B + 1] int32; max_seqlen >= the longest sequence.

    dropout_p drops attention probabilities (scaled by 1 / (1 - p)) with Philox numbers from
    `seed` ([1] int64 on q's device; drawn from torch's generator when None). `check` validates
    cu_seqlens' values (one host sync; skip it only for cu_seqlens from `unpad`). Returns out
    [T, heads, head_dim], and with return_lse also the float32 log-sum-exp of the scaled scores,
    [heads, T] (what the backward recomputes the probabilities from)."""
    _check_qkv(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed)
    if check:
        check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if seed is None:
        seed = (torch.randint(0, 2**62, (1,), device=q.device) if dropout_p > 0
                else torch.zeros(1, dtype=torch.int64, device=q.device))
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    out, lse = _attention_fwd(q, k, v, cu_seqlens, seed, max_seqlen, float(softmax_scale),
                              float(dropout_p))
    return (out, lse) if return_lse else out


def attention_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor,
                     *, dropout_p: float = 0.0, softmax_scale: float | None = None,
                     seed: torch.Tensor | None = None) -> torch.Tensor:
    """The convenience form for padded [B, S, heads, head_dim] inputs with a [B, S] mask (nonzero =
    real token): unpad (one host sync), attend, re-pad. Padding queries get zeros."""
    check_tensor("q", q, ndim=4, dtypes=DTYPES)
    for name, value in (("k", k), ("v", v)):
        check_tensor(name, value, shape=tuple(q.shape))
    check_tensor("key_padding_mask", key_padding_mask, shape=tuple(q.shape[:2]), device=q.device)
    packing = unpad(key_padding_mask)
    out = attention_varlen(packing.pack(q), packing.pack(k), packing.pack(v), packing.cu_seqlens,
                           packing.max_seqlen, dropout_p=dropout_p, softmax_scale=softmax_scale,
                           seed=seed, check=False)
    return packing.pad(out)


# ----------------------------------------------------------------------------------- reference

def dropout_mask(cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int, dropout_p: float,
                 seed: torch.Tensor) -> list[torch.Tensor]:
    """The keep-mask the kernels draw, per sequence b: bool [heads, len_b, len_b] (tests only;
    the kernels never store it). Regenerated by a tiny kernel through the same `_dropout_keep`."""
    masks = []
    lengths = cu_seqlens.diff().tolist()
    block = 16
    for b, length in enumerate(lengths):
        keep = torch.empty((num_heads, max_seqlen, max_seqlen), dtype=torch.int8, device=seed.device)
        if max_seqlen > 0:
            _dropout_mask_kernel[(num_heads, triton.cdiv(max_seqlen, block))](
                keep, cu_seqlens, seed, b, num_heads, max_seqlen, float(dropout_p), BLOCK=block)
        masks.append(keep[:, :length, :length].bool())
    return masks


def attention_varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens: torch.Tensor, *, softmax_scale: float | None = None,
                               dropout_masks: list[torch.Tensor] | None = None,
                               dropout_p: float = 0.0) -> torch.Tensor:
    """Plain PyTorch, one sequence at a time: softmax(q k^T * scale) (* keep / (1 - p)) v."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    outs = []
    bounds = cu_seqlens.tolist()
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [heads, len, head_dim]
        p = torch.softmax((qs @ ks.transpose(-1, -2)) * scale, dim=-1)
        if dropout_masks is not None:
            p = p * dropout_masks[b] / (1.0 - dropout_p)
        outs.append((p @ vs).transpose(0, 1))
    return torch.cat(outs) if outs else torch.empty_like(q)

