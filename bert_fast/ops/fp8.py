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

Scaling (`precision.fp8_scaling`), per tensor role (input, weight, gradient) and per GEMM:
- `current`: scale = fp8_max / amax(tensor now). Never overflows; one reduction before each cast.
- `delayed` (Transformer Engine's recipe): scale = fp8_max / max(amax history of the last
  `precision.fp8_amax_history` training forwards, i.e. micro-batches); the amax seen now (forward
  and backward) is recorded and enters the history at the next training forward (`roll`), after
  the training loop has max-reduced it across data-parallel ranks (`reduce_amaxes`, after each
  backward), so every rank scales alike and the checkpoint rank 0 writes is every rank's. Values
  past the stale scale saturate to +-fp8_max. An empty
  history (the first step) falls back to the current amax. The history and scales are module
  buffers (`*.fp8.<gemm>.amax_history`, `.amax_now`, `.scale`, float32 whatever the model's
  dtype), so DeepSpeed's checkpoints save and restore them and a resumed run is bit-exact.
Non-finite values: a NaN or inf input gives a NaN output (its amax makes the scale NaN; a plain
cast would saturate inf to 448 on the CPU, hiding it), so the loop's non-finite-loss check still
fires; its amax is left out of the history, so one bad step does not poison the steps after it.

Casts: on CUDA kernels/fp8_cast.py (one pass under delayed scaling: cast with the state's scale
and record the amax; two under current: amax, then cast), writing the row-major copy the forward
GEMM reads and the transposed one the backward reads (q(X)^T, q(W)^T and q(dY)^T, which the forward
saves instead of q(X), q(W)), zero-padded for `_scaled_mm`: 2 launches per operand against the
25-40 eager ops elsewhere (tests/test_fp8_cast.py counts them). A training forward casts a weight
once per optimizer step (`_cast_weight`: later micro-batches and activation checkpointing's
recomputation reuse the cast; under delayed scaling with its scale of the step's first forward).

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
This file is ~500 lines on top of torch and keeps the fused layer as it is.

torch.compile and CUDA graphs: the step compiles with fullgraph=True (tests/test_fp8_compile.py):
the eager casts are plain ops, the kernels a `bert_fast::fp8_cast` triton_op, nothing reads the
device. It is also capturable (tests/test_fp8_graphs.py): no tensor is made from host data inside
it, the state it writes is module buffers (static addresses, which Inductor's CUDA graph trees may
mutate) and the model's forward holds no collective (the loop reduces the amaxes eagerly, outside
the graphs). Compiled and captured forwards cast weights every time: the cache is host-side state a
graph cannot consult (a captured forward that reused a cast made outside it would replay that stale
cast forever), and the extra weight pass is about 1% of a BERT-large step.

References: Micikevicius et al., "FP8 Formats for Deep Learning" (arXiv:2209.05433); NVIDIA
Transformer Engine's DelayedScaling recipe
(https://docs.nvidia.com/deeplearning/transformer-engine/user-guide/api/common.html) and its FP8
weight caching (`is_first_microbatch`,
https://docs.nvidia.com/deeplearning/transformer-engine/user-guide/examples/advanced_optimizations.html).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
GRAD_FORMATS = {"e5m2": E5M2, "e4m3": E4M3}
SCALINGS = ("current", "delayed")
EMULATE_ENV = "BERT_FAST_FP8_EMULATE"  # test-only: lets a training run use FP8 on the CPU
_INPUT, _WEIGHT, _GRAD = 0, 1, 2  # rows of an Fp8State's buffers
# The four encoder GEMMs of a layer that run in FP8 (BertLayer's Linear children of these names).
GEMMS = ("qkv", "attn_out", "ffn_in", "ffn_out")
_FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class Fp8Recipe:
    """The `precision.fp8_*` settings: scaling 'current' or 'delayed', the gradients' format
    ('e5m2' or 'e4m3'), the delayed amax history's length and whether the forward GEMMs use the
    tensor cores' fast accumulation (CUDA only: the CPU's emulation sums exactly in float32)."""

    scaling: str = "current"
    grad_format: str = "e5m2"
    amax_history: int = 16
    fast_accum: bool = False

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"fp8 scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if self.grad_format not in GRAD_FORMATS:
            raise ValueError(f"fp8 grad_format must be one of {tuple(GRAD_FORMATS)}, "
                             f"got {self.grad_format!r}")
        length = self.amax_history
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"fp8 amax_history must be an int >= 1, got {self.amax_history!r}")
        if not isinstance(self.fast_accum, bool):
            raise ValueError(f"fp8 fast_accum must be true or false, got {self.fast_accum!r}")

    @property
    def grad_dtype(self) -> torch.dtype:
        return GRAD_FORMATS[self.grad_format]

    @classmethod
    def from_config(cls, recipe) -> Fp8Recipe:
        """From the training recipe's precision section (bert_fast/train/recipe.py Recipe)."""
        p = recipe.precision
        return cls(p.fp8_scaling, p.fp8_grad_format, p.fp8_amax_history, p.fp8_fast_accum)


class Fp8State(nn.Module):
    """One FP8 GEMM's recipe and, under delayed scaling, its scaling state in float32 buffers
    (rows: input, weight, gradient): `amax_history` [3, L] of past steps (newest first),
    `amax_now` [3] of this step so far, `scale` [3] from the history (0 while it is empty)."""

    def __init__(self, recipe: Fp8Recipe):
        super().__init__()
        self.recipe = recipe
        self._cached_weight = None  # _cast_weight's
        if recipe.scaling == "delayed":
            self.register_buffer("amax_history", torch.zeros(3, recipe.amax_history))
            self.register_buffer("amax_now", torch.zeros(3))
            self.register_buffer("scale", torch.zeros(3))
            # The roles' format maxima on the state's device, so a roll inside a CUDA graph makes
            # no tensor from host data (not saved: they follow from the recipe).
            self.register_buffer("format_max", torch.tensor([fp8_max(d) for d in self.dtypes]),
                                 persistent=False)
        _watch_optimizers()

    @property
    def delayed(self) -> bool:
        return self.recipe.scaling == "delayed"

    @property
    def dtypes(self) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
        """The FP8 formats of the roles (input, weight, gradient)."""
        return E4M3, E4M3, self.recipe.grad_dtype

    def _apply(self, fn, recurse=True):
        # DeepSpeed's bf16/fp16 cast (module.bfloat16()) converts every floating buffer: the scaling
        # state stays float32 (moves between devices still apply).
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        weights_changed()  # a model's load writes its weights too: no cached cast survives it
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def roll(self) -> None:
        """The step's amaxes (`amax_now`, reduced across ranks by `reduce_amaxes` before) enter
        the history; the scales follow from the new history; the next step's amaxes start at 0.
        On CUDA one launch (kernels/fp8_roll.py) instead of the 17 of the ops below: every training
        forward rolls every state."""
        if _use_kernels(self.amax_now.device):
            from bert_fast.kernels import fp8_roll

            fp8_roll.roll(self.amax_history, self.amax_now, self.scale, self.format_max)
            return
        self.amax_history.copy_(torch.cat([self.amax_now[:, None], self.amax_history[:, :-1]], dim=1))
        self.amax_now.zero_()
        self._update_scale()

    def _update_scale(self) -> None:
        self.scale.copy_(_scale_from_amax(self.amax_history.amax(dim=1), self.format_max, empty=0.0))

    @torch.no_grad()
    def record(self, role: int, amax: torch.Tensor) -> None:
        """Keeps the largest finite amax of this step (a NaN or inf one is left out, see module
        docstring); recomputed forwards (activation checkpointing) record the same value again."""
        finite = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax))
        self.amax_now[role] = torch.maximum(self.amax_now[role], finite)


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _scale_from_amax(amax: torch.Tensor, top: torch.dtype | torch.Tensor, empty: float = 1.0) -> torch.Tensor:
    """top / amax per entry (float32, finite); `empty` where amax is 0 or not finite. top: an FP8
    format (its fp8_max) or a tensor of maxima broadcasting with amax."""
    if isinstance(top, torch.dtype):
        top = fp8_max(top)
    ok = (amax > 0) & torch.isfinite(amax)
    scale = (top / torch.where(ok, amax, torch.ones_like(amax))).clamp(max=_FLOAT32_MAX)
    return torch.where(ok, scale, torch.full_like(scale, empty))


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
    """The scale to cast `x` with: current, or delayed from `state` (current while its history is
    empty); records x's amax into the state when `record`. NaN when x holds a NaN or inf (its amax
    does), so the cast gives NaN rather than saturating an inf to a finite value: the loss turns
    non-finite and the loop's check fires, at no extra pass over x."""
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


def _use_kernels(device: torch.device) -> bool:
    """Whether the casts run kernels/fp8_cast.py (CUDA; tests turn it on under the interpreter)."""
    return device.type == "cuda"


def cast(t: torch.Tensor, dtype: torch.dtype, state: Fp8State | None, role: int, record: bool, *,
         rowwise: bool = True, transpose: bool = False, bias: torch.Tensor | None = None,
         pre: torch.Tensor | None = None, approximate: str = "none") -> Cast:
    """`t` [M, N] in FP8 under `state`'s scaling for `role`, recording its amax when `record`.
    With `bias`, what is cast is gelu(t + bias) (the FFN's activation), with `pre` too
    t * gelu'(pre + bias) (its gradient, whose column sums come back as `dbias`); both in float32,
    never stored in t's dtype (bert_fast/ops/fp8_ffn.py). On CUDA one fused kernel pass (two under
    current scaling) writes the layouts asked for, padded for `_scaled_mm`; elsewhere the eager ops,
    whose transpose is a view (the emulated GEMM reads any layout)."""
    if _use_kernels(t.device):
        from bert_fast.kernels import fp8_cast

        delayed = state is not None and state.delayed
        rows, cols = (_round16(n) for n in t.shape) if _pads(t.device) else t.shape
        layout = dict(scale=state.scale if delayed else None,
                      amax_now=state.amax_now if delayed and record else None, slot=role, rows=rows,
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
# (ZeRO-3 swaps `.data`) and `_generation`, which every optimizer step (a global torch.optim hook:
# DeepSpeed writes the updated weights through other views of its flat buffers, which the version
# counter misses) and every state-dict load moves on.
CACHE_WEIGHTS = True
_generation = 0
_hooked = False


def forget_weight_casts(module: nn.Module) -> None:
    """Frees the weight casts `module`'s FP8 states hold (about 1 byte per weight, twice): for
    callers that will not run the eager cache again, such as CUDA graphs, which cast every time."""
    for state in states_of(module):
        state._cached_weight = None


def weights_changed() -> None:
    """Drops every cached FP8 weight cast: call after writing weights other than through an
    optimizer step, a state-dict load or in-place ops on the parameters themselves."""
    global _generation
    _generation += 1


def _watch_optimizers() -> None:
    global _hooked
    if not _hooked:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda *args: weights_changed())
        _hooked = True


class _CachedWeight(NamedTuple):
    key: tuple
    weight: weakref.ref
    cast: Cast
    keep: torch.Tensor | None  # the amax a training forward records again (0 when not finite)


def _weight_key(weight: torch.Tensor) -> tuple:
    return (_generation, weight._version, weight.data_ptr(), weight.dtype, tuple(weight.shape), weight.device,
            _use_kernels(weight.device), _pads(weight.device))


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
        if hit.keep is not None:
            now = state.amax_now.narrow(0, _WEIGHT, 1)
            torch.maximum(now, hit.keep, out=now)
        return hit.cast
    made = cast(weight, E4M3, state, _WEIGHT, record, transpose=True)  # the backward reads W^T
    keep = torch.nan_to_num(made.amax, nan=0.0, posinf=0.0).reshape(1) if state.delayed else None
    state._cached_weight = _CachedWeight(key, weakref.ref(weight), made, keep)
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
    is added to the float32 result before its one rounding to `out_dtype`: in cuBLASLt's epilogue
    where `_scaled_mm` takes it (a bf16/fp16 result and a bias of its dtype), saving the pass over
    the output that adding it after would cost; otherwise after the GEMM."""
    if emulate is None:
        emulate = emulated(a.device)
    if emulate:
        out = torch.mm(a.float(), b_t.float().t()) * (inv_a * inv_b)
        if bias is not None:
            out = out + bias.float()
        # Not `out.to(out_dtype)` when that is a no-op: returned from an autograd.Function's forward,
        # torch 2.11's Dynamo then loses the gradient (zero dX and dW; fixed in later releases).
        return out if out.dtype == out_dtype else out.to(out_dtype)
    m, k = a.shape
    n = b_t.shape[0]
    pad = _pads(a.device) and bool(m % 16 or k % 16 or n % 16)
    if pad:
        a, b_t = _pad_to(a, _round16(m), _round16(k)), _pad_to(b_t, _round16(n), _round16(k))
    epilogue = bias is not None and out_dtype in (torch.bfloat16, torch.float16) and bias.dtype == out_dtype
    fused = None
    if epilogue:
        fused = torch.nn.functional.pad(bias, (0, _round16(n) - n)) if pad and n % 16 else bias
    out = torch._scaled_mm(a.contiguous(), b_t.contiguous().t(), inv_a, inv_b, bias=fused,
                           out_dtype=out_dtype, use_fast_accum=fast_accum)
    out = out[:m, :n] if pad else out
    return out + bias.to(out_dtype) if bias is not None and not epilogue else out


def _gemm(a: torch.Tensor, b_t: torch.Tensor, inv_a, inv_b, out_dtype, emulate, rows: int,
          cols: int, fast_accum: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    """scaled_mm of possibly padded operands, the padding's rows and columns sliced off (a view);
    `bias` [cols] as scaled_mm adds it (padded with zeros to the operands' columns)."""
    if bias is not None and b_t.shape[0] != cols:
        bias = torch.nn.functional.pad(bias, (0, b_t.shape[0] - cols))
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


# ---- the model's FP8 state and the run's checks ------------------------------------------------

def enable(model: nn.Module, recipe: Fp8Recipe) -> list[Fp8State]:
    """Gives every encoder layer of `model` (each module with an `fp8` slot: model.BertLayer,
    found by the slot so this layer below the model never imports it) an `fp8` ModuleDict of one
    Fp8State per GEMM (GEMMS); the layers' forwards then run those GEMMs in FP8. Returns the states."""
    states = []
    for module in list(model.modules()):
        if hasattr(module, "fp8") and not isinstance(module, (Fp8State, nn.ModuleDict)):
            module.fp8 = nn.ModuleDict({name: Fp8State(recipe) for name in GEMMS})
            states += list(module.fp8.values())
    if not states:
        raise ValueError("fp8.enable: the model has no encoder layers")
    return states


def states_of(model: nn.Module) -> list[Fp8State]:
    return [m for m in model.modules() if isinstance(m, Fp8State)]


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def reduce_amaxes(states: list[Fp8State]) -> None:
    """Max-reduces every delayed state's step amaxes (`amax_now`) across data-parallel ranks in
    place: one all-reduce when torch.distributed runs with more than one rank, nothing otherwise;
    idempotent. The training loop calls it after each backward, eagerly (outside any compiled or
    captured graph, which then hold no collective), so the next forward's `roll` takes every
    rank's amaxes; checkpoint.save calls it too, so the file rank 0 writes holds them."""
    delayed = [s for s in states if s.delayed]
    if not delayed or _world_size() == 1:
        return
    now = torch.stack([s.amax_now for s in delayed])
    dist = torch.distributed
    dist.all_reduce(now, op=dist.ReduceOp.MAX)
    torch._foreach_copy_([s.amax_now for s in delayed], list(now))  # one launch, not one per state


@torch.no_grad()
def roll(states: list[Fp8State]) -> None:
    """Moves every delayed state's step amaxes into its history. No host sync, no collective: on
    several ranks, `reduce_amaxes` must have run since the last backward (the training loop's)."""
    for s in states:
        if s.delayed:
            s.roll()


@torch.no_grad()
def rescale_gradients(states: list[Fp8State], factor: float) -> None:
    """precision.fp16: the loss scale changed by `factor` (new / old). The gradients reaching the
    FP8 GEMMs carry the loss scale, so the gradient row of every delayed state (its history, this
    step's amax and its scale) follows it: after a rise the next casts would otherwise scale twice
    as large gradients by the old history and clip their largest values at the format's max,
    silently (saturation is no overflow: nothing turns inf for the loss scaler to see); after a
    fall they would waste a binade of range. Powers of two (DeepSpeed's scaler) rescale exactly.
    No host sync."""
    for s in states:
        if s.delayed:
            s.amax_history[_GRAD].mul_(factor)
            s.amax_now[_GRAD].mul_(factor)
            s._update_scale()


class LossScaleFollower:
    """Calls `rescale_gradients` when the fp16 loss scale moves: `update(scale)` after every
    optimizer step with the scaler's scale (None without fp16), which the training loop reads
    anyway."""

    def __init__(self, states: list[Fp8State], scale: float | None):
        self.states = [s for s in states if s.delayed]
        self.scale = scale

    def update(self, scale: float | None) -> None:
        if self.states and scale is not None and self.scale is not None and scale != self.scale:
            rescale_gradients(self.states, scale / self.scale)
        self.scale = scale


def is_state_key(name: str) -> bool:
    """Whether a state_dict key belongs to FP8 scaling state (not a weight: exports and init_from
    leave it out)."""
    return ".fp8." in f".{name}"


def check_device(device: torch.device) -> None:
    """Refuses, naming precision.fp8, a device that has no FP8 GEMMs: a CUDA GPU below compute
    capability 8.9, or the CPU (unless BERT_FAST_FP8_EMULATE=1, for tests: the GEMMs are emulated
    in float32 there and no faster than float32)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"precision.fp8 needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, "
                             f"Blackwell); {torch.cuda.get_device_name(device)} is {major}.{minor}. "
                             "Set precision.fp8=false")
        return
    if os.environ.get(EMULATE_ENV) != "1":
        raise ValueError(f"precision.fp8 needs a CUDA GPU with compute capability >= 8.9; this run is on "
                         f"{device.type}. Set precision.fp8=false ({EMULATE_ENV}=1 emulates FP8 on the CPU, "
                         "for tests only)")
