"""Per-tensor FP8 casts for the FP8 GEMMs (bert_fast/ops/fp8.py): amax, scale and cast to e4m3/e5m2, the
zero padding `torch._scaled_mm` wants and the transposed copy the backward GEMMs read, in as few
passes over the tensor as the scaling allows.

What is fused, per operand of a GEMM (x, W, dY):
- The scale comes from the tensor's amax now (`current`) or from the delayed-scaling state
  (`delayed`: the largest amax of the last steps, bert_fast/ops/fp8.py). Current scaling needs the amax
  before the first element is cast: an amax pass (read) and a cast pass (read, write): 2 launches.
  Delayed scaling knows its scale before the pass: the cast pass reads the tensor once, writes it
  once and records its amax on the way (per-program partials; the last program to finish its
  tiles, found by the state's atomic ticket, reduces them, records the amax into the state's
  `amax_now`, turns it into 1 / scale and puts the ticket back to 0): 1 launch. Until the state is
  primed (its first training forward, whose history is empty: current scaling) an amax pass runs
  before it, reading the tensor only where the state's scale is 0 (`scaled=False`; 2 launches).
  (A separate one-program finish launch, as before, was 288 of a BERT-large step's launches, and
  so was the amax pass that all later steps ran for nothing but zeroing the ticket.) Eager
  PyTorch spends 25-40 launches per operand on the same (abs, amax, the guards against 0 and
  non-finite amaxes, mul, clamp, cast; tests/test_fp8_cast.py counts them).
- Each pass writes the row-major copy [rows, cols] and/or the transposed one [cols, rows] from the
  same tile (the backward's dX = dY W and dW = dY^T X read W^T, dY^T and X^T; `_scaled_mm` takes its
  first operand row-major and its second column-major), with rows and columns past the tensor's
  written as zeros up to the caller's padded sizes (multiples of 16 on CUDA), so neither a
  transpose nor a pad copy follows.

Numerics are those of bert_fast/ops/fp8.py's eager path, bit for bit: scale = fp8_max / amax as torch
rounds `float / tensor` (fp8_max times the IEEE reciprocal, `div_rn`), clamped to the float32
maximum, 1 for an all-zero tensor; q = clamp(x * scale, +-fp8_max) rounded to nearest even;
inverse scale 1 / scale (IEEE, as `Tensor.reciprocal`). A tensor
holding NaN or inf has a non-finite amax: its inverse scale is NaN, so every GEMM product with it
is NaN (a plain cast would saturate inf to fp8_max and hide it), and its amax is not recorded.
Under current scaling its q is NaN too; under delayed scaling the cast has happened before the amax
is known, so q holds the saturated values, but the NaN inverse scale makes the GEMM's result the
same all-NaN one.

Under TRITON_INTERPRET=1 (the CPU tests) Triton's own float32 -> fp8 conversion is not torch's: it
truncates the mantissa and adds the first dropped bit without carrying into the exponent (124.4 ->
64 in e4m3, not 128) and has no NaN. So the interpreted kernels round in integer arithmetic
(`_fp8_bits`, RNE as the hardware `cvt.rn.satfinite` does) and store the bytes through a uint8 view;
tests/test_fp8_cast.py checks that rounding against torch's for every float32 neighbourhood of the
fp8 grids, and tests/gpu/ checks the compiled kernels (which use the hardware conversion) bit for
bit against the torch reference.

Launches: eagerly `kernel[grid]`; under torch.compile / export the same launchers run inside the
`bert_fast::fp8_cast` triton_op (it mutates `amax_now`), so fullgraph traces have no break.

References: Micikevicius et al., "FP8 Formats for Deep Learning" (arXiv:2209.05433); NVIDIA
Transformer Engine's fused cast-transpose and delayed-scaling amax bookkeeping
(https://github.com/NVIDIA/TransformerEngine, transformer_engine/common/transpose/cast_transpose.cu);
torchao.float8's dynamic per-tensor scaling (https://github.com/pytorch/ao, torchao/float8).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from bert_fast.kernels.launch import launch as _launch
from bert_fast.kernels.launch import traced as _traced
from bert_fast.kernels.launch import traced_body

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# Per format: mantissa bits, exponent bias, largest finite value.
FORMATS = {E4M3: (3, 7, 448.0), E5M2: (2, 15, 57344.0)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_M, BLOCK_N, NUM_WARPS = 64, 128, 4  # bench/results/aot/fp8_cast.json
PER_SM = 8  # programs per SM of the persistent passes (their amax partials stay few)
FINISH_BLOCK = 1024
_FLOAT32_MAX = 3.4028234663852886e38


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------- kernels

@triton.jit
def _fp8_bits(y, MANT: tl.constexpr, BIAS: tl.constexpr):
    """The fp8 byte of float32 `y` (|y| <= the format's max, or NaN), rounded to nearest even:
    the interpreter's stand-in for the hardware conversion. Normal results round the float32 bits
    (a carry moves into the exponent, as it should); subnormal ones scale y to units of the
    smallest subnormal and round through float32 addition of 2^23 (round-to-nearest-even)."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    shift: tl.constexpr = 23 - MANT
    rounded = (mag + ((1 << (shift - 1)) - 1) + ((mag >> shift) & 1)) >> shift
    normal = rounded - ((127 - BIAS) << MANT)
    small = mag < ((127 + 1 - BIAS) << 23)  # below the smallest normal 2^(1 - BIAS)
    units = tl.where(small, tl.abs(y), 0.0) * (2.0 ** (BIAS - 1 + MANT))
    subnormal = ((units + 8388608.0) - 8388608.0).to(tl.uint32)
    out = tl.where(small, subnormal, normal)
    out = tl.where(mag > 0x7F800000, 0x7F, out)  # NaN
    return (out | sign).to(tl.uint8)


@triton.jit
def _max_nan(a, b):
    """Elementwise max that keeps NaN (one FMNMX.NAN), so an amax is not finite when any element
    is not. The hardware's plain max drops NaN (the interpreter's numpy one keeps it)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _amax_of(acc):
    """The max of an elementwise accumulator, NaN if it holds one. tl.max's reduction drops NaN on
    the GPU, so a flag carries it (a custom NaN-keeping combine would cost the interpreter
    seconds per call)."""
    flat = tl.reshape(acc, [acc.numel])
    has_nan = tl.max((flat != flat).to(tl.int32), 0)
    return tl.where(has_nan > 0, float("nan"), tl.max(flat, 0))


@triton.jit
def _scale_from_amax(amax, FP8_MAX: tl.constexpr):
    """FP8_MAX / amax, clamped to the float32 max; 1 for amax 0; NaN for a non-finite amax
    (bert_fast.ops.fp8._scale_for). Rounded as torch computes `float / tensor`: FP8_MAX times the
    correctly rounded reciprocal."""
    finite = amax < float("inf")
    ok = (amax > 0) & finite
    scale = tl.minimum(tl.math.div_rn(1.0, tl.where(ok, amax, 1.0)) * FP8_MAX, 3.4028234663852886e38)
    return tl.where(ok, scale, tl.where(finite, 1.0, float("nan")))


@triton.jit
def _max_partials(P, n, BLOCK_P: tl.constexpr, VOLATILE: tl.constexpr = False):
    """The amax of n partials; VOLATILE for partials other programs of this launch wrote (not
    through this SM's L1, which could hold stale lines)."""
    offs = tl.arange(0, BLOCK_P)
    return _amax_of(tl.load(P + offs, mask=offs < n, other=0.0, volatile=VOLATILE))


@triton.jit
def _tile_index(tile, tiles_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row and column indices of tile `tile` (row-major order over [BLOCK_M, BLOCK_N] tiles). The
    passes take them from here and hand them to the loads, never back from a load helper: torch's
    mutation analysis of a triton_op's kernels (torch._higher_order_ops.triton_kernel_wrap) counts
    every argument of a call whose result feeds a store's address as written, so torch.compile
    would clone x, the tensor cast, around every cast (tests/test_fp8_cast.py checks the analysis)."""
    rows = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols


@triton.jit
def _load_tile(X, rows, cols, n_rows, n_cols, stride_x_row):
    """X[rows, cols] as float32, zeros outside [n_rows, n_cols]; also that mask."""
    inside = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x_row + cols[None, :], mask=inside, other=0.0)
    return x.to(tl.float32), inside


@triton.jit
def _exp2(x, SOFT: tl.constexpr):
    """2^x; compiled, one MUFU.EX2 (`ex2.approx.ftz`, relative error < 2^-22; results below 2^-126
    flush to 0, far below anything an fp8 cast keeps) instead of tl.exp2's range fix-ups."""
    if SOFT:
        return tl.exp2(x)
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _rcp(x, SOFT: tl.constexpr):
    """1 / x for x >= 1; compiled, one MUFU.RCP (`rcp.approx.ftz`, 1 ulp) instead of a full division."""
    if SOFT:
        return 1.0 / x
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _cdf_and_pdf(u, SOFT: tl.constexpr):
    """Phi(u), the standard normal CDF, and its density phi(u), in float32 from one exp and one
    reciprocal: erfc by Abramowitz & Stegun 7.1.26 (absolute error of Phi <= 7.5e-8; libdevice's
    erff costs about 36 instructions, this about 12), its constants folded (p / sqrt 2, a_i / 2,
    the exp in base 2). The tail is taken as P(t) e^(-u^2 / 2) directly, never as 1 - erf, so it
    suffers no cancellation: relative error < 0.2% for |u| <= 5 (growing beyond, where
    gelu(u) = u Phi(u) < 2e-6 |u|, far below any fp8 scale's resolution)."""
    t = _rcp(1.0 + 0.23164189340114784 * tl.abs(u), SOFT)
    half_poly = t * (0.127414796 + t * (-0.142248368 + t * (0.7107068705 + t * (-0.7265760135
                                                                                  + t * 0.5307027145))))
    e = _exp2(u * u * -0.7213475204444817, SOFT)  # exp(-u^2 / 2)
    tail = half_poly * e  # Phi(-|u|)
    return tl.where(u < 0, tail, 1.0 - tail), e * 0.3989422804014327


@triton.jit
def _gelu(u, TANH: tl.constexpr, SOFT: tl.constexpr):
    """GELU in float32: exact (u Phi(u), the erf form) or HF's tanh form, the latter as
    u * sigmoid(2 z) (= 0.5 u (1 + tanh z)): no cancellation for negative u."""
    if TANH:
        z = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        return u * _rcp(1.0 + _exp2(z * -2.8853900817779268, SOFT), SOFT)  # exp(-2 z)
    cdf, _ = _cdf_and_pdf(u, SOFT)
    return u * cdf


@triton.jit
def _gelu_grad(u, TANH: tl.constexpr, SOFT: tl.constexpr):
    """d gelu(u) / du in float32 (csrc/bias_gelu_math.h's gelu_grad); the tanh form through
    s = sigmoid(2 z): 1 + tanh z = 2 s, 1 - tanh^2 z = 4 s (1 - s)."""
    if TANH:
        k = 0.7978845608028654
        s = _rcp(1.0 + _exp2(k * (u + 0.044715 * u * u * u) * -2.8853900817779268, SOFT), SOFT)
        return s + 2.0 * u * s * (1.0 - s) * k * (1.0 + 3.0 * 0.044715 * u * u)
    cdf, pdf = _cdf_and_pdf(u, SOFT)
    return cdf + u * pdf


@triton.jit
def _load_value(X, Pre, ColBias, rows, cols, n_rows, n_cols, stride_x_row, PROLOGUE: tl.constexpr,
                GELU_TANH: tl.constexpr, SOFT: tl.constexpr):
    """The tile [rows, cols] of the tensor a pass casts, float32, zeros outside [n_rows, n_cols], and
    that mask: X itself
    (PROLOGUE 0), gelu(X + ColBias) (1: the FFN's activation, cast for the second GEMM) or
    X * gelu'(Pre + ColBias) (2: its gradient, cast for the first GEMM's backward; Pre has X's strides)."""
    x, inside = _load_tile(X, rows, cols, n_rows, n_cols, stride_x_row)
    if PROLOGUE != 0:
        b = tl.load(ColBias + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        if PROLOGUE == 1:
            x = _gelu(x + b[None, :], GELU_TANH, SOFT)
        else:
            u, _ = _load_tile(Pre, rows, cols, n_rows, n_cols, stride_x_row)
            x = x * _gelu_grad(u + b[None, :], GELU_TANH, SOFT)
        x = tl.where(inside, x, 0.0)  # gelu(0 + bias) is not 0: padding must stay 0
    return x, inside


@triton.jit
def _fp8_amax_kernel(
    X,  # [n_rows, n_cols], row stride stride_x_row, unit column stride
    Pre, ColBias,  # the prologue's (_load_value): [n_rows, n_cols] like X, [n_cols]; unread for PROLOGUE 0
    Scale,  # [slot + 1] float32: Scale[slot] is the delayed scale (SKIP_IF_SCALED), else unread
    Partial,  # [programs] float32 out: each program's amax of |X| (NaN or inf: not finite)
    n_rows, n_cols, stride_x_row, slot,
    SKIP_IF_SCALED: tl.constexpr, PROLOGUE: tl.constexpr, GELU_TANH: tl.constexpr, SOFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The amax pass: before a current-scaled cast, or for a delayed one whose history is empty
    (Scale <= 0; with a scale it reads nothing)."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(n_cols, BLOCK_N)
    tiles = tl.cdiv(n_rows, BLOCK_M) * tiles_n
    if SKIP_IF_SCALED:
        tiles = tl.where(tl.load(Scale + slot) > 0, 0, tiles)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(pid, tiles, tl.num_programs(0)):
        rows, cols = _tile_index(tile, tiles_n, BLOCK_M, BLOCK_N)
        x, _ = _load_value(X, Pre, ColBias, rows, cols, n_rows, n_cols, stride_x_row, PROLOGUE, GELU_TANH,
                           SOFT)
        acc = _max_nan(acc, tl.abs(x))
    tl.store(Partial + pid, _amax_of(acc))


# A subroutine, not inlined: inlined, ptxas built the bf16 two-layout delayed cast with 189 registers
# instead of 151 (2 CTAs per SM instead of 3); called, every pass's loop builds as before. Eager
# launches and graphs captured from them keep it; torch.compile re-emits helpers with a plain
# @triton.jit and builds the inlined form (tests/test_fp8_cast_aot.py pins both).
@triton.jit(noinline=True)
def _finish(Partial, n_partial, Scale, Ticket, AmaxNow, InvScale, AmaxOut, slot, FP8_MAX: tl.constexpr,
            SCALED: tl.constexpr, RECORD: tl.constexpr, BLOCK_F: tl.constexpr):
    """After a delayed-scaled cast, in its last program: the ticket back to 0, the amax, 1 / scale
    (NaN for a non-finite tensor), and the step's amax record (a non-finite one left out). The
    scale is the one the pass cast with, found again (passed, it cost the gelu_grad cast a spilled
    register): the state's if positive, else (an empty history) the current one, which the amax
    pass's partials gave the pass and the partials of the cast give here, or 1 where no amax pass
    ran (SCALED: the caller promised a positive scale, and it was not)."""
    tl.store(Ticket, 0)  # every other program has drawn its ticket: back to 0 for the next cast
    amax = _max_partials(Partial, n_partial, BLOCK_F, True)
    stored = tl.load(Scale + slot)
    scale = tl.where(stored > 0, stored, 1.0 if SCALED else _scale_from_amax(amax, FP8_MAX))
    finite = amax < float("inf")
    tl.store(InvScale, tl.where(finite, tl.math.div_rn(1.0, scale), float("nan")))
    tl.store(AmaxOut, amax)
    if RECORD:
        now = tl.load(AmaxNow + slot)
        tl.store(AmaxNow + slot, tl.where(finite, tl.maximum(now, amax), now))


@triton.jit
def _fp8_cast_kernel(
    X,  # [n_rows, n_cols], row stride stride_x_row, unit column stride
    Pre, ColBias,  # the prologue's (_load_value): [n_rows, n_cols] like X, [n_cols]; unread for PROLOGUE 0
    DBias,  # [cdiv(out_rows, BLOCK_M), out_cols] float32 out (PROLOGUE 2): per row block, column sums
    Q,  # [out_rows, out_cols] fp8 (uint8 under the interpreter), row-major (ROWWISE)
    QT,  # [out_cols, out_rows] the transposed copy (TRANSPOSE)
    Scale,  # [slot + 1] float32: Scale[slot] is the delayed scale (DELAYED); <= 0: current from AmaxIn
    AmaxIn,  # [n_amax_in] float32 partials of the amax pass (unread under SCALED)
    Partial,  # [programs] float32 out: each program's amax, NaN kept (DELAYED)
    Ticket,  # [1] int32, 0 at launch and put back to 0 at the end: programs done (DELAYED)
    AmaxNow,  # [slot + 1] float32: AmaxNow[slot] is the state's amax of this step, max-updated (RECORD)
    InvScale,  # [1] float32 out: 1 / scale (NaN for a non-finite X under DELAYED)
    AmaxOut,  # [1] float32 out: amax of |X|, NaN kept
    n_rows, n_cols, out_rows, out_cols, stride_x_row, n_amax_in, slot,
    FP8_MAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, SOFT: tl.constexpr,
    DELAYED: tl.constexpr, SCALED: tl.constexpr, RECORD: tl.constexpr, ROWWISE: tl.constexpr,
    TRANSPOSE: tl.constexpr, PROLOGUE: tl.constexpr, GELU_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """The cast pass over [out_rows, out_cols] tiles (zeros past [n_rows, n_cols]). Under PROLOGUE 2
    it also writes the gradient's column sums per row block (float32, before scaling: the bias
    gradient, which a deterministic sum over the blocks finishes). Under DELAYED the last program
    done finishes (`_finish`)."""
    pid = tl.program_id(0)
    if DELAYED:
        stored = tl.load(Scale + slot)
        # The amax pass's partials, read only for an empty history; none under SCALED (n_amax_in
        # 0: amax 0, scale 1, as `_finish` has it). Not specialised on SCALED: without the
        # division ptxas built the two-layout bf16 cast with 183 registers instead of 151 (2 CTAs
        # per SM instead of 3).
        amax = _max_partials(AmaxIn, tl.where(stored <= 0, n_amax_in, 0), BLOCK_P)
        scale = tl.where(stored > 0, stored, _scale_from_amax(amax, FP8_MAX))
    else:
        amax = _max_partials(AmaxIn, n_amax_in, BLOCK_P)
        scale = _scale_from_amax(amax, FP8_MAX)
    tiles_n = tl.cdiv(out_cols, BLOCK_N)
    tiles = tl.cdiv(out_rows, BLOCK_M) * tiles_n
    seen = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Not software-pipelined (no tl.range stages): the transposed copy's reread of Q below must
    # not be issued before the store it reads, which a pipeliner assuming no aliasing could do.
    for tile in range(pid, tiles, tl.num_programs(0)):
        rows, cols = _tile_index(tile, tiles_n, BLOCK_M, BLOCK_N)
        x, inside = _load_value(X, Pre, ColBias, rows, cols, n_rows, n_cols, stride_x_row, PROLOGUE,
                                GELU_TANH, SOFT)
        if PROLOGUE == 2:
            tl.store(DBias + (tile // tiles_n) * out_cols + cols, tl.sum(x, 0), mask=cols < out_cols)
        if DELAYED:
            seen = _max_nan(seen, tl.abs(x))
        y = tl.where(inside, x * scale, 0.0)  # padding is 0 even under a NaN scale
        if SOFT:
            # torch's clamp (NaN stays NaN), then the rounding.
            y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX))
            q = _fp8_bits(y, MANT, BIAS)
        else:
            # cvt.rn.satfinite: round to nearest even, saturate at +-max (inf too), NaN stays NaN:
            # torch's clamp-then-cast in one instruction per two values.
            q = y.to(Q.dtype.element_ty, fp_downcast_rounding="rtne")
        out = (rows < out_rows)[:, None] & (cols < out_cols)[None, :]
        if ROWWISE:
            tl.store(Q + rows.to(tl.int64)[:, None] * out_cols + cols[None, :], q, mask=out)
        if TRANSPOSE:
            if PROLOGUE != 0 and ROWWISE:
                # The transposed copy from the bytes just written (L2), not from q: given q, Triton
                # recomputes the whole prologue (a second GELU per element) in the transposed
                # layout rather than moving the bytes there. The barrier makes the CTA's writes
                # visible to all its threads.
                tl.debug_barrier()
                q = tl.load(Q + rows.to(tl.int64)[:, None] * out_cols + cols[None, :], mask=out)
            tl.store(QT + cols.to(tl.int64)[None, :] * out_rows + rows[:, None], q, mask=out)
    if DELAYED:
        tl.store(Partial + pid, _amax_of(seen))
        # Release this program's partial, then take a ticket: the program that draws the last one
        # has seen every partial's release (acq_rel at GPU scope; the barrier first, so the whole
        # CTA's work precedes the release whichever thread stored the partial).
        tl.debug_barrier()
        done = tl.atomic_add(Ticket, 1, sem="acq_rel", scope="gpu")
        if done == tl.num_programs(0) - 1:
            _finish(Partial, tl.num_programs(0), Scale, Ticket, AmaxNow, InvScale, AmaxOut, slot, FP8_MAX,
                    SCALED, RECORD, BLOCK_F)
    elif pid == 0:
        tl.store(InvScale, tl.math.div_rn(1.0, scale))
        tl.store(AmaxOut, amax)


# ------------------------------------------------------------------------------------- launchers

@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs(device: torch.device, rows: int, cols: int) -> int:
    """Programs of a persistent pass over [rows, cols]: PER_SM per SM on a GPU (so their amax
    partials stay under FINISH_BLOCK), 3 under the interpreter (so tests take several tiles per
    program, unevenly); never more than there are tiles, at least 1."""
    tiles = max(1, triton.cdiv(rows, BLOCK_M) * triton.cdiv(cols, BLOCK_N))
    limit = PER_SM * _sm_count(device.index or 0) if device.type == "cuda" else 3
    return min(limit, tiles, FINISH_BLOCK)


def _cast(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None, amax_now: torch.Tensor | None,
          ticket: torch.Tensor | None, scaled: bool, slot: int, rows: int, cols: int, rowwise: bool,
          transpose: bool, traced: bool, bias: torch.Tensor | None = None, pre: torch.Tensor | None = None,
          gelu_tanh: bool = False):
    """The launches of `cast` and the GELU casts (arguments checked there); returns (q, qt, inv,
    amax, dbias): dbias [cols] float32 (only its first x.shape[1] entries are the bias gradient) when
    `pre` is given, else an empty tensor."""
    mant, exp_bias, top = FORMATS[dtype]
    prologue = 0 if bias is None else 1 if pre is None else 2
    n_rows, n_cols = x.shape
    device = x.device
    delayed = scale is not None
    q = torch.empty((rows, cols) if rowwise else (0,), dtype=dtype, device=device)
    qt = torch.empty((cols, rows) if transpose else (0,), dtype=dtype, device=device)
    inv = torch.empty((), dtype=torch.float32, device=device)
    amax = torch.empty((), dtype=torch.float32, device=device)
    soft = interpreting()
    # The interpreter stores the bytes _fp8_bits computes; compiled kernels the hardware's fp8.
    q_arg, qt_arg = (q.view(torch.uint8), qt.view(torch.uint8)) if soft else (q, qt)
    # Prologue operands stand in for themselves where unread (a pointer is needed all the same).
    pre_arg, bias_arg = (x if pre is None else pre), (x if bias is None else bias)
    dbias = torch.empty((triton.cdiv(rows, BLOCK_M), cols) if prologue == 2 else (0,), dtype=torch.float32,
                        device=device)
    prologue_flags = dict(PROLOGUE=prologue, GELU_TANH=gelu_tanh)
    n_amax = programs(device, n_rows, n_cols)
    block_p = triton.next_power_of_2(n_amax)
    if scaled:  # no amax pass: the cast reads no partials (a scale <= 0 would be taken as 1)
        partial_in = inv
    else:
        partial_in = torch.empty(n_amax, dtype=torch.float32, device=device)
        _launch(_fp8_amax_kernel, (n_amax,), traced)(
            x, pre_arg, bias_arg, scale if delayed else inv, partial_in, n_rows, n_cols, x.stride(0), slot,
            SKIP_IF_SCALED=delayed, SOFT=soft, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS,
            **prologue_flags)
    n_cast = programs(device, rows, cols)
    partial = torch.empty(n_cast if delayed else 1, dtype=torch.float32, device=device)
    record = amax_now is not None
    _launch(_fp8_cast_kernel, (n_cast,), traced)(
        x, pre_arg, bias_arg, dbias if prologue == 2 else partial, q_arg if rowwise else qt_arg,
        qt_arg if transpose else q_arg, scale if delayed else inv,
        partial_in, partial, ticket if delayed else partial, amax_now if record else partial, inv, amax,
        n_rows, n_cols, rows, cols, x.stride(0), 0 if scaled else n_amax, slot,
        FP8_MAX=top, MANT=mant, BIAS=exp_bias, SOFT=soft, DELAYED=delayed, SCALED=scaled, RECORD=record,
        ROWWISE=rowwise, TRANSPOSE=transpose, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_P=block_p,
        BLOCK_F=triton.next_power_of_2(n_cast), num_warps=NUM_WARPS, **prologue_flags)
    if prologue == 2:  # the row blocks' column sums, added in a fixed order: deterministic
        dbias = dbias.sum(0)
    return q, qt, inv, amax, dbias


@triton_op("bert_fast::fp8_cast", mutates_args=("amax_now", "ticket"))
def _fp8_cast_op(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None,
                 amax_now: torch.Tensor | None, ticket: torch.Tensor | None, scaled: bool, slot: int,
                 rows: int, cols: int, rowwise: bool, transpose: bool, bias: torch.Tensor | None,
                 pre: torch.Tensor | None, gelu_tanh: bool,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cast(x, dtype, scale, amax_now, ticket, scaled, slot, rows, cols, rowwise, transpose,
                 traced_body(x), bias, pre, gelu_tanh)


# ---------------------------------------------------------------------------------------- public

def cast(x: torch.Tensor, dtype: torch.dtype, *, scale: torch.Tensor | None = None,
         amax_now: torch.Tensor | None = None, ticket: torch.Tensor | None = None, scaled: bool = False,
         slot: int = 0, rows: int | None = None, cols: int | None = None, rowwise: bool = True,
         transpose: bool = False):
    """x [M, N] (float32/16, bfloat16, unit column stride) cast to `dtype` (float8_e4m3fn or
    float8_e5m2) under a per-tensor scale. Returns (q, qt, inv_scale, amax):

    - q [rows, cols] row-major when `rowwise` (else an empty tensor), qt [cols, rows] = q^T when
      `transpose`; rows >= M and cols >= N (default M, N): zeros past x.
    - inv_scale: 0-d float32, 1 / scale (what `_scaled_mm` multiplies by); NaN when x holds NaN or
      inf. amax: 0-d float32 max |x|, not finite when x holds NaN or inf.
    - Scaling: `scale` None scales currently (fp8_max / amax). Otherwise delayed: `scale` is the
      state's float32 buffer and `scale[slot]` is used when > 0 (else current scaling);
      `amax_now[slot]` (the state's buffer, or None) is raised to amax when that is finite: the
      step's record. `ticket`: the state's int32 [1] arrival count, 0 (and left 0) between
      delayed casts on one stream (None: a fresh one, filled with 0: a launch). `scaled`: the
      caller knows scale[slot] > 0 (a primed state, bert_fast/ops/fp8_state.py), so no amax pass
      runs (were it <= 0 after all, x would be cast with scale 1).
    """
    return _checked(x, dtype, scale, amax_now, ticket, scaled, slot, rows, cols, rowwise, transpose, None,
                    None, "none")[:4]


def cast_gelu(y: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype, approximate: str = "none", *,
              scale: torch.Tensor | None = None, amax_now: torch.Tensor | None = None,
              ticket: torch.Tensor | None = None, scaled: bool = False, slot: int = 0,
              rows: int | None = None, cols: int | None = None, rowwise: bool = True,
              transpose: bool = False):
    """`cast` of gelu(y + bias), computed in float32 and never stored in y's dtype: the FFN's first
    GEMM's epilogue and the second GEMM's input cast in one pass (bias [N], y's dtype; approximate
    'none' (erf) or 'tanh'). Returns (q, qt, inv_scale, amax) of the activation."""
    return _checked(y, dtype, scale, amax_now, ticket, scaled, slot, rows, cols, rowwise, transpose, bias,
                    None, approximate)[:4]


def cast_gelu_grad(grad: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype,
                   approximate: str = "none", *, scale: torch.Tensor | None = None,
                   amax_now: torch.Tensor | None = None, ticket: torch.Tensor | None = None,
                   scaled: bool = False, slot: int = 0, rows: int | None = None,
                   cols: int | None = None, rowwise: bool = True, transpose: bool = False):
    """`cast` of grad * gelu'(y + bias), the gradient of `cast_gelu`'s activation taken back through
    the GELU (float32, never stored in grad's dtype), and the bias gradient: returns (q, qt,
    inv_scale, amax, dbias), dbias [N] float32 = that gradient's column sums (unscaled, before the
    cast; summed over row blocks in a fixed order, so it is deterministic). y: [M, N] like grad."""
    q, qt, inv, amax, dbias = _checked(grad, dtype, scale, amax_now, ticket, scaled, slot, rows, cols,
                                       rowwise, transpose, bias, y, approximate)
    return q, qt, inv, amax, dbias[:grad.shape[1]]


def _check_prologue(x: torch.Tensor, bias, pre, approximate: str) -> None:
    """The GELU casts' own arguments (x, the tensor cast, is a checked 2-D float tensor by then)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.dtype not in DTYPES \
            or bias.shape[0] != x.shape[1] or bias.device != x.device:
        raise ValueError(f"bias must be a 1-D float tensor of x's width on x's device, got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} "
                         f"{tuple(getattr(bias, 'shape', ()))} for x {tuple(x.shape)}")
    if pre is not None and (not isinstance(pre, torch.Tensor) or pre.shape != x.shape
                            or pre.dtype not in DTYPES or pre.device != x.device):
        raise ValueError(f"y must be a float tensor of grad's shape {tuple(x.shape)} on {x.device}, got "
                         f"{getattr(pre, 'dtype', type(pre).__name__)} {tuple(getattr(pre, 'shape', ()))}")


def _checked(x, dtype, scale, amax_now, ticket, scaled, slot, rows, cols, rowwise, transpose, bias, pre,
             approximate):
    """The checks every cast shares, then the launches (eagerly or through the triton_op)."""
    if dtype not in FORMATS:
        raise TypeError(f"dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in DTYPES:
        raise ValueError(f"x must be a 2-D float32, float16 or bfloat16 tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    if bias is not None:
        _check_prologue(x, bias, pre, approximate)
    if x.stride(-1) != 1 or (pre is not None and pre.stride() != x.stride()):  # pre is read with x's strides
        x = x.contiguous()
        pre = None if pre is None else pre.contiguous()
    rows, cols = rows or x.shape[0], cols or x.shape[1]
    if rows < x.shape[0] or cols < x.shape[1]:
        raise ValueError(f"rows, cols must be at least x's shape {tuple(x.shape)}, got ({rows}, {cols})")
    for name, t in (("scale", scale), ("amax_now", amax_now)):
        if t is not None and (t.dtype != torch.float32 or t.dim() != 1 or not t.is_contiguous()
                              or t.device != x.device or not 0 <= slot < t.numel()):
            raise ValueError(f"{name} must be a contiguous 1-D float32 tensor on {x.device} with an entry "
                             f"at slot {slot}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if scale is None and (amax_now is not None or ticket is not None or scaled):
        raise ValueError("amax_now, ticket and scaled are delayed scaling's: give the state's scale too")
    if ticket is not None and (not isinstance(ticket, torch.Tensor) or ticket.dtype != torch.int32
                               or tuple(ticket.shape) != (1,) or ticket.device != x.device):
        raise ValueError(f"ticket must be an int32 tensor of shape (1,) on {x.device}, got "
                         f"{getattr(ticket, 'dtype', type(ticket).__name__)} "
                         f"{tuple(getattr(ticket, 'shape', ()))} on {getattr(ticket, 'device', None)}")
    if scale is not None and ticket is None:
        ticket = torch.zeros(1, dtype=torch.int32, device=x.device)
    if not (rowwise or transpose):
        raise ValueError("rowwise and transpose are both False: nothing to write")
    bias = None if bias is None else bias.contiguous()
    tanh = approximate == "tanh"
    scaled = bool(scaled)
    if _traced(x):
        return _fp8_cast_op(x, dtype, scale, amax_now, ticket, scaled, slot, rows, cols, rowwise, transpose,
                            bias, pre, tanh)
    return _cast(x, dtype, scale, amax_now, ticket, scaled, slot, rows, cols, rowwise, transpose, False, bias,
                 pre, tanh)


def cast_reference(x: torch.Tensor, dtype: torch.dtype, *, scale: torch.Tensor | None = None,
                   amax_now: torch.Tensor | None = None, slot: int = 0, rows: int | None = None,
                   cols: int | None = None):
    """`cast` in eager PyTorch, both layouts: (q, q^T, inv_scale, amax). The test oracle."""
    _mant, _bias, top = FORMATS[dtype]
    amax = x.detach().float().abs().amax()
    finite = torch.isfinite(amax)
    ok = (amax > 0) & finite
    current = (top / torch.where(ok, amax, torch.ones_like(amax))).clamp(max=_FLOAT32_MAX)
    current = torch.where(ok, current, torch.where(finite, 1.0, float("nan")))
    used = current if scale is None else torch.where(scale[slot] > 0, scale[slot], current)
    q = (x.float() * used).clamp(-top, top).to(dtype)
    rows, cols = rows or x.shape[0], cols or x.shape[1]
    padded = torch.zeros((rows, cols), dtype=torch.uint8, device=x.device)
    padded[:x.shape[0], :x.shape[1]] = q.view(torch.uint8)
    inv = torch.where(finite, used.reciprocal(), float("nan"))
    if amax_now is not None:
        amax_now[slot] = torch.where(finite, torch.maximum(amax_now[slot], amax), amax_now[slot])
    return padded.view(dtype), padded.t().contiguous().view(dtype), inv, amax


def gelu_float(y: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(y + bias) in float32: what `cast_gelu` casts (the oracle, and the CPU's eager path)."""
    return torch.nn.functional.gelu(y.float() + bias.float(), approximate=approximate)


def gelu_grad_float(grad: torch.Tensor, y: torch.Tensor, bias: torch.Tensor,
                    approximate: str = "none") -> torch.Tensor:
    """grad * gelu'(y + bias) in float32: what `cast_gelu_grad` casts and sums into the bias gradient."""
    return torch.ops.aten.gelu_backward(grad.float(), y.float() + bias.float(), approximate=approximate)
