"""Fused MLM loss (kernels/mlm_loss.py) under the Triton interpreter: loss, log-sum-exp, accuracy
count and all three gradients against float64, beside eager PyTorch in the same dtype; argmax ties;
ignored rows; validation; no [N, vocab] allocation; every kernel config compiles for sm_90."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bert_fast import ops
from bert_fast.kernels import aot
from bert_fast.kernels import mlm_loss as mlm
from bert_fast.kernels.mlm_loss import mlm_loss, mlm_loss_reference

# Allowed error beyond 2x eager's, per unit of the reference's largest magnitude (gradients
# carry 1/N, so an absolute tolerance would hide them).
TOL = {torch.float32: 1e-5, torch.float16: 1e-3}
# Rows whose float64 top-2 logits are closer than this may legitimately flip their argmax.
TIE_GAP = {torch.float32: 1e-4, torch.float16: 5e-2}


def make_inputs(n, h, v, dtype, ignored=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (2 / h**0.5)  # logits of std ~2, as a trained head
    bias = torch.randn(v, generator=g) * 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    # Every other row is labelled with its argmax so that the accuracy count is not trivially 0.
    labels[::2] = torch.addmm(bias.double(), hidden.double(), weight.double().T).argmax(-1)[::2]
    labels[list(ignored)] = -100
    leaves = [t.to(dtype).requires_grad_() for t in (hidden, weight, bias)]
    return leaves, labels


def run(fn, leaves, labels, grad_scale, **kwargs):
    """(loss, correct, lse, grad_hidden, grad_weight, grad_bias) for fresh copies of the leaves."""
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    loss, correct, lse = fn(*copies, labels, **kwargs)
    (loss * grad_scale).backward()
    return (loss, correct, lse, *(t.grad for t in copies))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, h, v, chunk_rows, ignored", [
    (1, 16, 30522, None, ()),
    (6, 8, 30522, 4, (3,)),  # BERT's vocab, two chunks, one ignored row
    (3, 8, 50265, 2, ()),  # RoBERTa's vocab
    (13, 24, 1000, 5, (0, 12)),
    (5, 16, 257, None, ()),
    (9, 12, 8192, 4, (4,)),  # a multiple of BLOCK_V: the unmasked path
    (4, 8, 1, 3, ()),  # a single class: loss 0, gradients 0
])
def test_matches_float64(n, h, v, chunk_rows, ignored, dtype):
    leaves, labels = make_inputs(n, h, v, dtype, ignored, seed=n * v)
    ours = run(mlm_loss, leaves, labels, 0.37, chunk_rows=chunk_rows)
    eager = run(mlm_loss_reference, leaves, labels, 0.37)
    exact = run(mlm_loss_reference, [t.double() for t in leaves], labels, 0.37)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == torch.float32
    for i, name in ((0, "loss"), (2, "lse"), (3, "grad_hidden"), (4, "grad_weight"), (5, "grad_bias")):
        assert ours[i].dtype == (leaves[i - 3].dtype if i >= 3 else torch.float32), name
        e_ours = (ours[i].double() - exact[i]).abs().max().item()
        e_eager = (eager[i].double() - exact[i]).abs().max().item()
        scale = exact[i].abs().max().item()
        assert e_ours <= 2 * e_eager + TOL[dtype] * scale, (
            f"{name}: ours {e_ours:.3e} eager {e_eager:.3e} (scale {scale:.3e})")
    # The count may differ from float64 only on rows whose top-2 logits are nearly tied.
    logits = torch.addmm(*(t.detach().double() for t in (leaves[2], leaves[0], leaves[1].T)))
    top2 = logits.topk(min(2, v), -1).values
    gap = top2[:, 0] - top2[:, -1] if v > 1 else torch.full((n,), float("inf"), dtype=torch.float64)
    ambiguous = ((gap < TIE_GAP[dtype]) & (labels != -100)).sum().item()
    assert abs(ours[1].item() - exact[1].item()) <= ambiguous, (ours[1].item(), exact[1].item(), ambiguous)
    assert ours[1].dtype == torch.int64
    if v > 1:
        assert exact[1].item() > 0  # the check above had something to count


@pytest.mark.parametrize("bias_ties, label_expect", [
    # Equal maxima inside one tile and across tiles (BLOCK_V = 4096): the first index wins.
    ({10: 5.0, 20: 5.0, 4500: 5.0}, {10: 1, 20: 0, 4500: 0}),
    # The later tile holds a larger max, tied within itself.
    ({10: 5.0, 4500: 6.0, 4600: 6.0}, {4500: 1, 4600: 0, 10: 0}),
])
def test_argmax_ties_pick_the_first_index(bias_ties, label_expect):
    v = 5000
    bias = torch.randint(-3, 4, (v,)).float()  # integers: every logit is exact
    for col, value in bias_ties.items():
        bias[col] = value
    hidden, weight = torch.zeros(1, 4), torch.zeros(v, 4)
    for label, expect in label_expect.items():  # one row at a time: which label counts matters
        labels = torch.tensor([label])
        _, correct, _ = mlm_loss(hidden, weight, bias, labels)
        _, expected, _ = mlm_loss_reference(hidden, weight, bias, labels)
        assert correct.item() == expected.item() == expect, label


def test_all_ignored_rows_give_zero_loss_and_zero_gradients():
    leaves, labels = make_inputs(5, 8, 300, torch.float32, ignored=range(5))
    loss, correct, _, *grads = run(mlm_loss, leaves, labels, 1.0, chunk_rows=2)
    assert loss.item() == 0.0 and correct.item() == 0
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


def test_no_rows():
    leaves, _ = make_inputs(1, 8, 300, torch.float32)
    empty = [leaves[0][:0].detach().requires_grad_(), *leaves[1:]]
    loss, correct, lse, *grads = run(mlm_loss, empty, torch.zeros(0, dtype=torch.long), 1.0)
    assert loss.item() == 0.0 and correct.item() == 0 and lse.shape == (0,)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_without_grad_matches_and_int32_labels():
    leaves, labels = make_inputs(7, 8, 700, torch.float32, ignored=(2,))
    with torch.no_grad():
        loss, correct, lse = mlm_loss(*leaves, labels.int(), chunk_rows=3)
    ref = mlm_loss_reference(*(t.detach() for t in leaves), labels)
    torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref[2], rtol=1e-5, atol=1e-5)
    assert correct.item() == ref[1].item()


@pytest.mark.parametrize("frozen", [(1, 2), (0,), (0, 1)])  # a frozen decoder, frozen inputs, ...
def test_gradients_only_for_inputs_that_require_them(frozen):
    leaves, labels = make_inputs(5, 8, 300, torch.float32, ignored=(2,))
    for i in frozen:
        leaves[i] = leaves[i].detach()
    loss, *_ = mlm_loss(*leaves, labels, chunk_rows=2)
    loss.backward()
    exact = run(mlm_loss_reference, [t.double() for t in leaves], labels, 1.0)
    for i, t in enumerate(leaves):
        if i in frozen:
            assert t.grad is None
        else:
            torch.testing.assert_close(t.grad.double(), exact[3 + i], rtol=1e-5, atol=1e-6)


def test_out_of_range_label_poisons_the_loss_in_the_kernel():
    """What CUDA relies on, where labels are not checked on the host: NaN, never a silent answer."""
    leaves, labels = make_inputs(4, 8, 100, torch.float32)
    for bad in (100, -1, 1 << 40):
        labels[1] = bad
        loss, *_ = mlm._mlm_loss_fwd(*(t.detach() for t in leaves), labels, 4, False, False, False)
        assert torch.isnan(loss), bad


class MemoryProbe(TorchDispatchMode):
    """Every tensor an aten op returns, and the peak of the bytes they hold alive together.

    A storage counts from the first op that returns it until the last tensor on it dies (torch
    keeps a tensor's Python object alive while C++, e.g. autograd, still holds it). Storages
    that exist beforehand (the inputs) are not counted; the interpreter's byte views of kernel
    arguments share their storage, so they add nothing."""

    def __init__(self, *inputs):
        super().__init__()
        self.tensors = []  # (op, shape, bytes)
        self.refs = {t.untyped_storage().data_ptr(): [1, 0] for t in inputs}  # ptr -> [tensors, bytes]
        self.live = self.peak = 0

    def _release(self, ptr):
        entry = self.refs[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            self.tensors.append((str(func), tuple(t.shape), t.numel() * t.element_size()))
            storage = t.untyped_storage()
            entry = self.refs.setdefault(storage.data_ptr(), [0, storage.nbytes()])
            if entry[0] == 0:
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(t, self._release, storage.data_ptr())
        return out


@pytest.mark.parametrize("fn, fused", [(mlm_loss, True), (mlm_loss_reference, False)])
def test_no_n_by_vocab_tensor(fn, fused):
    n, h, v, chunk = 128, 4, 1000, 4
    leaves, labels = make_inputs(n, h, v, torch.float32)
    kwargs = {"chunk_rows": chunk} if fused else {}
    logits_bytes = n * v * 4  # one float32 [N, V] tensor
    with MemoryProbe(*leaves, labels) as probe:
        loss, *_ = fn(*leaves, labels, **kwargs)
        loss.backward()
    biggest = max(probe.tensors, key=lambda t: t[2])
    if fused:
        # The largest tensor is one float32 chunk of logits (the probe does see inside the op).
        # Alive at once: that chunk, [V, H] float32 gradient buffers (the accumulator, its scaled
        # copy, the returned gradient, one spare), [N, H] ones likewise and a few [N] vectors.
        assert biggest[2] == chunk * v * 4, f"the fused path allocated {biggest}"
        bound = chunk * v * 4 + 4 * v * h * 4 + 4 * n * h * 4 + 4 * n * 4
        assert probe.peak <= bound < logits_bytes / 4, (probe.peak, bound, logits_bytes)
    else:  # the probe sees the reference's [N, V] logits, so it can catch them
        assert biggest[2] >= logits_bytes and probe.peak >= 2 * logits_bytes, (biggest, probe.peak)


def test_ops_fast_backend_runs_the_kernel(monkeypatch):
    leaves, labels = make_inputs(6, 8, 500, torch.float32, ignored=(1,))
    calls = []
    real = mlm.mlm_loss

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(mlm, "mlm_loss", spy)
    fast = ops.mlm_loss(*leaves, labels, backend="fast")
    torch_ = ops.mlm_loss(*leaves, labels, backend="torch")
    assert calls == [(6, 8)]
    torch.testing.assert_close(fast[0], torch_[0], rtol=1e-5, atol=1e-6)
    assert fast[1].item() == torch_[1].item()
    # float64 (the oracle's dtype) stays on the torch path, which the kernel does not serve.
    ops.mlm_loss(*(t.double() for t in leaves), labels, backend="fast")
    assert calls == [(6, 8)]


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((_t(2, 3, 8), _t(10, 8), _t(10), _t(2, dtype=torch.long)), {}, ValueError, "hidden must have 2 dim"),
    ((_t(4, 8, dtype=torch.float64), _t(10, 8), _t(10), _t(4, dtype=torch.long)), {}, TypeError, "hidden must have dtype"),
    ((_t(4, 8), _t(10, 9), _t(10), _t(4, dtype=torch.long)), {}, ValueError, r"weight must have shape \(\*, 8\)"),
    ((_t(4, 8), _t(10, 8), _t(11), _t(4, dtype=torch.long)), {}, ValueError, r"bias must have shape \(10,\)"),
    ((_t(4, 8), _t(10, 8, dtype=torch.float16), _t(10), _t(4, dtype=torch.long)), {}, TypeError, "weight has dtype"),
    ((_t(4, 8), _t(10, 8), _t(10), _t(4)), {}, TypeError, "labels must have dtype"),
    ((_t(4, 8), _t(10, 8), _t(10), _t(5, dtype=torch.long)), {}, ValueError, r"labels must have shape \(4,\)"),
    ((_t(4, 8), _t(10, 8, dtype=torch.float32).to("meta"), _t(10), _t(4, dtype=torch.long)), {}, ValueError, "weight is on meta"),
    ((_t(4, 8), _t(0, 8), _t(0), _t(4, dtype=torch.long)), {}, ValueError, "weight must have a non-empty"),
    ((_t(2, 8), _t(10, 8), _t(10), torch.tensor([3, 10])), {}, ValueError, r"labels must be in \[0, 10\) or -100, got 10 at index 1"),
    ((_t(2, 8), _t(10, 8), _t(10), torch.tensor([-5, 1])), {}, ValueError, "got -5 at index 0"),
    ((_t(2, 8), _t(10, 8), _t(10), _t(2, dtype=torch.long)), {"chunk_rows": 0}, ValueError, "chunk_rows must be a positive int"),
])
def test_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        mlm_loss(*args, **kwargs)


def test_default_chunk_rows():
    assert mlm.default_chunk_rows(30522) == 8704  # 2^28 // 30522 = 8795, down to a multiple of 128
    assert mlm.default_chunk_rows(1 << 30) == 1


KERNEL_CONFIGS = [  # (logits dtype, labels dtype, COMPUTE_GRAD, vocab); 30522 % BLOCK_V != 0
    (dtype, "i64", grad, 30522) for dtype in ("fp32", "fp16", "bf16") for grad in (False, True)
] + [("bf16", "i64", True, 32768), ("bf16", "i32", True, 30522), ("fp16", "i64", True, 257)]


@pytest.mark.slow  # ~10 s of ptxas on two cores
def test_every_kernel_config_compiles_for_sm90_without_spills():
    reason = aot.unavailable_reason()
    if reason:
        pytest.skip(reason)
    specs = []
    for dtype, label_dtype, grad, vocab in KERNEL_CONFIGS:
        block, num_warps = mlm._block_config(vocab)
        specs.append(aot.AotSpec(
            mlm._mlm_ce_rows_kernel,
            signature={"Logits": f"*{dtype}", "Labels": f"*{label_dtype}", "Lse": "*fp32",
                       "Loss": "*fp32", "Correct": "*i32", "stride_logits_row": "i32", "V": "i32"},
            constexprs={"IGNORE_INDEX": mlm.IGNORE_INDEX, "BLOCK_V": block, "COMPUTE_GRAD": grad,
                        "EVEN_V": vocab % block == 0},
            num_warps=num_warps))
    reports = aot.compile_reports(specs)
    table = "\n".join(f"{config}: {r.row()}" for config, r in zip(KERNEL_CONFIGS, reports))
    print(table)
    assert all(r.spills == 0 for r in reports), table
    assert all(r.registers <= 255 for r in reports), table
    # The row kernel is memory-bound and has no tl.dot (the GEMMs are cuBLAS): no wgmma expected.
    assert not any(r.uses_wgmma for r in reports), table
