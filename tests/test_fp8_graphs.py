"""precision.fp8 can be captured in a CUDA graph (train.cuda_graphs, bert_fast/train/cuda_graphs.py):
what a graph forbids is checked here, where no GPU is, and tests/gpu/test_cuda_graphs_gpu.py and
test_train_compiled_gpu.py replay FP8 steps against eager ones on a device.

- A captured region may not read the device back nor copy host data in (a tensor made from Python
  numbers is a pageable host-to-device copy, which capture refuses): the eager FP8 step does neither.
- Inductor's CUDA graph trees record a compiled step only if every input it mutates has a static
  address: the compiled FP8 step mutates only module buffers, which Dynamo marks static.
- The model's forward holds no collective on several ranks: the training loop max-reduces the
  amaxes eagerly after each backward (bert_fast/ops/fp8_state.py `reduce_amaxes`), outside the graphs.
- A captured forward casts the weights itself: a graph that read a cast made before the capture
  would replay that stale cast after every optimizer step.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_compile import batch
from test_fp8_compile import _fp8_tiny
from torch.utils._python_dispatch import TorchDispatchMode

from bert_fast.ops import fp8, fp8_ffn, fp8_state

# Device reads, and tensors made from host data (torch.tensor(...): aten.lift_fresh, then on CUDA a
# host-to-device copy).
FORBIDDEN = ("_local_scalar_dense", "nonzero", "item", "is_nonzero", "equal", "lift_fresh", "lift_fresh_copy")


class _Forbidden(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        moves = name in ("_to_copy", "to") and "device" in kwargs  # a copy between devices
        if name in FORBIDDEN or moves:
            self.seen.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_the_eager_step_reads_nothing_back_and_copies_no_host_data_in(scaling):
    """Training steps of the model (delayed: two, the second scaling from a history)."""
    model = _fp8_tiny(scaling)
    for step in range(2 if scaling == "delayed" else 1):
        inputs = batch(filler=5, seed=step)  # built on the host, as the loader does
        with _Forbidden() as watch:
            model(**inputs, validate=False).loss.backward()
        assert watch.seen == [], sorted(set(watch.seen))
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
                p.grad = None
    if scaling == "delayed":  # the steps did roll the state the graph would replay
        assert (model.bert.layers[0].fp8["qkv"].amax_history[:, 0] > 0).all()


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_the_fused_casts_read_nothing_back_and_copy_no_host_data_in(monkeypatch, scaling):
    """The CUDA path of one FP8 linear and of the FFN's fused pair (ops/fp8_ffn.py), forward and
    backward (kernels/fp8_cast.py under the Triton interpreter, with the padding CUDA's _scaled_mm
    needs), twice with a roll between: what the model's step runs per GEMM on a GPU."""
    monkeypatch.setattr(fp8_state, "_use_kernels", lambda device: True)
    monkeypatch.setattr(fp8, "_pads", lambda device: True)
    states = [fp8.Fp8State(fp8.Fp8Recipe(scaling)) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    # None a multiple of 16.
    x, w, b, w2 = (torch.randn(*shape, generator=g) for shape in ((40, 24), (56, 24), (56,), (24, 56)))
    for _ in range(2):
        xs, ws, bs, w2s = (t.clone().requires_grad_() for t in (x, w, b, w2))
        with _Forbidden() as watch:
            if scaling == "delayed":
                fp8.roll(states)
            fp8.fp8_linear(xs, ws, states[0]).sum().backward()
            inner = fp8_ffn.fp8_linear_gelu(xs, ws, bs, *states)
            fp8.fp8_linear(inner.anchor, w2s, states[1], given=inner.cast).sum().backward()
        assert watch.seen == [], sorted(set(watch.seen))
        assert all(t.grad is not None for t in (xs, ws, bs, w2s))


def _compile_on_two_fake_ranks(model):
    """The delayed FP8 step compiled (fullgraph, graphs run as captured) while torch.distributed
    runs two ranks (a fake process group: collectives do nothing); returns the graphs' code."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch.testing._internal.distributed.fake_pg import FakeStore

    codes = []

    def keep(gm, example_inputs):
        codes.append(gm.code)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep, partition_fn=min_cut_rematerialization_partition,
                           keep_inference_input_mutations=True)
    torch._dynamo.reset()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        # as bert_fast/train/compiled.py compiles: the module's forward, bound
        step = torch.compile(model.forward, fullgraph=True, dynamic=False, backend=backend)
        for i in range(2):
            step(**batch(filler=5, seed=i), validate=False).loss.backward()
            fp8.reduce_amaxes(fp8.states_of(model))  # as the loop does, eagerly
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
    return codes


def test_the_compiled_step_mutates_only_static_buffers_and_holds_no_collective():
    model = _fp8_tiny("delayed")
    inputs = batch(filler=5)
    versions = {k: v._version for k, v in inputs.items() if torch.is_tensor(v)}
    states = fp8.states_of(model)
    before = {id(s): s.amax_history.clone() for s in states}
    codes = _compile_on_two_fake_ranks(model)
    assert len(codes) == 2  # one forward, one backward graph
    for code in codes:
        assert not any(word in code for word in ("c10d", "all_reduce", "_local_scalar_dense")), code
    from torch._dynamo.utils import get_static_address_type

    for s in states:  # the buffers the graphs mutate, mutated indeed, all marked static
        assert not torch.equal(s.amax_history, before[id(s)])
        assert all(get_static_address_type(b) is not None for b in s.buffers())
    # Nothing else is written: the batch the graph reads is left as it was.
    assert all(inputs[k]._version == v for k, v in versions.items())


def test_a_captured_forward_casts_every_weight_itself(monkeypatch):
    """Outside a capture the second micro-batch of an optimizer step reuses the weight casts;
    inside one every forward casts all of them, the weights' amaxes recorded either way."""
    model = _fp8_tiny("delayed")
    weights = {id(layer.weight) for layer in model.modules() if getattr(layer, "weight", None) is not None}
    calls = []
    real_cast = fp8.cast

    def counting_cast(t, *args, **kwargs):
        calls.append(id(t) in weights)
        return real_cast(t, *args, **kwargs)

    monkeypatch.setattr(fp8, "cast", counting_cast)
    gemms = 4 * model.config.num_hidden_layers
    for capturing, expected in ((False, [gemms, 0]), (True, [gemms, gemms])):
        monkeypatch.setattr(fp8, "_capturing", lambda t, now=capturing: now)
        fp8.weights_changed()  # a new optimizer step
        counts = []
        for micro in range(2):
            calls.clear()
            model(**batch(filler=5, seed=micro), validate=False).loss.backward()
            counts.append(sum(calls))
        assert counts == expected, (capturing, counts)
        state = model.bert.layers[0].fp8["qkv"]
        assert state.amax_now[1] == model.bert.layers[0].qkv.weight.detach().abs().amax()


def test_forgetting_the_weight_casts_frees_every_state_s_cast():
    """What GraphedStep calls after its warm-ups: their casts would otherwise stay held (about
    0.6 GB for BERT-large) while the graphs make their own."""
    model = _fp8_tiny("delayed")
    fp8.weights_changed()
    model(**batch(filler=5), validate=False).loss.backward()
    states = fp8.states_of(model)
    assert all(s._cached_weight is not None for s in states)
    fp8.forget_weight_casts(model)
    assert all(s._cached_weight is None for s in states)
