"""Fused LAMB / AdamW (csrc/optim.cpp on the CPU) against the per-tensor references.

Three-way, as flash-attention does: the fused step and the same-dtype eager reference are both
compared with a float64 run of the reference; the fused error may be at most ~2x the eager one
plus a small atol, and the fused result must also match the float32 reference to 1e-6 relative
(or to eager's own float32 error, where that is larger). Parameters are compared after 50 steps.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bert_fast import BertConfig, BertForPreTraining
from bert_fast.ops import extension
from bert_fast.optim import FusedAdamW, FusedLAMB, LAMBReference, adamw_reference, param_groups
from tests.helpers import max_rel_err

pytestmark = pytest.mark.skipif(not extension.available("cpu"), reason="bert_fast._C is not built")

# Awkward extras beside BERT-tiny's tensors: one element, odd sizes, one past a 16384 chunk.
AWKWARD = [(1,), (7, 3), (16385,), (3, 5461)]


def tiny_shapes() -> list[list[tuple]]:
    """[decay shapes, no-decay shapes] of BERT-tiny (2 layers, hidden 128, every tensor of the
    pretraining model) with the vocabulary cut to 1000 rows so 50 reference steps stay cheap on a
    2-core CI machine, plus the awkward shapes."""
    model = BertForPreTraining(BertConfig.from_preset("tiny", vocab_size=1000))
    return [[tuple(p.shape) for p in g["params"]] for g in param_groups(model, 0.01)] + [AWKWARD]


def make_groups(shapes, dtype=torch.float32, wd=(0.01, 0.0, 0.02), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"params": [(torch.randn(s, generator=g) * 0.05).to(dtype).requires_grad_() for s in group],
             "weight_decay": w} for group, w in zip(shapes, wd)]


def clone_groups(groups, dtype=None):
    return [{**g, "params": [p.detach().to(dtype or p.dtype).clone().requires_grad_() for p in g["params"]]}
            for g in groups]


def set_grads(groups_list, step: int, scale: float):
    """The same seeded gradients on every copy of the parameters. Per-tensor scales differ (trust
    ratios matter) and odd steps are 10x smaller, so the global norm moves across a threshold."""
    g = torch.Generator().manual_seed(1000 + step)
    shapes = [p.shape for p in (p for grp in groups_list[0] for p in grp["params"])]
    scale = scale if step % 2 == 0 else scale / 10
    grads = [torch.randn(s, generator=g) * scale * (1 + i % 5) for i, s in enumerate(shapes)]
    for groups in groups_list:
        for p, grad in zip((p for grp in groups for p in grp["params"]), grads):
            p.grad = grad.to(p.dtype)


def flat(groups):
    return torch.cat([p.detach().double().flatten() for g in groups for p in g["params"]])


def run(make_opt_list, groups_list, steps, scale):
    opts = [make(groups) for make, groups in zip(make_opt_list, groups_list)]
    for step in range(steps):
        set_grads(groups_list, step, scale)
        for opt in opts:
            opt.step()
    return opts


def assert_three_way(fused, eager, exact, tol=1e-6):
    """Fused error vs float64 at most 2x eager's + tol; fused vs the float32 reference within tol,
    or within eager's own float32 error where that is larger (after 50 steps of Adam-style
    normalisation, float32 rounding alone reaches ~1e-6: eager AdamW is 1.6e-6 off float64)."""
    err, base = max_rel_err(fused, exact), max_rel_err(eager, exact)
    direct = max_rel_err(fused, eager)
    report = f"fused vs float64 {err:.3g}, eager vs float64 {base:.3g}, fused vs eager {direct:.3g}"
    assert err <= 2 * base + tol, report
    assert direct <= max(tol, base), report


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small ops: one thread keeps the reference loops cheap and their time predictable on a
    shared 2-core machine (the threaded kernels are covered by the determinism test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes():
    return tiny_shapes()


def test_lamb_matches_reference_50_steps(shapes):
    """The global grad norm alternates between ~2.2 and ~0.22 (set_grads), so half the steps clip
    at max_grad_norm=1; trust ratios of every BERT-tiny tensor shape are exercised."""
    base = make_groups(shapes)
    fused, eager, exact = clone_groups(base), clone_groups(base), clone_groups(base, torch.float64)
    kw = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=1.0)
    run([lambda g: FusedLAMB(g, **kw), lambda g: LAMBReference(g, **kw), lambda g: LAMBReference(g, **kw)],
        [fused, eager, exact], 50, 1e-3)
    assert_three_way(flat(fused), flat(eager), flat(exact))
    assert max_rel_err(flat(fused), flat(base)) > 1e-3  # it did train


@pytest.mark.parametrize("variant", [dict(adam_w_mode=False), dict(use_nvlamb=True), dict(bias_correction=False),
                                     dict(max_grad_norm=0.0)],
                         ids=["l2", "nvlamb", "no_bias_correction", "no_clipping"])
def test_lamb_variants_match_reference(variant):
    """L2 decay (adam_w_mode=False), NVLAMB (trust ratio on no-decay groups), no bias correction,
    no clipping."""
    kw = dict(lr=1e-2, **variant)
    base = make_groups([[(33, 17), (5,)], [(40,), (1,)]], wd=(0.1, 0.0))
    fused, eager, exact = clone_groups(base), clone_groups(base), clone_groups(base, torch.float64)
    run([lambda g: FusedLAMB(g, **kw), lambda g: LAMBReference(g, **kw), lambda g: LAMBReference(g, **kw)],
        [fused, eager, exact], 20, 0.1)
    assert_three_way(flat(fused), flat(eager), flat(exact))


def test_adamw_matches_reference_and_torch_50_steps(shapes):
    base = make_groups(shapes)
    fused, eager, exact, torch_ = (clone_groups(base), clone_groups(base), clone_groups(base, torch.float64),
                                   clone_groups(base))
    kw = dict(lr=1e-3, betas=(0.9, 0.98), eps=1e-8)

    class Reference(torch.optim.Optimizer):
        def __init__(self, groups):
            super().__init__(groups, dict(kw, weight_decay=0.0))

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                group["n"] = group.get("n", 0) + 1
                ps = group["params"]
                states = [self.state[p] for p in ps]
                for p, s in zip(ps, states):
                    s.setdefault("m", torch.zeros_like(p))
                    s.setdefault("v", torch.zeros_like(p))
                adamw_reference(ps, [p.grad for p in ps], [s["m"] for s in states], [s["v"] for s in states],
                                step=group["n"], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                weight_decay=group["weight_decay"])

    run([lambda g: FusedAdamW(g, **kw), Reference, Reference,
         lambda g: torch.optim.AdamW(g, foreach=False, **kw)], [fused, eager, exact, torch_], 50, 1e-2)
    assert_three_way(flat(fused), flat(eager), flat(exact))
    torch_err = max_rel_err(flat(torch_), flat(exact))
    assert max_rel_err(flat(fused), flat(torch_)) <= max(1e-6, torch_err), torch_err


@pytest.mark.parametrize("opt", [FusedLAMB, FusedAdamW])
def test_clipping_equals_prescaled_grads(opt):
    """Clipping to N divides the grads by ||g|| / N: the same step as grads pre-scaled to norm N."""
    shapes = [[(300, 7), (1,)], [(129,)]]
    a, b = make_groups(shapes, wd=(0.01, 0.0)), make_groups(shapes, wd=(0.01, 0.0))
    set_grads([a, b], 0, 1.0)
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for g in b for p in g["params"]))
    assert norm > 0.5
    for g in b:
        for p in g["params"]:
            p.grad = (p.grad.double() * (0.5 / norm)).float()
    opt(a, lr=1e-2, max_grad_norm=0.5).step()
    opt(b, lr=1e-2, max_grad_norm=0.0).step()
    err = max_rel_err(flat(a), flat(b))
    assert err <= 1e-6, f"clipped vs pre-scaled: {err:.3g}"


def test_param_groups_split():
    model = BertForPreTraining(BertConfig.from_preset("tiny"))
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith(".weight") and p.dim() == 2 for p in decay["params"])
    assert all(names[id(p)].endswith("bias") or "norm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_no_decay_group_takes_plain_adam_step():
    """apex's rule: weight_decay 0 -> no trust ratio, the step is lr * m_hat / (sqrt(v_hat) + eps)."""
    p = torch.full((10,), 3.0, requires_grad=True)
    p.grad = torch.linspace(-1, 1, 10)
    FusedLAMB([{"params": [p], "weight_decay": 0.0}], lr=0.1, max_grad_norm=0.0).step()
    g = torch.linspace(-1, 1, 10)
    expected = 3.0 - 0.1 * g / (g.abs() + 1e-6)  # m_hat = g, v_hat = g^2 after one step
    assert max_rel_err(p.detach(), expected) <= 1e-6


@pytest.mark.parametrize("opt", [FusedLAMB, FusedAdamW])
def test_state_dict_round_trip_continues_identically(opt):
    shapes = [[(65, 33), (16385,)], [(7,)]]
    a = make_groups(shapes, wd=(0.01, 0.0))
    opt_a = opt(a, lr=1e-2, max_grad_norm=1.0)
    for step in range(5):
        set_grads([a], step, 0.1)
        opt_a.step()
    b = clone_groups(a)
    opt_b = opt(b, lr=0.5, max_grad_norm=1.0)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.param_groups[0]["step"] == 5 and opt_b.param_groups[0]["lr"] == 1e-2
    for step in range(5, 10):
        set_grads([a, b], step, 0.1)
        opt_a.step()
        opt_b.step()
    assert torch.equal(flat(a), flat(b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opt,ref", [(FusedLAMB, LAMBReference), (FusedAdamW, torch.optim.AdamW)])
def test_low_precision_params_keep_fp32_master(dtype, opt, ref):
    shapes = [[(65, 33), (1,)], [(17,)]]
    low = make_groups(shapes, dtype=dtype, wd=(0.01, 0.0))
    master = clone_groups(low, torch.float32)
    fused, reference = opt(low, lr=1e-2), ref(master, lr=1e-2)
    for step in range(10):
        set_grads([low], step, 0.1)
        for g32, glow in zip(master, low):
            for p32, plow in zip(g32["params"], glow["params"]):
                p32.grad = plow.grad.float()  # the reference sees the same rounded grads
        fused.step()
        reference.step()
    masters = [fused.state[p]["master"] for g in low for p in g["params"]]
    assert all(m.dtype == torch.float32 for m in masters)
    got = torch.cat([m.double().flatten() for m in masters])
    assert max_rel_err(got, flat(master)) <= 1e-6
    assert torch.equal(flat(low), torch.cat([m.to(dtype).double().flatten() for m in masters]))
    # A checkpoint keeps the fp32 master (torch would cast state to the parameter's dtype).
    again = opt(clone_groups(low), lr=1e-2)
    again.load_state_dict(fused.state_dict())
    assert all(s["master"].dtype == torch.float32 for s in again.state.values())


def test_deterministic_across_thread_counts():
    shapes = [[(1000, 129)], [(77,)]]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            groups = make_groups(shapes, wd=(0.01, 0.0))
            set_grads([groups], 0, 1.0)
            FusedLAMB(groups, lr=1e-2).step()
            results.append(flat(groups))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_segments_reduce_per_slot():
    """ZeRO-style segments: pieces of one flat tensor belong to different slots (out of order,
    one slot twice, one crossing a chunk); per-slot sums must equal torch's over the same pieces."""
    n = 40_003
    w, g = torch.randn(n), torch.randn(n)
    m, v = torch.zeros(n), torch.zeros(n)
    cuts, slots = [0, 5, 20_000, 20_001, 37_777, n], [3, 0, 2, 1, 0]
    segments = torch.tensor([[0, a, b - a, s] for a, b, s in zip(cuts, cuts[1:], slots)])
    norms = torch.ops.bert_fast.lamb_phase1([w], [g], [m], [v], segments, 5, torch.ones(1), 0.9, 0.999, 1e-6,
                                            0.01, 0.1, 0.001, True)
    u = (m / 0.1) / ((v / 0.001).sqrt() + 1e-6) + 0.01 * w
    want = torch.zeros(5, 2, dtype=torch.float64)  # slot 4 has no segment: zero
    for a, b, s in zip(cuts, cuts[1:], slots):
        want[s, 0] += (w[a:b].double() ** 2).sum()
        want[s, 1] += (u[a:b].double() ** 2).sum()
    assert max_rel_err(norms.double(), want) <= 1e-6
    assert torch.equal(m, 0.1 * g) and torch.allclose(v, 0.001 * g * g, rtol=1e-6, atol=0)


def test_ops_pass_opcheck():
    """Schemas (mutation annotations), fake kernels and dispatch, as torch.library checks them."""
    w, g = [torch.randn(5), torch.randn(7, 3)], [torch.randn(5), torch.randn(7, 3)]
    m, v = [torch.zeros(5), torch.zeros(7, 3)], [torch.zeros(5), torch.zeros(7, 3)]
    segments, clip, hyper = torch.tensor([[0, 0, 5, 0], [1, 0, 21, 1]]), torch.ones(1), (0.9, 0.999, 1e-6, 0.01)
    ops = torch.ops.bert_fast
    for op, args in ((ops.optim_sumsq, (w,)),
                     (ops.lamb_phase1, (w, g, m, v, segments, 2, clip, *hyper, 0.1, 0.001, True)),
                     (ops.lamb_phase2, (w, [], m, v, segments, torch.ones(2), *hyper, 0.1, 0.001, True)),
                     (ops.adamw_step, (w, [], g, m, v, clip, 1e-3, *hyper, 0.1, 0.001))):
        result = torch.library.opcheck(op, args)
        assert all(r == "SUCCESS" for r in result.values()), (op, result)


def test_bad_input_raises_naming_the_argument():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        FusedLAMB([p], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        FusedAdamW([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="max_grad_norm"):
        FusedLAMB([p], max_grad_norm=-1)
    q = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    q.grad = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"params\[0\]"):
        FusedLAMB([q]).step()
    with pytest.raises(TypeError, match="model"):
        param_groups([p], 0.01)
    # Direct op calls are checked too.
    w, m = torch.zeros(5), torch.zeros(5)
    clip = torch.ones(1)
    with pytest.raises(ValueError, match="grads"):
        torch.ops.bert_fast.lamb_phase1([w], [], [m], [m.clone()], torch.tensor([[0, 0, 5, 0]]), 1, clip,
                                        0.9, 0.999, 1e-6, 0.0, 1.0, 1.0, True)
    with pytest.raises(ValueError, match="segments"):
        torch.ops.bert_fast.lamb_phase1([w], [w.clone()], [m], [m.clone()], torch.tensor([[0, 2, 5, 0]]), 1,
                                        clip, 0.9, 0.999, 1e-6, 0.0, 1.0, 1.0, True)
    with pytest.raises(ValueError, match="segments"):  # start + length would overflow int64
        torch.ops.bert_fast.lamb_phase1([w], [w.clone()], [m], [m.clone()], torch.tensor([[0, 2, 2**63 - 1, 0]]),
                                        1, clip, 0.9, 0.999, 1e-6, 0.0, 1.0, 1.0, True)
    with pytest.raises(TypeError, match="exp_avg"):
        torch.ops.bert_fast.adamw_step([w], [], [w.clone()], [m.double()], [m.clone()], clip, 1e-3, 0.9,
                                       0.999, 1e-8, 0.0, 1.0, 1.0)


def test_replaced_params_are_refused_without_a_layout():
    """What DeepSpeed ZeRO does to a client optimizer: swap the group's tensors for a flat
    partition. LAMB must refuse it rather than take per-partition trust ratios."""
    p = torch.zeros(6, requires_grad=True)
    opt = FusedLAMB([p])
    flat_partition = torch.zeros(3, requires_grad=True)
    flat_partition.grad = torch.ones(3)
    opt.param_groups[0]["params"] = [flat_partition]
    with pytest.raises(RuntimeError, match="deepspeed_compat.initialize"):
        opt.step()


@pytest.mark.parametrize("config,setting", [
    ({"zero_optimization": {"stage": 4}}, "stage=4"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offload_param"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "nvme"}}}, "offload_param"),
    ({"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}, "gradient_clipping"),
    ({"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}, "gradient_clipping"),
    ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, "compute_grad_norm"),
])
def test_zero_config_refusals_name_the_setting(config, setting, tmp_path):
    """bert_fast.optim.zero.check_config runs before DeepSpeed starts (and without DeepSpeed)."""
    from bert_fast.optim.zero import check_config

    opt = FusedLAMB([torch.zeros(3, requires_grad=True)], max_grad_norm=1.0)
    with pytest.raises(ValueError, match=setting):
        check_config(config, opt)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=setting):
        check_config(str(path), opt)


def test_zero_config_accepts_exact_settings():
    from bert_fast.optim.zero import check_config

    opt = FusedLAMB([torch.zeros(3, requires_grad=True)], max_grad_norm=1.0)
    for config in ({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}},
                   {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}},
                   {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}},
                   {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}},
                   {"gradient_clipping": 0.0}):
        check_config(config, opt)
    check_config({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0},
                 FusedAdamW([torch.zeros(3, requires_grad=True)]))  # AdamW without its own clipping
    with pytest.raises(TypeError, match="optimizer"):
        check_config({}, torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=1.0))
