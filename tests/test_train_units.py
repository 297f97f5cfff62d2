"""Pieces of the training loop checked against independent references: the schedule against its
formula, the FLOP count against torch's FlopCounterMode, activation checkpointing against the
plain backward, the fp16 loss-scale watch, and the model's ZeRO-3 parameter registrations."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from bert_fast import BertConfig, BertForPreTraining
from bert_fast.model import zero3_external_parameters
from bert_fast.train.flops import peak_tflops, step_flops
from bert_fast.train.loop import LossScaleWatch, TrainingStopped
from bert_fast.train.schedule import lr_factor

# FlopCounterMode knows SDPA's CUDA kernels, not the CPU one the torch backend runs here; give it
# torch's own SDPA formula for that op.
CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}


def test_schedule_warmup_then_poly_decay():
    total, warmup = 100, 10
    assert [lr_factor(s, total, warmup) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_factor(9, total, warmup) == pytest.approx(1.0)
    for step in (10, 37, 99):
        progress = (step - warmup) / (total - warmup)
        assert lr_factor(step, total, warmup, "poly", 0.5) == pytest.approx(math.sqrt(1 - progress))
        assert lr_factor(step, total, warmup, "linear") == pytest.approx(1 - progress)
        assert lr_factor(step, total, warmup, "poly", 0.5, 0.1) == pytest.approx(0.1 + 0.9 * math.sqrt(1 - progress))
        assert lr_factor(step, total, warmup, "constant") == 1.0
    assert lr_factor(100, total, warmup) == 0.0 and lr_factor(500, total, warmup) == 0.0
    with pytest.raises(ValueError, match="schedule.decay"):
        lr_factor(50, total, warmup, "cosine")


@pytest.mark.parametrize("lengths", [[16, 16], [16, 9, 3]])
def test_step_flops_match_torch_flop_counter(lengths):
    """Our formula == what torch counts for the torch backend's forward, times 3 for the step
    (padding-free batches: the torch backend computes on padding, which the formula must not count)."""
    config = BertConfig.from_preset("mini", vocab_size=1000, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, backend="torch")
    model = BertForPreTraining(config).eval()
    g = torch.Generator().manual_seed(0)
    flops = 0.0
    predictions = 0
    for n in lengths:  # one sequence at a time: no padding anywhere
        ids = torch.randint(5, 1000, (1, n), generator=g)
        labels = torch.full((1, n), -100)
        labels[0, 1:n:4] = ids[0, 1:n:4]
        predictions += int((labels != -100).sum())
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter, torch.no_grad():
            model(input_ids=ids, mlm_labels=labels, next_sentence_label=torch.zeros(1, dtype=torch.long))
        flops += counter.get_total_flops()
    ours = step_flops(config, lengths, predictions)
    # FlopCounterMode also counts the NSP head's [1, H] x [H, 2] (4H per sequence, in ours too).
    assert ours == pytest.approx(3 * flops, rel=1e-9)
    assert step_flops(config, torch.tensor(lengths), predictions) == ours


def test_peak_table():
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), override=123.0) == 123.0


def test_activation_checkpointing_gives_the_same_gradients():
    config = BertConfig.from_preset("tiny", vocab_size=500, backend="torch")  # dropout on
    model = BertForPreTraining(config).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 500, (3, 20), generator=g)
    labels = torch.where(torch.rand(3, 20, generator=g) < 0.2, ids, torch.full_like(ids, -100))
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    labels[2, 12:] = -100
    nsp = torch.tensor([0, 1, 0])

    def grads(checkpointing: bool):
        model.bert.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # same dropout draws
        model(input_ids=ids, attention_mask=mask, mlm_labels=labels, next_sentence_label=nsp).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=0, msg=name)


def test_loss_scale_watch_stops_at_the_floor():
    watch = LossScaleWatch(floor=1.0, patience=2)
    watch.update(1, overflowed=True, scale=1024.0, last_saved=None)   # above the floor: DeepSpeed lowers it
    watch.update(2, overflowed=True, scale=1.0, last_saved=None)      # at the floor, once
    watch.update(3, overflowed=False, scale=1.0, last_saved=None)     # a good step resets
    watch.update(4, overflowed=True, scale=1.0, last_saved=None)
    with pytest.raises(TrainingStopped, match="precision.min_loss_scale=1.0.*step_00000040"):
        watch.update(5, overflowed=True, scale=1.0, last_saved="runs/x/checkpoints/step_00000040")
    LossScaleWatch(1.0, 1).update(1, overflowed=True, scale=None, last_saved=None)  # bf16: no scale


def test_zero3_registrations_cover_every_parameter_read_outside_its_module():
    model = BertForPreTraining(BertConfig.from_preset("tiny", vocab_size=300))
    pairs = zero3_external_parameters(model)
    registered = {id(p) for _, p in pairs}
    # Every parameter except those a module reads itself (mlm_bias) is used by a parent's forward.
    direct = {id(model.mlm_bias)}
    assert {id(p) for p in model.parameters()} - registered == direct
    layer = model.bert.layers[0]
    assert {id(p) for m, p in pairs if m is layer} == {id(p) for p in layer.parameters()}
