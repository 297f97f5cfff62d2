"""bert_fast.ops: each op's torch form against a float64 reference, and its argument checks."""

import pytest
import torch
import torch.nn.functional as F

from bert_fast import ops


def test_add_layer_norm_matches_float64():
    x, residual = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    x_bias, weight, bias = torch.randn(24), torch.randn(24), torch.randn(24)
    out = ops.add_layer_norm(x, weight, bias, 1e-5, x_bias=x_bias, residual=residual)
    h = (x + x_bias + residual).double()
    expected = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(out.double(), expected * weight.double() + bias.double(), rtol=1e-5, atol=1e-5)


def test_attention_matches_float64_and_ignores_padded_keys():
    b, s, h, d = 2, 7, 3, 8
    q, k, v = (torch.randn(b, s, h, d) for _ in range(3))
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 4:] = 0
    out = ops.attention(q, k, v, mask)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / d**0.5
    scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_attention_all_padding_row_is_finite():
    q = k = v = torch.randn(1, 3, 2, 4)
    assert torch.isfinite(ops.attention(q, k, v, torch.zeros(1, 3))).all()


def test_mlm_loss_matches_float64():
    hidden, weight, bias = torch.randn(6, 16), torch.randn(50, 16), torch.randn(50)
    labels = torch.tensor([3, -100, 49, 0, -100, 7])
    loss, correct = ops.mlm_loss(hidden, weight, bias, labels)
    logits = hidden.double() @ weight.double().T + bias.double()
    expected = F.cross_entropy(logits, labels)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    valid = labels != -100
    assert correct.item() == (logits.argmax(-1)[valid] == labels[valid]).sum().item()


@pytest.mark.parametrize("call, error, match", [
    (lambda: ops.attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3)),
     ValueError, "q must have 4 dimension"),
    (lambda: ops.attention(torch.randn(1, 3, 2, 4), torch.randn(1, 4, 2, 4), torch.randn(1, 3, 2, 4), torch.ones(1, 3)),
     ValueError, r"k must have shape \(1, 3, 2, 4\)"),
    (lambda: ops.attention(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4).half(), torch.randn(1, 3, 2, 4), torch.ones(1, 3)),
     TypeError, "k has dtype torch.float16"),
    (lambda: ops.attention(*(torch.randn(1, 3, 2, 4),) * 3, torch.ones(1, 4)),
     ValueError, r"attention_mask must have shape \(1, 3\)"),
    (lambda: ops.add_layer_norm(torch.randn(2, 8), torch.ones(7), torch.zeros(8), 1e-5),
     ValueError, r"weight must have shape \(8,\)"),
    (lambda: ops.add_layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(8), 1e-5, residual=torch.randn(3, 8)),
     ValueError, r"residual must have shape \(2, 8\)"),
    (lambda: ops.mlm_loss(torch.randn(4, 8), torch.randn(10, 9), torch.randn(10), torch.zeros(4, dtype=torch.long)),
     ValueError, r"weight must have shape \(\*, 8\)"),
    (lambda: ops.mlm_loss(torch.randn(4, 8), torch.randn(10, 8), torch.randn(10), torch.zeros(4)),
     TypeError, "labels must have dtype"),
    (lambda: ops.mlm_loss(torch.randn(4, 8), torch.randn(10, 8), torch.randn(11), torch.zeros(4, dtype=torch.long)),
     ValueError, r"bias must have shape \(10,\)"),
    (lambda: ops.embeddings(torch.zeros(2, 3), *(torch.zeros(2, 3, dtype=torch.long),) * 2, *(torch.randn(5, 4),) * 3,
                            torch.ones(4), torch.zeros(4), 1e-5),
     TypeError, "input_ids must have dtype"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
