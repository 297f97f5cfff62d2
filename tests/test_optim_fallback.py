"""The PyTorch fallbacks that run where bert_fast._C has no kernels for the device (a CUDA machine
whose build found no toolkit), checked on the CPU against the extension's CPU kernels.

A missing CUDA build is simulated by replacing `extension.available`, the one function that
decides; the fallback code is device-agnostic, so the CPU run is the code a GPU would run. Under
ZeRO, tests/test_optim_zero.py runs the fallback in its 2-rank launch.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from bert_fast import ops
from bert_fast.ops import extension
from bert_fast.ops.bias_gelu_ext import bias_gelu, bias_gelu_reference
from bert_fast.optim import FusedAdamW, FusedLAMB
from bert_fast.optim import fallback as fallback_ops
from tests.helpers import max_rel_err
from tests.test_optim import AWKWARD, clone_groups, flat, make_groups, set_grads

pytestmark = [pytest.mark.skipif(not extension.available("cpu"), reason="bert_fast._C is not built"),
              pytest.mark.filterwarnings("ignore:.*PyTorch fallbacks:UserWarning")]

SHAPES = [[(65, 33), (16385,), (1,)], [(129,), (7, 3)], [AWKWARD[3]]]


@pytest.fixture
def fresh(monkeypatch):
    """A process that has not warned yet, BERT_FAST_CUDA unset."""
    monkeypatch.setattr(extension, "_warned", False)
    monkeypatch.setattr(extension, "_fallback_seen", set())
    monkeypatch.delenv("BERT_FAST_CUDA", raising=False)


@pytest.fixture
def no_kernels(monkeypatch, fresh):
    """The extension as built on a CUDA machine without a toolkit, for CPU tensors: no kernels
    for the device. Returns a switch: no_kernels(False) gives them back (the fused run)."""
    real = extension.available

    def switch(missing: bool) -> None:
        monkeypatch.setattr(extension, "available", (lambda device="cpu": False) if missing else real)

    switch(True)
    return switch


def _states(opt, groups):
    return torch.cat([opt.state[p][k].double().flatten() for g in groups for p in g["params"]
                      for k in ("exp_avg", "exp_avg_sq")])


def _step_for_step(make, no_kernels, steps, scale, dtype=torch.float32, tol=1e-6):
    """Steps a fused and a fallback optimizer on the same grads; returns the worst relative error
    of the weights (fp32 masters for low-precision parameters) and of the moments over all steps."""
    base = make_groups(SHAPES, dtype=dtype, wd=(0.01, 0.0, 0.05))
    fused, ours = clone_groups(base), clone_groups(base)
    opt_fused, opt_ours = make(fused), make(ours)

    def weights(opt, groups):
        if dtype == torch.float32:
            return flat(groups)
        return torch.cat([opt.state[p]["master"].double().flatten() for g in groups for p in g["params"]])

    worst_w = worst_m = 0.0
    for step in range(steps):
        set_grads([fused, ours], step, scale)
        no_kernels(False)
        opt_fused.step()
        no_kernels(True)
        opt_ours.step()
        worst_w = max(worst_w, max_rel_err(weights(opt_ours, ours), weights(opt_fused, fused)))
        worst_m = max(worst_m, max_rel_err(_states(opt_ours, ours), _states(opt_fused, fused)))
        if dtype != torch.float32:  # the parameters hold the rounded masters
            assert torch.equal(flat(ours), torch.cat([opt_ours.state[p]["master"].to(dtype).double().flatten()
                                                      for g in ours for p in g["params"]]))
    assert max_rel_err(flat(ours), flat(base)) > 1e-3  # it did train
    return worst_w, worst_m


LAMB_VARIANTS = [dict(), dict(adam_w_mode=False), dict(use_nvlamb=True), dict(bias_correction=False),
                 dict(max_grad_norm=0.0), dict(weight_decay=0.0, max_grad_norm=0.3)]


@pytest.mark.parametrize("variant", LAMB_VARIANTS,
                         ids=["default", "l2", "nvlamb", "no_bias_correction", "no_clipping", "no_decay"])
def test_lamb_fallback_equals_fused_step_for_step(no_kernels, variant):
    """Grads alternate between a norm above and below max_grad_norm (set_grads), so clipping is
    on for half of the steps; groups with and without decay take trust-ratio and plain steps."""
    kw = {"lr": 1e-2, "max_grad_norm": 1.0, **variant}
    if "weight_decay" in variant:  # one decay for every group, overriding make_groups' per-group ones
        make = lambda groups: FusedLAMB([{"params": g["params"]} for g in groups], **kw)  # noqa: E731
    else:
        make = lambda groups: FusedLAMB(groups, **kw)  # noqa: E731
    worst_w, worst_m = _step_for_step(make, no_kernels, 8, 0.1)
    assert worst_w <= 1e-6 and worst_m <= 1e-6, (worst_w, worst_m)


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0], ids=["no_clipping", "clipping"])
def test_adamw_fallback_equals_fused_step_for_step(no_kernels, max_grad_norm):
    make = lambda groups: FusedAdamW(groups, lr=1e-2, max_grad_norm=max_grad_norm)  # noqa: E731
    worst_w, worst_m = _step_for_step(make, no_kernels, 8, 0.1)
    assert worst_w <= 1e-6 and worst_m <= 1e-6, (worst_w, worst_m)


@pytest.mark.parametrize("opt", [FusedLAMB, FusedAdamW])
def test_fallback_keeps_fp32_masters_of_bf16_params(no_kernels, opt):
    worst_w, worst_m = _step_for_step(lambda groups: opt(groups, lr=1e-2), no_kernels, 5, 0.1, dtype=torch.bfloat16)
    assert worst_w <= 1e-6 and worst_m <= 1e-6, (worst_w, worst_m)


def test_fallback_does_not_touch_the_grads(no_kernels):
    groups = make_groups(SHAPES)
    set_grads([groups], 0, 1.0)
    before = [p.grad.clone() for g in groups for p in g["params"]]
    FusedLAMB(groups, max_grad_norm=0.5).step()
    FusedAdamW(groups, max_grad_norm=0.5).step()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, (p for g in groups for p in g["params"])))


def test_segments_match_the_kernels():
    """ZeRO-style segments, op against op: pieces of one flat tensor in several slots (out of
    order, one slot twice, one crossing a 16384 chunk, one slot with no piece) and elements in no
    segment (ZeRO-3 padding), which neither may touch."""
    n = 40_003
    g = torch.Generator().manual_seed(3)
    w, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    m, v = torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01
    cuts, slots = [0, 5, 20_000, 20_001, 37_777, n - 3], [3, 0, 2, 1, 0]  # the last 3 elements: padding
    segments = torch.tensor([[0, a, b - a, s] for a, b, s in zip(cuts, cuts[1:], slots)])
    clip, hyper = torch.tensor([1.7]), (0.9, 0.999, 1e-6, 0.01, 0.19, 0.002)
    for adam_w_mode in (True, False):
        ref = [t.clone() for t in (w, m, v)]
        ours = [t.clone() for t in (w, m, v)]
        want = torch.ops.bert_fast.lamb_phase1([ref[0]], [grad], [ref[1]], [ref[2]], segments, 5, clip, *hyper,
                                               adam_w_mode)
        got, updates = fallback_ops.lamb_phase1([ours[0]], [grad], [ours[1]], [ours[2]], segments, 5, clip, *hyper,
                                                adam_w_mode)
        assert max_rel_err(got.double(), want.double()) <= 1e-6 and torch.all(got[4] == 0)
        steps = torch.tensor([0.1, 0.02, 0.3, 0.04, 0.5])
        torch.ops.bert_fast.lamb_phase2([ref[0]], [], [ref[1]], [ref[2]], segments, steps, *hyper, adam_w_mode)
        fallback_ops.lamb_phase2([ours[0]], [], updates, segments, steps)
        for a, b in zip(ours, ref):
            assert max_rel_err(a, b) <= 1e-6
            assert torch.equal(a[-3:], b[-3:])  # padding untouched
        assert torch.equal(ours[0][-3:], w[-3:])
    assert max_rel_err(fallback_ops.optim_sumsq([w, grad]), torch.ops.bert_fast.optim_sumsq([w, grad])) <= 1e-6


def test_missing_cuda_build_selects_the_fallback_and_warns_once(monkeypatch, fresh):
    """The extension as a toolkit-less build on a GPU machine leaves it: CPU kernels only."""

    class CpuOnly:
        @staticmethod
        def with_cuda():
            return False

    monkeypatch.setattr(extension, "_load", lambda: (CpuOnly, ""))
    assert extension.available("cpu") and not extension.available("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert extension.use_fallback(torch.device("cuda")) and extension.use_fallback("cuda:0")
        assert not extension.use_fallback("cpu")
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "without kernels for cuda" in message and "make install" in message and "BERT_FAST_CUDA=1" in message
    assert extension.fallback_chosen(torch.device("cuda")) and not extension.fallback_chosen(torch.device("cpu"))


def test_every_op_falls_back_with_one_warning(no_kernels):
    groups = make_groups(SHAPES)
    set_grads([groups], 0, 1.0)
    x, bias = torch.randn(4, 9, requires_grad=True), torch.randn(9, requires_grad=True)

    def forbidden(*args):
        raise AssertionError("the extension's op ran")

    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("always")
        for name in ("lamb_phase1", "lamb_phase2", "adamw_step", "optim_sumsq", "bias_gelu"):
            mp.setattr(torch.ops.bert_fast, name, forbidden)
        FusedLAMB(groups).step()
        FusedAdamW(groups, max_grad_norm=1.0).step()
        for approximate in ("none", "tanh"):
            y = bias_gelu(x, bias, approximate)
            torch.testing.assert_close(y, bias_gelu_reference(x, bias, approximate), rtol=0, atol=0)
            torch.testing.assert_close(ops.bias_gelu(x, bias, approximate, backend="fast"), y, rtol=0, atol=0)
        y.sum().backward()
    assert x.grad is not None and bias.grad is not None
    ours = [w for w in caught if "PyTorch fallbacks" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]


def test_bert_fast_cuda_1_refuses_the_fallback(no_kernels, monkeypatch):
    monkeypatch.setenv("BERT_FAST_CUDA", "1")
    groups = make_groups(SHAPES)
    set_grads([groups], 0, 1.0)
    x, bias = torch.randn(4, 9), torch.randn(9)
    for run in (lambda: FusedLAMB(groups).step(), lambda: FusedAdamW(groups).step(),
                lambda: bias_gelu(x, bias), lambda: ops.bias_gelu(x, bias, backend="fast")):
        with pytest.raises(RuntimeError, match="BERT_FAST_CUDA=1 refuses the PyTorch fallback") as err:
            run()
        assert "make install" in str(err.value)
    assert not extension._warned
