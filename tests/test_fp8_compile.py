"""precision.fp8 under torch.compile(fullgraph=True): the FP8 step traces into one forward and one
backward graph with no device read (the eager casts on the CPU; the fused cast kernels, traced with
fake tensors, as CUDA runs them), `pretrain.py` with train.compile logs the eager run's losses
(BERT_FAST_FP8_EMULATE=1). That an eager FP8 step reads nothing back: tests/test_fp8_graphs.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import early
import pytest
import torch
from test_compile import batch, tiny
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition

from bert_fast.ops import fp8
from helpers import gradient_errors, trace_with_fake_tensors

ROOT = Path(__file__).resolve().parents[1]
IN_GRAPHS = ("aten._local_scalar_dense", "aten.nonzero", "aten.item")


def _fp8_tiny(scaling: str):
    model = tiny("torch")
    fp8.enable(model, fp8.Fp8Recipe(scaling))
    return model


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_the_step_is_one_graph_each_way_and_reads_nothing_back(scaling):
    """fullgraph=True fails on any graph break; the graphs' code holds no device read. The graphs
    run as captured (no Inductor code generation), two steps, and give eager's gradients and keep
    the scaling state as eager does (to float32 rounding: AOTAutograd decomposes ops, whose results
    may differ in a last bit). torch 2.11 once gave zero gradients through every FP8 GEMM here
    while the rest of the step looked right (bert_fast/ops/fp8.py `scaled_mm`)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    eager, model = _fp8_tiny(scaling), _fp8_tiny(scaling)
    # Inductor's partitioner (the default one cannot place the backward's amax record: a mutation
    # of a forward input), with the graphs run as captured.
    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep, partition_fn=min_cut_rematerialization_partition,
                           keep_inference_input_mutations=True)
    step = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
    for i in range(2):
        for run in (eager, step):
            run(**batch(filler=5, seed=i), validate=False).loss.backward()
    assert len(graphs) == 2  # one forward, one backward: the same graphs serve the second step
    assert not any(name in code for code in graphs for name in IN_GRAPHS)
    # A last-bit difference in a scale may move an FP8 rounding: close, not equal.
    errors = gradient_errors(eager, model)
    assert max(errors.values()) < 1e-3, errors
    states = (eager.state_dict(), model.state_dict())
    for key in (k for k in states[0] if fp8.is_state_key(k)):
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-6, atol=0)


def test_train_compile_runs_eagerly_until_the_delayed_states_are_primed():
    """bert_fast/train/compiled.py: a graph traced before the states are primed would keep every
    cast's amax pass (a compiled forward never counts its rolls), so the first two training
    forwards, and evaluations before them, run eagerly; from the third on the compiled forward runs.
    Without delayed states the compiled forward is used from the start."""
    from bert_fast.train.compiled import eager_until_primed

    model = _fp8_tiny("delayed").train()
    calls = []

    def compiled(*args, **kwargs):
        calls.append("compiled")
        return model.__class__.forward(model, *args, **kwargs)

    forward = eager_until_primed(model.forward, compiled, fp8.states_of(model))
    data = batch(filler=5)
    with torch.no_grad():
        forward(**data, validate=False)  # a training-mode forward without gradients does not roll
    for step in range(3):
        forward(**data, validate=False).loss.backward()
        assert calls == ["compiled"] * (step == 2), step
    assert all(s.primed for s in fp8.states_of(model))
    plain = _fp8_tiny("current")
    assert eager_until_primed(plain.forward, compiled, fp8.states_of(plain)) is compiled


_TRACE = """
import re, torch
from bert_fast.ops import fp8, fp8_state
fp8_state._use_kernels = lambda device: True  # the CUDA casts; fake tensors only: no kernel runs
fp8._pads = lambda device: True
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from test_compile import tiny, traced_graphs

model = tiny("torch")
fp8.enable(model, fp8.Fp8Recipe({scaling!r}))
fp8.set_host_rolls(fp8.states_of(model), [5] * len(fp8.states_of(model)))  # primed, as after eager steps
graphs = traced_graphs(model, min_cut_rematerialization_partition, keep_inference_input_mutations=True)
for name, code in graphs.items():
    kernels = [kernel_side_table.get_kernel(int(i)).fn.__name__ for i in re.findall(r"kernel_idx = (\\d+)", code)]
    syncs = sum(code.count(s) for s in {syncs!r})
    print(name, syncs, *kernels)
"""


SCALINGS = ("current", "delayed")


@early.job
def traces(folder, threads) -> dict[str, str]:
    """Each scaling's trace output: an early job (tests/early.py), one after the other there, at once
    in this module's turn (each process mostly on one core)."""
    outputs = early.each(threads, *(lambda s=s: trace_with_fake_tensors(_TRACE.format(scaling=s, syncs=IN_GRAPHS))
                                    for s in SCALINGS))
    return dict(zip(SCALINGS, outputs))


@pytest.mark.parametrize("scaling", SCALINGS)
def test_the_fused_casts_trace_into_the_graphs(scaling, traces):
    """As on CUDA: per layer the forward casts x and W (2 GEMMs' worth of launches each), the
    backward dY, all through the bert_fast::fp8_cast triton_op (which mutates amax_now); under
    delayed scaling the forward first rolls each GEMM's state (bert_fast::fp8_roll), and the states
    are primed on the host (as bert_fast/train/compiled.py compiles them): its casts run no amax
    pass; no read."""
    out = traces[scaling]
    graphs = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in (["forward"],
                                                                                                  ["backward"])}
    gemms = 4 * tiny("torch").config.num_hidden_layers
    # Delayed scaling's finish: in the cast's last program.
    per_cast = ["_fp8_cast_kernel"] if scaling == "delayed" else ["_fp8_amax_kernel", "_fp8_cast_kernel"]
    rolls = gemms if scaling == "delayed" else 0
    for name, casts, rolled in (("forward", 2 * gemms, rolls), ("backward", gemms, 0)):
        syncs, *kernels = graphs[name]
        assert syncs == "0"
        assert sorted(kernels) == sorted(per_cast * casts + ["_fp8_roll_kernel"] * rolled), (name, kernels)


def _pretrain(out: Path, compiled: bool) -> list[tuple[float, float]]:
    # Synthetic batches pack to one shape: one compile each way. The corpus's 3 steps give three
    # packed shapes, each a compile of its own (over a minute more on a fresh machine); the
    # recompile per shape is checked against eager by test_train_static's compiled run.
    env = {**early.environ(), fp8.EMULATE_ENV: "1", "OMP_NUM_THREADS": "1"}
    done = early.run(
        [sys.executable, "pretrain.py", "--config", "configs/tiny-cpu.yaml", f"train.output_dir={out}",
         "data.source=synthetic",
         "train.steps=3", "log.every=1", "eval.every=0", "checkpoint.every=0", "data.workers=0",
         "model.backend=torch", "data.seq_length=32", "train.micro_batch=8", "train.global_batch=16",
         "model.hidden_dropout_prob=0", "model.attention_probs_dropout_prob=0", "precision.fp8=true",
         "precision.fp8_scaling=delayed", f"train.compile={str(compiled).lower()}"],
        cwd=ROOT, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in records if r["kind"] == "train"]


@early.job
def fp8_eager_and_compiled_records(root, threads) -> tuple[list, list]:
    """The (loss, gradient norm) of each train record of _pretrain eager and compiled: an early job
    (tests/early.py), one after the other there, at once in this module's turn (Inductor compiles
    for over a minute on a fresh machine)."""
    return tuple(early.each(threads, *(lambda c=c: _pretrain(root / str(c), c) for c in (False, True))))


@pytest.mark.slow
def test_compiled_fp8_training_logs_the_eager_losses_and_gradient_norms(fp8_eager_and_compiled_records):
    """Three steps of two micro-batches (DeepSpeed, float32, delayed scaling, emulated FP8 GEMMs),
    compiled by Inductor and eager. Inductor reorders float32 reductions (LayerNorm, softmax, the
    amax), so a value may differ in its last bit and, rarely, cross an FP8 rounding boundary: that
    element moves by one FP8 step and the loss by far less than 1e-4 of itself, the gradient norm
    by far less than 1e-3. The tolerances are those; measured, the runs agreed to 1.6e-6 (losses)
    and 5.7e-5 (gradient norms). Three warm-up steps barely move the loss, so the gradient norm is
    what shows a wrong gradient: when torch 2.11 zeroed every FP8 GEMM's, the losses still agreed
    to 6e-5 and the gradient norms differed by 4.9e-3."""
    eager, compiled = (torch.tensor(records) for records in fp8_eager_and_compiled_records)
    assert compiled.shape == (3, 2)
    torch.testing.assert_close(compiled[:, 0], eager[:, 0], rtol=1e-4, atol=0)
    torch.testing.assert_close(compiled[:, 1], eager[:, 1], rtol=1e-3, atol=0)
