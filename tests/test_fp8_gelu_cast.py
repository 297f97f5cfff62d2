"""kernels/fp8_cast.py's GELU prologues under the Triton interpreter: `cast_gelu` (gelu(y + b) cast
for the FFN's second FP8 GEMM) and `cast_gelu_grad` (dh * gelu'(y + b) cast for the first GEMM's
backward, with the bias gradient), against float64.

The kernels compute GELU in float32 and round once, to fp8. Their float32 GELU is not torch's bit
for bit (erf and exp differ by an ulp or two; the tanh form is computed through a sigmoid, without
torch's cancellation), so a byte may differ from torch's where the exact value sits within float32
error of a rounding midpoint. The oracle is therefore float64: every byte must be the fp8 rounding
of a value within float32 error (`_TOL` relative to the terms summed, not to a result that may be
tiny after cancellation) of the float64 value; and the scales, records, padding and layouts exact.
The compiled kernels (hardware conversion) are checked on a GPU by tests/gpu/test_fp8_gpu.py."""

from __future__ import annotations

import math

import pytest
import torch

from bert_fast.kernels import fp8_cast as fc

# The interpreter's numpy exp overflows to inf for very negative arguments, as the GPU's does (the
# sigmoid then gives the right 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")
_TOL = 2e-6  # float32 error of the GELU and its derivative, relative to the terms' size (measured: < 4e-7)
SHAPES = [((5, 9), (16, 16)), ((37, 200), (48, 208)), ((64, 128), None), ((130, 72), None)]
MODES = ["current", "delayed", "delayed-empty"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _gelu64(u: torch.Tensor, approximate: str) -> torch.Tensor:
    if approximate == "tanh":
        return u * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (u + 0.044715 * u**3))
    return 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))


def _gelu_grad64(u: torch.Tensor, approximate: str) -> torch.Tensor:
    if approximate == "tanh":
        k = math.sqrt(2 / math.pi)
        s = torch.sigmoid(2 * k * (u + 0.044715 * u**3))
        return s + 2 * u * s * (1 - s) * k * (1 + 3 * 0.044715 * u * u)
    return 0.5 * (1 + torch.erf(u / math.sqrt(2))) + u * torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)


def _assert_rounds(q: torch.Tensor, exact: torch.Tensor, slack: torch.Tensor, scale: float, dtype) -> None:
    """Every byte of q [M, N] is the fp8 rounding (saturating) of some value within `slack` of
    `exact` (both before scaling): rounding is monotone, so q lies between the roundings of the
    interval's ends."""
    top = fc.FORMATS[dtype][2]

    def rounded(v):
        return (v * scale).float().clamp(-top, top).to(dtype).float()

    got = q.float()
    low, high = rounded(exact - slack), rounded(exact + slack)
    bad = (got < low) | (got > high)
    assert not bad.any(), (got[bad][:5], (exact * scale)[bad][:5])


def _state(mode: str):
    if mode == "current":
        return {}
    stored = 0.0 if mode == "delayed-empty" else 0.37
    return dict(scale=torch.tensor([stored, 5.0, 9.0]), amax_now=torch.tensor([0.25, 2.5, 3.0]), slot=0)


def _inputs(shape, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(*shape, generator=g) * 2.5).bfloat16()
    bias = (torch.randn(shape[1], generator=g) * 0.5).bfloat16()
    grad = (torch.randn(*shape, generator=g) * 1e-3).bfloat16()
    return y, bias, grad


def _check_scale(inv, amax, exact_amax, mode, dtype):
    """The inverse scale is the stored one's, or fp8_max / amax as torch rounds it (current)."""
    assert abs(amax.item() - exact_amax) <= 1e-6 * exact_amax
    if mode == "delayed":
        assert inv.item() == torch.tensor(0.37).reciprocal().item()
    else:
        scale = (fc.FORMATS[dtype][2] / amax).clamp(max=3.4028234663852886e38)
        assert torch.equal(inv, scale.reciprocal())


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape, padded", SHAPES, ids=lambda s: "x".join(map(str, s)) if s else "unpadded")
def test_cast_gelu_is_the_rounded_float64_activation(shape, padded, mode, approximate):
    y, bias, _ = _inputs(shape, sum(shape))
    rows, cols = padded or shape
    args = _state(mode)
    q, qt, inv, amax = fc.cast_gelu(y, bias, fc.E4M3, approximate, rows=rows, cols=cols, transpose=True, **args)
    u = y.double() + bias.double()
    exact = _gelu64(u, approximate)
    assert q.shape == (rows, cols) and torch.equal(_bits(qt), _bits(q).t())
    assert not _bits(q)[shape[0]:].any() and not _bits(q)[:, shape[1]:].any()  # gelu(0 + b) is not 0
    _check_scale(inv, amax, exact.abs().max().item(), mode, fc.E4M3)
    _assert_rounds(q[:shape[0], :shape[1]], exact, _TOL * (u.abs() + 1), 1 / inv.item(), fc.E4M3)
    if mode != "current":  # the record: its slot only, raised to the activation's amax
        assert args["amax_now"].tolist() == [max(0.25, amax.item()), 2.5, 3.0]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape, padded", SHAPES, ids=lambda s: "x".join(map(str, s)) if s else "unpadded")
def test_cast_gelu_grad_is_the_rounded_float64_gradient_and_sums_the_bias_gradient(shape, padded, mode,
                                                                                  approximate):
    y, bias, grad = _inputs(shape, 7 * sum(shape))
    rows, cols = padded or shape
    args = _state(mode)
    q, qt, inv, amax, dbias = fc.cast_gelu_grad(grad, y, bias, fc.E5M2, approximate, rows=rows, cols=cols,
                                                transpose=True, **args)
    u = y.double() + bias.double()
    exact = grad.double() * _gelu_grad64(u, approximate)
    assert torch.equal(_bits(qt), _bits(q).t())
    assert not _bits(q)[shape[0]:].any() and not _bits(q)[:, shape[1]:].any()
    _check_scale(inv, amax, exact.abs().max().item(), mode, fc.E5M2)
    slack = _TOL * grad.double().abs() * (1 + u.abs())
    _assert_rounds(q[:shape[0], :shape[1]], exact, slack, 1 / inv.item(), fc.E5M2)
    # The bias gradient: unscaled float32 column sums, each within float32 summation error.
    assert dbias.shape == (shape[1],) and dbias.dtype == torch.float32
    bound = 1e-6 * shape[0] * exact.abs().sum(0) + slack.sum(0)
    assert ((dbias.double() - exact.sum(0)).abs() <= bound).all()
    again = fc.cast_gelu_grad(grad, y, bias, fc.E5M2, approximate, rows=rows, cols=cols, **_state(mode))[4]
    assert torch.equal(again, dbias)  # deterministic: no atomics


def test_one_layout_alone_and_strided_inputs_match_contiguous_ones():
    base, _, _ = _inputs((40, 96), 3)
    y, grad = base[3:33, 8:72], (base[5:35, 16:80] * 1e-2)
    bias = torch.randn(64).bfloat16()
    full = fc.cast_gelu_grad(grad.contiguous(), y.contiguous(), bias, fc.E5M2, rows=32, cols=64, transpose=True)
    only_t = fc.cast_gelu_grad(grad, y, bias, fc.E5M2, rows=32, cols=64, rowwise=False, transpose=True)
    assert only_t[0].numel() == 0 and torch.equal(_bits(only_t[1]), _bits(full[1]))
    assert torch.equal(only_t[4], full[4])
    fwd = fc.cast_gelu(y, bias, fc.E4M3, rows=32, cols=64)
    assert torch.equal(_bits(fwd[0]), _bits(fc.cast_gelu(y.contiguous(), bias, fc.E4M3, rows=32, cols=64)[0]))


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")
@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("mode", ["current", "delayed"])
def test_a_non_finite_preactivation_gives_a_nan_inverse_scale_and_no_record(mode):
    y, bias, grad = _inputs((37, 40), 5)
    y[20, 7] = float("inf")
    for name, made in (("gelu", lambda a: fc.cast_gelu(y, bias, fc.E4M3, **a)),
                       ("grad", lambda a: fc.cast_gelu_grad(grad, y, bias, fc.E5M2, **a))):
        args = _state(mode)
        out = made(args)
        assert torch.isnan(out[2]) and not torch.isfinite(out[3]), name
        if mode != "current":
            assert args["amax_now"].tolist() == [0.25, 2.5, 3.0], name


def test_bad_arguments_are_named():
    y, bias, grad = _inputs((8, 16), 1)
    with pytest.raises(ValueError, match="approximate must be"):
        fc.cast_gelu(y, bias, fc.E4M3, "sigmoid")
    with pytest.raises(ValueError, match="bias must be a 1-D float tensor of x's width"):
        fc.cast_gelu(y, bias[:8], fc.E4M3)
    with pytest.raises(ValueError, match="y must be a float tensor of grad's shape"):
        fc.cast_gelu_grad(grad, y[:4], bias, fc.E5M2)
    with pytest.raises(TypeError, match="dtype must be"):
        fc.cast_gelu(y, bias, torch.bfloat16)
