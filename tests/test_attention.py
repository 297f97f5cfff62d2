"""kernels/attention.py under the Triton interpreter: forward, log-sum-exp and dq/dk/dv against a
float64 reference (compared three ways, as flash-attention's tests do), ragged lengths, dropout
with the kernel's own mask, the padded form, validation, and sm_90 builds of every config."""

import math

import early
import pytest
import torch

from bert_fast import ops
from bert_fast.kernels.attention import (
    attention_varlen,
    attention_varlen_reference,
    dropout_mask,
)
from helpers import trace_with_fake_tensors

# Ours may err at most twice what eager PyTorch in the same dtype errs, plus this much times the
# largest exact value: a float32 sum of n products errs up to n * 2^-24 of their magnitudes, and
# the interpreter sums a tile's products in order (numpy's matmul of a transposed tile) where
# eager's BLAS sums in blocks (seen: dV 6.2e-6 against eager's 1.2e-6 at |dV| = 3.6).
ATOL = {torch.float32: 2e-6, torch.float16: 2e-3}


def cu_seqlens_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def make_qkv(lengths, heads, head_dim, dtype, fused=False, seed=0):
    """q, k, v [T, heads, head_dim]; `fused` makes them strided views of one [T, 3, heads, D]
    tensor, as the encoder's QKV GEMM produces."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    qkv = torch.randn(total, 3, heads, head_dim, generator=g) * torch.tensor([2.0, 1.0, 1.0])[:, None, None]
    if fused:
        qkv = qkv.to(dtype).requires_grad_()
        return [qkv], qkv.unbind(1)
    leaves = [t.to(dtype).contiguous().requires_grad_() for t in qkv.unbind(1)]
    return leaves, leaves


def lse_reference(q, k, cu_seqlens):
    """[heads, T] natural log-sum-exp of the scaled scores, per sequence."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    rows = []
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        s = (q[a:b].transpose(0, 1) @ k[a:b].transpose(0, 1).transpose(-1, -2)) * scale
        rows.append(torch.logsumexp(s, -1))
    return torch.cat(rows, dim=1)


def check_three_way(name, ours, eager, exact, dtype):
    e_ours = (ours.double() - exact).abs().max().item()
    e_eager = (eager.double() - exact).abs().max().item()
    scale = max(1.0, exact.abs().max().item())
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    assert e_ours <= 2 * e_eager + ATOL[dtype] * scale, f"{name}: ours {e_ours:.3e} vs eager {e_eager:.3e}"


CASES = [
    # lengths, heads, head_dim, fused qkv views
    ([1], 1, 32, False),
    ([17, 1, 33, 5], 2, 32, True),
    ([16, 31], 3, 64, False),
    ([2, 23], 2, 128, True),
    ([9, 1, 16], 1, 16, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths,heads,head_dim,fused", CASES)
def test_matches_float64(lengths, heads, head_dim, fused, dtype):
    cu = cu_seqlens_of(lengths)
    leaves, (q, k, v) = make_qkv(lengths, heads, head_dim, dtype, fused)
    out, lse = attention_varlen(q, k, v, cu, max(lengths), return_lse=True)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(grad)

    exact_leaves, (q64, k64, v64) = make_qkv(lengths, heads, head_dim, torch.float64, fused)
    exact = attention_varlen_reference(q64, k64, v64, cu)
    exact.backward(grad.double())
    eager_leaves, (qe, ke, ve) = make_qkv(lengths, heads, head_dim, dtype, fused)
    eager = attention_varlen_reference(qe, ke, ve, cu)
    eager.backward(grad)

    check_three_way("out", out, eager, exact, dtype)
    torch.testing.assert_close(lse, lse_reference(q64, k64, cu).float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-3)
    for i, name in enumerate(("dq", "dk", "dv")):
        ours, eager_grad, exact_grad = (ls[0].grad[:, i] if fused else ls[i].grad
                                        for ls in (leaves, eager_leaves, exact_leaves))
        check_three_way(name, ours, eager_grad, exact_grad, dtype)


def test_empty_sequences_and_empty_batch():
    lengths = [0, 3, 0, 1]
    cu = cu_seqlens_of(lengths)
    leaves, (q, k, v) = make_qkv(lengths, 2, 32, torch.float32)
    out = attention_varlen(q, k, v, cu, 3)
    out.sum().backward()
    expected = attention_varlen_reference(q.detach().double(), k.detach().double(), v.detach().double(), cu)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(t.grad).all() for t in leaves)

    empty = torch.zeros(0, 2, 32, requires_grad=True)
    out = attention_varlen(empty, empty, empty, torch.zeros(3, dtype=torch.int32), 0)
    out.sum().backward()
    assert out.shape == (0, 2, 32) and empty.grad.shape == (0, 2, 32)


def test_large_scores_stay_finite():
    # Scores near +-1e4: the online softmax must rescale instead of overflowing exp.
    lengths = [20, 1]
    cu = cu_seqlens_of(lengths)
    leaves, (q, k, v) = make_qkv(lengths, 1, 32, torch.float32)
    with torch.no_grad():
        q.mul_(40)
        k.mul_(40)
    out = attention_varlen(q, k, v, cu, 20)
    out.sum().backward()
    expected = attention_varlen_reference(q.detach().double(), k.detach().double(), v.detach().double(), cu)
    assert all(torch.isfinite(t).all() for t in (out, *[leaf.grad for leaf in leaves]))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_matches_reference_with_the_kernels_mask(dtype):
    lengths, heads, p = [19, 1, 33], 2, 0.3
    cu = cu_seqlens_of(lengths)
    seed = torch.tensor([20260421])
    leaves, (q, k, v) = make_qkv(lengths, heads, 32, dtype, fused=True)
    out = attention_varlen(q, k, v, cu, max(lengths), dropout_p=p, seed=seed)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(grad)

    masks = dropout_mask(cu, max(lengths), heads, p, seed)
    assert [tuple(m.shape) for m in masks] == [(heads, n, n) for n in lengths]
    exact_leaves, (q64, k64, v64) = make_qkv(lengths, heads, 32, torch.float64, fused=True)
    exact = attention_varlen_reference(q64, k64, v64, cu, dropout_masks=masks, dropout_p=p)
    exact.backward(grad.double())
    eager_leaves, (qe, ke, ve) = make_qkv(lengths, heads, 32, dtype, fused=True)
    eager = attention_varlen_reference(qe, ke, ve, cu, dropout_masks=masks, dropout_p=p)
    eager.backward(grad)
    check_three_way("out", out, eager, exact, dtype)
    check_three_way("dqkv", leaves[0].grad, eager_leaves[0].grad, exact_leaves[0].grad, dtype)

    # Same seed, same result; another seed, another mask.
    again = attention_varlen(q, k, v, cu, max(lengths), dropout_p=p, seed=seed)
    other = attention_varlen(q, k, v, cu, max(lengths), dropout_p=p, seed=seed + 1)
    assert torch.equal(again, out) and not torch.equal(other, out)


def test_dropout_kept_fraction_and_independence():
    lengths, heads, p = [48, 40], 4, 0.25
    cu = cu_seqlens_of(lengths)
    masks = dropout_mask(cu, max(lengths), heads, p, torch.tensor([7]))
    kept = torch.cat([m.flatten() for m in masks]).double()
    n = kept.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept.mean().item() - (1 - p)) < 5 * sigma, (kept.mean().item(), sigma)
    # Heads and sequences draw different numbers (offsets never collide).
    assert not torch.equal(masks[0][0], masks[0][1])
    assert not torch.equal(masks[0][0, :40, :40], masks[1][0])


def test_padded_form_matches_torch_attention():
    """ops.attention's fast path on padded inputs: unpad, the varlen kernel, re-pad (padding queries
    get zeros there, which the torch path does not give: the kernel ran)."""
    batch, seq, heads, head_dim = 3, 21, 2, 32
    mask = (torch.arange(seq)[None, :] < torch.tensor([21, 1, 12])[:, None]).long()
    mask[2, 5] = 0  # a hole: any mask works, not only prefixes
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(batch, seq, heads, head_dim, generator=g).requires_grad_() for _ in range(3)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = ops.attention(*leaves, mask, backend="fast")
    expected = ops.attention(*ref_leaves, mask, backend="torch")
    real = mask.bool()
    torch.testing.assert_close(out[real], expected[real], rtol=1e-5, atol=1e-5)
    assert torch.all(out[~real] == 0)
    grad = torch.randn(out.shape, generator=g) * real[..., None, None]
    out.backward(grad)
    expected.backward(grad)
    for name, a, b in zip("qkv", leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_ops_varlen_backends_agree():
    lengths = [5, 18]
    cu = cu_seqlens_of(lengths)
    _, (q, k, v) = make_qkv(lengths, 2, 64, torch.float32)
    fast = ops.attention_varlen(q, k, v, cu, 18, backend="fast")
    slow = ops.attention_varlen(q, k, v, cu, 18, backend="torch")
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def _qkv(shape=(6, 2, 32), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(q=a["q"][None]), ValueError, "q must have 3"),
    (lambda a: a.update(k=a["k"].half()), TypeError, "k has dtype"),
    (lambda a: a.update(v=a["v"][:5]), ValueError, "v must have shape"),
    (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), TypeError, "q must have dtype"),
    (lambda a: a.update(q=torch.randn(6, 2, 48), k=torch.randn(6, 2, 48), v=torch.randn(6, 2, 48)), ValueError, "head_dim 48"),
    (lambda a: a.update(k=torch.randn(6, 32, 2).transpose(1, 2)), ValueError, "k must be contiguous in head_dim"),
    (lambda a: a.update(cu_seqlens=a["cu_seqlens"].long()), TypeError, "cu_seqlens must have dtype"),
    (lambda a: a.update(cu_seqlens=torch.zeros(1, dtype=torch.int32)), ValueError, "at least 2"),
    (lambda a: a.update(max_seqlen=-1), ValueError, "max_seqlen"),
    (lambda a: a.update(max_seqlen=2.0), ValueError, "max_seqlen"),
    (lambda a: a.update(dropout_p=1.0), ValueError, "dropout_p"),
    (lambda a: a.update(softmax_scale=0.0), ValueError, "softmax_scale"),
    (lambda a: a.update(seed=torch.tensor([1], dtype=torch.int32)), TypeError, "seed must have dtype"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 4, 5], dtype=torch.int32)), ValueError, "end at T=6"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32)), ValueError, "non-decreasing"),
    (lambda a: a.update(max_seqlen=3), ValueError, "length 4 > max_seqlen=3"),
    (lambda a: a.update(q="q"), TypeError, "q must be a torch.Tensor"),
])
def test_bad_input_is_named(change, error, match):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v, cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32), max_seqlen=4)
    kwargs = {}
    change(args)
    for name in ("dropout_p", "softmax_scale", "seed"):
        if name in args:
            kwargs[name] = args.pop(name)
    with pytest.raises(error, match=match):
        attention_varlen(**args, **kwargs)


def test_does_not_modify_inputs():
    lengths = [7, 3]
    _, (q, k, v) = make_qkv(lengths, 2, 32, torch.float32, fused=True)
    before = [t.detach().clone() for t in (q, k, v)]
    attention_varlen(q, k, v, cu_seqlens_of(lengths), 7, dropout_p=0.1).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))


def test_registered_op_schema_and_autograd():
    # The fake-tensor and AOT-dispatch checks need a compiled kernel: tests/gpu runs them.
    lengths = [5, 7]
    _, (q, k, v) = make_qkv(lengths, 2, 32, torch.float32)
    args = (q, k, v, cu_seqlens_of(lengths), torch.tensor([3]), 7, 5, 0.2, 0.1)
    for utils in ("test_schema", "test_autograd_registration"):
        torch.library.opcheck(torch.ops.bert_fast.attention_varlen_fwd.default, args, test_utils=utils)


_TRACE = """
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from bert_fast.kernels.attention import attention_varlen

def step(qkv, cu, seed):
    out = attention_varlen(*qkv.unbind(1), cu, 7, dropout_p=0.1, seed=seed, check=False)
    return out, torch.autograd.grad(out.float().square().sum(), qkv)[0]

qkv = torch.randn(12, 3, 2, 64, dtype=torch.bfloat16, requires_grad=True)
gm = make_fx(step, tracing_mode="fake")(qkv, torch.tensor([0, 5, 12], dtype=torch.int32),
                                        torch.tensor([3]))
print(gm.code)
"""


@early.job
def attention_fake_trace(folder, threads):
    """trace_with_fake_tensors(_TRACE) (a fresh process, the interpreter off): an early job (tests/early.py)."""
    return trace_with_fake_tensors(_TRACE)


def test_ops_trace_with_fake_tensors(attention_fake_trace):
    code = attention_fake_trace
    assert "bert_fast.attention_varlen_fwd" in code
    assert "bert_fast.attention_varlen_bwd" in code


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_qkv_packed_equals_separate_and_returns_one_gradient_buffer(p):
    from bert_fast.kernels.attention import attention_varlen_qkvpacked

    lengths = [7, 18, 1]
    cu = cu_seqlens_of(lengths)
    seed = torch.tensor([11])
    [qkv], _ = make_qkv(lengths, 2, 32, torch.float32, fused=True)
    separate = [t.detach().clone().requires_grad_() for t in qkv.detach().unbind(1)]
    out = attention_varlen_qkvpacked(qkv, cu, max(lengths), dropout_p=p, seed=seed, site=4)
    expected = attention_varlen(*separate, cu, max(lengths), dropout_p=p, seed=seed, site=4)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(out, expected)
    assert qkv.grad.shape == qkv.shape and qkv.grad.is_contiguous()
    for i, leaf in enumerate(separate):
        assert torch.equal(qkv.grad[:, i], leaf.grad)


def test_sites_and_seeds_give_independent_masks_and_the_reference_follows_them():
    lengths, heads, p = [21, 9], 2, 0.4
    cu = cu_seqlens_of(lengths)
    _, (q, k, v) = make_qkv(lengths, heads, 32, torch.float32)
    seed = torch.tensor([5])
    outs = {site: attention_varlen(q, k, v, cu, 21, dropout_p=p, seed=seed, site=site) for site in (0, 1)}
    assert not torch.equal(outs[0], outs[1])
    for site, out in outs.items():
        masks = dropout_mask(cu, 21, heads, p, seed, site=site)
        expected = attention_varlen_reference(q.double(), k.double(), v.double(), cu, dropout_masks=masks,
                                              dropout_p=p)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_one_call_launches_one_kernel_forward_and_two_backward(monkeypatch):
    # Host work per call: no seed draw when the caller passes one, no copies of q, k, v, and the
    # backward is the delta preprocess plus one fused kernel.
    from bert_fast.kernels import attention as attn

    launched = []
    real = attn._launch
    lengths = [5, 12]
    [qkv], _ = make_qkv(lengths, 2, 32, torch.float32, fused=True)
    cu, seed = cu_seqlens_of(lengths), torch.tensor([1])

    def call():
        return attn.attention_varlen_unchecked(*qkv.unbind(1), cu, 12, dropout_p=0.1, seed=seed, site=0,
                                               qkv=qkv)[0]

    # The interpreter runs kernels through torch ops of its own: stub the launches to see ours.
    monkeypatch.setattr(attn, "_launch", lambda kernel, grid, traced: lambda *a, **k: None)
    ops_seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops_seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Spy():
        call()
    # Views and allocations only (autograd detaches a saved output): no randint, no copy.
    assert set(ops_seen) <= {"unbind", "empty", "select", "detach"}, ops_seen

    def counting(kernel, grid, traced):
        launched.append(kernel)
        return real(kernel, grid, traced)

    monkeypatch.setattr(attn, "_launch", counting)
    out = call()
    assert len(launched) == 1
    out.sum().backward()
    assert len(launched) == 3


def test_attention_impl_choice_and_clear_refusals():
    cpu = torch.device("cpu")
    assert ops.attention_impl("auto", cpu, torch.float32, 64) == "triton"
    assert ops.attention_impl("triton", cpu, torch.bfloat16, 64) == "triton"
    with pytest.raises(RuntimeError, match="attention_impl='torch_flash' cannot run: it needs a CUDA device"):
        ops.attention_impl("torch_flash", cpu, torch.bfloat16, 64)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        ops.attention_impl("flash3", cpu, torch.bfloat16, 64)
