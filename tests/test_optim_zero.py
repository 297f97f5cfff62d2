"""FusedLAMB under DeepSpeed ZeRO 1 and 2 on 2 CPU ranks (gloo) == LAMB without ZeRO on one
process with the same global batch, and the refusal of settings that cannot be exact.

One launch checks everything (DeepSpeed's first start is slow). The model's sizes put the
partition boundaries inside tensors, and max_grad_norm is small so clipping is active: both the
per-tensor trust ratios and the global clip must be reassembled across ranks. A run whose trust
ratios are taken per flat partition (what ZeRO does to a naive LAMB) must miss by far, so the
comparison can fail.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make install adds it)")

from bert_fast import extension  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not extension.available("cpu"), reason="bert_fast._C is not built")]

WORLD, MICRO, STEPS = 2, 4, 10
LAMB = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=0.05)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.LayerNorm(37), torch.nn.GELU(),
                               torch.nn.Linear(37, 5))


def _batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(WORLD * MICRO, 13, generator=g), torch.randn(WORLD * MICRO, 5, generator=g)


def _config(stage, **extra):
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "train_batch_size": MICRO * WORLD, "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0, "steps_per_print": 10 ** 6,
            **extra}


def _train_zero(stage, rank, naive=False, optimizer="FusedLAMB", **extra):
    from bert_fast import optim, zero_lamb
    from bert_fast.optim import ZeroLayout, param_groups

    model = _model()
    opt = getattr(optim, optimizer)(param_groups(model, 0.01), **LAMB)
    engine, *_ = zero_lamb.initialize(model, opt, _config(stage, **extra))
    if naive:  # one trust ratio per flat partition: what a per-tensor LAMB computes under ZeRO
        for p, layout in list(engine.optimizer.optimizer._zero.items()):
            whole = torch.tensor([[0, 0, int(layout.segments[:, 2].sum()), 0]])
            engine.optimizer.optimizer._zero[p] = ZeroLayout(whole, 1, layout.group, layout.grad_norm)
    norms = []
    for step in range(STEPS):
        x, y = _batch(step)
        dtype = next(engine.module.parameters()).dtype
        loss = torch.nn.functional.mse_loss(engine(x.chunk(WORLD)[rank].to(dtype)).float(), y.chunk(WORLD)[rank])
        engine.backward(loss)
        engine.step()
        norms.append(float(engine.optimizer._global_grad_norm))
    return torch.cat([p.detach().float().flatten() for p in engine.module.parameters()]), norms


def _train_single(optimizer_cls):  # a FusedLAMB, FusedAdamW or LAMBReference class
    from bert_fast.optim import param_groups

    model = _model().double() if optimizer_cls.__name__ == "LAMBReference" else _model()
    opt = optimizer_cls(param_groups(model, 0.01), **LAMB)
    for step in range(STEPS):
        x, y = _batch(step)
        loss = torch.nn.functional.mse_loss(model(x.to(model[0].weight.dtype)), y.to(model[0].weight.dtype))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _refusals():
    from bert_fast import zero_lamb
    from bert_fast.optim import FusedLAMB

    opt = FusedLAMB(_model().parameters())
    bad = {"stage3": _config(3), "offload": _config(2, zero_optimization={
        "stage": 2, "offload_optimizer": {"device": "cpu"}}),
           "clip_twice": _config(1, gradient_clipping=1.0),
           "bf16_stage0": _config(0, bf16={"enabled": True})}
    messages = {}
    for name, config in bad.items():
        try:
            zero_lamb.initialize(_model(), opt, config)
            messages[name] = None
        except ValueError as err:
            messages[name] = str(err)
    # Plain deepspeed.initialize (no layout): the first step must refuse, not train wrongly.
    model = _model()
    engine, *_ = deepspeed.initialize(model=model, optimizer=FusedLAMB(model.parameters(), **LAMB),
                                      config=_config(2))
    x, y = _batch(0)
    engine.backward(torch.nn.functional.mse_loss(engine(x[:MICRO]), y[:MICRO]))
    try:
        engine.step()
        messages["no_attach"] = None
    except RuntimeError as err:
        messages["no_attach"] = str(err)
    return messages


def _worker(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    from bert_fast.optim import FusedAdamW, FusedLAMB, LAMBReference

    result = {}
    single, exact = _train_single(FusedLAMB), _train_single(LAMBReference)
    scale = exact.abs().max().item()
    result["single_vs_f64"] = (single.double() - exact).abs().max().item() / scale
    for stage in (1, 2):
        zero, norms = _train_zero(stage, rank)
        result["clipped_steps"] = sum(n > LAMB["max_grad_norm"] for n in norms)
        result[f"zero{stage}_vs_single"] = (zero - single).abs().max().item() / scale
        result[f"zero{stage}_vs_f64"] = (zero.double() - exact).abs().max().item() / scale
    # AdamW is elementwise; only its clipping needs the layout's global norm.
    result["adamw_zero2_vs_single"] = (_train_zero(2, rank, optimizer="FusedAdamW")[0] - _train_single(
        FusedAdamW)).abs().max().item() / scale
    # bf16 ZeRO-2 (fp32 master partitions): the same layout; bf16 rounding sets the tolerance.
    result["zero2_bf16_vs_single"] = (_train_zero(2, rank, bf16={"enabled": True})[0] - single
                                      ).abs().max().item() / scale
    result["naive_vs_single"] = (_train_zero(2, rank, naive=True)[0] - single).abs().max().item() / scale
    result["trained"] = (single - torch.cat([p.detach().flatten() for p in _model().parameters()])
                         ).abs().max().item() / scale
    result["refusals"] = _refusals()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("zero") / "result")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    results = []
    for rank in range(WORLD):
        with open(f"{out}.{rank}") as f:
            results.append(json.load(f))
    return results


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_lamb_matches_single_process(zero_results, stage):
    for rank, r in enumerate(zero_results):
        assert r["trained"] > 1e-2 and r["clipped_steps"] > 0, r
        # Three-way: ZeRO and the unpartitioned fused run both against a float64 reference.
        assert r[f"zero{stage}_vs_f64"] <= 2 * r["single_vs_f64"] + 1e-5, (rank, r)
        assert r[f"zero{stage}_vs_single"] <= 1e-5, (rank, r)


def test_zero2_adamw_with_clipping_matches_single_process(zero_results):
    for r in zero_results:
        assert r["adamw_zero2_vs_single"] <= 1e-5, r


def test_zero2_bf16_close_to_single_process(zero_results):
    for r in zero_results:
        assert r["zero2_bf16_vs_single"] <= 1e-2 < r["naive_vs_single"], r


def test_per_partition_trust_ratio_would_be_caught(zero_results):
    for r in zero_results:
        assert r["naive_vs_single"] > 1e-3, r


@pytest.mark.parametrize("name,setting", [("stage3", "stage=3"), ("offload", "offload_optimizer"),
                                          ("clip_twice", "gradient_clipping"), ("bf16_stage0", "stage=0")])
def test_inexact_settings_are_refused_by_name(zero_results, name, setting):
    for r in zero_results:
        assert r["refusals"][name] is not None and setting in r["refusals"][name], r["refusals"]


def test_zero_without_layout_refuses_to_step(zero_results):
    for r in zero_results:
        assert r["refusals"]["no_attach"] is not None and "zero_lamb" in r["refusals"]["no_attach"]
