"""A training step replayed from CUDA graphs (bert_fast/train/cuda_graphs.py) gives eager's losses and
parameters over five steps with two batch shapes and gradient accumulation, dropout included
(the dropout seed is drawn on the device inside the graph, from the same generator); in FP8 also
eager's amax histories and scales (the warm-ups before a capture leave them alone, and the graphs
cast the updated weights every step rather than replay a cast made before the capture; under
delayed scaling the graphs captured once the states are primed run no amax pass, and the host's
count of the rolls, which decides that, follows the replays)."""

import pytest
import torch
from test_packed_batch import packed_from_padded

from bert_fast import BertConfig, BertForPreTraining
from bert_fast.ops import fp8
from bert_fast.optim import FusedLAMB
from bert_fast.train.cuda_graphs import GraphedStep
from helpers import padded_batch

pytestmark = pytest.mark.gpu


def model(dtype, fp8_scaling=None):
    torch.manual_seed(0)
    config = BertConfig.from_preset("mini", vocab_size=512, max_position_embeddings=128, backend="auto")
    built = BertForPreTraining(config)
    if fp8_scaling is not None:  # before the cast: the scaling state stays float32
        fp8.enable(built, fp8.Fp8Recipe(fp8_scaling))
    return built.to("cuda", dtype).train()


def batches(config):
    out = []
    for i in range(10):  # two shapes: 40 and 72 filler rows
        padded = padded_batch(config, [128, 70, 3, 99], 128, seed=i)
        packed = packed_from_padded(padded, filler=40 if i % 2 else 72, empty_slots=2)
        out.append({k: v.cuda() if torch.is_tensor(v) else v for k, v in packed.items()})
    return out


def _weight_amaxes(m) -> dict:
    """Each FP8 GEMM's weight amax now, and the one its delayed state recorded this step."""
    return {(i, name): (getattr(layer, name).weight.detach().abs().amax().float(), state.amax_now[1].clone())
            for i, layer in enumerate(m.bert.layers) for name, state in layer.fp8.items()}


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _spy_on_captured_casts(monkeypatch, m) -> dict[bool, set]:
    """The names of the FP8 cast kernels launched while a CUDA graph is being captured, by whether
    the model's states were primed then (kernels/fp8_cast.py's launches, through its `_launch`)."""
    from bert_fast.kernels import fp8_cast

    seen, launch, states = {False: set(), True: set()}, fp8_cast._launch, fp8.states_of(m)

    def spy(kernel, grid, traced=False):
        if torch.cuda.is_current_stream_capturing():
            fn = getattr(kernel, "fn", kernel)
            seen[all(s.primed for s in states)].add(fn.__name__)
        return launch(kernel, grid, traced)

    monkeypatch.setattr(fp8_cast, "_launch", spy)
    return seen


@pytest.mark.parametrize("dtype, fp8_scaling", [
    (torch.float32, None), (torch.bfloat16, None),
    pytest.param(torch.bfloat16, "delayed", marks=pytest.mark.skipif(not _fp8_gpu(), reason="needs FP8 GEMMs")),
    pytest.param(torch.bfloat16, "current", marks=pytest.mark.skipif(not _fp8_gpu(), reason="needs FP8 GEMMs"))],
    ids=["fp32", "bf16", "bf16-fp8-delayed", "bf16-fp8-current"])
def test_graphed_steps_equal_eager_steps(dtype, fp8_scaling, monkeypatch):
    eager, graphed = model(dtype, fp8_scaling), model(dtype, fp8_scaling)
    data = batches(eager.config)
    step = GraphedStep(graphed, warmup=2)
    captured = _spy_on_captured_casts(monkeypatch, graphed)
    optimizers = [FusedLAMB(m.parameters(), lr=1e-3) for m in (eager, graphed)]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    first = _weight_amaxes(graphed) if fp8_scaling == "delayed" else {}
    for i in range(5):
        losses = []
        for which, (m, opt) in enumerate(zip((eager, graphed), optimizers)):
            total = 0.0
            for micro in data[2 * i:2 * i + 2]:  # two micro batches accumulate per optimizer step
                torch.manual_seed(100 * i + len(micro["input_ids"]))
                if which == 0:
                    out = m(**micro, validate=False)
                    out.loss.backward()
                    total += out.loss.item()
                else:
                    total += step(micro)["loss"].item()
            if which == 1 and fp8_scaling == "delayed":  # the graphs cast today's weights, not stale ones
                for key, (now, recorded) in _weight_amaxes(m).items():
                    assert torch.equal(recorded, now), (i, key, recorded, now)
            opt.step()
            opt.zero_grad(set_to_none=False)
            losses.append(total)
        assert abs(losses[1] - losses[0]) <= tol * abs(losses[0]), (i, losses)
    for p, q in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(q.float(), p.float(), rtol=tol, atol=tol)
    for b, c in zip(eager.buffers(), graphed.buffers()):  # FP8: histories of as many rolls, alike
        torch.testing.assert_close(c.float(), b.float(), rtol=tol, atol=0)
    # Two shapes; under delayed scaling the first one again once the states are primed (its second
    # batch, the first step's second micro-batch, came primed already): no amax passes in it.
    assert len(step.graphs) == (3 if fp8_scaling == "delayed" else 2)
    if fp8_scaling == "delayed":
        assert all(s.primed for s in fp8.states_of(graphed)) and fp8.primed_after_roll(fp8.states_of(graphed))
        # What the graphs recorded: amax passes in the unprimed capture only.
        assert "_fp8_amax_kernel" in captured[False] and "_fp8_cast_kernel" in captured[True]
        assert "_fp8_amax_kernel" not in captured[True], captured[True]
    assert all(s._cached_weight is None for s in fp8.states_of(graphed))  # the warm-ups' casts freed
    if first:  # the check above could tell a stale cast: the weights' amaxes did move
        assert any(not torch.equal(first[k][0], now) for k, (now, _) in _weight_amaxes(graphed).items())
