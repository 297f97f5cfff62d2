"""The extension op torch.ops.bert_fast.bias_gelu (csrc/bias_gelu.cpp on CPU) against a float64
PyTorch reference, forward and backward, plus registration checks and bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bert_fast import ops
from bert_fast.ops import extension
from bert_fast.ops.bias_gelu_ext import APPROXIMATIONS, bias_gelu, bias_gelu_reference

pytestmark = pytest.mark.skipif(not extension.available("cpu"), reason="bert_fast._C not built")

SHAPES = [(1, 1), (3, 7), (2, 5, 128), (33, 3072), (0, 16)]
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def errors_vs_float64(fn, x, bias, approximate):
    """(forward, dx, dbias) of fn in x's dtype, and of the same-dtype eager reference, each as
    the max abs error against float64."""
    grad = torch.randn_like(x)
    x64, b64 = (t.detach().double().requires_grad_() for t in (x, bias))
    y64 = bias_gelu_reference(x64, b64, approximate)
    y64.backward(grad.double())
    results = []
    for f in (fn, bias_gelu_reference):
        xi, bi = (t.detach().clone().requires_grad_() for t in (x, bias))
        y = f(xi, bi, approximate)
        y.backward(grad)
        results.append([(a.double() - b).abs().max().item() if a.numel() else 0.0
                        for a, b in ((y, y64), (xi.grad, x64.grad), (bi.grad, b64.grad))])
    return results


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, dtype, approximate):
    x = (torch.randn(shape) * 3).to(dtype)
    bias = torch.randn(shape[-1]).to(dtype)
    ours, eager = errors_vs_float64(bias_gelu, x, bias, approximate)
    for what, e_ours, e_eager in zip(("y", "dx", "dbias"), ours, eager):
        # Ours may err at most about twice what eager PyTorch errs in the same dtype.
        assert e_ours <= 2 * e_eager + ATOL[dtype] * (shape[0] if what == "dbias" else 1), (
            f"{what}: ours {e_ours:.3e} vs eager {e_eager:.3e}")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gradcheck_float64(approximate):
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: bias_gelu(a, b, approximate), (x, bias))


def test_opcheck_registration():
    """Schema, fake (meta) kernel and autograd registration agree with the real kernel."""
    bias_gelu(torch.randn(2, 3), torch.randn(3))  # registers autograd and fake impls
    for requires_grad in (False, True):
        x = torch.randn(5, 8, requires_grad=requires_grad)
        bias = torch.randn(8, requires_grad=requires_grad)
        torch.library.opcheck(torch.ops.bert_fast.bias_gelu.default, (x, bias, False))


def test_non_contiguous_input():
    x = torch.randn(16, 10).t()  # [10, 16], stride (1, 10)
    bias = torch.randn(16)
    torch.testing.assert_close(bias_gelu(x, bias), bias_gelu_reference(x, bias))


@pytest.mark.parametrize("args, error, match", [
    (("x", torch.randn(3)), TypeError, "x must be a torch.Tensor"),
    ((torch.randn(2, 3), torch.randn(4)), ValueError, r"bias must have shape \(3,\)"),
    ((torch.randn(2, 3), torch.randn(1, 3)), ValueError, "bias must have 1 dimension"),
    ((torch.randn(2, 3), torch.randn(3).half()), TypeError, "bias has dtype torch.float16"),
    ((torch.ones(2, 3, dtype=torch.long), torch.ones(3, dtype=torch.long)), TypeError, "x must have dtype"),
    ((torch.tensor(1.0), torch.randn(1)), ValueError, "at least one dimension"),
])
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        bias_gelu(*args)


def test_bad_approximate():
    with pytest.raises(ValueError, match="approximate must be one of"):
        bias_gelu(torch.randn(2, 3), torch.randn(3), "sigmoid")


def test_ops_dispatch(monkeypatch):
    """`fast` runs the extension, `torch` and `auto` on CPU run eager PyTorch."""
    calls = []
    real = torch.ops.bert_fast.bias_gelu

    class Spy:
        def __call__(self, *args):
            calls.append(args)
            return real(*args)

    monkeypatch.setattr(torch.ops.bert_fast, "bias_gelu", Spy())
    x, bias = torch.randn(3, 5), torch.randn(5)
    ops.bias_gelu(x, bias, backend="torch")
    ops.bias_gelu(x, bias, backend="auto")
    assert calls == []
    ops.bias_gelu(x, bias, backend="fast")
    assert len(calls) == 1
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.bias_gelu(x, bias, backend="cuda")


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 9), cols=st.integers(1, 70), scale=st.floats(0.01, 30.0),
       approximate=st.sampled_from(APPROXIMATIONS))
def test_any_shape_and_scale_float64(rows, cols, scale, approximate):
    """Forward and input gradient agree with autograd through the reference to float64 rounding,
    for any row count (including none), width and input scale (deep into both GELU tails)."""
    x = (torch.randn(rows, cols, dtype=torch.float64) * scale).requires_grad_()
    bias = torch.randn(cols, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(rows, cols, dtype=torch.float64)
    ours = torch.autograd.grad(bias_gelu(x, bias, approximate), (x, bias), grad)
    y_ref = bias_gelu_reference(x, bias, approximate)
    expected = torch.autograd.grad(y_ref, (x, bias), grad)
    torch.testing.assert_close(bias_gelu(x, bias, approximate), y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
