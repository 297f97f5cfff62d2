"""What one encoder layer adds to a training step of the fast backend, in launches as CUDA runs it
(Triton kernels, and aten ops that run a kernel: not views, not allocations), counted under the
interpreter as the difference between a 2-layer and a 1-layer model: in float16 (the interpreter
lacks some of bf16; the launches are the same), and with FP8 under both scalings (the fused casts, `_scaled_mm`, dimensions padded to 16). A graph captured from the eager
step replays each launch one by one, and the eager step pays the host's launch cost for each, so
a new launch per layer (x 24 in BERT-large) should be a decision, not an accident: these counts
change only with the code that launches. Delayed scaling's roll once cost 17 launches per GEMM
state (68 per layer); kernels/fp8_roll.py makes it one. Delayed scaling is counted as every step
but the first runs it: primed (bert_fast/ops/fp8_state.py), its casts run no amax pass."""

from __future__ import annotations

import collections
from pathlib import Path

import early
import pytest
import torch
from test_compile import batch

from bert_fast import BertConfig, BertForPreTraining
from bert_fast.ops import fp8, fp8_state
from helpers import KernelCensus

TESTS = Path(__file__).resolve().parent

# Per encoder layer: launches by name (aten op or Triton kernel), forward + backward of one step.
# All: the attention (forward, the backward's preprocess and kernel), two add + LayerNorm (with
# their backwards' finalize), autograd's two sums of gradients meeting at a residual (add), the
# FFN bias gradient's cast to the bias dtype; fp16: the four GEMMs (the QKV bias in the first as
# addmm), their eight gradient GEMMs, the QKV bias gradient (sum) and bias + GELU with its backward
# (and its bias gradient's sum); FP8: per GEMM the operands' casts (x, W, dY: amax pass + cast
# pass) and three `_scaled_mm` (the QKV bias in its epilogue), the QKV bias gradient and the sum
# of the FFN bias gradient's row-block partials; delayed: each state's roll, and one cast pass per
# operand (the state is primed: no amax pass; the first step runs the 12 of current scaling). The
# attention's lse gets no zero-filled gradient (set_materialize_grads).
ATTENTION_AND_NORMS = {"_attn_fwd_kernel": 1, "_attn_bwd_preprocess_kernel": 1, "_attn_bwd_kernel": 1,
                       "_add_layer_norm_fwd_kernel": 2, "_add_layer_norm_bwd_kernel": 2, "_finalize_kernel": 2}
PER_LAYER = {
    "fp16": {**ATTENTION_AND_NORMS, "addmm": 1, "mm": 11, "sum": 2, "add": 2, "bias_gelu": 1,
             "bias_gelu_backward": 1, "_to_copy": 1},
    "current": {**ATTENTION_AND_NORMS, "_fp8_amax_kernel": 12, "_fp8_cast_kernel": 12, "_scaled_mm": 12,
                "sum": 2, "add": 2, "_to_copy": 1},
    "delayed": {**ATTENTION_AND_NORMS, "_fp8_cast_kernel": 12, "_scaled_mm": 12, "sum": 2, "add": 2,
                "_to_copy": 1, "_fp8_roll_kernel": 4},
}


def _step_launches(layers: int, precision: str) -> collections.Counter:
    """Launches of a training step after an optimizer step's worth of weight change (the weights
    are cast again, as every step does); under delayed scaling the second step (the first is
    the only one whose casts run amax passes)."""
    torch.manual_seed(0)
    config = BertConfig.from_preset("tiny", vocab_size=97, max_position_embeddings=32, backend="fast",
                                    num_hidden_layers=layers)
    model = BertForPreTraining(config).train()
    if precision != "fp16":
        fp8.enable(model, fp8.Fp8Recipe(precision))
    model = model.half()
    data = batch(filler=5)
    if precision == "delayed":
        model(**data, validate=False).loss.backward()
        model.zero_grad(set_to_none=True)  # the counted step's gradients are new, not accumulated
    fp8.weights_changed()
    with KernelCensus() as census:
        model(**data, validate=False).loss.backward()
    return census.aten + census.triton


def per_layer(precision: str) -> dict[str, int]:
    """What a second encoder layer adds, in a fresh interpreter (the job below): the FP8 casts'
    kernels and `_scaled_mm`, as CUDA runs them, set for the whole process."""
    fp8_state._use_kernels = lambda device: True
    fp8._pads = lambda device: True
    fp8.emulated = lambda device: False
    one, two = _step_launches(1, precision), _step_launches(2, precision)
    two.subtract(one)
    return {name: count for name, count in two.items() if count}


@early.job
def layer_launches(folder, threads) -> dict[str, dict[str, int]]:
    """`per_layer` of each precision (six interpreted steps, ~35 s): an early job (tests/early.py)."""
    runs = (lambda p=p: early.report("test_step_launches", "per_layer", p, path=TESTS) for p in PER_LAYER)
    return dict(zip(PER_LAYER, early.each(threads, *runs)))


@pytest.mark.parametrize("precision", list(PER_LAYER))
def test_an_encoder_layer_adds_these_launches_to_a_step(precision, layer_launches):
    assert layer_launches[precision] == PER_LAYER[precision]
