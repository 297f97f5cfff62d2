"""The training step's forward and backward captured in CUDA graphs, one per batch shape.

On packed static batches (bert_fast/data/packing.py) a step has no host sync and a handful of
shapes, so after a few eager warm-up steps its whole forward and backward can be recorded once
per shape and then replayed as one launch: no Python, no per-kernel launch cost, as NVIDIA's
MLPerf BERT runs its graphed step. Gradients accumulate into the parameters' `.grad` in place (a
graph writes into the tensors it was captured with), so the caller zeroes them in place between
optimizer steps (`zero_grad(set_to_none=False)`), and a step's outputs are the graph's static
tensors, overwritten by the next replay.

What a graph cannot hold: host work inside the step (DeepSpeed ZeRO's gradient-reduction hooks,
a loss scaler that reads the loss), tensors that change address, and the CPU. The training loop
therefore graphs only where none of those apply (one rank, no ZeRO partitioning, bf16 or
fp32) and refuses otherwise with the reason. precision.fp8 graphs too: its casts and scaling-state
updates are device ops on module buffers, and a captured forward casts the weights itself rather
than reuse a cast made outside the graph (bert_fast/ops/fp8.py). Under delayed scaling the casts
drop their amax pass once the states are primed (the second training forward on,
bert_fast/ops/fp8_state.py): the host decides that, so a graph records one decision, and a shape's
first step after priming captures that shape again (the graph of the unprimed steps is never
replayed after). A replay rolls the states on the device only: the host counts it.

The warm-up steps before a capture are not training steps: they leave the parameters' gradients,
the dropout generator and the module's buffers (FP8 amax histories and scales) as they found them.
On several ranks, delayed FP8 scaling needs `fp8.reduce_amaxes` after each step, as the training
loop calls it (bert_fast/ops/fp8.py).
"""

from __future__ import annotations

import torch

from bert_fast.ops import fp8

PACKED_TENSORS = ("input_ids", "token_type_ids", "cu_seqlens", "mlm_positions", "mlm_labels",
                  "next_sentence_label")
OUTPUTS = ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "mlm_predictions")


class GraphedStep:
    """`step(batch)` runs `model(**batch, validate=False)` and its loss's backward for a packed
    batch (its tensors on the model's CUDA device), from a CUDA graph of that batch shape: the
    first batch of each shape runs `warmup` eager steps on a side stream, is captured and then
    replayed; later ones copy their tensors into the graph's inputs and replay. Returns the
    outputs (OUTPUTS present in the model's output) as static tensors."""

    def __init__(self, model: torch.nn.Module, warmup: int = 3):
        params = list(model.parameters())
        if not params or params[0].device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need the model on a CUDA device; this run has "
                               f"{params[0].device if params else 'no parameters'} "
                               "(set train.cuda_graphs: false)")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (capture follows eager steps), got {warmup!r}")
        self.model, self.warmup, self.params = model, warmup, [p for p in params if p.requires_grad]
        self.fp8_states = fp8.states_of(model)
        self.graphs: dict[tuple, tuple] = {}
        self.pool = torch.cuda.graph_pool_handle()  # graphs replay one at a time: one memory pool

    def __call__(self, batch: dict) -> dict:
        key = (batch["max_seqlen"], *(tuple(batch[k].shape) for k in PACKED_TENSORS if k in batch),
               fp8.primed_after_roll(self.fp8_states))
        if key not in self.graphs:
            self.graphs[key] = self._capture(batch)  # its host code counted the step's roll
        elif self.graphs[key][3]:
            fp8.count_rolls(self.fp8_states)
        graph, inputs, outputs, _ = self.graphs[key]
        for name, tensor in inputs.items():
            tensor.copy_(batch[name], non_blocking=True)
        graph.replay()
        return outputs

    def _run(self, inputs: dict, max_seqlen: int) -> dict:
        out = self.model(**inputs, max_seqlen=max_seqlen, validate=False)
        out.loss.backward()
        return {k: out[k].detach() for k in OUTPUTS if out.get(k) is not None}

    def _capture(self, batch: dict) -> tuple:
        inputs = {k: batch[k].clone() for k in PACKED_TENSORS if k in batch}
        for p in self.params:  # a graph accumulates into .grad in place: it must exist first
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        kept = [p.grad.clone() for p in self.params]  # what the caller accumulated so far
        buffers = [(b, b.clone()) for b in self.model.buffers()]  # FP8 scaling state: warm-ups roll it
        counts = fp8.host_rolls(self.fp8_states)
        rng = torch.cuda.get_rng_state()  # the warm-up's dropout draws must not shift this step's
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: allocator, autotuning, lazy init out of the graph
            for _ in range(self.warmup):
                self._run(inputs, batch["max_seqlen"])
        torch.cuda.current_stream().wait_stream(side)
        fp8.forget_weight_casts(self.model)  # the warm-ups' casts: the graphs make their own
        fp8.set_host_rolls(self.fp8_states, counts)  # the capture decides as the step it records
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self._run(inputs, batch["max_seqlen"])
        rolled = fp8.host_rolls(self.fp8_states) != counts  # the capture rolled: so does each replay
        with torch.no_grad():  # undo the warm-up's gradients and buffer updates; capturing ran nothing
            for p, g in zip(self.params, kept):
                p.grad.copy_(g)
            for b, saved in buffers:
                b.copy_(saved)
        torch.cuda.set_rng_state(rng)
        return graph, inputs, outputs, rolled
