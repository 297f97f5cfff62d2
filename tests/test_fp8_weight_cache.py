"""bert_fast.ops.fp8's weight-cast cache: the micro-batches of one optimizer step cast each weight once,
with the results of casting it every time (bit for bit under current scaling, and under delayed
scaling with one micro-batch per step); every way a weight changes drops the cached cast."""

from __future__ import annotations

import pytest
import torch

from bert_fast.model import BertForPreTraining
from bert_fast.model.config import BertConfig
from bert_fast.ops import fp8
from bert_fast.ops.fp8 import Fp8Recipe, Fp8State
from helpers import mlm_batch


@pytest.fixture
def weight_casts(monkeypatch):
    """Counts fp8.cast calls for weights (role 1) with a state (the reference casts have none)."""
    calls = []
    original = fp8.cast

    def counting(t, dtype, state, role, record, **kwargs):
        if role == fp8._WEIGHT and state is not None:
            calls.append(t.shape)
        return original(t, dtype, state, role, record, **kwargs)

    monkeypatch.setattr(fp8, "cast", counting)
    return calls


def _model(scaling: str, seed: int = 0) -> BertForPreTraining:
    torch.manual_seed(seed)
    model = BertForPreTraining(BertConfig.from_preset("tiny", vocab_size=256, hidden_dropout_prob=0.0,
                                                      attention_probs_dropout_prob=0.0))
    fp8.enable(model, Fp8Recipe(scaling, amax_history=2))
    return model


def _batch(seed: int) -> dict:
    return mlm_batch(batch=4, seq=24, seed=seed)


def _train(model, steps: int, accumulation: int) -> list:
    """Losses, then every gradient and buffer at the end, of `steps` AdamW steps of `accumulation`
    micro-batches."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        for micro in range(accumulation):
            out = model(**_batch(step * accumulation + micro))
            out.loss.backward()
            losses.append(out.loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    return losses + [p.grad.clone() for p in model.parameters()] + [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("scaling, accumulation", [("current", 3), ("delayed", 1)])
def test_the_cache_changes_no_bit_of_training(scaling, accumulation, monkeypatch):
    """Current scaling depends on the weight alone; delayed scaling with one micro-batch per step
    casts each step's new weights at its only forward. Every loss, gradient and scaling state
    equal with and without the cache."""
    runs = []
    for cache in (True, False):
        monkeypatch.setattr(fp8, "CACHE_WEIGHTS", cache)
        runs.append(_train(_model(scaling), steps=3, accumulation=accumulation))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_micro_batches_reuse_the_cast_until_the_optimizer_steps(scaling, weight_casts):
    model = _model(scaling)
    gemms = 4 * model.config.num_hidden_layers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        for micro in range(3):
            model(**_batch(micro)).loss.backward()
            assert len(weight_casts) == gemms * (step + 1), (step, micro)  # the first micro-batch only
        optimizer.step()  # torch.optim's global post hook: the next forward casts again
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        model(**_batch(0))
    assert len(weight_casts) == 3 * gemms  # evaluation casts fresh: its scale is the state's now


def test_recomputed_forwards_reuse_the_cast(weight_casts):
    model = _model("delayed")
    model.bert.gradient_checkpointing = True
    model(**_batch(0)).loss.backward()  # each layer's forward runs again inside the backward
    assert len(weight_casts) == 4 * model.config.num_hidden_layers


def _linear(x, w, state):
    return fp8.fp8_linear(x, w, state)


def test_every_way_a_weight_changes_drops_the_cached_cast(weight_casts):
    state = Fp8State(Fp8Recipe("current"))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 32, generator=g), torch.randn(16, 32, generator=g).requires_grad_()
    _linear(x, w, state)
    _linear(x, w, state)
    assert len(weight_casts) == 1

    def changed(edit) -> bool:
        before = len(weight_casts)
        edit()
        y = _linear(x, w, state)
        assert torch.equal(y, fp8.fp8_linear(x, w.detach().clone(), None))  # never a stale cast
        return len(weight_casts) > before

    with torch.no_grad():
        assert changed(lambda: w.mul_(2.0))  # in place: the version counter moves
    assert changed(lambda: setattr(w, "data", w.data * 0.5))  # new storage (ZeRO-3 gathers)
    assert changed(fp8.weights_changed)  # what a writer through other views calls
    assert changed(lambda: torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0).step())  # any optimizer
    module = torch.nn.Module()
    module.fp8 = state
    assert changed(lambda: module.load_state_dict(module.state_dict()))  # a state-dict load
    assert not changed(lambda: None)


def test_a_write_through_data_is_seen_after_an_optimizer_step(weight_casts):
    """`w.data.mul_` bypasses the version counter (DeepSpeed copies its updated flat buffers into
    the weights that way): the cached cast is stale until the step's hook moves the generation,
    which DeepSpeed's copy always follows."""
    state = Fp8State(Fp8Recipe("current"))
    x, w = torch.randn(8, 32), torch.randn(16, 32).requires_grad_()
    _linear(x, w, state)
    w.data.mul_(3.0)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0).step()
    assert torch.equal(_linear(x, w, state), fp8.fp8_linear(x, w.detach().clone(), None))
    assert len(weight_casts) == 2


def test_a_new_weight_at_a_freed_ones_address_is_cast_again(weight_casts):
    state = Fp8State(Fp8Recipe("current"))
    x = torch.randn(8, 32)
    for seed in range(3):  # each clone may take the storage the last one freed, at version 0
        w = torch.randn(16, 32, generator=torch.Generator().manual_seed(seed)).clone().requires_grad_()
        assert torch.equal(_linear(x, w, state), fp8.fp8_linear(x, w.detach(), None))
        del w
    assert len(weight_casts) == 3


def test_delayed_scaling_reuses_the_steps_first_weight_scale():
    """History 2: after the weight halves, the step's first forward casts it with the scale of the
    old history (448 / a); two rolls later the history holds only a / 2, so casting every forward
    would use 896 / a at the third micro-batch, where the cached cast keeps the first one's. The
    weight amax is recorded every forward either way: the histories agree."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(16, 32, generator=g)
    xs = [torch.randn(8, 32, generator=g) for _ in range(4)]
    runs = {}
    for cache in (True, False):
        fp8.CACHE_WEIGHTS = cache
        try:
            state = Fp8State(Fp8Recipe("delayed", amax_history=2))
            w = w0.clone().requires_grad_()
            _linear(xs[0], w, state)
            with torch.no_grad():
                w.mul_(0.5)
            forwards = []
            for x in xs[1:]:
                fp8.roll([state])
                forwards.append((_linear(x, w, state), state.scale.clone()))  # the scales in force
            runs[cache] = forwards, state.amax_history.clone()
        finally:
            fp8.CACHE_WEIGHTS = True
    (cached, history), (fresh, fresh_history) = runs[True], runs[False]
    a = w0.abs().max().item()
    assert torch.equal(history, fresh_history) and history[1].tolist() == [a / 2, a / 2]
    scales = [s for _, s in fresh]
    assert scales[0][1] == scales[1][1] != scales[2][1]  # the weight's scale moved at the third
    for (y, _), weight_scale in ((cached[2], scales[0][1]), (fresh[2], scales[2][1])):
        want = fp8.linear_reference(xs[3], w0 * 0.5, scales[2][0], weight_scale)
        assert (y.double() - want).abs().max() <= 64 * 2.0**-23 * want.abs().max()
    assert all(torch.equal(c, f) for (c, _), (f, _) in zip(cached[:2], fresh[:2]))  # one cast so far
