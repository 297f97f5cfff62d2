"""`train.compile` and `train.cuda_graphs`: the model's step through torch.compile.

The loader's packed static batches come in at most `data.buckets` shapes (bert_fast/data/
packing.py) and the step reads nothing back from the device, so the model compiles with
`fullgraph=True, dynamic=False`: one graph per batch shape (and per train/eval mode), no break.
Only the module's `forward` is compiled (replaced on the instance): its parameter names and
checkpoints stay as they are, and DeepSpeed's module hooks (timers, ZeRO) run outside the graph.

`train.cuda_graphs` compiles with mode "reduce-overhead": Inductor records each shape's forward
and backward in a CUDA graph (CUDA graph trees) and replays it, the whole step one launch, as
NVIDIA's MLPerf BERT runs its graphed step. DeepSpeed's hooks and the optimizer run eagerly
around the graphs, so gradient reduction must not happen inside the backward: ZeRO 2 and 3
(which reduce and partition gradients during it) are refused, as are the CPU and fp16's loss
scaler (the scaler reads the loss). precision.fp8 graphs: its casts and scaling-state updates are
device ops on module buffers, and the amax all-reduce runs eagerly after each backward, outside the
graphs (bert_fast/ops/fp8.py, tests/test_fp8_graphs.py). Under delayed scaling the casts drop their
amax pass once the states are primed (bert_fast/ops/fp8_state.py), which the host decides and a
graph records: the training forwards run eagerly until then (the first two), and the model
compiles primed. bert_fast/train/cuda_graphs.py captures the eager model directly; bench/e2e.py
compares the two.
"""

from __future__ import annotations

import functools
import os

import torch

from bert_fast.ops import fp8
from bert_fast.train.config import model_config
from bert_fast.train.recipe import Recipe

__all__ = ["check_compile", "compile_model", "eager_until_primed"]


def check_compile(recipe: Recipe, device: torch.device) -> None:
    """Refuses, naming the key, what cannot be compiled or graphed in this run."""
    t = recipe.train
    if not (t.compile or t.cuda_graphs):
        return
    key = "train.cuda_graphs" if t.cuda_graphs else "train.compile"
    stage = recipe.zero.stage
    if stage == 3:
        raise ValueError(f"{key}: zero.stage=3 gathers parameters in module hooks, which break the "
                         "graph; use zero.stage <= 2 or set it false")
    if model_config(recipe).backend == "fast" and os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError(f"{key}: the Triton interpreter (TRITON_INTERPRET=1) cannot be compiled; "
                         "compile the fast backend on a GPU, or set it false")
    if t.cuda_graphs:
        if device.type != "cuda":
            raise ValueError(f"train.cuda_graphs needs a CUDA device; this run is on {device.type} "
                             "(set train.cuda_graphs=false)")
        if stage == 2:
            raise ValueError("train.cuda_graphs: zero.stage=2 reduces gradients inside the backward, "
                             "which a CUDA graph cannot hold; use zero.stage 0 or 1")
        if recipe.precision.fp16:
            raise ValueError("train.cuda_graphs: precision.fp16's loss scaler reads the loss every "
                             "step; use precision.bf16")


def _allow_recompiles(count: int) -> None:
    """Dynamo gives up on a function after a few recompiles (8 by default): raise the limit to
    the shapes a run has (training and evaluation buckets, in train and eval mode)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), count))


def compile_model(module: torch.nn.Module, recipe: Recipe) -> None:
    """Compiles `module` in place as `train.compile` / `train.cuda_graphs` ask (check_compile first)."""
    t = recipe.train
    if not (t.compile or t.cuda_graphs):
        return
    _allow_recompiles(4 * recipe.data.buckets + 4)
    compiled = torch.compile(module.forward, fullgraph=True, dynamic=False,
                             mode="reduce-overhead" if t.cuda_graphs else None)
    module.forward = eager_until_primed(module.forward, compiled, fp8.states_of(module))


def eager_until_primed(eager, compiled, states: list):
    """`compiled`, but `eager` while a delayed FP8 state is not primed: a graph traced then would
    keep every cast's amax pass for good (the host decides it, and a compiled forward never counts
    its rolls), and one traced on the next forward would be traced again once primed. Without
    delayed FP8 states, `compiled` itself."""
    delayed = [s for s in states if s.delayed]
    if not delayed:
        return compiled

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        return compiled(*args, **kwargs) if all(s.primed for s in delayed) else eager(*args, **kwargs)

    return forward
