"""The Triton attention on a GPU: bf16/fp16 at BERT shapes against float64 (three-way), dropout
with the kernel's own mask (drawn by kernels/dropout.py's plain-Triton path, so the kernels'
inline-PTX apply is checked against it), bitwise determinism (the backward's single-writer dQ
red.add included), torch.compile of the registered op, torch's varlen flash attention as the
alternative implementation, and the encoder's unpadded fast path against its padded torch path."""

import math

import pytest
import torch

from bert_fast import BertConfig, BertForPreTraining
from bert_fast.kernels.attention import attention_varlen, attention_varlen_reference, dropout_mask

pytestmark = pytest.mark.gpu
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_lengths(batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    lengths[0] = seq  # the longest one is always there
    return lengths.tolist()


def make(lengths, heads, head_dim, dtype):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, device="cuda")
    return cu, qkv


def run(qkv, dtype, cu, max_seqlen, grad, fn, **kwargs):
    leaf = qkv.to(dtype, copy=True).requires_grad_()
    out = fn(*leaf.unbind(1), cu, max_seqlen, **kwargs)
    out.backward(grad.to(dtype))
    return out, leaf.grad


def reference(q, k, v, cu, max_seqlen, **kwargs):
    return attention_varlen_reference(q, k, v, cu, **kwargs)


def assert_three_way(name, ours, eager, exact, dtype):
    e_ours = (ours.double() - exact).abs().max().item()
    e_eager = (eager.double() - exact).abs().max().item()
    assert torch.isfinite(ours).all(), name
    assert e_ours <= 2 * e_eager + ATOL[dtype], f"{name}: ours {e_ours:.3e} vs eager {e_eager:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq,heads,head_dim", [(128, 12, 64), (512, 16, 64), (200, 4, 128), (77, 8, 32)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_matches_float64_at_bert_shapes(seq, heads, head_dim, dtype, dropout_p):
    lengths = random_lengths(8, seq, seed=seq + heads)
    cu, qkv = make(lengths, heads, head_dim, dtype)
    grad = torch.randn(sum(lengths), heads, head_dim, device="cuda")
    seed = torch.tensor([1234], device="cuda")
    masks = dropout_mask(cu, seq, heads, dropout_p, seed) if dropout_p else None
    ref_kwargs = dict(dropout_masks=masks, dropout_p=dropout_p)
    out, dqkv = run(qkv, dtype, cu, seq, grad, attention_varlen, dropout_p=dropout_p, seed=seed)
    out64, dqkv64 = run(qkv, torch.float64, cu, seq, grad, reference, **ref_kwargs)
    eager, deager = run(qkv, dtype, cu, seq, grad, reference, **ref_kwargs)
    assert_three_way("out", out, eager, out64, dtype)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_three_way(name, dqkv[:, i], deager[:, i], dqkv64[:, i], dtype)


def test_dropout_kept_fraction_on_gpu():
    cu = torch.tensor([0, 512, 1024], dtype=torch.int32, device="cuda")
    masks = dropout_mask(cu, 512, 12, 0.1, torch.tensor([99], device="cuda"))
    kept = torch.cat([m.flatten() for m in masks]).double()
    sigma = math.sqrt(0.1 * 0.9 / kept.numel())
    assert abs(kept.mean().item() - 0.9) < 5 * sigma


def test_repeated_runs_are_bitwise_identical():
    lengths = random_lengths(16, 512, seed=3)
    cu, qkv = make(lengths, 12, 64, torch.bfloat16)
    grad = torch.randn(sum(lengths), 12, 64, device="cuda")
    seed = torch.tensor([5], device="cuda")
    first = run(qkv, torch.bfloat16, cu, 512, grad, attention_varlen, dropout_p=0.1, seed=seed)
    for _ in range(3):
        again = run(qkv, torch.bfloat16, cu, 512, grad, attention_varlen, dropout_p=0.1, seed=seed)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_opcheck_of_the_registered_op():
    lengths = random_lengths(3, 100, seed=5)
    cu, qkv = make(lengths, 4, 64, torch.bfloat16)
    q, k, v = (t.contiguous().requires_grad_() for t in qkv.to(torch.bfloat16).unbind(1))
    seed = torch.tensor([11], device="cuda")
    torch.library.opcheck(torch.ops.bert_fast.attention_varlen_fwd.default,
                          (q, k, v, cu, seed, 100, 3, 0.125, 0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inline_ptx_apply_equals_the_plain_decision(dtype):
    import triton
    import triton.language as tl

    from bert_fast.kernels import dropout

    @triton.jit
    def apply_kernel(X, Flags, Byte, Y, PLAIN: tl.constexpr):
        offs = tl.arange(0, 64)[:, None] * 64 + tl.arange(0, 64)[None, :]
        x, flags, byte = tl.load(X + offs), tl.load(Flags + offs).to(tl.uint32), tl.load(Byte + offs)
        y = tl.where(dropout.kept(flags, byte), x, tl.zeros_like(x)) if PLAIN else dropout.apply(x, flags, byte)
        tl.store(Y + offs, y)

    x = torch.randn(64, 64, device="cuda").to(dtype)
    flags = torch.randint(-2**31, 2**31, (64, 64), dtype=torch.int64, device="cuda").to(torch.int32)
    byte = torch.randint(0, 4, (64, 64), dtype=torch.int32, device="cuda")
    ptx, plain = torch.empty_like(x), torch.empty_like(x)
    apply_kernel[(1,)](x, flags, byte, ptx, PLAIN=False)
    apply_kernel[(1,)](x, flags, byte, plain, PLAIN=True)
    assert torch.equal(ptx, plain) and 0 < (plain == 0).sum() < plain.numel()


def test_qkv_packed_gradient_is_one_buffer_equal_to_separate_ones():
    from bert_fast.kernels.attention import attention_varlen_qkvpacked

    lengths = random_lengths(8, 512, seed=9)
    cu, qkv = make(lengths, 12, 64, torch.bfloat16)
    grad = torch.randn(sum(lengths), 12, 64, device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor([3], device="cuda")
    packed = qkv.to(torch.bfloat16).requires_grad_()
    out = attention_varlen_qkvpacked(packed, cu, 512, dropout_p=0.1, seed=seed, site=2)
    out.backward(grad)
    separate, dseparate = run(qkv, torch.bfloat16, cu, 512, grad, attention_varlen, dropout_p=0.1, seed=seed,
                              site=2)
    assert torch.equal(out, separate) and torch.equal(packed.grad, dseparate)


@pytest.mark.parametrize("seq", [128, 512])
def test_torch_flash_matches_float64(seq):
    from bert_fast.ops import torch_flash

    lengths = random_lengths(8, seq, seed=seq)
    cu, qkv = make(lengths, 12, 64, torch.bfloat16)
    grad = torch.randn(sum(lengths), 12, 64, device="cuda")

    def flash(q, k, v, cu_seqlens, max_seqlen):
        return torch_flash.attention_varlen(q, k, v, cu_seqlens, max_seqlen)

    out, dqkv = run(qkv, torch.bfloat16, cu, seq, grad, flash)
    out64, dqkv64 = run(qkv, torch.float64, cu, seq, grad, reference)
    eager, deager = run(qkv, torch.bfloat16, cu, seq, grad, reference)
    assert_three_way("out", out, eager, out64, torch.bfloat16)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_three_way(name, dqkv[:, i], deager[:, i], dqkv64[:, i], torch.bfloat16)


def test_torch_compile_of_the_registered_op():
    lengths = random_lengths(4, 128, seed=4)
    cu, qkv = make(lengths, 12, 64, torch.bfloat16)
    grad = torch.randn(sum(lengths), 12, 64, device="cuda")
    seed = torch.tensor([8], device="cuda")

    def fn(q, k, v, cu_seqlens, max_seqlen):
        return attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.1, seed=seed, check=False) * 2

    compiled = torch.compile(fn, fullgraph=True)
    eager = run(qkv, torch.bfloat16, cu, 128, grad, fn)
    ours = run(qkv, torch.bfloat16, cu, 128, grad, compiled)
    # Not bitwise: Inductor autotunes the user kernels again and may pick another BLOCK_N, which
    # changes the float32 summation order (one bf16 rounding step apart); the same seed keeps the
    # dropout mask identical, so a wrong mask or scale still fails by far more than this.
    for a, b in zip(eager, ours):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


def test_encoder_fast_path_matches_torch_path():
    # float32: "auto" runs the Triton kernel (torch's flash attention takes 16-bit inputs only).
    values = dict(vocab_size=500, max_position_embeddings=128, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    # "auto" is the fast path on CUDA (the Triton kernels) without requiring bert_fast._C, which
    # bench/gpu_suite.sh is still building while these tests run (bias+GELU then runs torch).
    models = {b: BertForPreTraining(BertConfig.from_preset("mini", backend=backend, **values)).cuda().eval()
              for b, backend in (("torch", "torch"), ("fast", "auto"))}
    models["fast"].load_state_dict(models["torch"].state_dict())
    lengths = [128, 77, 1, 64]
    mask = (torch.arange(128)[None, :] < torch.tensor(lengths)[:, None]).long().cuda()
    ids = torch.randint(1, 500, (4, 128), device="cuda") * mask
    labels = torch.where(torch.rand(4, 128, device="cuda") < 0.15, ids, -100) * mask + (mask - 1) * 100
    labels[:, 0] = ids[:, 0]
    outs = {b: m(ids, torch.zeros_like(ids), mask, mlm_labels=labels,
                 next_sentence_label=torch.tensor([0, 1, 0, 1], device="cuda")) for b, m in models.items()}
    torch.testing.assert_close(outs["fast"].loss, outs["torch"].loss, rtol=1e-5, atol=1e-5)
    for out in outs.values():
        out.loss.backward()
    for (name, p), q in zip(models["torch"].named_parameters(), models["fast"].parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
