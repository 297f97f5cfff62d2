"""Masked-LM decoder fused with softmax cross-entropy over the vocabulary, forward and backward.

Fused: the decoder projection `hidden @ weight.T + bias` (tied word embeddings), the log-sum-exp,
the cross-entropy, the argmax accuracy count and the gradient of all three inputs, without ever
holding the `[N, vocab]` logits (eager PyTorch materialises them, their float32 copy, the
log-softmax and its gradient: 4.9 GB per float32 copy at N = 40k, V = 30522).

Design: chunked fused linear cross-entropy (Liger-Kernel's FLCE [1]): per chunk of rows, cuBLAS
GEMMs and two memory-bound Triton passes over the chunk's logits; not one kernel that also does the
GEMMs (Cut Cross-Entropy [3]): the three GEMMs (6 N V H FLOPs) are nearly all the work, cuBLAS runs
them near the tensor-core peak, and a fused backward would have to recompute the logits.

Per chunk, in the input dtype with float32 accumulation:
1. `logits = x @ W.T` (cuBLAS) into a buffer whose rows are padded to the stats kernel's tile
   (`padded_stride`: 30720 for BERT's 30522). Rows 30522 elements apart are 61044 bytes apart,
   not a multiple of 16: cuBLAS cannot use Hopper's TMA on such a leading dimension (which is why
   NVIDIA's and Megatron's BERTs pad the vocabulary [4]), and Triton, which specialises a stride
   only when 16 divides it, loaded the previous kernel's rows 2 bytes at a time (LDG.E.U16 in its
   sm_90 build). The bias is not in the GEMM: cuBLAS's bias epilogue needs a contiguous result,
   and both passes below add it for one FFMA per element.
2. `_mlm_stats_kernel`, one read: per row the online log-sum-exp [2] in log2 units (running max,
   per-lane sums of 2^(y - max) rescaled when the max grows), the first argmax (searched only in
   the tiles where a row's max grows, torch.argmax's tie rule), the target logit (one gather) and
   the loss; -inf into the padding columns.
3. `_mlm_grad_kernel`, one read and one write: `softmax - onehot` in place, in the input dtype,
   and the float32 column sums of its rows (before rounding) into a per-program partial of the
   bias gradient: a 2-D grid of BLOCK_M rows x BLOCK_V columns, the padding inside the grid, so
   no mask in its loop, no [chunk, V] float32 tensor and no `logits.sum(0)` pass.
4. `grad_hidden rows = dlogits @ W` and `grad_weight (+)= dlogits.T @ x` (cuBLAS, float32 output:
   the first chunk writes the accumulator, later ones add with beta = 1, no temporary).
After the chunks, `_mlm_finish_kernel` sums the bias partials (in a fixed order: deterministic, no
atomics anywhere) and the per-row losses, counts and hits. Chunks only bound memory: the default
is the fewest equal chunks of at most 2^28 logits (one chunk up to 8704 rows at V = 30522).

Why two passes over the logits (3 x 250 MB at 4096 x 30522 bf16, ~180 us at 4.2 TB/s) and not one:
the gradient needs the row's final log-sum-exp before its first element is written, so one pass
must keep the row on chip. A row is 61 KB in bf16 (32768 lanes at V = 30522); held in registers by
one 16-warp program that is 64 values a thread, and the bias gradient's column partial (another
[V] float32 vector for the rows a program owns) 64 more: the 128 registers a thread may have at 512
threads, before any temporary. Re-reading the row from L2 inside one program instead needs the
rows of every resident program in L2 (132 SMs x 2-4 programs x 61 KB = 16-32 MB of 50 MB) and
leaves the bias gradient to one program per row, i.e. to a separate column-sum pass over the
gradient: 250 MB again. The two-pass split costs the same traffic with every pass streaming at
full occupancy. The sm_90 builds (bench/results/aot/mlm_loss.json): 10.3 + 10.0 SASS instructions
per bf16 element for the two passes, against 28 + 16 for the previous single two-pass kernel (and
its 2-byte loads).

Computing the gradients in the forward saves recomputing the logits GEMM (a quarter of the FLOPs);
the price is holding grad_hidden [N, H] and grad_weight [V, H] in float32 until the backward, which
for BERT follows at once (the MLM loss is the last op). Without gradients (evaluation, no_grad)
only the logits GEMM, the stats pass and the finish run.

The forward is a `torch.library.triton_op` (its kernels traced through `wrap_triton`) with its
backward registered by `register_autograd`, so torch.compile and torch.export see one op. The
backward is one kernel: each stored gradient times `grad_loss / count` in float32, rounded once to
its input's dtype. The 1/count factor is not folded into the 16-bit dlogits because small
probabilities divided by ~10^4 predicted rows would underflow in fp16 before the loss scale
reaches them. `count` (non-ignored rows) stays a device tensor: no host sync anywhere in forward or
backward. Launches per call: 3 GEMMs + 2 Triton kernels per chunk and the finish forward, one
kernel backward (tests/test_mlm_loss.py counts them).

Labels: -100 is ignored. Any other label outside [0, V) yields a NaN loss for its row rather than a
silent wrong answer (the kernels compare labels, and gather only in-range ones); CPU labels are
checked up front with a ValueError, which costs no device sync.

References:
[1] Hsu et al., Liger Kernel: Efficient Triton Kernels for LLM Training, arXiv:2410.10989;
    https://github.com/linkedin/Liger-Kernel/blob/main/src/liger_kernel/ops/fused_linear_cross_entropy.py
[2] Milakov and Gimelshein, Online normalizer calculation for softmax, arXiv:1805.02867.
[3] Wijmans et al., Cut Your Losses in Large-Vocabulary Language Models, arXiv:2411.09009.
[4] NVIDIA, Matrix Multiplication Background User's Guide (dimensions and leading dimensions as
    multiples of 16 bytes for Tensor Cores; the vocabulary-padding example);
    https://docs.nvidia.com/deeplearning/performance/dl-performance-matrix-multiplication/
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from bert_fast.kernels.checks import INT_DTYPES, check_same, check_tensor
from bert_fast.kernels.launch import launch as _launch
from bert_fast.kernels.launch import traced_body
from bert_fast.labels import IGNORE_INDEX

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The most logits one chunk may hold: 2^28 elements = 512 MB in bf16, 1 GB in float32. Chunks of
# ~8k rows keep the three GEMMs large enough to run at full speed on an H100.
MAX_CHUNK_ELEMENTS = 1 << 28
# Tile shapes (see stats_config, grad_config; bench/results/aot/mlm_loss.json has their builds).
STATS_BLOCK_R, STATS_BLOCK_V, STATS_WARPS = 4, 1024, 4
GRAD_BLOCK_M, GRAD_SUB_M, GRAD_BLOCK_V, GRAD_WARPS = 256, 8, 256, 4
FINISH_BLOCK, FINISH_ROWS, FINISH_WARPS, SCALE_BLOCK, SCALE_WARPS = 1024, 4096, 8, 4096, 8

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _logits2(Rows, cols, bias2, V, MASK: tl.constexpr):
    """log2(e) * (logits + bias) of `Rows` x `cols` in float32, one FFMA each; -inf past V."""
    if MASK:
        x = tl.load(Rows + cols[None, :], mask=(cols < V)[None, :], other=float("-inf"))
    else:
        x = tl.load(Rows + cols[None, :])
    return x.to(tl.float32) * _LOG2E + bias2[None, :]


@triton.jit
def _bias2(Bias, cols, V, MASK: tl.constexpr):
    """log2(e) * bias[cols], 0 past V."""
    if MASK:
        return tl.load(Bias + cols, mask=cols < V, other=0.0).to(tl.float32) * _LOG2E
    return tl.load(Bias + cols).to(tl.float32) * _LOG2E


@triton.jit
def _stats_tile(Rows, Bias, start, V, m, acc, best, BLOCK_V: tl.constexpr, TAIL: tl.constexpr):
    """Fold columns [start, start + BLOCK_V) of BLOCK_R rows into the running max `m` (log2 units),
    the per-lane sums `acc` of 2^(y - m) and the first argmax `best`. The tail tile reaches into
    the buffer's padding columns: they count as -inf, and -inf is written there, so that the
    gradient kernel, which runs over whole padded rows without a column mask, reads defined
    values (what it computes there is never used)."""
    cols = start + tl.arange(0, BLOCK_V)
    y = _logits2(Rows, cols, _bias2(Bias, cols, V, TAIL), V, TAIL)
    if TAIL:
        tl.store(Rows + cols[None, :], tl.full(y.shape, float("-inf"), Rows.dtype.element_ty),
                 mask=(cols >= V)[None, :])
    tile_max = tl.max(y, axis=1)
    grew = tile_max > m
    # The argmax moves only when a row's max grows, in a few of a row's tiles: look for the
    # tile's first maximal column then only. Strictly greater: on a tie the earlier tile keeps the
    # index, as torch.argmax does.
    if tl.max(grew.to(tl.int32), axis=0) > 0:
        first = tl.min(tl.where(y == tile_max[:, None], cols[None, :], V), axis=1)
        best = tl.where(grew, first, best)
    m_new = tl.maximum(m, tile_max)
    acc = acc * tl.exp2(m - m_new)[:, None] + tl.exp2(y - m_new[:, None])
    return m_new, acc, best


@triton.jit
def _mlm_stats_kernel(
    Logits,  # [>= rows, stride_logits_row] this chunk's hidden @ weight.T, without the bias;
    #          stride_logits_row >= V rounded up to BLOCK_V (padding: -inf out)
    Bias,  # [V]
    Labels,  # [N] int32/int64 target ids, IGNORE_INDEX where nothing is predicted
    Lse,  # [N] fp32 out: log-sum-exp of the row's logits
    Loss,  # [N] fp32 out: lse - target logit; 0 when ignored, NaN for a label outside [0, V)
    Correct,  # [N] int32 out: 1 where the row's first argmax is its label
    Shift,  # [N] fp32 out, for _mlm_grad_kernel: lse in log2 units, +inf where ignored
    Target,  # [N] int32 out, for _mlm_grad_kernel: the label, -1 where none is in [0, V)
    row0,  # the chunk's first row in Labels, Lse, Loss, Correct, Shift and Target
    rows,  # rows in this chunk
    stride_logits_row,
    V,
    IGNORE_INDEX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_chunk = local < rows
    # Rows past the chunk's end redo its last row (and store nothing), so no load needs a row mask.
    local = tl.minimum(local, rows - 1).to(tl.int64)
    Rows = Logits + local[:, None] * stride_logits_row
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
    best = tl.zeros([BLOCK_R], tl.int32)
    v_full = V - V % BLOCK_V
    for start in range(0, v_full, BLOCK_V):
        m, acc, best = _stats_tile(Rows, Bias, start, V, m, acc, best, BLOCK_V, False)
    if v_full < V:
        m, acc, best = _stats_tile(Rows, Bias, v_full, V, m, acc, best, BLOCK_V, True)
    lse2 = m + tl.log2(tl.sum(acc, axis=1))

    label = tl.load(Labels + row0 + local)
    valid = label != IGNORE_INDEX
    unknown = (label < 0) | (label >= V)
    gather = valid & ~unknown
    label = tl.where(gather, label, -1).to(tl.int32)  # in range now: int32 compares and offsets
    # The target's y exactly as the loop computed it: a row whose label is its max has loss >= 0.
    target = (tl.load(Logits + local * stride_logits_row + label, mask=gather, other=0.0).to(tl.float32)
              * _LOG2E + tl.load(Bias + label, mask=gather, other=0.0).to(tl.float32) * _LOG2E)
    loss = tl.where(valid, (lse2 - target) * _LN2, 0.0)
    loss = tl.where(valid & unknown, float("nan"), loss)
    out = row0 + local
    tl.store(Lse + out, lse2 * _LN2, mask=in_chunk)
    tl.store(Loss + out, loss, mask=in_chunk)
    tl.store(Correct + out, (gather & (best == label)).to(tl.int32), mask=in_chunk)
    tl.store(Shift + out, tl.where(valid, lse2, float("inf")), mask=in_chunk)
    tl.store(Target + out, label, mask=in_chunk)


@triton.jit
def _grad_tile(Logits, Shift, Target, acc, bias2, cols, first, last, row0, stride_logits_row,
               SUB_M: tl.constexpr, MASK_ROWS: tl.constexpr, HAS_BIAS_GRAD: tl.constexpr):
    """Rows [first, first + SUB_M) x `cols`, masked to rows < last when MASK_ROWS: logits ->
    softmax - onehot in place; `acc` += it."""
    local = first + tl.arange(0, SUB_M)
    if MASK_ROWS:
        row_ok = local < last
        local = tl.minimum(local, last - 1)
    # 2^(y - inf) = 0: ignored rows (and a masked row's stand-in) get a zero gradient, no select.
    shift = tl.load(Shift + row0 + local)
    label = tl.load(Target + row0 + local)
    if MASK_ROWS:
        shift = tl.where(row_ok, shift, float("inf"))
        label = tl.where(row_ok, label, -1)
    Rows = Logits + local.to(tl.int64)[:, None] * stride_logits_row
    p = tl.exp2(_logits2(Rows, cols, bias2, 0, False) - shift[:, None])
    g = tl.where(cols[None, :] == label[:, None], p - 1.0, p)
    if MASK_ROWS:
        tl.store(Rows + cols[None, :], g.to(Logits.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(Rows + cols[None, :], g.to(Logits.dtype.element_ty))
    if HAS_BIAS_GRAD:
        acc += g
    return acc


@triton.jit
def _mlm_grad_kernel(
    Logits,  # [>= rows, stride_logits_row] in: hidden @ weight.T, -inf padding past V (from
    #          _mlm_stats_kernel); out: softmax - onehot in the same dtype, 0 padding
    Bias,  # [V]
    Shift,  # [N] fp32 from _mlm_stats_kernel: lse in log2 units, +inf where ignored
    Target,  # [N] int32 from _mlm_stats_kernel: the label, -1 for none
    BiasPartial,  # [row programs, stride_logits_row] fp32 out: column sums of each program's rows
    row0,  # the chunk's first row in Shift and Target
    rows,  # rows in this chunk
    stride_logits_row,  # a multiple of BLOCK_V: the grid covers the padding, with no column mask
    V,
    BLOCK_M: tl.constexpr,
    SUB_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    HAS_BIAS_GRAD: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # add to BiasPartial (every chunk after the first), in chunk order
):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    bias2 = _bias2(Bias, cols, V, True)
    acc = tl.zeros([SUB_M, BLOCK_V], tl.float32)  # column sums, reduced over rows once at the end
    first = tl.program_id(1) * BLOCK_M
    last = tl.minimum(first + BLOCK_M, rows)
    full = first + (last - first) // SUB_M * SUB_M
    for r in range(first, full, SUB_M):
        acc = _grad_tile(Logits, Shift, Target, acc, bias2, cols, r, last, row0, stride_logits_row,
                         SUB_M, False, HAS_BIAS_GRAD)
    if full < last:  # the program's partial last step: its rows only, never the next program's
        acc = _grad_tile(Logits, Shift, Target, acc, bias2, cols, full, last, row0, stride_logits_row,
                         SUB_M, True, HAS_BIAS_GRAD)
    if HAS_BIAS_GRAD:
        Partial = BiasPartial + tl.program_id(1).to(tl.int64) * stride_logits_row + cols
        total = tl.sum(acc, axis=0)
        if ACCUMULATE:
            total += tl.load(Partial)
        tl.store(Partial, total)


@triton.jit
def _mlm_finish_kernel(
    Loss,  # [N] fp32 per-row losses
    Correct,  # [N] int32 per-row hits
    Labels,  # [N]
    BiasPartial,  # [blocks, stride_partial] fp32 per-program column sums (past V: unused)
    LossOut,  # [] fp32 out: mean loss over non-ignored rows, 0 when there are none
    CorrectOut,  # [] int64 out
    CountOut,  # [] fp32 out: non-ignored rows
    GradBias,  # [V] fp32 out: column sums of softmax - onehot over all rows
    N,
    V,
    blocks,
    stride_partial,
    IGNORE_INDEX: tl.constexpr,
    BLOCK: tl.constexpr,  # bias columns per program
    ROW_BLOCK: tl.constexpr,  # rows per step of program 0's sums: few steps, each a latency
    HAS_BIAS_GRAD: tl.constexpr,
):
    pid = tl.program_id(0)
    if HAS_BIAS_GRAD:
        cols = pid * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], tl.float32)
        for b in range(0, blocks):  # a fixed order: the same sum on every run
            acc += tl.load(BiasPartial + b * stride_partial + cols, mask=cols < V, other=0.0)
        tl.store(GradBias + cols, acc, mask=cols < V)
    if pid == 0:
        loss = tl.zeros([ROW_BLOCK], tl.float32)
        hits = tl.zeros([ROW_BLOCK], tl.int32)
        count = tl.zeros([ROW_BLOCK], tl.int32)
        for start in range(0, N, ROW_BLOCK):
            rows = start + tl.arange(0, ROW_BLOCK)
            ok = rows < N
            loss += tl.load(Loss + rows, mask=ok, other=0.0)
            hits += tl.load(Correct + rows, mask=ok, other=0)
            count += (tl.load(Labels + rows, mask=ok, other=IGNORE_INDEX) != IGNORE_INDEX).to(tl.int32)
        total = tl.sum(count, axis=0).to(tl.float32)
        tl.store(LossOut, tl.sum(loss, axis=0) / tl.maximum(total, 1.0))
        tl.store(CorrectOut, tl.sum(hits, axis=0).to(tl.int64))
        tl.store(CountOut, total)


@triton.jit
def _scale_block(Src, Dst, n, block, scale, BLOCK: tl.constexpr):
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(Dst + offs, (tl.load(Src + offs, mask=ok) * scale).to(Dst.dtype.element_ty), mask=ok)


@triton.jit
def _mlm_scale_grads_kernel(
    GradLoss,  # [] the loss's incoming gradient
    Count,  # [] fp32 non-ignored rows
    GradXIn, GradXOut, nx,  # fp32 [N, H] -> hidden's dtype
    GradWIn, GradWOut, nw,  # fp32 [V, H] -> weight's dtype
    GradBIn, GradBOut, nb,  # fp32 [V] -> bias's dtype
    BLOCK: tl.constexpr,
):
    """All three gradients in one launch: program ranges for x, then weight, then bias."""
    pid = tl.program_id(0)
    scale = tl.load(GradLoss).to(tl.float32) / tl.maximum(tl.load(Count), 1.0)
    blocks_x = tl.cdiv(nx, BLOCK)
    blocks_w = tl.cdiv(nw, BLOCK)
    if pid < blocks_x:
        _scale_block(GradXIn, GradXOut, nx, pid, scale, BLOCK)
    elif pid < blocks_x + blocks_w:
        _scale_block(GradWIn, GradWOut, nw, pid - blocks_x, scale, BLOCK)
    else:
        _scale_block(GradBIn, GradBOut, nb, pid - blocks_x - blocks_w, scale, BLOCK)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # integer division: triton.cdiv from Python goes through JITFunction.__call__


def _block(vocab: int, cap: int) -> int:
    """A power-of-two tile width: `cap`, or the vocabulary's own size when smaller (16 at least)."""
    return min(cap, max(16, triton.next_power_of_2(vocab)))


def stats_config(vocab: int) -> dict:
    """_mlm_stats_kernel's tile: BLOCK_R rows x BLOCK_V columns per step, and its warps."""
    block_v = _block(vocab, STATS_BLOCK_V)
    return dict(BLOCK_R=STATS_BLOCK_R, BLOCK_V=block_v,
                num_warps=max(1, min(STATS_WARPS, STATS_BLOCK_R * block_v // 1024)))


def grad_config(vocab: int) -> dict:
    """_mlm_grad_kernel's tile: BLOCK_M rows per program in steps of SUB_M, BLOCK_V columns (a
    divisor of the stats kernel's BLOCK_V, see padded_stride)."""
    block_v = min(_block(vocab, GRAD_BLOCK_V), stats_config(vocab)["BLOCK_V"])
    return dict(BLOCK_M=GRAD_BLOCK_M, SUB_M=GRAD_SUB_M, BLOCK_V=block_v,
                num_warps=max(1, min(GRAD_WARPS, GRAD_SUB_M * block_v // 512)))


def padded_stride(vocab: int) -> int:
    """Row stride of the logits buffer: vocab rounded up to the stats kernel's BLOCK_V (30720 for
    BERT's 30522: 0.6% more memory), which the gradient kernel's BLOCK_V divides: the stats
    kernel's tail tile and the gradient kernel's last column block lie inside each row. At least
    a multiple of 16 elements: Triton then knows every row is 16-byte aligned, and so does cuBLAS."""
    block = stats_config(vocab)["BLOCK_V"]
    return _cdiv(vocab, block) * block


# `torch.mm(..., out_dtype=)` (16-bit inputs, float32 result) arrived in torch 2.8; `addmm` with
# that out_dtype and a float32 addend (pytorch/pytorch#167931) after it, in 2.10 or 2.11: gated on
# 2.11, the first version a GPU test ran it on.
_TORCH = tuple(int(p) for p in torch.__version__.split(".")[:2])
_HAS_MM_OUT_DTYPE = _TORCH >= (2, 8)
_HAS_ADDMM_OUT_DTYPE = _TORCH >= (2, 11)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (float32) = a @ b, or += a @ b, with a and b in the input dtype. cuBLAS keeps its float32
    sum: no 16-bit rounding of a chunk's share, no [V, H] temporary, no separate add."""
    if a.dtype == torch.float32:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif a.is_cuda and _HAS_MM_OUT_DTYPE and not accumulate:
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    elif a.is_cuda and _HAS_ADDMM_OUT_DTYPE:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    elif accumulate:  # CPU (aten has no out_dtype kernel there) and older torch: a 16-bit product
        out += torch.mm(a, b)
    else:
        out.copy_(torch.mm(a, b))


def default_chunk_rows(vocab: int) -> int:
    """The most rows one chunk may hold: MAX_CHUNK_ELEMENTS logits, in multiples of 128."""
    rows = MAX_CHUNK_ELEMENTS // vocab
    return rows - rows % 128 if rows >= 128 else max(rows, 1)


def chunk_rows_for(n: int, vocab: int) -> int:
    """Rows per chunk by default: the fewest chunks default_chunk_rows allows, of equal size (in
    multiples of 128), so no chunk runs a small tail GEMM."""
    cap = default_chunk_rows(vocab)
    if n <= cap:
        return max(n, 1)
    size = _cdiv(n, _cdiv(n, cap))
    return min(cap, _cdiv(size, 128) * 128) if cap >= 128 else cap


def _forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
             chunk_rows: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        torch.Tensor, torch.Tensor]:
    """(loss, correct, lse, count, grad_hidden, grad_weight, grad_bias): the gradients unscaled
    (`softmax - onehot` pushed through the decoder; float32), each an empty tensor when not asked
    for. The body of the triton_op below, and what tests count launches of."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    labels, bias = labels.contiguous(), bias.contiguous()
    compute_grad = grad_hidden or grad_weight or grad_bias
    chunks = [(start, min(chunk_rows, n - start)) for start in range(0, n, chunk_rows)]
    stride = padded_stride(vocab)
    stats, grad = stats_config(vocab), grad_config(vocab)
    # The first chunk is the largest; later ones add into the same rows of partials.
    blocks = _cdiv(chunks[0][1], grad["BLOCK_M"]) if grad_bias and chunks else 0

    f32 = dict(device=device, dtype=torch.float32)
    lse, loss_rows, shift = (torch.empty(n, **f32) for _ in range(3))
    correct_rows, target = (torch.empty(n, device=device, dtype=torch.int32) for _ in range(2))
    partial = torch.empty((blocks, stride), **f32)
    grad_x = torch.empty((n, h) if grad_hidden else (0,), **f32)
    # With no rows no GEMM writes grad_weight: zeros then (the only fill kernel of the op).
    grad_w = torch.empty((vocab, h) if grad_weight else (0,), **f32)
    if grad_weight and not n:
        grad_w.zero_()
    grad_b = torch.empty(vocab if grad_bias else 0, **f32)
    # One buffer for every chunk; the kernels take it whole (never a view), which keeps the op
    # simple to functionalize under torch.compile.
    buf = torch.empty((chunks[0][1] if chunks else 0, stride), device=device, dtype=hidden.dtype)
    traced = traced_body(buf)
    weight_t = weight.t()
    for i, (start, rows) in enumerate(chunks):
        x = hidden[start:start + rows]
        logits = buf[:rows, :vocab]
        torch.mm(x, weight_t, out=logits)
        _launch(_mlm_stats_kernel, (_cdiv(rows, stats["BLOCK_R"]),), traced)(
            buf, bias, labels, lse, loss_rows, correct_rows, shift, target, start, rows, stride, vocab,
            IGNORE_INDEX=IGNORE_INDEX, BLOCK_R=stats["BLOCK_R"], BLOCK_V=stats["BLOCK_V"],
            num_warps=stats["num_warps"])
        if not compute_grad:
            continue
        _launch(_mlm_grad_kernel, (stride // grad["BLOCK_V"], _cdiv(rows, grad["BLOCK_M"])), traced)(
            buf, bias, shift, target, partial, start, rows, stride, vocab,
            BLOCK_M=grad["BLOCK_M"], SUB_M=grad["SUB_M"], BLOCK_V=grad["BLOCK_V"],
            HAS_BIAS_GRAD=grad_bias, ACCUMULATE=i > 0, num_warps=grad["num_warps"])
        if grad_hidden:
            _mm_into(grad_x[start:start + rows], logits, weight, accumulate=False)
        if grad_weight:
            _mm_into(grad_w, logits.t(), x, accumulate=i > 0)

    loss = torch.empty((), **f32)
    correct = torch.empty((), device=device, dtype=torch.int64)
    count = torch.empty((), **f32)
    _launch(_mlm_finish_kernel, (_cdiv(vocab, FINISH_BLOCK) if grad_bias else 1,), traced)(
        loss_rows, correct_rows, labels, partial, loss, correct, count, grad_b, n, vocab, blocks, stride,
        IGNORE_INDEX=IGNORE_INDEX, BLOCK=FINISH_BLOCK, ROW_BLOCK=FINISH_ROWS, HAS_BIAS_GRAD=grad_bias,
        num_warps=FINISH_WARPS)
    return loss, correct, lse, count, grad_x, grad_w, grad_b


_mlm_loss_fwd = triton_op("bert_fast::mlm_loss_fwd", mutates_args=())(_forward)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, _labels, _chunk_rows, *wanted = inputs
    _loss, correct, lse, count, *grads = output
    ctx.save_for_backward(count, *grads)
    ctx.wanted = wanted
    ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype)
    ctx.mark_non_differentiable(correct, lse, count, *grads)
    # Without this autograd would fill zero gradients for the six non-differentiable outputs,
    # [V, H] float32 among them, on every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * 8
    count, *grads = ctx.saved_tensors
    # New tensors, so the saved gradients stay intact for retain_graph; one rounding each.
    outs = [torch.empty(g.shape, device=g.device, dtype=dtype) if wanted else None
            for g, wanted, dtype in zip(grads, ctx.wanted, ctx.dtypes)]
    args, programs = [], 0
    for g, out in zip(grads, outs):
        numel = g.numel() if out is not None else 0
        args += [g, g if out is None else out, numel]
        programs += _cdiv(numel, SCALE_BLOCK)
    if programs:
        _launch(_mlm_scale_grads_kernel, (programs,), traced_body(count))(
            grad_loss, count, *args, BLOCK=SCALE_BLOCK, num_warps=SCALE_WARPS)
    return *outs, None, None, None, None, None


_mlm_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


def _validate(hidden, weight, bias, labels, chunk_rows, check_labels: bool) -> int:
    check_tensor("hidden", hidden, ndim=2, dtypes=DTYPES)
    check_tensor("weight", weight, ndim=2, shape=(None, hidden.shape[1]), device=hidden.device)
    check_tensor("bias", bias, shape=(weight.shape[0],), device=hidden.device)
    check_same(("hidden", "weight", "bias"), (hidden, weight, bias), "dtype")
    check_tensor("labels", labels, dtypes=INT_DTYPES, shape=(hidden.shape[0],), device=hidden.device)
    vocab = weight.shape[0]
    if vocab == 0 or hidden.shape[1] == 0:
        raise ValueError(f"weight must have a non-empty shape, got {tuple(weight.shape)}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    if check_labels and labels.device.type == "cpu":  # on CUDA a bad label gives a NaN loss instead
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
        if bad.any():
            raise ValueError(f"labels must be in [0, {vocab}) or {IGNORE_INDEX}, got "
                             f"{labels[bad][0].item()} at index {bad.nonzero()[0].item()}")
    return chunk_rows_for(hidden.shape[0], vocab) if chunk_rows is None else chunk_rows


def mlm_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor, *,
             chunk_rows: int | None = None, check_labels: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused `cross_entropy(hidden @ weight.T + bias, labels, ignore_index=-100)`.

    hidden [N, H], weight [V, H], bias [V] (float32, float16 or bfloat16, one dtype), labels [N]
    int32/int64. Returns (loss: float32 mean over non-ignored rows, 0 when there are none;
    correct: int64 count of non-ignored rows whose argmax is the label; lse: float32 [N] per-row
    log-sum-exp). `chunk_rows` bounds the logits held at once (default: the fewest equal chunks
    of at most 2^28 logits). `check_labels=False` skips the labels' range check on CPU tensors (a
    host read; on CUDA it never runs), for labels checked where the batch was built."""
    chunk_rows = _validate(hidden, weight, bias, labels, chunk_rows, check_labels)
    wanted = [torch.is_grad_enabled() and t.requires_grad for t in (hidden, weight, bias)]
    loss, correct, lse, *_ = _mlm_loss_fwd(hidden, weight, bias, labels, chunk_rows, *wanted)
    return loss, correct, lse


def mlm_loss_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager PyTorch: the full [N, V] logits, in float32 (float64 for float64 inputs)."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    valid = labels != IGNORE_INDEX
    loss_sum = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction="sum")
    loss = loss_sum / valid.sum().clamp(min=1)
    correct = ((logits.argmax(-1) == labels) & valid).sum()
    return loss, correct, torch.logsumexp(logits, -1)
