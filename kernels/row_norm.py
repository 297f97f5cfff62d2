"""The row tiling and LayerNorm math that kernels/layernorm.py and kernels/embeddings.py share.

Rows of `hidden` elements are held as K chunks of CHUNK columns, CHUNK a power of two:
768 = 3 x 256, 1024 = 2 x 512, 384 = 3 x 128. One 1024-wide tile for 768 columns would leave a
quarter of the lanes masked. Programs loop over tiles of 2 * HALF rows, taken as two row tiles of
one layout, the even rows and the odd rows: a dropout Philox call covers 8 columns of two adjacent
rows (kernels/dropout.py, `row_pair_flags`), and both then sit in one thread, so each call is
computed once. Chunks are tuples of [HALF, CHUNK] float32 tensors, built by static loops.

Weight gradients go through per-program float32 partial rows, summed in a fixed order by
`_finalize_kernel` into the parameter dtype: deterministic, no atomics, one launch for all of them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from bert_fast.kernels import dropout

MAX_HIDDEN = 4096


def row_plan(hidden: int) -> tuple[int, int]:
    """(CHUNK, K): K chunks of CHUNK columns cover `hidden`, exactly when a K in 1..8 makes
    hidden / K a power of two up to 512, else with a masked tail."""
    for k in range(1, 9):
        chunk = hidden // k
        if hidden % k == 0 and chunk <= 512 and chunk & (chunk - 1) == 0:
            return chunk, k
    k = triton.cdiv(hidden, 512)
    return triton.next_power_of_2(triton.cdiv(hidden, k)), k


def launch_config(hidden: int) -> dict:
    """Constexprs and warps of the row kernels for `hidden` columns: a 16-byte vector per thread
    (8 columns of 16-bit data), a warp per 256 columns of a row; tiles of 2 x 4 rows, or more when
    the chunks are narrow. From the sm_90 builds (bench/results/aot/layernorm.json): at 768 = 3 x
    256, 4 warps issue fewer instructions per element than 8, whose rows span two warps."""
    chunk, k = row_plan(hidden)
    warps = max(4, chunk // 64)
    return dict(CHUNK=chunk, K=k, HALF=max(4, warps * 256 // chunk), num_warps=warps)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs(device: torch.device, rows: int, half: int, per_sm: int = 4) -> int:
    """Programs of a row kernel: a few per SM on a GPU, 4 under the CPU interpreter (so tests split
    rows unevenly across programs); never more than there are tiles of 2 * half rows, at least 1."""
    tiles = max(1, triton.cdiv(rows, 2 * half))
    return min(per_sm * _sm_count(device.index or 0) if device.type == "cuda" else 4, tiles)


@triton.jit
def load_vector(P, n_cols, CHUNK: tl.constexpr, K: tl.constexpr):
    """A parameter vector [n_cols] as K float32 chunks [CHUNK] (zeros past n_cols)."""
    out = ()
    for k in tl.static_range(K):
        cols = k * CHUNK + tl.arange(0, CHUNK)
        out = out + (tl.load(P + cols, mask=cols < n_cols, other=0.0).to(tl.float32),)
    return out


@triton.jit
def load_rows(P, rows, stride_row, n_rows, n_cols, CHUNK: tl.constexpr, K: tl.constexpr):
    """Rows `rows` ([HALF] int) of a row-major [n_rows, n_cols] tensor as K float32 chunks."""
    out = ()
    base = rows.to(tl.int64)[:, None] * stride_row
    for k in tl.static_range(K):
        cols = k * CHUNK + tl.arange(0, CHUNK)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        out = out + (tl.load(P + base + cols[None, :], mask=mask, other=0.0).to(tl.float32),)
    return out


@triton.jit
def store_rows(P, rows, stride_row, n_rows, n_cols, values, CHUNK: tl.constexpr, K: tl.constexpr):
    base = rows.to(tl.int64)[:, None] * stride_row
    for k in tl.static_range(K):
        cols = k * CHUNK + tl.arange(0, CHUNK)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        tl.store(P + base + cols[None, :], values[k].to(P.dtype.element_ty), mask=mask)


@triton.jit
def dropout_words(Seed, threshold, site):
    """The constants every dropout call of a program needs, as one tuple."""
    seed_lo, seed_hi = dropout.seed_words(Seed)
    t_low, t_top_clear = dropout.threshold_words(threshold)
    return (seed_lo, seed_hi, site.to(tl.uint32), t_low, t_top_clear)


@triton.jit
def drop_rows(values, rows, drop, CHUNK: tl.constexpr, K: tl.constexpr):
    """`values` (chunks of rows `rows`) with dropped elements zeroed: the row-pair mask."""
    seed_lo, seed_hi, site, t_low, t_top_clear = drop
    out = ()
    for k in tl.static_range(K):
        cols = k * CHUNK + tl.arange(0, CHUNK)
        flags, byte = dropout.row_pair_flags(seed_lo, seed_hi, 0, site, t_low, t_top_clear, rows, cols)
        out = out + (dropout.apply(values[k], flags, byte),)
    return out


@triton.jit
def normalize(h, w, b, n_cols, eps, CHUNK: tl.constexpr, K: tl.constexpr):
    """LayerNorm of float32 rows in chunks: (y chunks, x-hat chunks, mean, rstd [HALF]). Two passes
    over registers (mean, then the centred sum of squares), as exact as float32 allows."""
    total = tl.sum(h[0], 1)
    for k in tl.static_range(1, K):
        total += tl.sum(h[k], 1)
    mean = total / n_cols
    centred = ()
    squares = tl.zeros_like(mean)
    for k in tl.static_range(K):
        cols = k * CHUNK + tl.arange(0, CHUNK)
        c = tl.where((cols < n_cols)[None, :], h[k] - mean[:, None], 0.0)
        squares += tl.sum(c * c, 1)
        centred = centred + (c,)
    rstd = 1.0 / tl.sqrt(squares / n_cols + eps)
    y = ()
    xhat = ()
    for k in tl.static_range(K):
        xh = centred[k] * rstd[:, None]
        y = y + (xh * w[k][None, :] + b[k][None, :],)
        xhat = xhat + (xh,)
    return y, xhat, mean, rstd


@triton.jit
def normalize_backward(xhat, dy, w, rstd, n_cols, K: tl.constexpr):
    """dL/dh chunks from x-hat and dL/dy: (w dy - x-hat mean(x-hat w dy) - mean(w dy)) rstd.
    x-hat is 0 past the row's end, and so is dy."""
    c1 = tl.zeros_like(rstd)
    c2 = tl.zeros_like(rstd)
    for k in tl.static_range(K):
        g = w[k][None, :] * dy[k]
        c1 += tl.sum(xhat[k] * g, 1)
        c2 += tl.sum(g, 1)
    c1 = c1 / n_cols
    c2 = c2 / n_cols
    dh = ()
    for k in tl.static_range(K):
        dh = dh + ((w[k][None, :] * dy[k] - (xhat[k] * c1[:, None] + c2[:, None])) * rstd[:, None],)
    return dh


@triton.jit
def accumulate(acc, values, K: tl.constexpr):
    """acc[k] + values[k] for chunk tuples."""
    out = ()
    for k in tl.static_range(K):
        out = out + (acc[k] + values[k],)
    return out


@triton.jit
def zeros(HALF: tl.constexpr, CHUNK: tl.constexpr, K: tl.constexpr):
    out = ()
    for _ in tl.static_range(K):
        out = out + (tl.zeros([HALF, CHUNK], tl.float32),)
    return out


@triton.jit
def store_partial(P, pid, n_cols, acc, CHUNK: tl.constexpr, K: tl.constexpr):
    """Row `pid` of a [programs, n_cols] float32 partial: the column sums of acc's chunks."""
    for k in tl.static_range(K):
        cols = k * CHUNK + tl.arange(0, CHUNK)
        tl.store(P + pid * n_cols + cols, tl.sum(acc[k], 0), mask=cols < n_cols)


@triton.jit
def _finalize_kernel(
    Partial,  # [S, P, N] float32 per-program partial sums
    Out0, Out1, Out2,  # [N] each, in the parameters' dtype: the sums of Partial[0], [1], [2]
    n_programs, n_cols, scale0, scale1, scale2,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Out_s = scale_s * sum over programs of Partial[s], in program order (deterministic)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    s = tl.program_id(1)
    base = Partial + s.to(tl.int64) * n_programs * n_cols
    acc = tl.zeros([BLOCK_P, BLOCK_N], tl.float32)
    for start in range(0, n_programs, BLOCK_P):
        prog = start + tl.arange(0, BLOCK_P)
        mask = (prog < n_programs)[:, None] & (cols < n_cols)[None, :]
        acc += tl.load(base + prog[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, 0)
    if s == 0:
        tl.store(Out0 + cols, (total * scale0).to(Out0.dtype.element_ty), mask=cols < n_cols)
    elif s == 1:
        tl.store(Out1 + cols, (total * scale1).to(Out1.dtype.element_ty), mask=cols < n_cols)
    else:
        tl.store(Out2 + cols, (total * scale2).to(Out2.dtype.element_ty), mask=cols < n_cols)


def finalize(partial: torch.Tensor, outs: list[torch.Tensor], launch, scales=(1.0, 1.0, 1.0)) -> None:
    """outs[s] = scales[s] * partial[s].sum(0) for partial [S, P, N] (S = len(outs) <= 3), one
    launch; `launch` is the caller's (kernel, grid) -> launcher (eager, or wrap_triton traced)."""
    sums, n_programs, n_cols = partial.shape
    padded = list(outs) + [outs[0]] * (3 - len(outs))  # unread: the grid has len(outs) rows
    block_n = min(256, triton.next_power_of_2(n_cols))
    launch(_finalize_kernel, (-(-n_cols // block_n), sums))(
        partial, *padded, n_programs, n_cols, *(float(x) for x in scales), BLOCK_P=8, BLOCK_N=block_n)
