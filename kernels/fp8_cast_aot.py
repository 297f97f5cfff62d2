"""Ahead-of-time sm_90 builds of the FP8 cast kernels (kernels/fp8_cast.py), without a GPU, through
kernels/aot.py: what bench/results/aot/fp8_cast.json holds (`python bench/fp8_cast.py
--compile-report`; checked by tests/test_fp8_cast_aot.py).

Rows: the amax pass and the cast pass per input dtype (bf16, what the model casts; fp32), per
scaling (current: the scale from the amax pass; delayed: the state's, recording the amax in the
same pass) and per layout written (row-major, transposed, both: what the backward GEMMs read),
e4m3 for activations and weights, e5m2 for gradients (a delayed cast's last program also
finishes: amax, 1 / scale and the record, outside the loop). All as they launch: hardware
conversion (SOFT=False), BLOCK_M x BLOCK_N tiles, NUM_WARPS.

The `prologue` column: "-" casts x itself; "gelu" casts gelu(y + b) (PROLOGUE 1, the FFN's
activation for ffn_out, e4m3) and "gelu_grad" casts dh * gelu'(y + b) while summing the bias
gradient (PROLOGUE 2, ffn_in's output gradient, e5m2), both in bf16, both layouts, exact (erf)
GELU, as bert_fast/ops/fp8_ffn.py launches them; with their amax passes under current scaling
(under delayed scaling a primed state's casts run none: the delayed rows are those casts).

Per row: `instructions_per_iteration`, the SASS of the loop over tiles (one thread's share of a
tile); `instructions_per_element` = that x threads / tile elements; `bytes_per_element`, what the
pass reads and writes per element of x: each bf16/fp32 tensor read (gelu_grad reads dh and y),
plus 1 per fp8 copy written. The bias (one row) and gelu_grad's bias-gradient partials (one float32
row per 64-row block: 4 / 64 bytes per element) are left out.
"""

from __future__ import annotations

from bert_fast.kernels import aot
from bert_fast.kernels import fp8_cast as fc

_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
_FP8 = {"e4m3": ("fp8e4nv", fc.FORMATS[fc.E4M3]), "e5m2": ("fp8e5", fc.FORMATS[fc.E5M2])}
# prologue column -> (PROLOGUE, tensors of x's size read)
PROLOGUES = {"-": (0, 1), "gelu": (1, 1), "gelu_grad": (2, 2)}


def _signature(fn, pointers: dict) -> dict:
    fn = aot._unwrap(fn)
    constexprs = aot.constexpr_names(fn)
    return {name: pointers.get(name, "*fp32" if name[0].isupper() else "i32")
            for name in fn.arg_names if name not in constexprs}


def _inputs(dtype: str, prologue: str) -> dict:
    """Pointer types of x and the prologue's operands. Unread (PROLOGUE 0) they are x itself, as
    kernels/fp8_cast.py passes them; DBias is float32 and stays the default."""
    if prologue == "-":
        return {"X": f"*{dtype}", "Pre": f"*{dtype}", "ColBias": f"*{dtype}"}
    return {"X": "*bf16", "Pre": "*bf16", "ColBias": "*bf16"}


def _prologue_flags(prologue: str) -> dict:
    return dict(PROLOGUE=PROLOGUES[prologue][0], GELU_TANH=False)


def _amax(dtype: str, delayed: bool, prologue: str = "-") -> aot.AotSpec:
    sig = _signature(fc._fp8_amax_kernel, _inputs(dtype, prologue))
    flags = dict(SKIP_IF_SCALED=delayed, SOFT=False, BLOCK_M=fc.BLOCK_M, BLOCK_N=fc.BLOCK_N,
                 **_prologue_flags(prologue))
    return aot.AotSpec(fc._fp8_amax_kernel, sig, flags, fc.NUM_WARPS, 3, divisible=("n_cols",))


def _cast(dtype: str, fmt: str, delayed: bool, rowwise: bool, transpose: bool,
          prologue: str = "-") -> aot.AotSpec:
    triton_fp8, (mant, bias, top) = _FP8[fmt]
    sig = _signature(fc._fp8_cast_kernel,
                     {**_inputs(dtype, prologue), "Q": f"*{triton_fp8}", "QT": f"*{triton_fp8}",
                      "Ticket": "*i32"})
    # Delayed: the primed state's cast (SCALED, no amax pass before it), what every step but the
    # first runs.
    flags = dict(FP8_MAX=top, MANT=mant, BIAS=bias, SOFT=False, DELAYED=delayed, SCALED=delayed,
                 RECORD=delayed, ROWWISE=rowwise, TRANSPOSE=transpose, BLOCK_M=fc.BLOCK_M, BLOCK_N=fc.BLOCK_N,
                 BLOCK_P=fc.FINISH_BLOCK, BLOCK_F=fc.FINISH_BLOCK, **_prologue_flags(prologue))
    # Padded sizes are multiples of 16 (what _scaled_mm wants); the input's columns are BERT's widths.
    return aot.AotSpec(fc._fp8_cast_kernel, sig, flags, fc.NUM_WARPS, 3,
                       divisible=("n_cols", "out_rows", "out_cols"))


LAYOUTS = {"rowwise": (True, False), "transposed": (False, True), "both": (True, True)}
# The fused FFN casts: which fp8 format each prologue is cast to (fp8_ffn.py: the activation e4m3,
# its gradient the recipe's gradient format, e5m2 by default).
FUSED = {"gelu": "e4m3", "gelu_grad": "e5m2"}


def _read(dtype: str, prologue: str) -> int:
    return _SIZE[dtype] * PROLOGUES[prologue][1]


def specs() -> list[tuple[dict, aot.AotSpec]]:
    """(config columns, spec) of every row."""
    out = []
    for dtype in ("bf16", "fp32"):
        for delayed in (False, True):
            scaling = "delayed" if delayed else "current"
            out.append((dict(kernel="amax", dtype=dtype, fp8="-", scaling=scaling, layout="-", prologue="-",
                             bytes_per_element=_SIZE[dtype]), _amax(dtype, delayed)))
            for layout, (rowwise, transpose) in LAYOUTS.items():
                for fmt in ("e4m3", "e5m2") if dtype == "bf16" else ("e4m3",):
                    written = int(rowwise) + int(transpose)
                    out.append((dict(kernel="cast", dtype=dtype, fp8=fmt, scaling=scaling, layout=layout,
                                     prologue="-", bytes_per_element=_SIZE[dtype] + written),
                                _cast(dtype, fmt, delayed, rowwise, transpose)))
    for prologue, fmt in FUSED.items():
        read = _read("bf16", prologue)
        out.append((dict(kernel="amax", dtype="bf16", fp8="-", scaling="current", layout="-",
                         prologue=prologue, bytes_per_element=read), _amax("bf16", False, prologue)))
        for delayed in (False, True):
            scaling = "delayed" if delayed else "current"
            out.append((dict(kernel="cast", dtype="bf16", fp8=fmt, scaling=scaling, layout="both",
                             prologue=prologue, bytes_per_element=read + 2),
                        _cast("bf16", fmt, delayed, True, True, prologue)))
    return out


def row_key(row: dict) -> tuple:
    """What names a report row: (kernel, dtype, fp8, scaling, layout, prologue)."""
    return tuple(row[k] for k in ("kernel", "dtype", "fp8", "scaling", "layout", "prologue"))


def fp8_cast_report() -> list[dict]:
    named = specs()
    rows = []
    for (config, _), r in zip(named, aot.compile_reports([s for _, s in named])):
        tile = fc.BLOCK_M * fc.BLOCK_N
        per_element = (None if r.instructions_per_iteration is None
                       else round(r.instructions_per_iteration * 32 * r.num_warps / tile, 2))
        rows.append(dict(**config, block=f"{fc.BLOCK_M}x{fc.BLOCK_N}", num_warps=r.num_warps,
                         registers=r.registers, spills=r.spills, shared_bytes=r.shared_bytes,
                         instructions_per_iteration=r.instructions_per_iteration,
                         instructions_per_element=per_element))
    return rows
