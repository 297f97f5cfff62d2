"""Ahead-of-time sm_90 builds of the FP8 cast kernels (kernels/fp8_cast.py), without a GPU, through
kernels/aot.py: what bench/results/aot/fp8_cast.json holds (`python bench/fp8_cast.py
--compile-report`; checked by tests/test_fp8_cast_aot.py).

Rows: the amax pass and the cast pass per input dtype (bf16, what the model casts; fp32), per
scaling (current: the scale from the amax pass; delayed: the state's, recording the amax in the
same pass) and per layout written (row-major, transposed, both: what the backward GEMMs read),
e4m3 for activations and weights, e5m2 for gradients; and the one-program finish. All as they
launch: hardware conversion (SOFT=False), BLOCK_M x BLOCK_N tiles, NUM_WARPS.

Per row: `instructions_per_iteration`, the SASS of the loop over tiles (one thread's share of a
tile); `instructions_per_element` = that x threads / tile elements; `bytes_per_element`, what the
pass reads and writes per element of x (input size, plus 1 per fp8 copy written).
"""

from __future__ import annotations

from bert_fast.kernels import aot
from bert_fast.kernels import fp8_cast as fc

_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
_FP8 = {"e4m3": ("fp8e4nv", fc.FORMATS[fc.E4M3]), "e5m2": ("fp8e5", fc.FORMATS[fc.E5M2])}
_INTS = ("n_rows", "n_cols", "out_rows", "out_cols", "stride_x_row", "n_amax_in", "n_partial")


def _signature(fn, pointers: dict) -> dict:
    fn = aot._unwrap(fn)
    constexprs = aot.constexpr_names(fn)
    return {name: pointers.get(name, "*fp32" if name[0].isupper() else "i32")
            for name in fn.arg_names if name not in constexprs}


def _amax(dtype: str, delayed: bool) -> aot.AotSpec:
    sig = _signature(fc._fp8_amax_kernel, {"X": f"*{dtype}"})
    flags = dict(SKIP_IF_SCALED=delayed, BLOCK_M=fc.BLOCK_M, BLOCK_N=fc.BLOCK_N)
    return aot.AotSpec(fc._fp8_amax_kernel, sig, flags, fc.NUM_WARPS, 3, divisible=("n_cols",))


def _cast(dtype: str, fmt: str, delayed: bool, rowwise: bool, transpose: bool) -> aot.AotSpec:
    triton_fp8, (mant, bias, top) = _FP8[fmt]
    sig = _signature(fc._fp8_cast_kernel, {"X": f"*{dtype}", "Q": f"*{triton_fp8}", "QT": f"*{triton_fp8}"})
    flags = dict(FP8_MAX=top, MANT=mant, BIAS=bias, SOFT=False, DELAYED=delayed, ROWWISE=rowwise,
                 TRANSPOSE=transpose, BLOCK_M=fc.BLOCK_M, BLOCK_N=fc.BLOCK_N, BLOCK_P=fc.FINISH_BLOCK)
    # Padded sizes are multiples of 16 (what _scaled_mm wants); the input's columns are BERT's widths.
    return aot.AotSpec(fc._fp8_cast_kernel, sig, flags, fc.NUM_WARPS, 3,
                       divisible=("n_cols", "out_rows", "out_cols"))


def _finish() -> aot.AotSpec:
    flags = dict(FP8_MAX=448.0, RECORD=True, BLOCK_P=fc.FINISH_BLOCK)
    return aot.AotSpec(fc._fp8_finish_kernel, _signature(fc._fp8_finish_kernel, {}), flags, 4, 3)


LAYOUTS = {"rowwise": (True, False), "transposed": (False, True), "both": (True, True)}


def specs() -> list[tuple[dict, aot.AotSpec]]:
    """(config columns, spec) of every row."""
    out = []
    for dtype in ("bf16", "fp32"):
        for delayed in (False, True):
            scaling = "delayed" if delayed else "current"
            out.append((dict(kernel="amax", dtype=dtype, fp8="-", scaling=scaling, layout="-",
                             bytes_per_element=_SIZE[dtype]), _amax(dtype, delayed)))
            for layout, (rowwise, transpose) in LAYOUTS.items():
                for fmt in ("e4m3", "e5m2") if dtype == "bf16" else ("e4m3",):
                    written = int(rowwise) + int(transpose)
                    out.append((dict(kernel="cast", dtype=dtype, fp8=fmt, scaling=scaling, layout=layout,
                                     bytes_per_element=_SIZE[dtype] + written),
                                _cast(dtype, fmt, delayed, rowwise, transpose)))
    out.append((dict(kernel="finish", dtype="fp32", fp8="e4m3", scaling="delayed", layout="-",
                     bytes_per_element=0), _finish()))
    return out


def fp8_cast_report() -> list[dict]:
    named = specs()
    rows = []
    for (config, _), r in zip(named, aot.compile_reports([s for _, s in named])):
        tile = fc.BLOCK_M * fc.BLOCK_N
        per_element = (None if r.instructions_per_iteration is None or config["kernel"] == "finish"
                       else round(r.instructions_per_iteration * 32 * r.num_warps / tile, 2))
        rows.append(dict(**config, block=f"{fc.BLOCK_M}x{fc.BLOCK_N}", num_warps=r.num_warps,
                         registers=r.registers, spills=r.spills, shared_bytes=r.shared_bytes,
                         instructions_per_iteration=r.instructions_per_iteration,
                         instructions_per_element=per_element))
    return rows
