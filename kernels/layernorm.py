"""Fused residual + bias + dropout + LayerNorm: `y = LayerNorm(residual + dropout(x + x_bias))`.

BERT is post-LN: every sub-layer ends in this expression, with `x` the output of a GEMM run
without its bias. Eager PyTorch spends four or five memory passes on it (bias add, dropout with a
stored mask, residual add, layer norm); fused, the forward reads `x` and `residual` once and writes
`y` once, never the mask.

Backward: when a gradient is wanted the forward also writes x-hat = (h - mean) * rstd in x's dtype
and float32 rstd, and the backward reads x-hat (with dy) instead of recomputing h from x, x_bias,
residual and the dropout mask. The bytes are the same (forward +1 write, backward -1 read: x-hat in
place of x and residual), the backward's loop is far shorter and holds half the registers, and
x-hat (about 1 in magnitude) rounds better than h itself, which eager bf16 keeps. A plain LayerNorm
(no x_bias, residual or dropout: h is x) saves the float32 mean instead and reads x again, as
eager does. Evaluation and inference (no gradient) save nothing. `dresidual` is the gradient of
`h`; without dropout `dx` is the same tensor. dgamma, dbeta and dx_bias go through per-program
float32 partial rows and one finalize launch (kernels/row_norm.py): bitwise reproducible, no
atomics. Launches per call: one forward, two backward.

Tiling (kernels/row_norm.py): a program loops over tiles of row pairs, each row held as chunks
(768 = 3 x 256) so every lane works. Dropout comes from kernels/dropout.py's row-pair layout
(Philox4x32-7, 16 decisions per call, p rounded to 1/256) keyed by a [1] int64 seed and an int
`site`, so the model draws one seed per forward and gives each call site its own masks; the scale
1 / (1 - p) is folded into the bias add.

Host side: `add_layer_norm` validates; `add_layer_norm_unchecked` is bert_fast.ops' entry (it has
validated). Eager calls run a plain `torch.autograd.Function`; under torch.compile / export the same
launchers run inside the `bert_fast::add_layer_norm_fwd/bwd` triton_ops.

References: Triton tutorial 05 (layer norm), flash-attention `flash_attn/ops/triton/layer_norm.py`
(https://github.com/Dao-AILab/flash-attention), apex `FusedLayerNorm`, Liger-Kernel `layer_norm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from bert_fast.kernels import dropout
from bert_fast.kernels import row_norm as rn
from bert_fast.kernels.checks import check_same, check_tensor
from bert_fast.kernels.launch import launch as _launch
from bert_fast.kernels.launch import traced as _traced
from bert_fast.kernels.launch import traced_body

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HIDDEN = rn.MAX_HIDDEN


@triton.jit
def _pre_norm(X, XBias, Residual, rows, xb, drop, stride_x_row, stride_res_row, n_rows, n_cols,
              dropout_scale, HAS_X_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr):
    """h = residual + dropout(x + x_bias) for rows `rows`, as chunks; xb is x_bias already
    multiplied by the dropout scale when there is dropout."""
    h = rn.load_rows(X, rows, stride_x_row, n_rows, n_cols, CHUNK, K)
    if HAS_DROPOUT or HAS_X_BIAS:
        scaled = ()
        for k in tl.static_range(K):
            v = h[k]
            if HAS_DROPOUT:
                v = v * dropout_scale
            if HAS_X_BIAS:
                v = v + xb[k][None, :]
            scaled = scaled + (v,)
        h = scaled
    if HAS_DROPOUT:
        h = rn.drop_rows(h, rows, drop, CHUNK, K)
    if HAS_RESIDUAL:
        h = rn.accumulate(h, rn.load_rows(Residual, rows, stride_res_row, n_rows, n_cols, CHUNK, K), K)
    return h


@triton.jit
def _fwd_rows(X, XBias, Residual, Y, XHat, Mean, Rstd, rows, w, b, xb, drop, stride_x_row, stride_res_row,
              stride_y_row, n_rows, n_cols, eps, dropout_scale,
              HAS_X_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              SAVE: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr):
    h = _pre_norm(X, XBias, Residual, rows, xb, drop, stride_x_row, stride_res_row, n_rows, n_cols,
                  dropout_scale, HAS_X_BIAS, HAS_RESIDUAL, HAS_DROPOUT, CHUNK, K)
    y, xhat, mean, rstd = rn.normalize(h, w, b, n_cols, eps, CHUNK, K)
    rn.store_rows(Y, rows, stride_y_row, n_rows, n_cols, y, CHUNK, K)
    if SAVE:
        tl.store(Rstd + rows, rstd, mask=rows < n_rows)
        if HAS_X_BIAS or HAS_RESIDUAL or HAS_DROPOUT:
            rn.store_rows(XHat, rows, stride_y_row, n_rows, n_cols, xhat, CHUNK, K)
        else:  # h is x: the backward reads x again and needs only the mean
            tl.store(Mean + rows, mean, mask=rows < n_rows)


@triton.jit
def _add_layer_norm_fwd_kernel(
    X,  # [M, N] input (the GEMM output)
    XBias,  # [N] bias added to X before dropout (read only if HAS_X_BIAS)
    Residual,  # [M, N] (read only if HAS_RESIDUAL)
    W,  # [N] gamma
    B,  # [N] beta
    Y,  # [M, N] output
    XHat,  # [M, N] x-hat, x's dtype, strided like Y (written if SAVE, unless h is x)
    Mean,  # [M] float32 (written if SAVE and h is x: no x_bias, residual or dropout)
    Rstd,  # [M] float32 (written only if SAVE)
    Seed,  # [1] int64 dropout seed (read only if HAS_DROPOUT)
    stride_x_row, stride_res_row, stride_y_row, n_rows, n_cols, eps, threshold, site, dropout_scale,
    HAS_X_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, SAVE: tl.constexpr,
    HALF: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr,
):
    w = rn.load_vector(W, n_cols, CHUNK, K)
    b = rn.load_vector(B, n_cols, CHUNK, K)
    xb = w
    if HAS_X_BIAS:
        xb = rn.load_vector(XBias, n_cols, CHUNK, K)
        if HAS_DROPOUT:
            scaled = ()
            for k in tl.static_range(K):
                scaled = scaled + (xb[k] * dropout_scale,)
            xb = scaled
    drop = (0, 0, 0, 0, 0)
    if HAS_DROPOUT:
        drop = rn.dropout_words(Seed, threshold, site)
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, 2 * HALF), tl.num_programs(0)):
        even = tile * 2 * HALF + 2 * tl.arange(0, HALF)
        _fwd_rows(X, XBias, Residual, Y, XHat, Mean, Rstd, even, w, b, xb, drop, stride_x_row, stride_res_row,
                  stride_y_row, n_rows, n_cols, eps, dropout_scale, HAS_X_BIAS, HAS_RESIDUAL, HAS_DROPOUT,
                  SAVE, CHUNK, K)
        _fwd_rows(X, XBias, Residual, Y, XHat, Mean, Rstd, even + 1, w, b, xb, drop, stride_x_row,
                  stride_res_row, stride_y_row, n_rows, n_cols, eps, dropout_scale, HAS_X_BIAS, HAS_RESIDUAL,
                  HAS_DROPOUT, SAVE, CHUNK, K)


@triton.jit
def _bwd_rows(XHat, Mean, Rstd, DY, DH, DX, rows, w, drop, sums, stride_xhat_row, stride_dy_row,
              stride_dh_row, stride_dx_row, n_rows, n_cols, dropout_scale, HAS_X_BIAS: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, FROM_X: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr):
    """dh (and dx with dropout) for rows `rows`; returns the running (dw, db, dxb) chunk sums."""
    xhat = rn.load_rows(XHat, rows, stride_xhat_row, n_rows, n_cols, CHUNK, K)
    rstd = tl.load(Rstd + rows, mask=rows < n_rows, other=0.0)  # rows past the end: all zero
    if FROM_X:  # XHat is x itself (a plain LayerNorm): x-hat = (x - mean) rstd
        mean = tl.load(Mean + rows, mask=rows < n_rows, other=0.0)
        centred = ()
        for k in tl.static_range(K):
            centred = centred + ((xhat[k] - mean[:, None]) * rstd[:, None],)
        xhat = centred
    dy = rn.load_rows(DY, rows, stride_dy_row, n_rows, n_cols, CHUNK, K)
    dh = rn.normalize_backward(xhat, dy, w, rstd, n_cols, K)
    rn.store_rows(DH, rows, stride_dh_row, n_rows, n_cols, dh, CHUNK, K)
    dw, db, dxb = sums
    kept = dh
    if HAS_DROPOUT:
        # dx = mask(dh) * scale; dx_bias sums mask(dh), and the finalize applies the scale.
        kept = rn.drop_rows(dh, rows, drop, CHUNK, K)
        dx = ()
        for k in tl.static_range(K):
            dx = dx + (kept[k] * dropout_scale,)
        rn.store_rows(DX, rows, stride_dx_row, n_rows, n_cols, dx, CHUNK, K)
    gw = ()
    for k in tl.static_range(K):
        gw = gw + (dy[k] * xhat[k],)
    dw = rn.accumulate(dw, gw, K)
    db = rn.accumulate(db, dy, K)
    if HAS_X_BIAS:
        dxb = rn.accumulate(dxb, kept, K)
    return dw, db, dxb


@triton.jit(do_not_specialize=["n_rows"])
def _add_layer_norm_bwd_kernel(
    XHat,  # [M, N] x-hat saved by the forward, or x itself if FROM_X
    Mean,  # [M] float32 (read only if FROM_X)
    Rstd,  # [M] float32
    W,  # [N]
    Seed,  # [1] int64 (read only if HAS_DROPOUT)
    DY,  # [M, N] gradient of the output
    DH,  # [M, N] gradient of the pre-norm sum (= dresidual; = dx without dropout)
    DX,  # [M, N] gradient of X (written only if HAS_DROPOUT)
    Partial,  # [2 or 3, programs, N] float32: per-program sums of dgamma, dbeta (, dx_bias / scale)
    stride_xhat_row, stride_dy_row, stride_dh_row, stride_dx_row,
    n_rows, n_cols, threshold, site, dropout_scale,
    HAS_X_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, FROM_X: tl.constexpr,
    HALF: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr,
):
    pid = tl.program_id(0)
    w = rn.load_vector(W, n_cols, CHUNK, K)
    drop = (0, 0, 0, 0, 0)
    if HAS_DROPOUT:
        drop = rn.dropout_words(Seed, threshold, site)
    zero = rn.zeros(HALF, CHUNK, K)
    sums = (zero, zero, zero)
    for tile in range(pid, tl.cdiv(n_rows, 2 * HALF), tl.num_programs(0)):
        even = tile * 2 * HALF + 2 * tl.arange(0, HALF)
        sums = _bwd_rows(XHat, Mean, Rstd, DY, DH, DX, even, w, drop, sums, stride_xhat_row, stride_dy_row,
                         stride_dh_row, stride_dx_row, n_rows, n_cols, dropout_scale, HAS_X_BIAS, HAS_DROPOUT,
                         FROM_X, CHUNK, K)
        sums = _bwd_rows(XHat, Mean, Rstd, DY, DH, DX, even + 1, w, drop, sums, stride_xhat_row,
                         stride_dy_row, stride_dh_row, stride_dx_row, n_rows, n_cols, dropout_scale,
                         HAS_X_BIAS, HAS_DROPOUT, FROM_X, CHUNK, K)
    programs = tl.num_programs(0)
    dw, db, dxb = sums
    rn.store_partial(Partial, pid, n_cols, dw, CHUNK, K)
    rn.store_partial(Partial + programs * n_cols, pid, n_cols, db, CHUNK, K)
    if HAS_X_BIAS:
        rn.store_partial(Partial + 2 * programs * n_cols, pid, n_cols, dxb, CHUNK, K)


# ----------------------------------------------------------------------------------- launchers

def _plain(x_bias, residual, dropout_p: float) -> bool:
    """h is x itself: the forward saves the mean instead of x-hat and the backward reads x again."""
    return x_bias is None and residual is None and dropout_p == 0.0


def _forward(x, weight, bias, x_bias, residual, seed, eps: float, dropout_p: float, site: int, save: bool,
             traced: bool = False):
    """x, residual: [M, N] with stride(-1) == 1. Returns (y [M, N], x-hat [M, N], mean [M], rstd [M]):
    with `save` the statistics the backward reads (float32 rstd, and x-hat in x's dtype, or the
    float32 mean when h is x), the others empty tensors."""
    rows, hidden = x.shape
    plain = _plain(x_bias, residual, dropout_p)
    y = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    xhat = torch.empty((rows, hidden) if save and not plain else (0,), dtype=x.dtype, device=x.device)
    mean = torch.empty(rows if save and plain else 0, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows if save else 0, device=x.device, dtype=torch.float32)
    if rows == 0:
        return y, xhat, mean, rstd
    config = rn.launch_config(hidden)
    threshold = dropout.keep_threshold(dropout_p)
    grid = (rn.programs(x.device, rows, config["HALF"], per_sm=8),)
    _launch(_add_layer_norm_fwd_kernel, grid, traced)(
        x, weight if x_bias is None else x_bias, x if residual is None else residual, weight, bias, y,
        xhat if xhat.numel() else y, mean if mean.numel() else weight, rstd if save else weight, seed,
        x.stride(0), 0 if residual is None else residual.stride(0), y.stride(0), rows, hidden, eps, threshold,
        site, dropout.dropout_scale(dropout_p), HAS_X_BIAS=x_bias is not None,
        HAS_RESIDUAL=residual is not None, HAS_DROPOUT=threshold > 0, SAVE=save, **config)
    return y, xhat, mean, rstd


def _backward(dy, xhat, mean, rstd, weight, x_bias, seed, dropout_p: float, site: int, traced: bool = False):
    """(dh, dx, dweight, dbias, dx_bias): dh [M, N] is the pre-norm sum's gradient (= dresidual,
    = dx without dropout); dx is dh itself without dropout; dx_bias None without x_bias. `xhat`
    is x itself when `mean` is not empty (a plain LayerNorm)."""
    rows, hidden = xhat.shape
    threshold = dropout.keep_threshold(dropout_p)
    dh = torch.empty((rows, hidden), dtype=xhat.dtype, device=xhat.device)
    dx = torch.empty((rows, hidden), dtype=xhat.dtype, device=xhat.device) if threshold > 0 else dh
    outs = [torch.empty_like(weight), torch.empty_like(weight)]
    if x_bias is not None:
        outs.append(torch.empty_like(x_bias))
    config = rn.launch_config(hidden)
    n_programs = rn.programs(xhat.device, rows, config["HALF"])
    partial = torch.empty((len(outs), n_programs, hidden), device=xhat.device, dtype=torch.float32)
    from_x = mean.numel() > 0
    _launch(_add_layer_norm_bwd_kernel, (n_programs,), traced)(
        xhat, mean if from_x else rstd, rstd, weight, seed, dy, dh, dx, partial, xhat.stride(0), dy.stride(0),
        dh.stride(0), dx.stride(0), rows, hidden, threshold, site, dropout.dropout_scale(dropout_p),
        HAS_X_BIAS=x_bias is not None, HAS_DROPOUT=threshold > 0, FROM_X=from_x, **config)
    rn.finalize(partial, outs, lambda kernel, grid: _launch(kernel, grid, traced),
                scales=(1.0, 1.0, dropout.dropout_scale(dropout_p)))
    return dh, dx, outs[0], outs[1], outs[2] if x_bias is not None else None


class _AddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, x_bias, residual, seed, eps, dropout_p, site):
        save = any(ctx.needs_input_grad[:5])  # grad mode is off inside forward; this says it all
        y, xhat, mean, rstd = _forward(x, weight, bias, x_bias, residual, seed, eps, dropout_p, site, save)
        ctx.save_for_backward(x if _plain(x_bias, residual, dropout_p) else xhat, mean, rstd, weight, x_bias,
                              seed)
        ctx.args = (dropout_p, site)
        ctx.has_residual = residual is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        xhat, mean, rstd, weight, x_bias, seed = ctx.saved_tensors
        dh, dx, dweight, dbias, dx_bias = _backward(_rows(dy), xhat, mean, rstd, weight, x_bias, seed,
                                                    *ctx.args)
        return dx, dweight, dbias, dx_bias, dh if ctx.has_residual else None, None, None, None, None


@triton_op("bert_fast::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        x_bias: torch.Tensor | None, residual: torch.Tensor | None, seed: torch.Tensor,
                        eps: float, dropout_p: float, site: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, x_bias, residual, seed, eps, dropout_p, site, save=True,
                    traced=traced_body(x))


@triton_op("bert_fast::add_layer_norm_bwd", mutates_args=())
def _add_layer_norm_bwd(dy: torch.Tensor, xhat: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        weight: torch.Tensor, x_bias: torch.Tensor | None, seed: torch.Tensor,
                        dropout_p: float, site: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dx or an empty tensor without dropout (an op may not return one tensor twice),
    dweight, dbias, dx_bias or an empty tensor)."""
    dh, dx, dweight, dbias, dx_bias = _backward(dy, xhat, mean, rstd, weight, x_bias, seed, dropout_p, site,
                                                traced=traced_body(dy))
    empty = xhat.new_empty(0)
    return dh, dx if dx is not dh else empty, dweight, dbias, dx_bias if dx_bias is not None else empty


def _setup_context(ctx, inputs, output):
    x, weight, _bias, x_bias, residual, seed, _eps, dropout_p, site = inputs
    _y, xhat, mean, rstd = output
    saved = x if _plain(x_bias, residual, dropout_p) else xhat
    ctx.save_for_backward(saved, mean, rstd, weight, x_bias, seed)
    ctx.args = (dropout_p, site)
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(xhat, mean, rstd)


def _op_backward(ctx, dy, _dxhat, _dmean, _drstd):
    xhat, mean, rstd, weight, x_bias, seed = ctx.saved_tensors
    dh, dx, dweight, dbias, dx_bias = _add_layer_norm_bwd(_rows(dy), xhat, mean, rstd, weight, x_bias, seed,
                                                          *ctx.args)
    dx = dx if ctx.args[0] > 0.0 else dh
    return (dx, dweight, dbias, dx_bias if x_bias is not None else None, dh if ctx.has_residual else None,
            None, None, None, None)


_add_layer_norm_fwd.register_autograd(_op_backward, setup_context=_setup_context)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with unit stride along N (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


# -------------------------------------------------------------------------------------- public

def add_layer_norm_unchecked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *,
                             x_bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                             dropout_p: float = 0.0, seed: torch.Tensor | None = None,
                             site: int = 0) -> torch.Tensor:
    """`add_layer_norm` for callers that validated the arguments (bert_fast.ops): weight, bias
    and x_bias contiguous, residual of x's shape."""
    if seed is None:
        seed = dropout.new_seed(x.device) if dropout_p > 0 else weight  # unread without dropout
    rows = _rows(x)
    residual = None if residual is None else _rows(residual)
    args = (seed, float(eps), float(dropout_p), int(site))
    if _traced(x):
        y, _, _, _ = _add_layer_norm_fwd(rows, weight, bias, x_bias, residual, *args)
    else:
        y = _AddLayerNorm.apply(rows, weight, bias, x_bias, residual, *args)
    return y.view(x.shape)


def _check(x, weight, bias, eps, x_bias, residual, dropout_p, seed, site) -> None:
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
    if isinstance(site, bool) or not isinstance(site, int) or not 0 <= site < 2**32:
        raise ValueError(f"site must be an int in [0, 2**32), got {site!r}")


def add_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-12, *,
                   x_bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                   dropout_p: float = 0.0, seed: torch.Tensor | None = None, site: int = 0) -> torch.Tensor:
    """`LayerNorm(residual + dropout(x + x_bias))` over the last dimension of `x` (any leading
    shape), in x's dtype with float32 statistics. `dropout_p` > 0 applies dropout (callers pass 0
    in eval; p rounded to a multiple of 1/256, kernels/dropout.py); `seed` ([1] int64 on x's
    device) and `site` fix its mask (see `dropout_mask`); the seed is drawn from torch's generator
    when None."""
    _check(x, weight, bias, eps, x_bias, residual, dropout_p, seed, site)
    return add_layer_norm_unchecked(x, weight.contiguous(), bias.contiguous(), eps,
                                    x_bias=None if x_bias is None else x_bias.contiguous(),
                                    residual=residual, dropout_p=dropout_p, seed=seed, site=site)


# ----------------------------------------------------------------------------------- reference

def dropout_mask(seed: torch.Tensor, rows: int, hidden: int, dropout_p: float, site: int = 0) -> torch.Tensor:
    """The keep-mask [rows, hidden] (bool, on seed's device) that the kernels apply, with this
    seed and site, to row-major [rows, hidden] data: for tests, never stored in training."""
    return dropout.keep_mask(seed, rows, hidden, dropout_p, site=site, row_pairs=True)


def add_layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float = 1e-12, *, x_bias: torch.Tensor | None = None,
                             residual: torch.Tensor | None = None, dropout_p: float = 0.0,
                             keep: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch, in x's dtype. With `keep` (x's shape, bool) dropout uses that mask and the
    kernels' scale (kernels/dropout.py), else torch's own dropout when dropout_p > 0."""
    h = x if x_bias is None else x + x_bias
    if keep is not None:
        h = h * keep * dropout.dropout_scale(dropout_p)
    elif dropout_p > 0:
        h = F.dropout(h, dropout_p)
    if residual is not None:
        h = h + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
