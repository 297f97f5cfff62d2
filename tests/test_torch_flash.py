"""bert_fast/ops/torch_flash.py's plumbing on the CPU, where torch's flash kernels do not exist: the
private aten ops are replaced by a float64 reference with the same contract, so the wrapper's
arguments (cu_seqlens, max_seqlen, scale, dropout, the RNG state handed from forward to backward)
and its autograd are checked here; tests/gpu runs the real kernels."""

import math

import pytest
import torch

from bert_fast.kernels.attention import attention_varlen_reference
from bert_fast.ops import torch_flash


def reference_lse(q, k, cu, scale):
    rows = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        s = q[a:b].transpose(0, 1) @ k[a:b].transpose(0, 1).transpose(-1, -2) * scale
        rows.append(torch.logsumexp(s, -1))
    return torch.cat(rows, dim=1)


@pytest.fixture
def fake_aten(monkeypatch):
    calls = {}

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale=None):
        assert cu_q is cu_k and max_q == max_k and not is_causal and not return_debug_mask
        calls["forward"] = dict(max_seqlen=max_q, dropout_p=dropout_p, scale=scale)
        out = attention_varlen_reference(q, k, v, cu_q, softmax_scale=scale)
        return out, reference_lse(q, k, cu_q, scale), torch.tensor([7]), torch.tensor([9]), torch.empty(0)

    def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, rng_a, rng_b, *,
                 scale=None):
        calls["backward"] = dict(rng=(int(rng_a), int(rng_b)), max_seqlen=max_q, scale=scale)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            attention_varlen_reference(*leaves, cu_q, softmax_scale=scale).backward(dout)
        return tuple(leaf.grad for leaf in leaves)

    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", forward)
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_backward", backward)
    return calls


def test_wrapper_passes_shapes_scale_and_rng_state_and_differentiates(fake_aten):
    lengths = [5, 1, 12]
    cu = torch.tensor([0, 5, 6, 18], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(18, 2, 16, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3))
    out = torch_flash.attention_varlen(q, k, v, cu, max(lengths))
    grad = torch.randn(out.shape, dtype=torch.float64, generator=g)
    out.backward(grad)
    assert fake_aten["forward"] == dict(max_seqlen=12, dropout_p=0.0, scale=1 / math.sqrt(16))
    assert fake_aten["backward"] == dict(rng=(7, 9), max_seqlen=12, scale=1 / math.sqrt(16))

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = attention_varlen_reference(*leaves, cu)
    expected.backward(grad)
    torch.testing.assert_close(out, expected)
    for ours, theirs in zip((q, k, v), leaves):
        torch.testing.assert_close(ours.grad, theirs.grad)


def test_unavailable_reasons_name_the_limit():
    cpu = torch.device("cpu")
    assert "CUDA device" in torch_flash.unavailable_reason(cpu, torch.bfloat16, 64)
