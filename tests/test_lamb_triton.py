"""LAMB's Triton fallback (bert_fast.kernels.lamb), what FusedLAMB runs on a CUDA machine whose
bert_fast._C has no CUDA kernels, checked on the CPU under TRITON_INTERPRET=1 against the
extension's CPU kernels: op against op on ZeRO-style segment tables, and FusedLAMB step for step
in the variants tests/test_optim_fallback.py covers. Its sm_90 build: tests/test_lamb_aot.py."""

from __future__ import annotations

import os

import pytest
import torch

from bert_fast.kernels import lamb as triton_lamb
from bert_fast.ops import extension
from bert_fast.optim import FusedLAMB
from bert_fast.optim import fallback as fallback_ops
from tests.helpers import max_rel_err
from tests.test_optim import clone_groups, flat, make_groups, set_grads
from tests.test_optim_fallback import LAMB_VARIANTS, SHAPES, _step_for_step, fresh, no_kernels  # noqa: F401

pytestmark = [pytest.mark.skipif(not extension.available("cpu"), reason="bert_fast._C is not built"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="CPU tensors run Triton only under TRITON_INTERPRET=1"),
              pytest.mark.filterwarnings("ignore:.*PyTorch fallbacks:UserWarning")]

HYPER = (0.9, 0.999, 1e-6, 0.01, 0.19, 0.002)


@pytest.fixture
def triton_on_cpu(monkeypatch, no_kernels):  # noqa: F811
    """FusedLAMB without kernels, taking the Triton path as on CUDA (the CPU interprets it)."""
    monkeypatch.setattr(fallback_ops, "triton_lamb", lambda device: True)

    def forbidden(*args, **kwargs):
        raise AssertionError("the foreach fallback ran")

    monkeypatch.setattr(fallback_ops, "lamb_phase1", forbidden)
    monkeypatch.setattr(fallback_ops, "lamb_phase2", forbidden)
    return no_kernels


def _zero_case(n=40_003, seed=3):
    """One flat partition cut into pieces of several slots (out of order, one slot twice, one
    piece crossing a 16384 chunk, slot 4 with no piece) and 3 padding elements at the end."""
    g = torch.Generator().manual_seed(seed)
    w, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    m, v = torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01
    cuts, slots = [0, 5, 20_000, 20_001, 37_777, n - 3], [3, 0, 2, 1, 0]
    segments = torch.tensor([[0, a, b - a, s] for a, b, s in zip(cuts, cuts[1:], slots)])
    return w, grad, m, v, segments


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("adam_w_mode", [True, False], ids=["adamw", "l2"])
def test_segments_match_the_cpu_kernels(grad_dtype, adam_w_mode):
    """Op against op: per-slot sums, moments, weights and the rounded model copy; padding and the
    empty slot untouched."""
    w, grad, m, v, segments = _zero_case()
    grad = grad.to(grad_dtype)
    clip = torch.tensor([1.7])
    ref, ours = ([t.clone() for t in (w, m, v)] for _ in range(2))
    want = torch.ops.bert_fast.lamb_phase1([ref[0]], [grad], [ref[1]], [ref[2]], segments, 5, clip, *HYPER,
                                           adam_w_mode)
    got = triton_lamb.lamb_phase1([ours[0]], [grad], [ours[1]], [ours[2]], segments, 5, clip, *HYPER, adam_w_mode)
    assert max_rel_err(got.double(), want.double()) <= 1e-6 and torch.all(got[4] == 0), (got, want)
    for a, b in zip(ours[1:], ref[1:]):
        assert max_rel_err(a, b) <= 1e-6
    steps = torch.tensor([0.1, 0.02, 0.3, 0.04, 0.5])
    copy_dtype = torch.float16 if grad_dtype == torch.float16 else torch.bfloat16
    ref_copy, our_copy = (torch.zeros_like(w, dtype=copy_dtype) for _ in range(2))
    torch.ops.bert_fast.lamb_phase2([ref[0]], [ref_copy], [ref[1]], [ref[2]], segments, steps, *HYPER, adam_w_mode)
    triton_lamb.lamb_phase2([ours[0]], [our_copy], [ours[1]], [ours[2]], segments, steps, *HYPER, adam_w_mode)
    assert max_rel_err(ours[0], ref[0]) <= 1e-6
    if copy_dtype == torch.float16:
        assert torch.equal(our_copy[:-3], ours[0][:-3].half())
    else:  # the interpreter's bf16 rounding: see test_fused_lamb_on_triton_keeps_fp32_masters_of_bf16_params
        rounded = ours[0][:-3].bfloat16().double()
        assert torch.all((our_copy[:-3].double() - rounded).abs() <= rounded.abs() * 2.0 ** -7)
    for a, b in zip(ours, (w, m, v)):
        assert torch.equal(a[-3:], b[-3:])  # padding untouched
    assert torch.all(our_copy[-3:] == 0)


def test_against_the_float64_reference():
    """Both phases on several whole tensors (lengths 1, odd, a multiple of the block, across
    chunks) against plain float64 PyTorch: what both the kernels and this path approximate."""
    g = torch.Generator().manual_seed(5)
    numels = [1, 1023, 2048, 16385, 3 * 5461]
    w, grads = [torch.randn(n, generator=g) for n in numels], [torch.randn(n, generator=g) for n in numels]
    m, v = [torch.zeros(n) for n in numels], [torch.zeros(n) for n in numels]
    segments = torch.tensor([[i, 0, n, i] for i, n in enumerate(numels)])
    hyper = (0.9, 0.999, 1e-6, 0.01, 0.1, 0.001, True)
    clip = torch.tensor([2.5])
    exact = [[t.double() for t in ts] for ts in (w, grads, m, v)]

    def steps_of(norms):
        trust = torch.where((norms[:, 0] > 0) & (norms[:, 1] > 0), (norms[:, 0] / norms[:, 1]).sqrt(),
                            torch.ones(len(norms), dtype=norms.dtype))
        return 1e-2 * trust

    want = triton_lamb.lamb_reference(*exact, segments, len(numels), clip, steps_of, *hyper)
    got = triton_lamb.lamb_phase1(w, grads, m, v, segments, len(numels), clip, *hyper)
    triton_lamb.lamb_phase2(w, [], m, v, segments, steps_of(got).float(), *hyper)
    assert max_rel_err(got.double(), want) <= 1e-6
    for ours, ref in zip((w, m, v), exact[:1] + exact[2:]):
        assert max_rel_err(torch.cat(ours).double(), torch.cat(ref)) <= 1e-6


def test_deterministic():
    w, grad, m, v, segments = _zero_case(seed=7)
    clip = torch.tensor([1.0])
    runs = []
    for _ in range(2):
        state = [t.clone() for t in (w, m, v)]
        norms = triton_lamb.lamb_phase1([state[0]], [grad], [state[1]], [state[2]], segments, 5, clip, *HYPER, True)
        triton_lamb.lamb_phase2([state[0]], [], [state[1]], [state[2]], segments, torch.full((5,), 0.1), *HYPER, True)
        runs.append([norms, *state])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("variant", LAMB_VARIANTS,
                         ids=["default", "l2", "nvlamb", "no_bias_correction", "no_clipping", "no_decay"])
def test_fused_lamb_on_triton_equals_fused_step_for_step(triton_on_cpu, variant):
    kw = {"lr": 1e-2, "max_grad_norm": 1.0, **variant}
    if "weight_decay" in variant:
        make = lambda groups: FusedLAMB([{"params": g["params"]} for g in groups], **kw)  # noqa: E731
    else:
        make = lambda groups: FusedLAMB(groups, **kw)  # noqa: E731
    worst_w, worst_m = _step_for_step(make, triton_on_cpu, 6, 0.1)
    assert worst_w <= 1e-6 and worst_m <= 1e-6, (worst_w, worst_m)


def test_fused_lamb_on_triton_keeps_fp32_masters_of_fp16_params(triton_on_cpu):
    worst_w, worst_m = _step_for_step(lambda groups: FusedLAMB(groups, lr=1e-2), triton_on_cpu, 4, 0.1,
                                      dtype=torch.float16)
    assert worst_w <= 1e-6 and worst_m <= 1e-6, (worst_w, worst_m)


def test_fused_lamb_on_triton_keeps_fp32_masters_of_bf16_params(triton_on_cpu):
    """As above for bf16, except the rounded copies: Triton's interpreter casts float32 to bf16 by
    dropping bits and adding the first dropped one (not round-to-nearest-even, and not exact at a
    carry), where the compiled kernel's cvt.rn.bf16.f32 rounds as torch does; so the copies are
    checked to within one bf16 step of the rounded masters here."""
    base = make_groups(SHAPES, dtype=torch.bfloat16, wd=(0.01, 0.0, 0.05))
    fused, ours = clone_groups(base), clone_groups(base)
    opt_fused, opt_ours = FusedLAMB(fused, lr=1e-2), FusedLAMB(ours, lr=1e-2)

    def masters(opt, groups):
        return torch.cat([opt.state[p]["master"].double().flatten() for g in groups for p in g["params"]])

    for step in range(4):
        set_grads([fused, ours], step, 0.1)
        triton_on_cpu(False)
        opt_fused.step()
        triton_on_cpu(True)
        opt_ours.step()
        assert max_rel_err(masters(opt_ours, ours), masters(opt_fused, fused)) <= 1e-6
        rounded = masters(opt_ours, ours).to(torch.bfloat16).double()
        ulp = rounded.abs() * 2.0 ** -7
        assert torch.all((flat(ours) - rounded).abs() <= ulp)
    assert max_rel_err(flat(ours), flat(base)) > 1e-3


def test_cuda_without_kernels_selects_triton(monkeypatch, no_kernels):  # noqa: F811
    """The selection as on a GPU machine without the CUDA kernels: Triton for CUDA tensors (where
    it imports), foreach elsewhere. FusedLAMB asks `triton_lamb` with the parameters' device."""
    assert fallback_ops.triton_lamb(torch.device("cuda")) and fallback_ops.triton_lamb(torch.device("cuda", 1))
    assert not fallback_ops.triton_lamb(torch.device("cpu"))
    monkeypatch.setattr(fallback_ops, "_triton_importable", lambda: False)
    assert not fallback_ops.triton_lamb(torch.device("cuda"))

    asked, ran = [], []
    monkeypatch.setattr(fallback_ops, "triton_lamb", lambda device: asked.append(device) or True)
    real1, real2 = triton_lamb.lamb_phase1, triton_lamb.lamb_phase2
    monkeypatch.setattr(triton_lamb, "lamb_phase1", lambda *a: ran.append(1) or real1(*a))
    monkeypatch.setattr(triton_lamb, "lamb_phase2", lambda *a: ran.append(2) or real2(*a))
    groups = make_groups([[(7, 3), (5,)], [(4,)]])
    set_grads([groups], 0, 1.0)
    FusedLAMB(groups).step()
    assert asked and all(d == torch.device("cpu") for d in asked) and ran == [1, 2, 1, 2]
    no_kernels(False)  # with kernels nothing asks
    asked.clear()
    FusedLAMB(groups).step()
    assert not asked


def test_misaligned_pieces_take_the_unaligned_build():
    """A piece starting at an odd element is not 16-byte aligned; the host must say so."""
    w, grad, m, v, segments = _zero_case()
    plan = triton_lamb._plan(segments, [w], 5)
    _, aligned = plan.table([[w], [grad], [m], [v], []])
    assert not aligned
    whole = torch.tensor([[0, 0, w.numel(), 0]])
    _, aligned = triton_lamb._plan(whole, [w], 1).table([[w], [grad], [m], [v], []])
    assert aligned == all(t.data_ptr() % 16 == 0 for t in (w, grad, m, v))


def test_a_step_reads_nothing_from_the_device(triton_on_cpu):
    """After the first step (which builds the chunk table from the CPU segments), a step on the
    Triton path makes no device-to-host read: coefficients are rounded on the host, step sizes
    and clip stay device tensors, and address tables are rebuilt from data pointers only."""
    from tests.helpers import count_launches_and_syncs

    groups = make_groups(SHAPES)
    opt = FusedLAMB(groups, lr=1e-2)
    set_grads([groups], 0, 0.1)
    opt.step()
    set_grads([groups], 1, 0.1)  # new grad tensors: new addresses
    with count_launches_and_syncs() as counts:
        opt.step()
    assert counts["syncs"] == 0, counts


def test_bad_tables_are_refused_before_a_launch():
    """What csrc/optim_args.h refuses, refused on the host before a kernel could touch memory
    outside the tensors."""
    w, grad, m, v, _ = _zero_case(n=100)
    clip = torch.tensor([1.0])

    def phase1(segments, ws=(w,), gs=(grad,)):
        return triton_lamb.lamb_phase1(list(ws), list(gs), [m], [v], segments, 2, clip, *HYPER, True)

    for bad in ([[1, 0, 10, 0]], [[0, 95, 10, 0]], [[0, -1, 10, 0]], [[0, 0, 10, 2]]):
        with pytest.raises(ValueError, match=r"segments\[0\]"):
            phase1(torch.tensor(bad))
    with pytest.raises(ValueError, match="segments must be an int64 CPU tensor"):
        phase1(torch.tensor([[0, 0, 10]]))
    with pytest.raises(ValueError, match=r"grads\[0\] must be contiguous"):
        phase1(torch.tensor([[0, 0, 50, 0]]), gs=(torch.randn(200)[::2],))
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        phase1(torch.tensor([[0, 0, 50, 0]]), gs=(torch.randn(99),))
    with pytest.raises(TypeError, match="float32"):
        phase1(torch.tensor([[0, 0, 50, 0]]), ws=(w.double(),))
