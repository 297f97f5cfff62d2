"""torch.compile of the training step on packed batches: the torch backend compiled by Inductor
matches eager over three steps, one compile per batch shape; the fast backend's forward and
backward trace into one graph each (fullgraph: no break) with every Triton kernel inside."""

import sys
from pathlib import Path

import early
import pytest
import torch
from test_packed_batch import packed_from_padded

from bert_fast import BertConfig, BertForPreTraining
from helpers import padded_batch, trace_with_fake_tensors


def tiny(backend: str, dropout: float = 0.0) -> BertForPreTraining:
    torch.manual_seed(0)
    config = BertConfig.from_preset("tiny", vocab_size=97, max_position_embeddings=32, backend=backend,
                                    hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForPreTraining(config).train()


def batch(filler: int, seed: int = 4) -> dict:
    return packed_from_padded(padded_batch(tiny("torch").config, [16, 7, 11, 1], 16, seed=seed),
                              filler=filler, empty_slots=1)


def traced_graphs(model, partitioner, **aot_options) -> dict[str, str]:
    """The code of the forward and backward graphs AOTAutograd's `partitioner` cuts from
    torch.compile(model, fullgraph=True) on one packed batch, captured without compiling them
    (for the fake-tensor trace scripts, which run with the Triton interpreter off)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    class Captured(Exception):
        pass

    def partition(joint, inputs, **kw):
        graphs["forward"], graphs["backward"] = (g.code for g in partitioner(joint, inputs, **kw))
        raise Captured()

    step = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=lambda gm, ex: gm,
                                                                     partition_fn=partition, **aot_options))
    try:
        step(**batch(filler=40), validate=False)
    except Exception as err:
        while err is not None and not isinstance(err, Captured):
            err = err.__cause__ or err.__context__
        if err is None:
            raise
    return graphs


_WARM_UP = """
import torch
torch.manual_seed(0)
import test_compile
test_compile.test_inductor_matches_eager_over_three_steps(None)
"""


@early.job
def inductor_cache(folder, threads):
    """The test below run once in a subprocess started with the session (tests/early.py), on the
    same number of threads as this process: Inductor's C++ compiles of its graphs (~50 s of one
    core on a fresh machine) land in Inductor's on-disk cache, where the test's own compile finds
    them (~10 s). The test then runs as it always did, and the subprocess's run must pass too.
    In the module's own turn there is nothing to run beside: nothing is done."""
    if threads == 0:
        return None
    done = early.run([sys.executable, "-c", _WARM_UP], cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.mark.slow
def test_inductor_matches_eager_over_three_steps(inductor_cache):
    eager, compiled = tiny("torch"), tiny("torch")
    step = torch.compile(compiled, fullgraph=True)
    for i in range(3):
        losses = []
        for model, run in ((eager, eager), (compiled, step)):
            out = run(**batch(filler=5, seed=i), validate=False)
            out.loss.backward()
            losses.append(out.loss.detach())
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
                    p.grad = None
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5, msg=f"step {i}")
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5)


def test_one_compile_per_batch_shape():
    graphs = []

    def count(gm, example_inputs):
        graphs.append(tuple(t.shape[0] for t in example_inputs if torch.is_tensor(t) and t.dim() == 1))
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(tiny("torch"), fullgraph=True, dynamic=False, backend=count)
    for filler in (5, 13, 5, 13, 5):  # two row counts, as two buckets give
        step(**batch(filler), validate=False).loss.backward()
    assert len(graphs) == 2, graphs


_TRACE = """
import re, sys, torch
import bert_fast.ops as ops
ops.triton_runs_on = lambda device: True  # fake tensors only: no kernel runs
from torch._functorch.partitioners import default_partition
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from test_compile import tiny, traced_graphs

for name, code in traced_graphs(tiny("fast", dropout=0.1), default_partition).items():
    kernels = {kernel_side_table.get_kernel(int(i)).fn.__name__ for i in re.findall(r"kernel_idx = (\\d+)", code)}
    print(name, *sorted(kernels), *sorted(set(re.findall(r"torch\\.ops\\.bert_fast\\.\\w+", code))))
"""


@early.job
def fast_step_fake_trace(folder, threads):
    """trace_with_fake_tensors(_TRACE) (a fresh process, the interpreter off): an early job (tests/early.py)."""
    return trace_with_fake_tensors(_TRACE)


def test_the_fast_step_traces_into_one_forward_and_one_backward_graph(fast_step_fake_trace):
    printed = {line.split()[0]: set(line.split()[1:])
               for line in fast_step_fake_trace.splitlines() if line.split()[:1] in (["forward"], ["backward"])}
    assert printed["forward"] >= {"_embeddings_fwd_kernel", "_attn_fwd_kernel", "_add_layer_norm_fwd_kernel",
                                  "_mlm_stats_kernel", "_mlm_grad_kernel", "torch.ops.bert_fast.bias_gelu"}
    assert printed["backward"] >= {"_embeddings_bwd_kernel", "_attn_bwd_kernel", "_add_layer_norm_bwd_kernel",
                                   "_finalize_kernel", "_segment_block_kernel", "_mlm_scale_grads_kernel",
                                   "torch.ops.bert_fast.bias_gelu_backward"}
