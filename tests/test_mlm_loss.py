"""Fused MLM loss (kernels/mlm_loss.py) under the Triton interpreter: loss, log-sum-exp, accuracy
count and all three gradients against float64, beside eager PyTorch in the same dtype, at the
launchers' tiles and at tiny ones that run every path (many tiles per row, many row programs and
column blocks, partial row steps, bias partials added across chunks); argmax ties; ignored rows;
validation; no [N, vocab] allocation; the kernels each call launches and no host sync; the sm_90
report (bench/results/aot/mlm_loss.json) against a fresh build and its targets."""

import json
import weakref
from pathlib import Path

import early
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bert_fast import ops
from bert_fast.kernels import aot
from bert_fast.kernels import mlm_loss as mlm
from bert_fast.kernels.mlm_loss import mlm_loss, mlm_loss_reference
from helpers import KernelCensus

REPORT = Path(__file__).resolve().parents[1] / "bench" / "results" / "aot" / "mlm_loss.json"

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


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles small enough that a few rows run every path: several stats tiles per row and a tail,
    several gradient programs along rows and columns, partial row steps."""
    for name, value in dict(STATS_BLOCK_R=2, STATS_BLOCK_V=64, GRAD_BLOCK_M=6, GRAD_SUB_M=4,
                            GRAD_BLOCK_V=32).items():
        monkeypatch.setattr(mlm, name, value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, h, v, chunk_rows, ignored, tiles", [
    (1, 16, 30522, None, (), "default"),
    (6, 8, 30522, 4, (3,), "default"),  # BERT's vocab, two chunks, one ignored row
    (3, 8, 50265, 2, (), "default"),  # RoBERTa's vocab
    (13, 24, 1000, 5, (0, 12), "default"),
    (5, 16, 257, None, (), "default"),
    (9, 12, 8192, 4, (4,), "default"),  # a multiple of the stats tile: no tail, no padding
    (4, 8, 1, 3, (), "default"),  # a single class: loss 0, gradients 0
    (23, 8, 300, 10, (1, 22), "small"),  # chunks of 10, 10 and 3 rows; programs of 6 rows, 4 a step
    (17, 8, 256, None, (5,), "small"),  # one chunk; V a multiple of both tiles
])
def test_matches_float64(n, h, v, chunk_rows, ignored, tiles, dtype, request):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
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
    # Equal maxima inside one tile and across tiles (BLOCK_V = 1024): the first index wins.
    ({10: 5.0, 20: 5.0, 4500: 5.0}, {10: 1, 20: 0, 4500: 0}),
    # The later tile holds a larger max, tied within itself.
    ({10: 5.0, 4500: 6.0, 4600: 6.0}, {4500: 1, 4600: 0, 10: 0}),
    # The max in the tail tile (past 4096), where the padding must not count.
    ({10: 5.0, 4990: 7.0, 4999: 7.0}, {4990: 1, 4999: 0, 10: 0}),
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


@pytest.mark.parametrize("grads", [False, True])
def test_out_of_range_label_poisons_the_loss_in_the_kernel(grads):
    """What CUDA relies on, where labels are not checked on the host: NaN, never a silent answer
    (1 << 40 would be 0 in int32), and the other rows' gradients stay finite."""
    leaves, labels = make_inputs(4, 8, 100, torch.float32)
    for bad in (100, -1, 1 << 40):
        labels[1] = bad
        loss, _, _, _, *out = mlm._mlm_loss_fwd(*(t.detach() for t in leaves), labels, 4, grads, grads, grads)
        assert torch.isnan(loss), bad
        assert all(torch.isfinite(g).all() for g in out), bad


class MemoryProbe(TorchDispatchMode):
    """Every tensor an aten op returns, and the peak of the bytes they hold alive together.

    A storage counts from the first op that returns it until the last tensor on it dies (torch
    keeps a tensor's Python object alive while C++, e.g. autograd, still holds it). Storages
    that exist beforehand (the inputs) are not counted; the interpreter's byte views of kernel
    arguments share their storage, so they add nothing. The fused op is opaque to a dispatch
    mode: the probe runs its body instead, to see the tensors it allocates."""

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
        if func is torch.ops.bert_fast.mlm_loss_fwd.default:
            with self:
                return mlm._forward(*args, **(kwargs or {}))
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
        # The largest tensor is the chunk buffer of logits, rows padded to the stats tile (the
        # probe runs the op's body). Alive at once: that buffer, [V, H] float32
        # gradient buffers (the accumulator, the returned gradient, one spare), [N, H] ones likewise,
        # per-row vectors and the bias partials (one row per gradient program of a chunk).
        stride = mlm.padded_stride(v)
        assert biggest[2] == chunk * stride * 4, f"the fused path allocated {biggest}"
        bound = chunk * stride * 4 + 3 * v * h * 4 + 3 * n * h * 4 + 8 * n * 4 + 2 * stride * 4
        assert probe.peak <= bound < logits_bytes / 4, (probe.peak, bound, logits_bytes)
    else:  # the probe sees the reference's [N, V] logits, so it can catch them
        assert biggest[2] >= logits_bytes and probe.peak >= 2 * logits_bytes, (biggest, probe.peak)


def test_the_backward_keeps_gradients_not_logits():
    """Issue 20: no [N, V] logits kept for the backward. One chunk whose buffer (262 KB) dwarfs
    what the backward needs: the float32 gradients and a few per-row and scalar tensors."""
    n, h, v = 64, 4, 1000
    leaves, labels = make_inputs(n, h, v, torch.float32)
    with MemoryProbe(*leaves, labels) as probe:
        loss, *_ = mlm_loss(*leaves, labels)
        kept = probe.live
        loss.backward()
    assert kept <= (v * h + n * h + v) * 4 + 8 * n * 4 + 64 < n * mlm.padded_stride(v) * 4 / 8, kept


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


def test_chunk_sizes():
    assert mlm.default_chunk_rows(30522) == 8704  # 2^28 // 30522 = 8795, down to a multiple of 128
    assert mlm.default_chunk_rows(1 << 30) == 1
    # One chunk while it fits, then the fewest equal ones (multiples of 128), never above the cap.
    assert [mlm.chunk_rows_for(n, 30522) for n in (1, 4096, 8704, 16384, 17409, 81920)] == [
        1, 4096, 8704, 8192, 5888, 8192]
    assert mlm.chunk_rows_for(5, 1 << 30) == 1


def test_padded_stride_fits_both_kernels():
    for vocab in (1, 257, 1000, 8192, 30522, 50265):
        stride = mlm.padded_stride(vocab)
        stats, grad = mlm.stats_config(vocab), mlm.grad_config(vocab)
        # What the AOT report assumes (16 | stride) and what the kernels' padding needs.
        assert stride >= vocab and stride % 16 == 0, vocab
        assert stride % stats["BLOCK_V"] == 0 and stats["BLOCK_V"] % grad["BLOCK_V"] == 0, vocab
        assert stride - vocab < stats["BLOCK_V"], vocab
    assert mlm.padded_stride(30522) == 30720


@pytest.mark.parametrize("chunks, grad", [(1, True), (3, True), (1, False), (3, False)])
def test_launches_per_call_and_no_host_sync(chunks, grad):
    """Issue 20's static target: a fixed, small number of kernels per call. Forward: per chunk the
    logits GEMM and the stats pass, with gradients the gradient pass and the two gradient GEMMs;
    then one finish kernel. Backward: one kernel. Nothing reads the device on the host. (The
    public function's CPU label check, a host read by design, runs before the op and is not
    counted; on CUDA it does not run.)"""
    n, h, v = 12, 8, 300
    leaves, labels = make_inputs(n, h, v, torch.float32, ignored=(3,))
    leaves = [t.detach().requires_grad_(grad) for t in leaves]
    args = (*leaves, labels, n // chunks, grad, grad, grad)
    with KernelCensus() as fwd:
        mlm._forward(*(t.detach() for t in leaves), *args[3:])
    gemms = {"mm": 3 * chunks - (chunks - 1), "addmm_": chunks - 1} if grad else {"mm": chunks}
    assert dict(fwd.aten) == {k: c for k, c in gemms.items() if c}, fwd.aten
    kernels = {"_mlm_stats_kernel": chunks, "_mlm_finish_kernel": 1}
    if grad:
        kernels["_mlm_grad_kernel"] = chunks
    assert dict(fwd.triton) == kernels, fwd.triton
    if not grad:
        return
    loss = mlm._mlm_loss_fwd(*args)[0]
    seed = torch.ones(())
    with KernelCensus() as bwd:
        torch.autograd.backward(loss, seed)
    assert dict(bwd.triton) == {"_mlm_scale_grads_kernel": 1}, bwd.triton
    assert dict(bwd.aten) == {}, bwd.aten  # autograd fills no zero gradients for the other outputs
    syncs = {"_local_scalar_dense", "nonzero", "item"}
    assert not syncs & (set(fwd.aten) | set(bwd.aten))


def _aot_reason():
    reason = aot.unavailable_reason()
    return reason and f"no AOT compile here: {reason}"


@early.job
def mlm_loss_aot_report(folder, threads):
    """The kernels' sm_90 report: an early job (tests/early.py)."""
    if _aot_reason():
        return None
    return early.report("bert_fast.kernels.mlm_loss_aot", "report")


@pytest.fixture(scope="module")
def fresh_report(mlm_loss_aot_report):
    if _aot_reason():
        pytest.skip(_aot_reason())
    return mlm_loss_aot_report


KEY = ("kernel", "dtype")


@pytest.mark.slow  # ~15 s of ptxas on two cores
def test_committed_report_matches_a_fresh_build(fresh_report):
    committed = {tuple(r[k] for k in KEY): r for r in json.loads(REPORT.read_text())}
    built = {tuple(r[k] for k in KEY): r for r in fresh_report}
    assert sorted(committed) == sorted(built), "the kernels changed: rerun bench/mlm_loss.py --compile-report"
    for key, row in built.items():
        assert committed[key] == row, (f"{key}: the sm_90 build changed; rerun bench/mlm_loss.py "
                                       f"--compile-report\ncommitted {committed[key]}\nbuilt     {row}")


@pytest.mark.slow
def test_every_kernel_meets_the_static_targets(fresh_report):
    rows = {(r["kernel"], r["dtype"]): r for r in fresh_report}
    assert {k for k, _ in rows} == {"stats", "grad", "finish", "scale_grads"}
    for key, row in rows.items():
        assert row["spills"] == 0, key
        # Memory-bound passes (the GEMMs are cuBLAS): no tensor cores expected.
        assert not row["uses_wgmma"], key
        # At most 128 registers: 4 programs of 4 warps (16 warps) per SM or more, for loads in flight.
        assert row["registers"] <= 128, key
    for dtype in ("bf16", "fp16", "fp32"):
        # The replaced kernel issued 28 + 16 instructions per bf16 element in its two loops (and
        # loaded 2 bytes at a time at V = 30522); each pass now costs at most 11 and the common
        # iteration skips the argmax search.
        stats, grad = rows[("stats", dtype)], rows[("grad", dtype)]
        assert stats["instructions_per_element"] <= 11 and grad["instructions_per_element"] <= 11, dtype
        assert stats["skippable"] > 0 and len(grad["loops"]) == 1, dtype
