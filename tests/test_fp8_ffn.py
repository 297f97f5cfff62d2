"""bert_fast/ops/fp8_ffn.py: the FFN's first FP8 GEMM with bias + GELU fused into the casts.

In float32 on the CPU (FP8 emulated) the fused path computes what the unfused one does (FP8 GEMM,
ops.bias_gelu, the next GEMM's own cast) op for op, so outputs, gradients and the delayed scaling
state must match it exactly: that pins the autograd plumbing (the anchor, the handed-over cast,
the records into the right state's rows, the bias gradient). On the kernel path (interpreter, CUDA's
padding) the casts round once from float32 instead of going through torch's GELU: close, not equal.
The kernels themselves are checked against float64 in tests/test_fp8_gelu_cast.py."""

from __future__ import annotations

import pytest
import torch

from bert_fast import ops
from bert_fast.model import BertForPreTraining
from bert_fast.model.config import BertConfig
from bert_fast.ops import fp8, fp8_ffn, fp8_state
from bert_fast.ops.fp8 import Fp8Recipe, Fp8State
from helpers import KernelCensus, mlm_batch

K, N = 64, 256  # hidden, intermediate


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(N, K, generator=g) * 0.1).to(dtype).requires_grad_()
    b1 = (torch.randn(N, generator=g) * 0.3).to(dtype).requires_grad_()
    w2 = (torch.randn(K, N, generator=g) * 0.05).to(dtype).requires_grad_()
    return w1, b1, w2


def _ffn(x, params, states, fuse: bool, monkeypatch, record=True):
    """ffn_out(gelu(ffn_in(x))) without ffn_out's bias, as BertLayer runs it."""
    monkeypatch.setattr(fp8_ffn, "FUSE_GELU", fuse)
    w1, b1, w2 = params
    inner = ops.linear_gelu(x, w1, b1, fp8=states[0], fp8_next=states[1], record=record, backend="torch")
    assert isinstance(inner, fp8_ffn.Fp8Activation) == fuse
    return ops.linear(inner, w2, fp8=states[1], record=record)


def _run(scaling: str, fuse: bool, monkeypatch, dtype=torch.float32, steps: int = 3):
    """`steps` forward + backward on new inputs (rolling delayed histories between them): the
    last output, every gradient and the states' buffers."""
    params = _params(dtype)
    states = [Fp8State(Fp8Recipe(scaling)) for _ in range(2)]
    for step in range(steps):
        fp8.roll(states)
        for p in params:
            p.grad = None
        g = torch.Generator().manual_seed(100 + step)
        x = (torch.randn(3, 13, K, generator=g) * 2).to(dtype).requires_grad_()
        out = _ffn(x, params, states, fuse, monkeypatch)
        out.backward(torch.randn(out.shape, generator=g).to(dtype) * 1e-2)
    buffers = {f"{i}.{name}": b.clone() for i, s in enumerate(states) for name, b in s.named_buffers()}
    return out.detach(), [x.grad, *(p.grad for p in params)], buffers


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_fused_equals_the_unfused_fp8_ffn_in_float32(scaling, monkeypatch):
    fused, unfused = _run(scaling, True, monkeypatch), _run(scaling, False, monkeypatch)
    assert torch.equal(fused[0], unfused[0])
    grad_x, grad_w1, grad_b1, grad_w2 = fused[1]
    ref_x, ref_w1, ref_b1, ref_w2 = unfused[1]
    assert torch.equal(grad_x, ref_x) and torch.equal(grad_w1, ref_w1) and torch.equal(grad_w2, ref_w2)
    # The bias gradient: the same float32 column sums, perhaps in another order.
    torch.testing.assert_close(grad_b1, ref_b1, rtol=1e-6, atol=1e-9)
    assert fused[2].keys() == unfused[2].keys()
    assert all(torch.equal(b, unfused[2][name]) for name, b in fused[2].items())  # histories, scales, ...
    if scaling == "delayed":
        histories = [fused[2][f"{i}.amax_history"] for i in range(2)]
        assert all((h.amax(dim=1) > 0).all() for h in histories)  # every role of both states recorded


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_the_kernel_path_matches_the_emulated_one(scaling, monkeypatch):
    """The casts through kernels/fp8_cast.py (interpreter; bf16 activations; operands padded to
    multiples of 16 as on CUDA): a transposed or mis-recorded operand would be off by 100%."""
    emulated = _run(scaling, True, monkeypatch, torch.bfloat16)
    monkeypatch.setattr(fp8_state, "_use_kernels", lambda device: True)
    monkeypatch.setattr(fp8, "_pads", lambda device: True)
    kernels = _run(scaling, True, monkeypatch, torch.bfloat16)
    for got, want in zip([kernels[0], *kernels[1]], [emulated[0], *emulated[1]]):
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 0.03
    for name, want in emulated[2].items():  # amax within bf16 vs float32 GELU rounding
        torch.testing.assert_close(kernels[2][name], want, rtol=2e-2, atol=0)


def test_evaluation_records_nothing_and_makes_no_transpose(monkeypatch):
    monkeypatch.setattr(fp8_state, "_use_kernels", lambda device: True)  # the CPU path's transpose is a view
    params = _params()
    states = [Fp8State(Fp8Recipe("delayed")) for _ in range(2)]
    x = torch.randn(9, K)
    with torch.no_grad():
        inner = ops.linear_gelu(x, *params[:2], fp8=states[0], fp8_next=states[1], record=False)
        out = ops.linear(inner, params[2], fp8=states[1], record=False)
    assert inner.cast.qt is None and out.shape == (9, K)
    assert all(not b.any() for s in states for b in (s.amax_now, s.amax_history))
    # The anchor carries only the gradient: one element, zero strides.
    assert inner.anchor.shape == (9, N) and inner.anchor.stride() == (0, 0)
    assert inner.anchor.untyped_storage().nbytes() == 4


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_fusing_replaces_the_gelu_ops_and_allocates_no_zero_gradients(scaling, monkeypatch):
    """Forward + backward of the FFN on the kernel path, as CUDA runs it: the fused casts take the
    place of bias + GELU, its backward and the bias sum (the same cast launches, 2 fewer ops),
    and autograd fills no zero gradients for the cast's outputs (4 [M, N]-sized memsets if it did).
    Measured, delayed: 23 launches against 25 unfused (29 and 31 with a finish launch per cast)."""
    monkeypatch.setattr(fp8_state, "_use_kernels", lambda device: True)
    monkeypatch.setattr(fp8, "_pads", lambda device: True)
    monkeypatch.setattr(fp8, "emulated", lambda device: False)  # torch._scaled_mm, as on CUDA
    counts = {}
    for fuse in (True, False):
        params = _params(torch.bfloat16)
        states = [Fp8State(Fp8Recipe(scaling)) for _ in range(2)]
        fp8.roll(states)
        x = torch.randn(37, K).bfloat16().requires_grad_()
        with KernelCensus() as launches:
            out = _ffn(x, params, states, fuse, monkeypatch)
            out.backward(torch.ones_like(out))
        counts[fuse] = (launches.total(), launches.aten + launches.triton)
    (fused, ops_fused), (unfused, ops_unfused) = counts[True], counts[False]
    assert fused == unfused - 2, counts
    assert not {"add", "gelu", "gelu_backward", "zeros", "zero_", "fill_"} & set(ops_fused), ops_fused
    cast_kernels = ("_fp8_amax_kernel", "_fp8_cast_kernel")
    assert [ops_fused[k] for k in cast_kernels] == [ops_unfused[k] for k in cast_kernels]


def _model(fuse: bool, monkeypatch, scaling="delayed"):
    monkeypatch.setattr(fp8_ffn, "FUSE_GELU", fuse)
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig.from_preset("tiny", vocab_size=256, hidden_dropout_prob=0.0,
                                                      attention_probs_dropout_prob=0.0))
    fp8.enable(model, Fp8Recipe(scaling))
    return model


def test_the_model_trains_the_same_fused_or_not(monkeypatch):
    """Two steps of the tiny FP8 model (delayed, float32 emulation): every gradient and state
    buffer equal to the unfused model's (bias gradients up to summation order)."""
    results = {}
    for fuse in (True, False):
        model = _model(fuse, monkeypatch)
        for step in range(2):
            model.zero_grad()
            out = model(**mlm_batch(seed=step))
            out.loss.backward()
        results[fuse] = (out.loss.detach(), {n: p.grad for n, p in model.named_parameters()},
                         {n: b for n, b in model.named_buffers()})
    (loss, grads, buffers), (ref_loss, ref_grads, ref_buffers) = results[True], results[False]
    assert torch.equal(loss, ref_loss)
    for name, grad in grads.items():
        if name.endswith("ffn_in.bias"):
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-9)
        else:
            assert torch.equal(grad, ref_grads[name]), name
    assert buffers.keys() == ref_buffers.keys()
    assert all(torch.equal(b, ref_buffers[n]) for n, b in buffers.items())
