"""FP8 GEMMs for the encoder (`precision.fp8`): per-tensor scaled e4m3/e5m2 linear layers.

What: `fp8_linear(x, weight, state)` computes `x @ weight.T` with both operands cast to
float8_e4m3fn under a per-tensor scale; its backward casts the incoming gradient to e5m2 (or e4m3,
`precision.fp8_grad_format`) and runs both gradient GEMMs in FP8 on the quantised copies the forward
saved (dX = q(dY) @ q(W), dW = q(dY)^T @ q(X)). The result comes back in the input's dtype, so the
fused epilogues after it (`ops.bias_gelu`, `ops.add_layer_norm` with the GEMM's bias) run unchanged.
A bias no such epilogue takes (the QKV GEMM's) is added to the GEMM's float32 result, in cuBLASLt's
epilogue on CUDA (`scaled_mm`): adding it after would read and write the [tokens, 3 x hidden]
output once more. `bert_fast.ops.linear` is the one entry the model calls
(`ops.linear_gelu` for the FFN's first GEMM, whose bias + GELU run inside the casts instead:
bert_fast/ops/fp8_ffn.py).

Scaling (current, or delayed from an amax history), the per-GEMM `Fp8State`, and what the model
and the training loop do with the states (enable, roll, reduce_amaxes, ...): bert_fast/ops/fp8_state.py,
whose public names this module re-exports (`fp8.Fp8State`, `fp8.roll`, ...). A NaN or inf input
gives a NaN output, so the loop's non-finite-loss check still fires.

Casts: on CUDA kernels/fp8_cast.py (one pass under delayed scaling once the state is primed: cast
with the state's scale and record the amax; two under current: amax, then cast), writing the
row-major copy the forward GEMM reads and the transposed one the backward reads (q(X)^T, q(W)^T and
q(dY)^T, which the forward saves instead of q(X), q(W)), zero-padded for `_scaled_mm`: 1 or 2
launches per operand against the 25-40 eager ops elsewhere (tests/test_fp8_cast.py counts them).
A training forward casts a weight once per optimizer step (`_cast_weight`: later micro-batches and
activation checkpointing's recomputation reuse the cast; under delayed scaling with its scale of
the step's first forward).

GEMM: `torch._scaled_mm` (second operand column-major; on CUDA every dimension a multiple of 16:
operands are zero-padded where not, which changes no result). On the CPU torch 2.13 runs
`_scaled_mm` with a naive kernel, about 0.1 GFLOP/s (512x128x512: 1.5 s against 36 ms for the
float32 GEMM of the same numbers), far too slow to train, so the CPU *emulates* it: the FP8 operands
are exact in float32, so a float32 GEMM of the dequantised values equals `_scaled_mm` up to
accumulation order (tests/test_fp8.py checks both against float64). Training runs refuse FP8 on the
CPU unless `BERT_FAST_FP8_EMULATE=1` (tests only) and on GPUs below compute capability 8.9.

Why our own op and not torchao's float8 training (`torchao.float8.convert_to_float8_training`,
evaluated at torchao 0.18.0): it swaps `nn.Linear` modules for `Float8Linear`, which replaces our
`Linear` (bert_fast/model/bert.py, whose forward leaves the bias to the fused epilogue: bias + GELU,
bias + dropout + residual + LayerNorm) with one that adds the bias itself, unfused, and drops the
epilogue; its only scaling is dynamic (`ScalingType.DYNAMIC`: delayed scaling
was removed), so `precision.fp8_scaling=delayed` and its checkpointed history could not be had.
These two files are ~650 lines on top of torch and keep the fused layer as it is.

torch.compile and CUDA graphs: the step compiles with fullgraph=True (tests/test_fp8_compile.py):
the eager casts are plain ops, the kernels a `bert_fast::fp8_cast` triton_op, nothing reads the
device. It is also capturable (tests/test_fp8_graphs.py): no tensor is made from host data inside
it, the state it writes is module buffers (static addresses, which Inductor's CUDA graph trees may
mutate) and the model's forward holds no collective (the loop reduces the amaxes eagerly, outside
the graphs). Compiled and captured forwards cast weights every time: the cache is host-side state a
graph cannot consult (a captured forward that reused a cast made outside it would replay that stale
cast forever), and the extra weight pass is about 1% of a BERT-large step.

References: Micikevicius et al., "FP8 Formats for Deep Learning" (arXiv:2209.05433); NVIDIA
Transformer Engine's FP8 weight caching (`is_first_microbatch`,
https://docs.nvidia.com/deeplearning/transformer-engine/user-guide/examples/advanced_optimizations.html).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import nn

from bert_fast.ops import fp8_state as _state
from bert_fast.ops.fp8_state import (
    _GRAD,
    _INPUT,
    _WEIGHT,
    E4M3,
    E5M2,
    EMULATE_ENV,
    GEMMS,
    GRAD_FORMATS,
    SCALINGS,
    Fp8Recipe,
    Fp8State,
    LossScaleFollower,
    _scale_from_amax,
    check_device,
    count_rolls,
    enable,
    fp8_max,
    host_rolls,
    is_state_key,
    primed_after_roll,
    reduce_amaxes,
    rescale_gradients,
    roll,
    set_host_rolls,
    states_of,
    weights_changed,
)

# Public names, fp8_state's among them: the model, the loop and the tests call `fp8.<name>`.
__all__ = [
    "E4M3", "E5M2", "EMULATE_ENV", "GEMMS", "GRAD_FORMATS", "SCALINGS", "Cast", "Fp8Recipe",
    "Fp8State", "LossScaleFollower", "cast", "check_device", "count_rolls", "emulated", "enable",
    "forget_weight_casts", "fp8_linear", "fp8_max", "host_rolls", "is_state_key", "linear_reference",
    "primed_after_roll", "quantize", "reduce_amaxes", "rescale_gradients", "roll", "scaled_mm",
    "set_host_rolls", "states_of", "uses_fast_accum", "weights_changed"]


def quantize(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    """`x * scale` cast to `dtype`, saturating at +-fp8_max (inf too: `_scale_for` makes the scale
    NaN for a tensor holding NaN or inf, so those come out NaN). scale: a 0-d float32 tensor."""
    top = fp8_max(dtype)
    return (x.float() * scale).clamp(-top, top).to(dtype)


def _amax(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().amax().float()


def _scale_and_amax(x: torch.Tensor, dtype: torch.dtype, state: Fp8State | None, role: int,
                    record: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(`_scale_for`'s scale, x's amax)."""
    amax = _amax(x)
    scale = _scale_from_amax(amax, dtype)
    if state is not None and state.delayed:
        if record:
            state.record(role, amax)
        stored = state.scale[role]
        scale = torch.where(stored > 0, stored, scale)
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan"))), amax


def _scale_for(x: torch.Tensor, dtype: torch.dtype, state: Fp8State | None, role: int,
               record: bool) -> torch.Tensor:
    """The scale to cast `x` with: current, or delayed from `state` (current while its scale is 0:
    an empty history before the state is primed, bert_fast/ops/fp8_state.py); records x's amax
    into the state when `record`. NaN when x holds a NaN or inf (its amax does), so the cast gives
    NaN rather than saturating an inf to a finite value: the loss turns non-finite and the loop's
    check fires, at no extra pass over x."""
    return _scale_and_amax(x, dtype, state, role, record)[0]


# ---- the casts ---------------------------------------------------------------------------------

class Cast(NamedTuple):
    """An operand in FP8: q [rows, cols] row-major and/or its transpose qt (None where not made;
    zero-padded to multiples of 16 where `_scaled_mm` needs it), 1 / scale, and the tensor's amax;
    for a GELU gradient's cast (`cast(..., pre=)`) also the bias gradient, float32 [cols]."""

    q: torch.Tensor | None
    qt: torch.Tensor | None
    inv: torch.Tensor
    amax: torch.Tensor
    dbias: torch.Tensor | None = None


def cast(t: torch.Tensor, dtype: torch.dtype, state: Fp8State | None, role: int, record: bool, *,
         rowwise: bool = True, transpose: bool = False, bias: torch.Tensor | None = None,
         pre: torch.Tensor | None = None, approximate: str = "none") -> Cast:
    """`t` [M, N] in FP8 under `state`'s scaling for `role`, recording its amax when `record`.
    With `bias`, what is cast is gelu(t + bias) (the FFN's activation), with `pre` too
    t * gelu'(pre + bias) (its gradient, whose column sums come back as `dbias`); both in float32,
    never stored in t's dtype (bert_fast/ops/fp8_ffn.py). On CUDA one fused kernel pass (two under
    current scaling) writes the layouts asked for, padded for `_scaled_mm`; elsewhere the eager ops,
    whose transpose is a view (the emulated GEMM reads any layout)."""
    if _state._use_kernels(t.device):
        from bert_fast.kernels import fp8_cast

        delayed = state is not None and state.delayed
        rows, cols = (_round16(n) for n in t.shape) if _pads(t.device) else t.shape
        # A primed state's scales are all positive: no amax pass. (Under torch.compile a guard on
        # the bool, which flips once: bert_fast/train/compiled.py compiles once primed.)
        scaled = delayed and state.primed
        layout = dict(scale=state.scale if delayed else None,
                      amax_now=state.amax_now if delayed and record else None,
                      ticket=state.ticket if delayed else None, scaled=scaled, slot=role, rows=rows,
                      cols=cols, rowwise=rowwise, transpose=transpose)
        dbias = None
        if bias is None:
            q, qt, inv, amax = fp8_cast.cast(t, dtype, **layout)
        elif pre is None:
            q, qt, inv, amax = fp8_cast.cast_gelu(t, bias, dtype, approximate, **layout)
        else:
            q, qt, inv, amax, dbias = fp8_cast.cast_gelu_grad(t, pre, bias, dtype, approximate, **layout)
        return Cast(q if rowwise else None, qt if transpose else None, inv, amax, dbias)
    dbias = None
    if bias is not None:
        from bert_fast.kernels.fp8_cast import gelu_float, gelu_grad_float

        t = gelu_float(t, bias, approximate) if pre is None else gelu_grad_float(t, pre, bias, approximate)
        dbias = None if pre is None else t.sum(0)
    scale, amax = _scale_and_amax(t, dtype, state, role, record)
    q = quantize(t, dtype, scale)
    return Cast(q, q.t(), scale.reciprocal(), amax, dbias)


# Weights change once per optimizer step, micro-batches cast them once (Transformer Engine's FP8
# weight caching, its `is_first_microbatch`). A state's cached weight cast is reused while the key
# below holds: the same weight tensor, its version counter (in-place edits through it), its storage
# (ZeRO-3 swaps `.data`) and the weights' generation (bert_fast/ops/fp8_state.py), which every
# optimizer step and every state-dict load moves on.
CACHE_WEIGHTS = True


def forget_weight_casts(module: nn.Module) -> None:
    """Frees the weight casts `module`'s FP8 states hold (about 1 byte per weight, twice): for
    callers that will not run the eager cache again, such as CUDA graphs, which cast every time."""
    for state in states_of(module):
        state._cached_weight = None


class _CachedWeight(NamedTuple):
    key: tuple
    weight: weakref.ref
    cast: Cast
    keep: torch.Tensor | None  # the amax a later training forward records again (0 when not finite)


def _weight_key(weight: torch.Tensor) -> tuple:
    return (_state.generation(), weight._version, weight.data_ptr(), weight.dtype, tuple(weight.shape),
            weight.device, _state._use_kernels(weight.device), _pads(weight.device))


def _capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (bert_fast/train/cuda_graphs.py)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _cast_weight(weight: torch.Tensor, state: Fp8State | None, record: bool, transpose: bool) -> Cast:
    """The weight in e4m3, from the state's cache when the weight has not changed since it was cast
    (training forwards only: the micro-batches of one optimizer step and activation checkpointing's
    recomputation). Under delayed scaling a reused cast keeps the scale it was made with, that of
    the step's first training forward (the rolls of the later micro-batches move the weight scale
    only for the next cast), and the weight's amax is recorded again, so the history is what it
    would be without the cache."""
    if state is None or not record or not CACHE_WEIGHTS or torch.compiler.is_compiling() \
            or _capturing(weight):
        return cast(weight, E4M3, state, _WEIGHT, record, transpose=transpose)
    key, hit = _weight_key(weight), state._cached_weight
    if hit is not None and hit.key == key and hit.weight() is weight:
        if state.delayed:
            if hit.keep is None:  # made on the first reuse: a step of one micro-batch never needs it
                hit = state._cached_weight = hit._replace(
                    keep=torch.nan_to_num(hit.cast.amax, nan=0.0, posinf=0.0).reshape(1))
            now = state.amax_now.narrow(0, _WEIGHT, 1)
            torch.maximum(now, hit.keep, out=now)
        return hit.cast
    made = cast(weight, E4M3, state, _WEIGHT, record, transpose=True)  # the backward reads W^T
    state._cached_weight = _CachedWeight(key, weakref.ref(weight), made, None)
    return made


# ---- the GEMM ----------------------------------------------------------------------------------

def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if t.shape == (rows, cols):
        return t
    # Padding an fp8 tensor goes through uint8 (zeros are the same bits), which every device pads.
    out = torch.nn.functional.pad(t.view(torch.uint8), (0, cols - t.shape[1], 0, rows - t.shape[0]))
    return out.view(t.dtype)


def _round16(n: int) -> int:
    return -(-n // 16) * 16


def _pads(device: torch.device) -> bool:
    """Whether _scaled_mm needs its dimensions padded to multiples of 16 (CUDA; the CPU's does not)."""
    return device.type == "cuda"


def emulated(device: torch.device) -> bool:
    """Whether the FP8 GEMM is emulated in float32 here (every device but CUDA)."""
    return device.type != "cuda"


def scaled_mm(a: torch.Tensor, b_t: torch.Tensor, inv_a: torch.Tensor, inv_b: torch.Tensor,
              out_dtype: torch.dtype, emulate: bool | None = None, fast_accum: bool = False,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """`(a * inv_a) @ (b_t * inv_b).T (+ bias)` for fp8 a [M, K] and b_t [N, K], in `out_dtype`.
    `torch._scaled_mm` (which takes its second operand column-major: b_t.T of a row-major b_t is
    that view, no copy), on CUDA with every dimension zero-padded to a multiple of 16 (the casts
    pad already there), with the tensor cores' fast accumulation when `fast_accum`; or the float32
    emulation (`emulate`, default: off CUDA), any layout, always exact float32 sums. `bias` [N]
    (shorter when b_t's last rows are the casts' zero padding: zeros past it) is added to the
    float32 result before its one rounding to `out_dtype`: in cuBLASLt's epilogue where
    `_scaled_mm` takes it (a bf16/fp16 result and a bias of its dtype), saving the pass over the
    output that adding it after would cost; otherwise after the GEMM."""
    if emulate is None:
        emulate = emulated(a.device)
    if emulate:
        out = torch.mm(a.float(), b_t.float().t()) * (inv_a * inv_b)
        if bias is not None:
            out = out + _pad_bias(bias, out.shape[1]).float()
        # Not `out.to(out_dtype)` when that is a no-op: returned from an autograd.Function's forward,
        # torch 2.11's Dynamo then loses the gradient (zero dX and dW; fixed in later releases).
        return out if out.dtype == out_dtype else out.to(out_dtype)
    m, k = a.shape
    n = b_t.shape[0]
    pad = _pads(a.device) and bool(m % 16 or k % 16 or n % 16)
    if pad:
        a, b_t = _pad_to(a, _round16(m), _round16(k)), _pad_to(b_t, _round16(n), _round16(k))
    epilogue = bias is not None and out_dtype in (torch.bfloat16, torch.float16) and bias.dtype == out_dtype
    out = torch._scaled_mm(a.contiguous(), b_t.contiguous().t(), inv_a, inv_b,
                           bias=_pad_bias(bias, b_t.shape[0]) if epilogue else None, out_dtype=out_dtype,
                           use_fast_accum=fast_accum)
    out = out[:m, :n] if pad else out
    return out + _pad_bias(bias, n).to(out_dtype) if bias is not None and not epilogue else out


def _pad_bias(bias: torch.Tensor, n: int) -> torch.Tensor:
    """bias [N'] zero-padded to the GEMM's n >= N' output columns (operands the casts padded)."""
    return bias if bias.shape[0] == n else torch.nn.functional.pad(bias, (0, n - bias.shape[0]))


def _gemm(a: torch.Tensor, b_t: torch.Tensor, inv_a, inv_b, out_dtype, emulate, rows: int,
          cols: int, fast_accum: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    """scaled_mm of possibly padded operands (and `bias` [cols]), the padding's rows and columns
    sliced off (a view)."""
    out = scaled_mm(a, b_t, inv_a, inv_b, out_dtype, emulate, fast_accum, bias)
    return out if out.shape == (rows, cols) else out[:rows, :cols]


def _forward_gemm(ctx, x2d, weight, state, record, emulate, given=None, bias=None):
    """The forward both FP8 autograd functions share: x cast (unless `given`: made, and recorded,
    by the op before, bert_fast/ops/fp8_ffn.py, whose x2d only carries the gradient) and W cast,
    y = q(x) @ q(W)^T (+ bias, in the GEMM's epilogue where it can be), and on ctx what
    `_backward_gemms` reads. Returns (y, the tensors to save for it: q(X)^T and q(W)^T where a
    gradient needs them, and their inverse scales)."""
    grad_x, grad_w = ctx.needs_input_grad[:2]
    cx = given if given is not None else cast(x2d, E4M3, state, _INPUT, record, transpose=grad_w)
    cw = _cast_weight(weight, state, record, transpose=grad_x)
    ctx.state, ctx.record, ctx.emulate = state, record, emulate
    ctx.x_dtype, ctx.w_dtype = x2d.dtype, weight.dtype
    ctx.shapes = (x2d.shape[0], x2d.shape[1], weight.shape[0])
    y = _gemm(cx.q, cw.q, cx.inv, cw.inv, x2d.dtype, emulate, x2d.shape[0], weight.shape[0],
              uses_fast_accum(state), None if bias is None else bias.to(x2d.dtype))
    return y, (cx.qt if grad_w else None, cw.qt if grad_x else None, cx.inv, cw.inv)


def _grad_dtype(state: Fp8State | None) -> torch.dtype:
    return state.recipe.grad_dtype if state is not None else E5M2


def _backward_gemms(ctx, cg: Cast, saved) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dX = q(dY) @ q(W) and dW = q(dY)^T @ q(X), where wanted, from the output gradient's cast
    and what `_forward_gemm` saved."""
    qt_x, qt_w, inv_x, inv_w = saved
    m, k, n = ctx.shapes
    want_x, want_w = ctx.needs_input_grad[:2]
    grad_x = grad_w = None
    if want_x:  # dX [M, K] = q(dY) [M, N] @ q(W) [N, K]
        grad_x = _gemm(cg.q, qt_w, cg.inv, inv_w, ctx.x_dtype, ctx.emulate, m, k)
    if want_w:  # dW [N, K] = q(dY)^T [N, M] @ q(X) [M, K]
        grad_w = _gemm(cg.qt, qt_x, cg.inv, inv_x, ctx.w_dtype, ctx.emulate, n, k)
    return grad_x, grad_w


class _Fp8Linear(torch.autograd.Function):
    """y = q(x) @ q(W)^T; dX = q(dY) @ q(W); dW = q(dY)^T @ q(X). The forward keeps only what the
    backward reads, the transposed copies q(X)^T and q(W)^T (half the bytes of bf16 ones), which
    the casts wrote in the same pass as q(X) and q(W)."""

    @staticmethod
    def forward(ctx, x2d, weight, state, record, emulate, given, bias):
        y, saved = _forward_gemm(ctx, x2d, weight, state, record, emulate, given, bias)
        ctx.save_for_backward(*saved)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        want_x, want_w = ctx.needs_input_grad[:2]
        grad_b = grad.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[6] else None
        if not (want_x or want_w):
            return None, None, None, None, None, None, grad_b
        cg = cast(grad, _grad_dtype(ctx.state), ctx.state, _GRAD, ctx.record, rowwise=want_x,
                  transpose=want_w)
        return *_backward_gemms(ctx, cg, ctx.saved_tensors), None, None, None, None, grad_b


def uses_fast_accum(state: Fp8State | None) -> bool:
    """Whether a forward GEMM under `state` uses fast accumulation (precision.fp8_fast_accum)."""
    return state is not None and state.recipe.fast_accum


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, state: Fp8State | None = None, *,
               record: bool = True, emulate: bool | None = None, given: Cast | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T (+ bias)` in FP8. x [..., K], weight [N, K], bias [N] (added to the GEMM's
    float32 result, in cuBLASLt's epilogue on CUDA with a bf16/fp16 result; leave it out where a
    fused epilogue after the GEMM takes it); the result has x's dtype. `state` None scales
    everything currently with e5m2 gradients; `record` False (evaluation) leaves a delayed state's
    amaxes alone. `given`: x already cast (both layouts, by bert_fast/ops/fp8_ffn.py), x then only
    carries the gradient. Arguments are checked by `bert_fast.ops.linear`."""
    out = _Fp8Linear.apply(x.reshape(-1, x.shape[-1]), weight, state, record, emulate, given, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear_reference(x: torch.Tensor, weight: torch.Tensor, s_x: torch.Tensor,
                     s_w: torch.Tensor) -> torch.Tensor:
    """The FP8 forward in float64 from the same quantised operands (the test oracle)."""
    q_x = quantize(x, E4M3, s_x).double() / s_x.double()
    q_w = quantize(weight, E4M3, s_w).double() / s_w.double()
    return q_x @ q_w.t()
