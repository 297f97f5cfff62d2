"""Fused residual + bias + dropout + LayerNorm: `y = LayerNorm(residual + dropout(x + x_bias))`.

BERT is post-LN: every sub-layer ends in this expression, with `x` the output of a GEMM run
without its bias. Eager PyTorch spends four or five memory passes on it (bias add, dropout with a
stored mask, residual add, layer norm); fused, the forward reads `x` and `residual` once and writes
`y` once, and stores only float32 mean/rstd per row and the dropout seed (never the mask).

Backward: the pre-norm sum `h` is recomputed from `x`, `x_bias`, `residual` and the regenerated
dropout mask instead of being saved. Both choices move the same bytes when there is a residual
(save: forward +1 write, backward +1 read of `h`; recompute: backward +2 reads of `x` and
`residual`, where `residual` is already kept alive by the GEMM that consumed it), and recomputing is
strictly cheaper without a residual (`h` would be a copy of `x`); it also keeps the forward, which
inference and evaluation run alone, at the minimum of one read per input and one write.
`dresidual` is the gradient of `h`; without dropout `dx` is the same tensor.
dgamma, dbeta and dx_bias go through per-program float32 partial sums `[n_programs, hidden]` and
a second `sum(0)`, so results are bitwise reproducible run to run (no atomics).

The dropout mask is `tl.rand(seed, row * hidden + col) >= p` (Philox; the offset is int64, so
tensors past 2**31 elements get distinct numbers), the same call in forward, backward and
`dropout_mask` (which exposes it for tests). The seed is a [1] int64 tensor on the device, drawn
from torch's generator there: it follows torch.manual_seed and needs no host sync.

Forward and backward are `torch.library.triton_op`s (kernels launched through `wrap_triton`) with
the backward attached by `register_autograd`, so torch.compile and torch.export see single ops.
The HAS_* flags are passed by the launchers rather than by `triton.heuristics`, which `wrap_triton`
does not take; an absent optional input is passed as a placeholder pointer that its flag keeps
unread.

References: Triton tutorial 05 (layer norm), flash-attention `flash_attn/ops/triton/layer_norm.py`
(https://github.com/Dao-AILab/flash-attention), apex `FusedLayerNorm`, Liger-Kernel `layer_norm`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from bert_fast.checks import check_same, check_tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# One row lives in registers; past this the backward's per-thread arrays would spill.
MAX_HIDDEN = 4096


@triton.jit
def _dropout_keep(seed, offsets, dropout_p):
    """True where dropout keeps the element; shared by every kernel that regenerates the mask."""
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _layer_norm_row(h, cols, mask, N, eps, W, B, Mean, Rstd, row):
    """LayerNorm of one float32 row held in registers: stores its mean and rstd, returns
    gamma * xhat + beta. Shared with the embeddings kernel."""
    mean = tl.sum(h, axis=0) / N
    hc = tl.where(mask, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, axis=0) / N + eps)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    w = tl.load(W + cols, mask=mask).to(tl.float32)
    b = tl.load(B + cols, mask=mask).to(tl.float32)
    return hc * rstd * w + b


@triton.jit
def _add_layer_norm_fwd_kernel(
    X,  # [M, N] input (the GEMM output)
    XBias,  # [N] bias added to X before dropout (read only if HAS_X_BIAS)
    Residual,  # [M, N] (read only if HAS_RESIDUAL)
    W,  # [N] gamma
    B,  # [N] beta
    Y,  # [M, N] output
    Mean,  # [M] float32
    Rstd,  # [M] float32
    Seed,  # [1] int64 dropout seed (read only if HAS_DROPOUT)
    stride_x_row,
    stride_res_row,
    stride_y_row,
    N,
    eps,
    dropout_p,
    HAS_X_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    h = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        h += tl.load(XBias + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = _dropout_keep(tl.load(Seed), row * N + cols, dropout_p)
        h = tl.where(keep, h / (1.0 - dropout_p), 0.0)
    if HAS_RESIDUAL:
        h += tl.load(Residual + row * stride_res_row + cols, mask=mask, other=0.0).to(tl.float32)
    y = _layer_norm_row(h, cols, mask, N, eps, W, B, Mean, Rstd, row)
    tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "rows_per_program"])
def _add_layer_norm_bwd_kernel(
    X,  # [M, N]
    XBias,  # [N] (read only if HAS_X_BIAS)
    Residual,  # [M, N] (read only if HAS_RESIDUAL)
    W,  # [N]
    Mean,  # [M] float32
    Rstd,  # [M] float32
    Seed,  # [1] int64 (read only if HAS_DROPOUT)
    DY,  # [M, N] gradient of the output
    DH,  # [M, N] gradient of the pre-norm sum (= dresidual; = dx without dropout)
    DX,  # [M, N] gradient of X (written only if HAS_DROPOUT)
    DW,  # [n_programs, N] float32 partial sums of dgamma
    DB,  # [n_programs, N] float32 partial sums of dbeta
    DXBias,  # [n_programs, N] float32 partial sums of dx_bias (written only if HAS_X_BIAS)
    stride_x_row,
    stride_res_row,
    stride_dy_row,
    stride_dh_row,
    stride_dx_row,
    M,
    N,
    dropout_p,
    rows_per_program,
    HAS_X_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        x_bias = tl.load(XBias + cols, mask=mask, other=0.0).to(tl.float32)
        dx_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row in range(row_start, row_end):
        # Recompute the pre-norm sum exactly as the forward did.
        h = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_X_BIAS:
            h += x_bias
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, row * N + cols, dropout_p)
            h = tl.where(keep, h / (1.0 - dropout_p), 0.0)
        if HAS_RESIDUAL:
            h += tl.load(Residual + row * stride_res_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)
        dy = tl.load(DY + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        dw += dy * xhat
        db += dy
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        c2 = tl.sum(wdy, axis=0) / N
        dh = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DH + row * stride_dh_row + cols, dh.to(DH.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            dh = tl.where(keep, dh / (1.0 - dropout_p), 0.0)
            tl.store(DX + row * stride_dx_row + cols, dh.to(DX.dtype.element_ty), mask=mask)
        if HAS_X_BIAS:
            dx_bias += dh
    tl.store(DW + pid * N + cols, dw, mask=mask)
    tl.store(DB + pid * N + cols, db, mask=mask)
    if HAS_X_BIAS:
        tl.store(DXBias + pid * N + cols, dx_bias, mask=mask)


@triton.jit
def _dropout_mask_kernel(
    Keep,  # [M, N] bool output
    Seed,  # [1] int64
    N,
    dropout_p,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    keep = _dropout_keep(tl.load(Seed), row * N + cols, dropout_p)
    tl.store(Keep + row * N + cols, keep, mask=mask)


def block_config(hidden: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for one row of `hidden` elements: about 8 fp32 values per thread."""
    block = triton.next_power_of_2(hidden)
    return block, min(max(block // 256, 1), 8)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def backward_programs(device: torch.device, rows: int) -> int:
    """Programs of the backward: a few per SM on a GPU (each keeps its own dgamma/dbeta partial
    row); 4 under the CPU interpreter so tests still split rows unevenly across programs. Each
    program writes its whole partial row (zeros when it gets no rows); 0 when there are no rows."""
    per_device = 8 * _sm_count(device.index or 0) if device.type == "cuda" else 4
    return min(per_device, rows)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with unit stride along N (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _placeholder(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """An absent optional input becomes a valid pointer that the kernel's flag keeps unread."""
    return like if t is None else t


@triton_op("bert_fast::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        x_bias: torch.Tensor | None, residual: torch.Tensor | None, seed: torch.Tensor,
                        eps: float, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: [M, N] with stride(-1) == 1. Returns y [M, N] and float32 mean, rstd [M]."""
    rows, hidden = x.shape
    y = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows == 0:
        return y, mean, rstd
    block, warps = block_config(hidden)
    wrap_triton(_add_layer_norm_fwd_kernel)[(rows,)](
        x, _placeholder(x_bias, weight), _placeholder(residual, x), weight, bias, y, mean, rstd, seed,
        x.stride(0), 0 if residual is None else residual.stride(0), y.stride(0), hidden, eps, dropout_p,
        HAS_X_BIAS=x_bias is not None, HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0.0,
        BLOCK_N=block, num_warps=warps)
    return y, mean, rstd


@triton_op("bert_fast::add_layer_norm_bwd", mutates_args=())
def _add_layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        x_bias: torch.Tensor | None, residual: torch.Tensor | None, mean: torch.Tensor,
                        rstd: torch.Tensor, seed: torch.Tensor, dropout_p: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dh [M, N] (the pre-norm sum's gradient = dresidual = dx without dropout), dx [M, N]
    with dropout (else empty: a custom op may not return one tensor twice), and the float32
    column sums [2 or 3, N] of dgamma, dbeta (and dx_bias)."""
    rows, hidden = x.shape
    dh = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    dx = torch.empty((rows, hidden) if dropout_p > 0.0 else (0,), dtype=x.dtype, device=x.device)
    programs = backward_programs(x.device, rows)
    partial = torch.empty((2 if x_bias is None else 3, programs, hidden), device=x.device,
                          dtype=torch.float32)
    if rows > 0:
        block, warps = block_config(hidden)
        wrap_triton(_add_layer_norm_bwd_kernel)[(programs,)](
            x, _placeholder(x_bias, weight), _placeholder(residual, x), weight, mean, rstd, seed, dy, dh,
            dh if dropout_p == 0.0 else dx, partial[0], partial[1], partial[-1],
            x.stride(0), 0 if residual is None else residual.stride(0), dy.stride(0), dh.stride(0),
            dh.stride(0), rows, hidden, dropout_p, triton.cdiv(rows, programs),
            HAS_X_BIAS=x_bias is not None, HAS_RESIDUAL=residual is not None,
            HAS_DROPOUT=dropout_p > 0.0, BLOCK_N=block, num_warps=warps)
    return dh, dx, partial.sum(1)  # the sum over programs is the deterministic second stage


def _setup_context(ctx, inputs, output):
    x, weight, _bias, x_bias, residual, seed, _eps, dropout_p = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, x_bias, residual, mean, rstd, seed)
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, x_bias, residual, mean, rstd, seed = ctx.saved_tensors
    dh, dx, sums = _add_layer_norm_bwd(as_rows(dy), x, weight, x_bias, residual, mean, rstd, seed,
                                       ctx.dropout_p)
    dx = dx if ctx.dropout_p > 0.0 else dh
    dx_bias = sums[2].to(x_bias.dtype) if x_bias is not None else None
    return (dx, sums[0].to(weight.dtype), sums[1].to(weight.dtype), dx_bias,
            dh if residual is not None else None, None, None, None)


_add_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(x, weight, bias, eps, x_bias, residual, dropout_p, seed) -> None:
    check_tensor("x", x, dtypes=DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    if hidden > MAX_HIDDEN:
        raise ValueError(f"x's last dimension is {hidden}; this kernel supports at most {MAX_HIDDEN}")
    named = {"weight": weight, "bias": bias}
    if x_bias is not None:
        named["x_bias"] = x_bias
    for name, value in named.items():
        check_tensor(name, value, shape=(hidden,))
    if residual is not None:
        named["residual"] = check_tensor("residual", residual, shape=tuple(x.shape))
    names, tensors = ("x", *named), (x, *named.values())
    check_same(names, tensors, "dtype")
    check_same(names, tensors, "device")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if seed is not None:
        check_tensor("seed", seed, shape=(1,), dtypes=(torch.int64,), device=x.device)


def new_seed(dropout_p: float, device: torch.device) -> torch.Tensor:
    """[1] int64 seed on `device` from torch's generator there (follows torch.manual_seed; no
    host sync); zeros, never read, when there is no dropout."""
    if dropout_p > 0.0:
        return torch.randint(0, 2**62, (1,), device=device)
    return torch.zeros(1, dtype=torch.int64, device=device)


def add_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-12, *,
                   x_bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                   dropout_p: float = 0.0, seed: torch.Tensor | None = None) -> torch.Tensor:
    """`LayerNorm(residual + dropout(x + x_bias))` over the last dimension of `x` (any leading
    shape), in x's dtype with float32 statistics. `dropout_p` > 0 applies dropout (callers pass 0
    in eval); `seed` ([1] int64 on x's device) fixes its mask (see `dropout_mask`), drawn from
    torch's generator when None."""
    _check(x, weight, bias, eps, x_bias, residual, dropout_p, seed)
    dropout_p = float(dropout_p)
    if seed is None:
        seed = new_seed(dropout_p, x.device)
    y, _, _ = _add_layer_norm_fwd(
        as_rows(x), weight.contiguous(), bias.contiguous(),
        None if x_bias is None else x_bias.contiguous(),
        None if residual is None else as_rows(residual), seed, float(eps), dropout_p)
    return y.view(x.shape)


def dropout_mask(seed: torch.Tensor, rows: int, hidden: int, dropout_p: float) -> torch.Tensor:
    """The keep-mask [rows, hidden] (bool, on seed's device) that the kernels apply, with this
    seed, to row-major [rows, hidden] data: for tests and debugging, never stored in training."""
    keep = torch.empty((rows, hidden), dtype=torch.bool, device=seed.device)
    if rows > 0 and hidden > 0:
        block, warps = block_config(hidden)
        _dropout_mask_kernel[(rows,)](keep, seed, hidden, float(dropout_p), BLOCK_N=block,
                                      num_warps=warps)
    return keep


def add_layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float = 1e-12, *, x_bias: torch.Tensor | None = None,
                             residual: torch.Tensor | None = None, dropout_p: float = 0.0,
                             keep: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch, in x's dtype. With `keep` (x's shape, bool) dropout uses that mask, else
    torch's own dropout when dropout_p > 0."""
    h = x if x_bias is None else x + x_bias
    if keep is not None:
        h = h * keep / (1.0 - dropout_p)
    elif dropout_p > 0:
        h = F.dropout(h, dropout_p)
    if residual is not None:
        h = h + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
