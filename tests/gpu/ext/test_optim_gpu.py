"""CUDA fused LAMB / AdamW (csrc/optim_kernels.cu) against the per-tensor references in float64 and in
the same dtype, with float32 and bfloat16/float16 parameters (float32 master weights), ZeRO-style
segments, agreement with the CPU kernels, and no host synchronisation inside a step."""

import pytest
import torch

from bert_fast.ops import extension
from bert_fast.optim import FusedAdamW, FusedLAMB, LAMBReference

pytestmark = pytest.mark.gpu
# Tensors of one element, odd sizes, one past a 16384-element chunk, and a BERT-base matrix.
SHAPES = [[(1,), (7, 3), (16385,), (3072, 768)], [(768,), (5,), (30522,)]]


@pytest.fixture(autouse=True)
def _needs_cuda_build():
    if not extension.available("cuda"):
        pytest.fail("bert_fast._C has no CUDA kernels on a CUDA machine: rebuild with BERT_FAST_CUDA=1")


def groups(dtype, device="cuda", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"params": [(torch.randn(s, generator=g) * 0.05).to(device=device, dtype=dtype) for s in shapes],
             "weight_decay": wd} for shapes, wd in zip(SHAPES, (0.01, 0.0))]


def like(gs, dtype=None, device=None):
    return [{**g, "params": [p.detach().to(device=device or p.device, dtype=dtype or p.dtype).clone()
                             for p in g["params"]]} for g in gs]


def set_grads(all_groups, step, scale=1e-2):
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=g) * scale * (1 + i % 3)
             for i, p in enumerate(p for grp in all_groups[0] for p in grp["params"])]
    for gs in all_groups:
        for p, grad in zip((p for grp in gs for p in grp["params"]), grads):
            p.grad = grad.to(device=p.device, dtype=p.dtype)


def flat(gs):
    return torch.cat([p.detach().double().flatten().cpu() for g in gs for p in g["params"]])


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def master_of(opt, gs):
    return torch.cat([opt.state[p].get("master", p).detach().double().flatten().cpu()
                      for g in gs for p in g["params"]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["lamb", "adamw"])
def test_cuda_matches_reference(kind, dtype):
    ours = groups(dtype)
    eager, exact = like(ours, torch.float32), like(ours, torch.float64)
    if kind == "lamb":
        opt = FusedLAMB(ours, lr=1e-2, max_grad_norm=1.0)
        refs = [LAMBReference(eager, lr=1e-2, max_grad_norm=1.0), LAMBReference(exact, lr=1e-2, max_grad_norm=1.0)]
    else:
        opt = FusedAdamW(ours, lr=1e-2)
        refs = [torch.optim.AdamW(eager, lr=1e-2, foreach=False), torch.optim.AdamW(exact, lr=1e-2, foreach=False)]
    for step in range(20):
        set_grads([ours, eager, exact], step)
        for g32, g64, glow in zip(eager, exact, ours):  # the references see the rounded grads
            for p32, p64, plow in zip(g32["params"], g64["params"], glow["params"]):
                p32.grad, p64.grad = plow.grad.float(), plow.grad.double()
        opt.step()
        for r in refs:
            r.step()
    got, e32, e64 = master_of(opt, ours), flat(eager), flat(exact)
    err, base = rel(got, e64), rel(e32, e64)
    assert err <= 2 * base + 1e-6, f"ours {err:.3g} vs eager {base:.3g} (float64 reference)"
    if dtype != torch.float32:
        assert torch.equal(flat(ours), got.to(dtype).double()), "params are not the rounded master weights"


@pytest.mark.parametrize("kind", ["lamb", "adamw"])
def test_cuda_agrees_with_cpu(kind):
    gpu = groups(torch.float32)
    cpu = like(gpu, device="cpu")
    make = (lambda g: FusedLAMB(g, lr=1e-2)) if kind == "lamb" else (lambda g: FusedAdamW(g, lr=1e-2))
    opts = [make(gpu), make(cpu)]
    for step in range(10):
        set_grads([gpu, cpu], step)
        for o in opts:
            o.step()
    assert rel(flat(gpu), flat(cpu)) <= 2e-6  # float32 both; summation orders and FMA differ


def test_segments_reduce_per_slot():
    """ZeRO-style: one flat tensor whose pieces belong to different slots; the per-slot sums of
    w^2 and update^2 must equal the torch sums over the same pieces."""
    n = 100_003
    w = torch.randn(n, device="cuda")
    g = torch.randn(n, device="cuda")
    m, v = torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")
    cuts = [0, 5, 40_000, 40_001, 77_777, n]
    slots = [3, 0, 2, 1, 0]  # slot 0 appears twice, out of order
    segments = torch.tensor([[0, a, b - a, s] for a, b, s in zip(cuts, cuts[1:], slots)])
    norms = torch.ops.bert_fast.lamb_phase1([w], [g], [m], [v], segments, 4, torch.ones(1, device="cuda"),
                                            0.9, 0.999, 1e-6, 0.01, 0.1, 0.001, True)
    u = (m / 0.1) / ((v / 0.001).sqrt() + 1e-6) + 0.01 * w
    want = torch.zeros(4, 2, dtype=torch.float64, device="cuda")
    for a, b, s in zip(cuts, cuts[1:], slots):
        want[s, 0] += (w[a:b].double() ** 2).sum()
        want[s, 1] += (u[a:b].double() ** 2).sum()
    assert rel(norms.double().cpu(), want.cpu()) <= 1e-5


def test_step_does_not_synchronise():
    gs = groups(torch.bfloat16)
    opts = [FusedLAMB(gs, lr=1e-2), FusedAdamW(like(gs), lr=1e-2)]
    for o in opts:
        set_grads([o.param_groups], 0)
        o.step()  # state allocation may sync; steps after it must not
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for o in opts:
            o.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
