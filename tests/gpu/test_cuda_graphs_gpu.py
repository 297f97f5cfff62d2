"""A training step replayed from CUDA graphs (bert_fast/train/cuda_graphs.py) gives eager's losses and
parameters over five steps with two batch shapes and gradient accumulation, dropout included
(the dropout seed is drawn on the device inside the graph, from the same generator)."""

import pytest
import torch
from test_packed_batch import packed_from_padded

from bert_fast import BertConfig, BertForPreTraining
from bert_fast.optim import FusedLAMB
from bert_fast.train.cuda_graphs import GraphedStep
from helpers import padded_batch

pytestmark = pytest.mark.gpu


def model(dtype):
    torch.manual_seed(0)
    config = BertConfig.from_preset("mini", vocab_size=512, max_position_embeddings=128, backend="auto")
    return BertForPreTraining(config).to("cuda", dtype).train()


def batches(config):
    out = []
    for i in range(10):  # two shapes: 40 and 72 filler rows
        padded = padded_batch(config, [128, 70, 3, 99], 128, seed=i)
        packed = packed_from_padded(padded, filler=40 if i % 2 else 72, empty_slots=2)
        out.append({k: v.cuda() if torch.is_tensor(v) else v for k, v in packed.items()})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_steps_equal_eager_steps(dtype):
    eager, graphed = model(dtype), model(dtype)
    data = batches(eager.config)
    step = GraphedStep(graphed, warmup=2)
    optimizers = [FusedLAMB(m.parameters(), lr=1e-3) for m in (eager, graphed)]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
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
            opt.step()
            opt.zero_grad(set_to_none=False)
            losses.append(total)
        assert abs(losses[1] - losses[0]) <= tol * abs(losses[0]), (i, losses)
    for p, q in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(q.float(), p.float(), rtol=tol, atol=tol)
    assert len(step.graphs) == 2
