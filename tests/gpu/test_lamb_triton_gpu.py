"""LAMB's Triton fallback (bert_fast.kernels.lamb) compiled on CUDA: against float64 on BERT-sized
tensors and ZeRO pieces (aligned and not), bf16/fp16 copies rounded as torch rounds, the CPU
kernels' result, and FusedLAMB on CUDA without the CUDA kernels taking it."""

import pytest
import torch

from bert_fast.kernels import lamb as triton_lamb
from bert_fast.ops import extension
from bert_fast.optim import FusedLAMB
from bert_fast.optim import fallback as fallback_ops

pytestmark = pytest.mark.gpu

HYPER = (0.9, 0.999, 1e-6, 0.01, 0.19, 0.002)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _steps_of(norms):
    norms = norms.double()
    ok = (norms[:, 0] > 0) & (norms[:, 1] > 0)
    return 1e-2 * torch.where(ok, (norms[:, 0] / norms[:, 1]).sqrt(), torch.ones_like(norms[:, 0]))


@pytest.mark.parametrize("adam_w_mode", [True, False])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["whole", "pieces"])
def test_matches_float64_and_rounds_copies_as_torch(adam_w_mode, low, layout):
    g = torch.Generator().manual_seed(0)
    if layout == "whole":
        numels = [1, 21, 16385, 3072 * 768, 30522]
        segments = torch.tensor([[i, 0, n, i] for i, n in enumerate(numels)])
        slots = len(numels)
    else:  # one flat partition, pieces at odd offsets (unaligned build), 3 padding elements
        numels = [3 * 16384 + 1003]
        cuts, order = [0, 5, 20_000, 20_001, 37_777, numels[0] - 3], [3, 0, 2, 1, 0]
        segments = torch.tensor([[0, a, b - a, s] for a, b, s in zip(cuts, cuts[1:], order)])
        slots = 5
    w = [torch.randn(n, generator=g).cuda() * 0.05 for n in numels]
    grads = [(torch.randn(n, generator=g) * 1e-2).cuda().to(low) for n in numels]
    m = [(torch.randn(n, generator=g) * 1e-3).cuda() for n in numels]
    v = [(torch.rand(n, generator=g) * 1e-5).cuda() for n in numels]
    copies = [torch.zeros(n, device="cuda", dtype=low) for n in numels]
    exact = [[t.double().cpu() for t in ts] for ts in (w, grads, m, v)]
    clip = torch.tensor([1.7], device="cuda")
    want = triton_lamb.lamb_reference(*exact, segments, slots, clip.cpu(), _steps_of, *HYPER, adam_w_mode)
    norms = triton_lamb.lamb_phase1(w, grads, m, v, segments, slots, clip, *HYPER, adam_w_mode)
    triton_lamb.lamb_phase2(w, copies, m, v, segments, _steps_of(want).float().cuda(), *HYPER, adam_w_mode)
    assert _rel(norms.cpu(), want) <= 1e-5
    for ours, ref in zip((w, m, v), (exact[0], exact[2], exact[3])):
        assert _rel(torch.cat(ours).cpu(), torch.cat(ref)) <= 1e-6
    if layout == "pieces":
        assert torch.all(copies[0][-3:] == 0)
        assert torch.equal(copies[0][:-3], w[0][:-3].to(low))
    else:
        assert all(torch.equal(c, x.to(low)) for c, x in zip(copies, w))


def test_equals_the_cpu_kernels():
    if not extension.available("cpu"):
        pytest.skip("bert_fast._C is not built")
    g = torch.Generator().manual_seed(1)
    numels = [7, 16385, 768 * 768]
    w, grads = [torch.randn(n, generator=g) for n in numels], [torch.randn(n, generator=g) for n in numels]
    m, v = [torch.zeros(n) for n in numels], [torch.zeros(n) for n in numels]
    segments = torch.tensor([[i, 0, n, i] for i, n in enumerate(numels)])
    clip = torch.tensor([1.3])
    cuda = [[t.cuda() for t in ts] for ts in (w, grads, m, v)]
    for _ in range(3):
        want = torch.ops.bert_fast.lamb_phase1(w, grads, m, v, segments, 3, clip, *HYPER, True)
        got = triton_lamb.lamb_phase1(*cuda, segments, 3, clip.cuda(), *HYPER, True)
        assert _rel(got.cpu(), want) <= 1e-6
        steps = _steps_of(want).float()
        torch.ops.bert_fast.lamb_phase2(w, [], m, v, segments, steps, *HYPER, True)
        triton_lamb.lamb_phase2(cuda[0], [], cuda[2], cuda[3], segments, steps.cuda(), *HYPER, True)
        for ours, ref in zip((cuda[0], cuda[2], cuda[3]), (w, m, v)):
            assert _rel(torch.cat(ours).cpu(), torch.cat(ref)) <= 1e-6


def test_fused_lamb_without_cuda_kernels_runs_triton(monkeypatch):
    monkeypatch.setattr(extension, "available", lambda device="cpu": torch.device(device).type == "cpu")
    monkeypatch.setattr(extension, "_warned", True)

    def forbidden(*args, **kwargs):
        raise AssertionError("the foreach fallback ran on CUDA")

    monkeypatch.setattr(fallback_ops, "lamb_phase1", forbidden)
    params = [torch.randn(768, 768, device="cuda"), torch.randn(768, device="cuda")]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    before = [p.clone() for p in params]
    FusedLAMB([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=1e-2).step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
