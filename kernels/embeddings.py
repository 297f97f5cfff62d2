"""Fused BERT embeddings: `dropout(LayerNorm(word[ids] + token_type[types] + position[pos]))`.

Eager PyTorch runs three gathers, two adds, the layer norm and dropout as separate passes over
`[tokens, hidden]`, with the mask stored. Here one program per token gathers the three rows, sums
them in float32, normalises, applies dropout and writes the output once; it saves float32
mean/rstd per token and the dropout seed.

Backward: one kernel recomputes the sum from the gathers (the position and token-type tables are
small and stay in L2; re-reading the word row costs what reading a saved sum would, without the
forward's extra write), regenerates the mask, writes `dh = d(word + type + position)` and per-program
dgamma/dbeta partials (summed in a second, deterministic stage). `dh` is then scattered into the three
tables by `torch.ops.aten.embedding_dense_backward`, the op F.embedding's own backward runs, and it
zeroes the `padding_idx` row as Hugging Face expects. On CUDA it adds each id's rows in a fixed
order without atomics: above 3072 tokens (every pretraining batch) it radix-sorts the ids and sums
each segment; below, a leader-warp shared-memory kernel, which has a rare reported race
(https://github.com/pytorch/pytorch/pull/187687). On the CPU it is a serial index_add. Writing our
own sort + segment-sum kernel would reproduce the sorted path.

Like kernels/layernorm.py, forward and backward are `torch.library.triton_op`s with
`register_autograd`; the seed is a [1] int64 device tensor.

References: NVIDIA Megatron-LM / apex fused embeddings, `kernels/layernorm.py` (same mask helper and
partial-sum scheme).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from bert_fast.checks import INT_DTYPES, check_same, check_tensor
from bert_fast.kernels.layernorm import (
    DTYPES,
    MAX_HIDDEN,
    _dropout_keep,
    _layer_norm_row,
    as_rows,
    backward_programs,
    block_config,
    new_seed,
)


@triton.jit
def _embeddings_fwd_kernel(
    InputIds,  # [M] int32/int64 word ids
    TokenTypeIds,  # [M] int32/int64
    PositionIds,  # [M] int32/int64
    Word,  # [V, N]
    TokenType,  # [TV, N]
    Position,  # [P, N]
    W,  # [N] gamma
    B,  # [N] beta
    Y,  # [M, N] output
    Mean,  # [M] float32
    Rstd,  # [M] float32
    Seed,  # [1] int64 dropout seed (read only if HAS_DROPOUT)
    stride_word_row,
    stride_type_row,
    stride_pos_row,
    stride_y_row,
    N,
    eps,
    dropout_p,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    word_id = tl.load(InputIds + row).to(tl.int64)
    type_id = tl.load(TokenTypeIds + row).to(tl.int64)
    pos_id = tl.load(PositionIds + row).to(tl.int64)
    h = tl.load(Word + word_id * stride_word_row + cols, mask=mask, other=0.0).to(tl.float32)
    h += tl.load(TokenType + type_id * stride_type_row + cols, mask=mask, other=0.0).to(tl.float32)
    h += tl.load(Position + pos_id * stride_pos_row + cols, mask=mask, other=0.0).to(tl.float32)
    y = _layer_norm_row(h, cols, mask, N, eps, W, B, Mean, Rstd, row)
    if HAS_DROPOUT:
        keep = _dropout_keep(tl.load(Seed), row * N + cols, dropout_p)
        y = tl.where(keep, y / (1.0 - dropout_p), 0.0)
    tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "rows_per_program"])
def _embeddings_bwd_kernel(
    InputIds,  # [M]
    TokenTypeIds,  # [M]
    PositionIds,  # [M]
    Word,  # [V, N]
    TokenType,  # [TV, N]
    Position,  # [P, N]
    W,  # [N]
    Mean,  # [M] float32
    Rstd,  # [M] float32
    Seed,  # [1] int64 (read only if HAS_DROPOUT)
    DY,  # [M, N] gradient of the output
    DH,  # [M, N] gradient of the summed embeddings
    DW,  # [n_programs, N] float32 partial sums of dgamma
    DB,  # [n_programs, N] float32 partial sums of dbeta
    stride_word_row,
    stride_type_row,
    stride_pos_row,
    stride_dy_row,
    stride_dh_row,
    M,
    N,
    dropout_p,
    rows_per_program,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    for row in range(row_start, row_end):
        word_id = tl.load(InputIds + row).to(tl.int64)
        type_id = tl.load(TokenTypeIds + row).to(tl.int64)
        pos_id = tl.load(PositionIds + row).to(tl.int64)
        h = tl.load(Word + word_id * stride_word_row + cols, mask=mask, other=0.0).to(tl.float32)
        h += tl.load(TokenType + type_id * stride_type_row + cols, mask=mask, other=0.0).to(tl.float32)
        h += tl.load(Position + pos_id * stride_pos_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)
        dy = tl.load(DY + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, row * N + cols, dropout_p)
            dy = tl.where(keep, dy / (1.0 - dropout_p), 0.0)
        dw += dy * xhat
        db += dy
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        c2 = tl.sum(wdy, axis=0) / N
        dh = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DH + row * stride_dh_row + cols, dh.to(DH.dtype.element_ty), mask=mask)
    tl.store(DW + pid * N + cols, dw, mask=mask)
    tl.store(DB + pid * N + cols, db, mask=mask)


@triton_op("bert_fast::embeddings_fwd", mutates_args=())
def _embeddings_fwd(ids: torch.Tensor, types: torch.Tensor, positions: torch.Tensor, word: torch.Tensor,
                    position: torch.Tensor, token_type: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor, seed: torch.Tensor, eps: float, padding_idx: int,
                    dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, types, positions: [M] contiguous. Returns y [M, N] and float32 mean, rstd [M].
    (padding_idx is only for the backward.)"""
    rows, hidden = ids.shape[0], word.shape[1]
    y = torch.empty((rows, hidden), device=word.device, dtype=word.dtype)
    mean = torch.empty(rows, device=word.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=word.device, dtype=torch.float32)
    if rows == 0:
        return y, mean, rstd
    block, warps = block_config(hidden)
    wrap_triton(_embeddings_fwd_kernel)[(rows,)](
        ids, types, positions, word, token_type, position, weight, bias, y, mean, rstd, seed,
        word.stride(0), token_type.stride(0), position.stride(0), y.stride(0),
        hidden, eps, dropout_p, HAS_DROPOUT=dropout_p > 0.0, BLOCK_N=block, num_warps=warps)
    return y, mean, rstd


@triton_op("bert_fast::embeddings_bwd", mutates_args=())
def _embeddings_bwd(dy: torch.Tensor, ids: torch.Tensor, types: torch.Tensor, positions: torch.Tensor,
                    word: torch.Tensor, position: torch.Tensor, token_type: torch.Tensor,
                    weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, seed: torch.Tensor,
                    dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns dh [M, N] (word's dtype, the gradient of the summed embeddings) and the float32
    column sums [2, N] of dgamma and dbeta."""
    rows, hidden = dy.shape
    dh = torch.empty((rows, hidden), device=word.device, dtype=word.dtype)
    programs = backward_programs(word.device, rows)
    partial = torch.empty((2, programs, hidden), device=word.device, dtype=torch.float32)
    if rows > 0:
        block, warps = block_config(hidden)
        wrap_triton(_embeddings_bwd_kernel)[(programs,)](
            ids, types, positions, word, token_type, position, weight, mean, rstd, seed, dy, dh,
            partial[0], partial[1], word.stride(0), token_type.stride(0), position.stride(0),
            dy.stride(0), dh.stride(0), rows, hidden, dropout_p, triton.cdiv(rows, programs),
            HAS_DROPOUT=dropout_p > 0.0, BLOCK_N=block, num_warps=warps)
    return dh, partial.sum(1)  # the sum over programs is the deterministic second stage


def _setup_context(ctx, inputs, output):
    ids, types, positions, word, position, token_type, weight, _bias, seed, _eps, padding_idx, \
        dropout_p = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(ids, types, positions, word, position, token_type, weight, mean, rstd, seed)
    ctx.padding_idx, ctx.dropout_p = padding_idx, dropout_p
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    ids, types, positions, word, position, token_type, weight, mean, rstd, seed = ctx.saved_tensors
    dh, sums = _embeddings_bwd(as_rows(dy), ids, types, positions, word, position, token_type, weight,
                               mean, rstd, seed, ctx.dropout_p)
    need = ctx.needs_input_grad
    scatter = torch.ops.aten.embedding_dense_backward
    dword = scatter(dh, ids, word.shape[0], ctx.padding_idx, False) if need[3] else None
    dpos = scatter(dh, positions, position.shape[0], -1, False) if need[4] else None
    dtype = scatter(dh, types, token_type.shape[0], -1, False) if need[5] else None
    return (None, None, None, dword, dpos, dtype, sums[0].to(weight.dtype), sums[1].to(weight.dtype),
            None, None, None, None)


_embeddings_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(input_ids, token_type_ids, position_ids, word, position, token_type, norm_weight,
           norm_bias, eps, padding_idx, dropout_p, seed, check_ids) -> int:
    """Validates everything; returns padding_idx normalised to [0, V) or -1 for none."""
    check_tensor("input_ids", input_ids, dtypes=INT_DTYPES)
    for name, value in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
        check_tensor(name, value, dtypes=INT_DTYPES, shape=tuple(input_ids.shape))
    check_tensor("word", word, ndim=2, dtypes=DTYPES)
    hidden = word.shape[1]
    if hidden == 0 or hidden > MAX_HIDDEN:
        raise ValueError(f"word's hidden size must be in [1, {MAX_HIDDEN}], got {hidden}")
    for name, value in (("position", position), ("token_type", token_type)):
        check_tensor(name, value, ndim=2, shape=(None, hidden))
    for name, value in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        check_tensor(name, value, shape=(hidden,))
    names = ("word", "position", "token_type", "norm_weight", "norm_bias")
    tensors = (word, position, token_type, norm_weight, norm_bias)
    check_same(names, tensors, "dtype")
    check_same(names + ("input_ids", "token_type_ids", "position_ids"),
               tensors + (input_ids, token_type_ids, position_ids), "device")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if seed is not None:
        check_tensor("seed", seed, shape=(1,), dtypes=(torch.int64,), device=word.device)
    vocab = word.shape[0]
    if padding_idx is None:
        padding_idx = -1
    elif (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)
          or not -vocab <= padding_idx < vocab):
        raise ValueError(f"padding_idx must be None or an int in [-{vocab}, {vocab}), got {padding_idx!r}")
    elif padding_idx < 0:
        padding_idx += vocab
    if check_ids and input_ids.numel():
        # One device->host copy for all three: a bad id must never reach the kernel's gathers.
        named = {"input_ids": (input_ids, vocab), "token_type_ids": (token_type_ids, token_type.shape[0]),
                 "position_ids": (position_ids, position.shape[0])}
        stats = torch.stack([torch.stack([t.min(), t.max()]) for t, _ in named.values()]).tolist()
        for (name, (_, size)), (low, high) in zip(named.items(), stats):
            if low < 0 or high >= size:
                raise ValueError(f"{name} contains {low if low < 0 else high}; allowed values are "
                                 f"[0, {size - 1}]")
    return padding_idx


def embeddings(input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor,
               word: torch.Tensor, position: torch.Tensor, token_type: torch.Tensor,
               norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float = 1e-12, *,
               padding_idx: int | None = None, dropout_p: float = 0.0,
               seed: torch.Tensor | None = None, check_ids: bool = True) -> torch.Tensor:
    """`dropout(LayerNorm(word[input_ids] + token_type[token_type_ids] + position[position_ids]))`
    for ids of any shape; returns `[*ids.shape, hidden]` in the tables' dtype. `padding_idx` keeps
    that word row's gradient at zero. `check_ids` validates id ranges (one device->host copy);
    pass False only when the caller already has (the kernel gathers without bounds checks)."""
    padding_idx = _check(input_ids, token_type_ids, position_ids, word, position, token_type,
                         norm_weight, norm_bias, eps, padding_idx, dropout_p, seed, check_ids)
    dropout_p = float(dropout_p)
    if seed is None:
        seed = new_seed(dropout_p, word.device)
    y, _, _ = _embeddings_fwd(
        input_ids.reshape(-1).contiguous(), token_type_ids.reshape(-1).contiguous(),
        position_ids.reshape(-1).contiguous(), word.contiguous(), position.contiguous(),
        token_type.contiguous(), norm_weight.contiguous(), norm_bias.contiguous(), seed, float(eps),
        padding_idx, dropout_p)
    return y.view(*input_ids.shape, word.shape[1])


def embeddings_reference(input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                         position_ids: torch.Tensor, word: torch.Tensor, position: torch.Tensor,
                         token_type: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                         eps: float = 1e-12, *, padding_idx: int | None = None, dropout_p: float = 0.0,
                         keep: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch in the tables' dtype. With `keep` ([*ids.shape, hidden], bool) dropout uses
    that mask, else torch's own dropout when dropout_p > 0."""
    h = F.embedding(input_ids, word, padding_idx) + F.embedding(token_type_ids, token_type)
    h = h + F.embedding(position_ids, position)
    h = F.layer_norm(h, (h.shape[-1],), norm_weight, norm_bias, eps)
    if keep is not None:
        return h * keep / (1.0 - dropout_p)
    return F.dropout(h, dropout_p) if dropout_p > 0 else h
