"""Fused BERT embeddings: `dropout(LayerNorm(word[ids] + token_type[types] + position[pos]))`.

Eager PyTorch runs three gathers, two adds, the layer norm and dropout as separate passes over
`[tokens, hidden]`, with the mask stored. Here one kernel gathers the three rows of each token, sums
them in float32, normalises, applies dropout and writes the output once (kernels/row_norm.py's
tiling: row pairs, hidden in chunks). The encoder calls it on the real tokens only (ids gathered
through the batch's packing first), so padding is never embedded.

Backward: when a gradient is wanted the forward also writes x-hat (LayerNorm's normalised input,
x's dtype) and rstd, so the backward neither gathers the table rows again nor recomputes the sum: one
kernel applies the dropout mask to dy, forms dh = d(word + type + position) and per-program dgamma
and dbeta partials, one finalize launch sums those (no atomics, deterministic). dh then reaches the
tables in two passes: the word rows by a sorted segment sum (kernels/segment_sum.py: deterministic,
no atomics, no host sync, which `aten.embedding_dense_backward` needs once per table), the position
and token-type rows by one more over (position, type) pairs, in float32, whose two small sums over
the other axis give both tables. The `padding_idx` row gets no gradient, as in Hugging Face. No
step of forward or backward reads the device from the host.

Dropout comes from kernels/dropout.py's row-pair layout (16 decisions per Philox call) keyed by a
[1] int64 seed and an int `site`. `embeddings` validates (ids in range cost one host sync; bert_fast.ops
skips that check when the batch was validated on the host); eager calls run a plain
`torch.autograd.Function`, tracing the `bert_fast::embeddings_fwd/bwd` triton_ops.

References: NVIDIA Megatron-LM / apex fused embeddings, `kernels/layernorm.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from bert_fast.kernels import dropout
from bert_fast.kernels import row_norm as rn
from bert_fast.kernels.checks import INT_DTYPES, check_same, check_tensor
from bert_fast.kernels.launch import launch as _launch
from bert_fast.kernels.launch import traced as _traced
from bert_fast.kernels.launch import traced_body
from bert_fast.kernels.segment_sum import segment_sum

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HIDDEN = rn.MAX_HIDDEN


@triton.jit
def _gather(Table, Ids, rows, stride_row, n_rows, n_cols, CHUNK: tl.constexpr, K: tl.constexpr):
    """Rows Table[Ids[rows]] as K float32 chunks (zeros for rows past n_rows)."""
    valid = rows < n_rows
    base = tl.load(Ids + rows, mask=valid, other=0).to(tl.int64)[:, None] * stride_row
    out = ()
    for k in tl.static_range(K):
        cols = k * CHUNK + tl.arange(0, CHUNK)
        mask = valid[:, None] & (cols < n_cols)[None, :]
        out = out + (tl.load(Table + base + cols[None, :], mask=mask, other=0.0).to(tl.float32),)
    return out


@triton.jit
def _fwd_rows(InputIds, TokenTypeIds, PositionIds, Word, TokenType, Position, Y, XHat, Rstd, rows, w, b, drop,
              stride_word_row, stride_type_row, stride_pos_row, stride_y_row, n_rows, n_cols, eps,
              dropout_scale,
              HAS_DROPOUT: tl.constexpr, SAVE: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr):
    h = _gather(Word, InputIds, rows, stride_word_row, n_rows, n_cols, CHUNK, K)
    h = rn.accumulate(h, _gather(TokenType, TokenTypeIds, rows, stride_type_row, n_rows, n_cols, CHUNK, K), K)
    h = rn.accumulate(h, _gather(Position, PositionIds, rows, stride_pos_row, n_rows, n_cols, CHUNK, K), K)
    y, xhat, _, rstd = rn.normalize(h, w, b, n_cols, eps, CHUNK, K)
    if HAS_DROPOUT:
        scaled = ()
        for k in tl.static_range(K):
            scaled = scaled + (y[k] * dropout_scale,)
        y = rn.drop_rows(scaled, rows, drop, CHUNK, K)
    rn.store_rows(Y, rows, stride_y_row, n_rows, n_cols, y, CHUNK, K)
    if SAVE:
        tl.store(Rstd + rows, rstd, mask=rows < n_rows)
        rn.store_rows(XHat, rows, stride_y_row, n_rows, n_cols, xhat, CHUNK, K)


@triton.jit
def _embeddings_fwd_kernel(
    InputIds,  # [M] int32/int64 word ids (validated: the gathers are not bounds-checked)
    TokenTypeIds,  # [M] int32/int64
    PositionIds,  # [M] int32/int64
    Word,  # [V, N]
    TokenType,  # [TV, N]
    Position,  # [P, N]
    W,  # [N] gamma
    B,  # [N] beta
    Y,  # [M, N] output
    XHat,  # [M, N] x-hat in Y's dtype and strides (written only if SAVE)
    Rstd,  # [M] float32 (written only if SAVE)
    Seed,  # [1] int64 dropout seed (read only if HAS_DROPOUT)
    stride_word_row, stride_type_row, stride_pos_row, stride_y_row, n_rows, n_cols, eps, threshold, site,
    dropout_scale,
    HAS_DROPOUT: tl.constexpr, SAVE: tl.constexpr, HALF: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr,
):
    w = rn.load_vector(W, n_cols, CHUNK, K)
    b = rn.load_vector(B, n_cols, CHUNK, K)
    drop = (0, 0, 0, 0, 0)
    if HAS_DROPOUT:
        drop = rn.dropout_words(Seed, threshold, site)
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, 2 * HALF), tl.num_programs(0)):
        even = tile * 2 * HALF + 2 * tl.arange(0, HALF)
        _fwd_rows(InputIds, TokenTypeIds, PositionIds, Word, TokenType, Position, Y, XHat, Rstd, even, w,
                  b, drop,
                  stride_word_row, stride_type_row, stride_pos_row, stride_y_row, n_rows, n_cols, eps,
                  dropout_scale, HAS_DROPOUT, SAVE, CHUNK, K)
        _fwd_rows(InputIds, TokenTypeIds, PositionIds, Word, TokenType, Position, Y, XHat, Rstd, even + 1,
                  w, b,
                  drop, stride_word_row, stride_type_row, stride_pos_row, stride_y_row, n_rows, n_cols, eps,
                  dropout_scale, HAS_DROPOUT, SAVE, CHUNK, K)


@triton.jit
def _bwd_rows(XHat, Rstd, DY, DH, rows, w, drop, sums, stride_xhat_row, stride_dy_row, stride_dh_row, n_rows,
              n_cols, dropout_scale, HAS_DROPOUT: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr):
    xhat = rn.load_rows(XHat, rows, stride_xhat_row, n_rows, n_cols, CHUNK, K)
    rstd = tl.load(Rstd + rows, mask=rows < n_rows, other=0.0)
    dy = rn.load_rows(DY, rows, stride_dy_row, n_rows, n_cols, CHUNK, K)
    if HAS_DROPOUT:  # dropout follows the LayerNorm: its mask and scale come first here
        dy = rn.drop_rows(dy, rows, drop, CHUNK, K)
        scaled = ()
        for k in tl.static_range(K):
            scaled = scaled + (dy[k] * dropout_scale,)
        dy = scaled
    dh = rn.normalize_backward(xhat, dy, w, rstd, n_cols, K)
    rn.store_rows(DH, rows, stride_dh_row, n_rows, n_cols, dh, CHUNK, K)
    dw, db = sums
    gw = ()
    for k in tl.static_range(K):
        gw = gw + (dy[k] * xhat[k],)
    return rn.accumulate(dw, gw, K), rn.accumulate(db, dy, K)


@triton.jit(do_not_specialize=["n_rows"])
def _embeddings_bwd_kernel(
    XHat,  # [M, N] saved by the forward
    Rstd,  # [M] float32
    W,  # [N]
    Seed,  # [1] int64 (read only if HAS_DROPOUT)
    DY,  # [M, N] gradient of the output
    DH,  # [M, N] gradient of the summed embeddings
    Partial,  # [2, programs, N] float32 per-program sums of dgamma and dbeta
    stride_xhat_row, stride_dy_row, stride_dh_row, n_rows, n_cols, threshold, site, dropout_scale,
    HAS_DROPOUT: tl.constexpr, HALF: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr,
):
    pid = tl.program_id(0)
    w = rn.load_vector(W, n_cols, CHUNK, K)
    drop = (0, 0, 0, 0, 0)
    if HAS_DROPOUT:
        drop = rn.dropout_words(Seed, threshold, site)
    zero = rn.zeros(HALF, CHUNK, K)
    sums = (zero, zero)
    for tile in range(pid, tl.cdiv(n_rows, 2 * HALF), tl.num_programs(0)):
        even = tile * 2 * HALF + 2 * tl.arange(0, HALF)
        sums = _bwd_rows(XHat, Rstd, DY, DH, even, w, drop, sums, stride_xhat_row, stride_dy_row,
                         stride_dh_row,
                         n_rows, n_cols, dropout_scale, HAS_DROPOUT, CHUNK, K)
        sums = _bwd_rows(XHat, Rstd, DY, DH, even + 1, w, drop, sums, stride_xhat_row, stride_dy_row,
                         stride_dh_row, n_rows, n_cols, dropout_scale, HAS_DROPOUT, CHUNK, K)
    dw, db = sums
    rn.store_partial(Partial, pid, n_cols, dw, CHUNK, K)
    rn.store_partial(Partial + tl.num_programs(0) * n_cols, pid, n_cols, db, CHUNK, K)


# ----------------------------------------------------------------------------------- launchers

def _forward(ids, types, positions, word, position, token_type, weight, bias, seed, eps: float,
             dropout_p: float, site: int, save: bool, traced: bool = False):
    """ids, types, positions: [M] contiguous. Returns y [M, N], and with `save` x-hat [M, N] and
    float32 rstd [M] (else empty tensors)."""
    rows, hidden = ids.shape[0], word.shape[1]
    y = torch.empty((rows, hidden), device=word.device, dtype=word.dtype)
    xhat = torch.empty((rows, hidden) if save else (0,), device=word.device, dtype=word.dtype)
    rstd = torch.empty(rows if save else 0, device=word.device, dtype=torch.float32)
    if rows == 0:
        return y, xhat, rstd
    config = rn.launch_config(hidden)
    threshold = dropout.keep_threshold(dropout_p)
    _launch(_embeddings_fwd_kernel, (rn.programs(word.device, rows, config["HALF"], per_sm=8),), traced)(
        ids, types, positions, word, token_type, position, weight, bias, y, xhat if save else y,
        rstd if save else weight, seed, word.stride(0), token_type.stride(0), position.stride(0), y.stride(0),
        rows, hidden, eps, threshold, site, dropout.dropout_scale(dropout_p), HAS_DROPOUT=threshold > 0,
        SAVE=save, **config)
    return y, xhat, rstd


def _backward(dy, ids, types, positions, xhat, rstd, weight, vocab: int, positions_size: int, type_vocab: int,
              seed, padding_idx: int, dropout_p: float, site: int, need: tuple, traced: bool = False):
    """(dword, dposition, dtoken_type, dweight, dbias); a table gradient is None when not needed."""
    rows, hidden = dy.shape
    threshold = dropout.keep_threshold(dropout_p)
    dh = torch.empty((rows, hidden), device=dy.device, dtype=xhat.dtype)
    outs = [torch.empty_like(weight), torch.empty_like(weight)]
    config = rn.launch_config(hidden)
    n_programs = rn.programs(dy.device, rows, config["HALF"])
    partial = torch.empty((2, n_programs, hidden), device=dy.device, dtype=torch.float32)
    if rows:
        _launch(_embeddings_bwd_kernel, (n_programs,), traced)(
            xhat, rstd, weight, seed, dy, dh, partial, xhat.stride(0), dy.stride(0), dh.stride(0), rows,
            hidden, threshold, site, dropout.dropout_scale(dropout_p), HAS_DROPOUT=threshold > 0, **config)
        rn.finalize(partial, outs, lambda kernel, grid: _launch(kernel, grid, traced))
    else:
        for out in outs:
            out.zero_()

    def launch(kernel, grid):
        return _launch(kernel, grid, traced)

    dword = segment_sum(dh, ids, vocab, padding_idx, launch) if need[0] else None
    dpos = dtype = None
    if need[1] or need[2]:
        # One pass over dh for both: float32 sums per (position, type) pair (each about batch / 2
        # tokens), then the two small sums over the other axis.
        pairs = segment_sum(dh, positions * type_vocab + types, positions_size * type_vocab, -1, launch,
                            out_dtype=torch.float32).view(positions_size, type_vocab, hidden)
        dpos = pairs.sum(1).to(dh.dtype) if need[1] else None
        dtype = pairs.sum(0).to(dh.dtype) if need[2] else None
    return dword, dpos, dtype, outs[0], outs[1]


class _Embeddings(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, types, positions, word, position, token_type, weight, bias, seed, eps, padding_idx,
                dropout_p, site):
        save = any(ctx.needs_input_grad[3:8])
        y, xhat, rstd = _forward(ids, types, positions, word, position, token_type, weight, bias, seed, eps,
                                 dropout_p, site, save)
        ctx.save_for_backward(ids, types, positions, xhat, rstd, weight, seed)
        ctx.args = (word.shape[0], position.shape[0], token_type.shape[0], padding_idx, dropout_p, site)
        return y

    @staticmethod
    def backward(ctx, dy):
        ids, types, positions, xhat, rstd, weight, seed = ctx.saved_tensors
        vocab, positions_size, type_vocab, padding_idx, dropout_p, site = ctx.args
        grads = _backward(_rows(dy), ids, types, positions, xhat, rstd, weight, vocab, positions_size,
                          type_vocab, seed, padding_idx, dropout_p, site, ctx.needs_input_grad[3:6])
        return (None, None, None, *grads, None, None, None, None, None)


@triton_op("bert_fast::embeddings_fwd", mutates_args=())
def _embeddings_fwd(ids: torch.Tensor, types: torch.Tensor, positions: torch.Tensor, word: torch.Tensor,
                    position: torch.Tensor, token_type: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor, seed: torch.Tensor, eps: float, padding_idx: int, dropout_p: float,
                    site: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(ids, types, positions, word, position, token_type, weight, bias, seed, eps, dropout_p,
                    site, save=True, traced=traced_body(ids))


@triton_op("bert_fast::embeddings_bwd", mutates_args=())
def _embeddings_bwd(dy: torch.Tensor, ids: torch.Tensor, types: torch.Tensor, positions: torch.Tensor,
                    xhat: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
                    vocab: int, positions_size: int, type_vocab: int, padding_idx: int, dropout_p: float,
                    site: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy, ids, types, positions, xhat, rstd, weight, vocab, positions_size, type_vocab, seed,
                     padding_idx, dropout_p, site, (True, True, True), traced=traced_body(dy))


def _setup_context(ctx, inputs, output):
    (ids, types, positions, word, position, token_type, weight, _bias, seed, _eps, padding_idx, dropout_p,
     site) = inputs
    _y, xhat, rstd = output
    ctx.save_for_backward(ids, types, positions, xhat, rstd, weight, seed)
    ctx.args = (word.shape[0], position.shape[0], token_type.shape[0], padding_idx, dropout_p, site)
    ctx.mark_non_differentiable(xhat, rstd)


def _op_backward(ctx, dy, _dxhat, _drstd):
    ids, types, positions, xhat, rstd, weight, seed = ctx.saved_tensors
    grads = _embeddings_bwd(_rows(dy), ids, types, positions, xhat, rstd, weight, seed, *ctx.args)
    return (None, None, None, *grads, None, None, None, None, None)


_embeddings_fwd.register_autograd(_op_backward, setup_context=_setup_context)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


# -------------------------------------------------------------------------------------- public

def embeddings_unchecked(input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor,
                         word: torch.Tensor, position: torch.Tensor, token_type: torch.Tensor,
                         norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, *,
                         padding_idx: int = -1, dropout_p: float = 0.0, seed: torch.Tensor | None = None,
                         site: int = 0) -> torch.Tensor:
    """`embeddings` for callers that validated the arguments (bert_fast.ops): ids in range,
    tables contiguous, padding_idx in [0, V) or -1."""
    if seed is None:
        seed = dropout.new_seed(word.device) if dropout_p > 0 else norm_weight  # unread without dropout
    ids, types, positions = (t.reshape(-1).contiguous() for t in (input_ids, token_type_ids, position_ids))
    args = (ids, types, positions, word, position, token_type, norm_weight, norm_bias, seed, float(eps),
            int(padding_idx), float(dropout_p), int(site))
    if _traced(word):
        y, _, _ = _embeddings_fwd(*args)
    else:
        y = _Embeddings.apply(*args)
    return y.view(*input_ids.shape, word.shape[1])


def _check(input_ids, token_type_ids, position_ids, word, position, token_type, norm_weight,
           norm_bias, eps, padding_idx, dropout_p, seed, site, check_ids) -> int:
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
    if isinstance(site, bool) or not isinstance(site, int) or not 0 <= site < 2**32:
        raise ValueError(f"site must be an int in [0, 2**32), got {site!r}")
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
               seed: torch.Tensor | None = None, site: int = 0, check_ids: bool = True) -> torch.Tensor:
    """`dropout(LayerNorm(word[input_ids] + token_type[token_type_ids] + position[position_ids]))`
    for ids of any shape; returns `[*ids.shape, hidden]` in the tables' dtype. `padding_idx` keeps
    that word row's gradient at zero. `seed` and `site` key the dropout mask (kernels/dropout.py,
    row pairs; p rounded to 1/256). `check_ids` validates id ranges (one device->host copy); pass
    False only when the caller already has (the kernel gathers without bounds checks)."""
    padding_idx = _check(input_ids, token_type_ids, position_ids, word, position, token_type,
                         norm_weight, norm_bias, eps, padding_idx, dropout_p, seed, site, check_ids)
    return embeddings_unchecked(input_ids, token_type_ids, position_ids, word.contiguous(),
                                position.contiguous(),
                                token_type.contiguous(), norm_weight.contiguous(), norm_bias.contiguous(),
                                eps,
                                padding_idx=padding_idx, dropout_p=dropout_p, seed=seed, site=site)


# ----------------------------------------------------------------------------------- reference

def embeddings_reference(input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                         position_ids: torch.Tensor, word: torch.Tensor, position: torch.Tensor,
                         token_type: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                         eps: float = 1e-12, *, padding_idx: int | None = None, dropout_p: float = 0.0,
                         keep: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch in the tables' dtype. With `keep` ([*ids.shape, hidden], bool) dropout uses
    that mask and the kernels' scale, else torch's own dropout when dropout_p > 0."""
    h = F.embedding(input_ids, word, padding_idx) + F.embedding(token_type_ids, token_type)
    h = h + F.embedding(position_ids, position)
    h = F.layer_norm(h, (h.shape[-1],), norm_weight, norm_bias, eps)
    if keep is not None:
        return h * keep * dropout.dropout_scale(dropout_p)
    return F.dropout(h, dropout_p) if dropout_p > 0 else h
