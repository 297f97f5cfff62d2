"""Masked-LM decoder fused with softmax cross-entropy over the vocabulary, forward and backward.

Fused: the decoder projection `hidden @ weight.T + bias` (tied word embeddings), the log-sum-exp,
the cross-entropy, the argmax accuracy count and the gradient of all three inputs, without ever
holding the `[N, vocab]` logits (eager PyTorch materialises them, their float32 copy, the
log-softmax and its gradient: 4.9 GB per float32 copy at N = 40k, V = 30522).

Design: chunked fused linear cross-entropy (Liger-Kernel's FLCE [1]), not one kernel that also does
the GEMM with an online log-sum-exp (Cut Cross-Entropy [3]). Why:
- The three GEMMs (logits, grad_hidden, grad_weight: 6 N V H FLOPs) are nearly all the work, and
  cuBLAS already runs them near the tensor-core peak; a Triton GEMM could at best match it.
- In a one-kernel design the backward does not fit on chip: grad_hidden for a block of rows is
  [BLOCK_N, H] in float32 (H = 768..1024, 200-500 KB for 64-128 rows), and grad_weight needs a
  second sweep with the roles of rows and vocabulary swapped, recomputing the logits again.
- The memory bound is the same: one chunk of logits `[chunk_rows, V]` lives at a time (at most
  2^28 elements, 512 MB in bf16), never `[N, V]`.

Per chunk of rows: `logits = x @ W.T + b` (cuBLAS, input dtype, float32 accumulation, like eager),
then one Triton program per row streams its logits tile by tile (BLOCK_V columns). Pass 1 keeps the
running max and sum of exp (online log-sum-exp [2], float32), the target logit and the argmax (the
first index among ties, as torch.argmax). Pass 2, when gradients are wanted, overwrites the logits
in place with `softmax - onehot` (zero for ignored rows). From that chunk the forward then computes
the gradients, as FLCE does: grad_hidden rows = dlogits @ W, grad_weight += dlogits.T @ x into a
float32 accumulator, grad_bias += column sums. The chunk order is fixed and nothing is atomic, so the
weight gradient is deterministic. Computing the gradients in the forward saves recomputing the
logits GEMM (a quarter of the FLOPs); the price is holding grad_hidden [N, H] and grad_weight [V, H]
float32 until the backward, which for BERT follows at once (the MLM loss is the last op). Without
gradients (evaluation, no_grad) only the logits GEMM and pass 1 run.

The forward is a `torch.library.triton_op` (the kernel launched through `wrap_triton`) with its
backward registered by `register_autograd`, so torch.compile and torch.export see one op. The
backward multiplies the stored gradients by `grad_loss / count` in float32. The 1/count factor
is not folded into the 16-bit dlogits because small probabilities divided by ~10^4 predicted rows
would underflow in fp16 before the loss scale reaches them. `count` (non-ignored rows) stays a
device tensor: no host sync anywhere in forward or backward.

Labels: -100 is ignored. Any other label outside [0, V) yields a NaN loss for its row rather than a
silent wrong answer (the kernel only compares labels, never indexes memory with them); CPU labels
are checked up front with a ValueError, which costs no device sync.

References:
[1] Hsu et al., Liger Kernel: Efficient Triton Kernels for LLM Training, arXiv:2410.10989;
    https://github.com/linkedin/Liger-Kernel/blob/main/src/liger_kernel/ops/fused_linear_cross_entropy.py
[2] Milakov and Gimelshein, Online normalizer calculation for softmax, arXiv:1805.02867.
[3] Wijmans et al., Cut Your Losses in Large-Vocabulary Language Models, arXiv:2411.09009.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from bert_fast.checks import INT_DTYPES, check_same, check_tensor

IGNORE_INDEX = -100
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The most logits one chunk may hold: 2^28 elements = 512 MB in bf16, 1 GB in float32. Chunks of
# ~8k rows keep the three GEMMs large enough to run at full speed on an H100.
MAX_CHUNK_ELEMENTS = 1 << 28
BLOCK_V = 4096


@triton.jit
def _mlm_ce_rows_kernel(
    Logits,  # [rows, V] logits in; softmax - onehot out when COMPUTE_GRAD
    Labels,  # [rows] int32/int64 target ids, IGNORE_INDEX where nothing is predicted
    Lse,  # [rows] fp32 log-sum-exp of the row
    Loss,  # [rows] fp32 lse - target logit; 0 when ignored, NaN for a label outside [0, V)
    Correct,  # [rows] int32 1 where the argmax is the label
    stride_logits_row,
    V,
    IGNORE_INDEX: tl.constexpr,
    BLOCK_V: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    EVEN_V: tl.constexpr,  # V % BLOCK_V == 0: no masks (set by the launcher, see _ce_rows)
):
    row = tl.program_id(0).to(tl.int64)
    Logits += row * stride_logits_row
    label = tl.load(Labels + row)
    offs = tl.arange(0, BLOCK_V)

    m = float("-inf")  # running max
    s = 0.0  # running sum of exp(logit - m)
    target = 0.0
    best = 0  # argmax so far
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        if EVEN_V:
            x = tl.load(Logits + cols).to(tl.float32)
        else:
            x = tl.load(Logits + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        tile_max, tile_arg = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        # Strictly greater: on a tie the earlier tile keeps the index, as torch.argmax does.
        best = tl.where(tile_max > m, start + tile_arg, best)
        m_new = tl.maximum(m, tile_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        target += tl.sum(tl.where(cols == label, x, 0.0), axis=0)
    lse = m + tl.log(s)

    valid = label != IGNORE_INDEX
    loss = tl.where(valid, lse - target, 0.0)
    loss = tl.where(valid & ((label < 0) | (label >= V)), float("nan"), loss)
    tl.store(Lse + row, lse)
    tl.store(Loss + row, loss)
    tl.store(Correct + row, (valid & (best == label)).to(tl.int32))

    if COMPUTE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            if EVEN_V:
                x = tl.load(Logits + cols).to(tl.float32)
            else:
                x = tl.load(Logits + cols, mask=cols < V, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            g = tl.where(cols == label, p - 1.0, p)
            g = tl.where(valid, g, 0.0).to(Logits.dtype.element_ty)
            if EVEN_V:
                tl.store(Logits + cols, g)
            else:
                tl.store(Logits + cols, g, mask=cols < V)


def _block_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 16 columns per thread at full size, smaller tiles for tiny vocabs."""
    block = min(BLOCK_V, triton.next_power_of_2(vocab))
    return block, max(1, min(8, block // 512))


def _ce_rows(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, loss: torch.Tensor,
             correct: torch.Tensor, compute_grad: bool) -> None:
    """Run the row kernel on one chunk (all arguments are the launcher's own contiguous buffers)."""
    rows, vocab = logits.shape
    assert logits.stride(-1) == 1 and labels.is_contiguous()
    block, num_warps = _block_config(vocab)
    # EVEN_V is computed here, not by @triton.heuristics: wrap_triton takes only jit or autotune
    # kernels, not a bare heuristics wrapper.
    wrap_triton(_mlm_ce_rows_kernel)[(rows,)](
        logits, labels, lse, loss, correct, logits.stride(0), vocab,
        IGNORE_INDEX=IGNORE_INDEX, BLOCK_V=block, COMPUTE_GRAD=compute_grad,
        EVEN_V=vocab % block == 0, num_warps=num_warps)


# `torch.mm(..., out_dtype=)` (16-bit inputs, float32 result) arrived in torch 2.8.
_HAS_MM_OUT_DTYPE = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 8)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as float32. cuBLAS accumulates 16-bit products in float32 anyway; `out_dtype` keeps
    that sum instead of rounding each chunk's share of grad_weight to 16 bits. (addmm's out_dtype
    would save a pass but needs its addend in the 16-bit input dtype.)"""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda and _HAS_MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    # CPU (tests; aten has no out_dtype kernel there) and torch < 2.8: the chunk's share rounds to
    # 16 bits, as eager's whole gradient does, and the chunks still sum in float32.
    return torch.mm(a, b).float()


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk: as many as MAX_CHUNK_ELEMENTS allows, in multiples of 128 for the GEMMs."""
    rows = MAX_CHUNK_ELEMENTS // vocab
    return rows - rows % 128 if rows >= 128 else max(rows, 1)


@triton_op("bert_fast::mlm_loss_fwd", mutates_args=())
def _mlm_loss_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                  chunk_rows: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor, torch.Tensor]:
    """(loss, correct, lse, count, grad_hidden, grad_weight, grad_bias): the gradients unscaled
    (`softmax - onehot` pushed through the decoder; hidden's dtype, then float32, float32), each
    an empty tensor when not asked for."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    labels = labels.contiguous()
    grad_x = torch.empty((n, h) if grad_hidden else (0,), device=device, dtype=hidden.dtype)
    grad_w = None if grad_weight and n else torch.zeros((vocab, h) if grad_weight else (0,), device=device)
    grad_b = torch.zeros(vocab if grad_bias else 0, device=device, dtype=torch.float32)
    compute_grad = grad_hidden or grad_weight or grad_bias
    weight_t = weight.t()
    per_row = [], [], []  # lse, loss, correct of each chunk
    for start in range(0, n, chunk_rows):
        x = hidden[start:start + chunk_rows]
        rows = x.shape[0]
        # The kernel writes only tensors of its own, never views, which keeps the op simple to
        # functionalize under torch.compile; the caching allocator reuses the last chunk's memory.
        logits = torch.addmm(bias, x, weight_t)
        outs = (torch.empty(rows, device=device, dtype=torch.float32),
                torch.empty(rows, device=device, dtype=torch.float32),
                torch.empty(rows, device=device, dtype=torch.int32))
        _ce_rows(logits, labels[start:start + rows], *outs, compute_grad)
        for acc, out in zip(per_row, outs):
            acc.append(out)
        if grad_hidden:
            torch.mm(logits, weight, out=grad_x[start:start + rows])
        if grad_weight:
            if grad_w is None:  # the first chunk writes the accumulator
                grad_w = _mm_fp32(logits.t(), x)
            elif hidden.dtype == torch.float32:
                grad_w.addmm_(logits.t(), x)
            else:
                grad_w += _mm_fp32(logits.t(), x)
        if grad_bias:
            grad_b += logits.sum(0, dtype=torch.float32)
        del logits  # before the next chunk's allocation: two chunks never coexist
    lse, loss_rows, correct_rows = (
        torch.cat(parts) if parts else torch.empty(0, device=device, dtype=dtype)
        for parts, dtype in zip(per_row, (torch.float32, torch.float32, torch.int32)))
    count = (labels != IGNORE_INDEX).sum().to(torch.float32)
    loss = loss_rows.sum() / count.clamp(min=1.0)
    return loss, correct_rows.sum(), lse, count, grad_x, grad_w, grad_b


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, _labels, _chunk_rows, *wanted = inputs
    _loss, correct, lse, count, *grads = output
    ctx.save_for_backward(count, *grads)
    ctx.wanted = wanted
    ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype)
    ctx.mark_non_differentiable(correct, lse, count, *grads)


def _backward(ctx, grad_loss, *_):
    count, *grads = ctx.saved_tensors
    scale = grad_loss.float() / count.clamp(min=1.0)
    # A float32 copy scaled in place (the saved gradients stay intact for retain_graph), then one
    # rounding to the parameter's dtype.
    out = [g.to(torch.float32, copy=True).mul_(scale).to(dtype) if wanted else None
           for g, wanted, dtype in zip(grads, ctx.wanted, ctx.dtypes)]
    return *out, None, None, None, None, None


_mlm_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


def _validate(hidden, weight, bias, labels, chunk_rows) -> int:
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
    if labels.device.type == "cpu":  # free on the CPU; on CUDA a bad label gives a NaN loss instead
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
        if bad.any():
            raise ValueError(f"labels must be in [0, {vocab}) or {IGNORE_INDEX}, got "
                             f"{labels[bad][0].item()} at index {bad.nonzero()[0].item()}")
    return default_chunk_rows(vocab) if chunk_rows is None else chunk_rows


def mlm_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor, *,
             chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused `cross_entropy(hidden @ weight.T + bias, labels, ignore_index=-100)`.

    hidden [N, H], weight [V, H], bias [V] (float32, float16 or bfloat16, one dtype), labels [N]
    int32/int64. Returns (loss: float32 mean over non-ignored rows, 0 when there are none;
    correct: int64 count of non-ignored rows whose argmax is the label; lse: float32 [N] per-row
    log-sum-exp). `chunk_rows` bounds the logits held at once (default: 2^28 elements)."""
    chunk_rows = _validate(hidden, weight, bias, labels, chunk_rows)
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
