"""bench/ceilings.py's FP8 matmul: the `_scaled_mm` call it times computes the scaled product from
operands in the layout bert_fast/ops/fp8.py uses (the CPU's `_scaled_mm` runs it, slowly)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ceilings  # noqa: E402


def test_fp8_operands_have_the_layout_scaled_mm_takes():
    a, b, scale_a, scale_b = ceilings.fp8_operands(64, torch.device("cpu"))
    assert a.dtype == b.dtype == torch.float8_e4m3fn and a.is_contiguous()
    assert b.stride() == (1, 64)  # column-major second operand
    assert scale_a.dim() == scale_b.dim() == 0 and scale_a.dtype == scale_b.dtype == torch.float32


def test_fp8_matmul_is_the_scaled_product_in_bf16():
    a, b, _, _ = ceilings.fp8_operands(32, torch.device("cpu"))
    scale_a, scale_b = torch.tensor(0.5), torch.tensor(0.25)
    # fp8 values are exact in float64: the reference differs only by the bf16 rounding of the result.
    ref = (a.double() * 0.5) @ (b.double() * 0.25)
    for fast_accum in (False, True):
        out = ceilings.fp8_matmul(a, b, scale_a, scale_b, fast_accum)
        assert out.dtype == torch.bfloat16 and out.shape == (32, 32)
        torch.testing.assert_close(out.double(), ref, rtol=2 ** -8, atol=1e-6)


def test_fp8_unavailable_names_the_reason_off_cuda():
    assert "compute capability >= 8.9" in ceilings.fp8_unavailable(torch.device("cpu"))
