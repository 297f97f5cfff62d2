"""kernels/aot.py compiles for sm_90 without a GPU and reads registers, spills, shared memory and
whether the tensor-core path is Hopper's wgmma."""

import pytest
import triton
import triton.language as tl

from bert_fast.kernels import aot

pytestmark = pytest.mark.skipif(aot.unavailable_reason() is not None,
                                reason=f"no AOT compile here: {aot.unavailable_reason()}")


@triton.jit
def _scale_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N) * 2, mask=offs < N)


@triton.jit
def _dot_kernel(A, B, C, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    tile = r[:, None] * BLOCK + r[None, :]
    tl.store(C + tile, tl.dot(tl.load(A + tile), tl.load(B + tile)))


@triton.jit
def _hoard_kernel(X, Y, BLOCK: tl.constexpr):
    # A [BLOCK, BLOCK] fp32 tile per thread group that is far too big for registers: must spill.
    r = tl.arange(0, BLOCK)
    tile = tl.load(X + r[:, None] * BLOCK + r[None, :])
    tl.store(Y + r[:, None] * BLOCK + r[None, :], tile * tl.sum(tile, 0)[None, :])


def test_reports_hopper_compile():
    elementwise, dot = aot.compile_reports([
        aot.AotSpec(_scale_kernel, {"X": "*fp32", "Y": "*fp32", "N": "i32"}, {"BLOCK": 1024}),
        aot.AotSpec(_dot_kernel, {"A": "*bf16", "B": "*bf16", "C": "*fp32"}, {"BLOCK": 64}),
    ])
    assert elementwise.name == "_scale_kernel" and 0 < elementwise.registers <= 255
    assert elementwise.spills == 0 and not elementwise.uses_wgmma and elementwise.shared_bytes == 0
    assert dot.uses_wgmma and dot.shared_bytes > 0 and dot.spills == 0
    assert dot.row()["constexprs"] == "BLOCK=64"


def test_detects_spills():
    report = aot.compile_report(_hoard_kernel, {"X": "*fp32", "Y": "*fp32"}, {"BLOCK": 128},
                                num_warps=1)
    assert report.spills > 0, report


def test_missing_argument_is_named():
    with pytest.raises(RuntimeError, match="miss arguments \\['N'\\]"):
        aot.compile_report(_scale_kernel, {"X": "*fp32", "Y": "*fp32"}, {"BLOCK": 64})
