"""The encoder's unpadded fast path: unpad once per batch, every layer on the packed real tokens,
re-pad only for callers of [B, S, hidden]; against the padded torch path (the oracle)."""

import pytest
import torch

from bert_fast import BertConfig, BertForPreTraining, ops
from bert_fast.model.bert import dropout_site
from bert_fast.ops import padding
from helpers import padded_batch


def pair(**overrides):
    values = {"vocab_size": 120, "max_position_embeddings": 24, "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0, **overrides}
    slow = BertForPreTraining(BertConfig.from_preset("tiny", backend="torch", **values)).eval()
    fast = BertForPreTraining(BertConfig.from_preset("tiny", backend="fast", **values)).eval()
    fast.load_state_dict(slow.state_dict())
    return slow, fast


def test_packing_round_trips_any_mask():
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 1, 1]])
    packing = padding.unpad(mask)
    assert packing.cu_seqlens.tolist() == [0, 3, 3, 6] and packing.max_seqlen == 3
    x = torch.randn(3, 4, 5, requires_grad=True)
    packed = packing.pack(x)
    torch.testing.assert_close(packed, x[mask.bool()], rtol=0, atol=0)
    torch.testing.assert_close(packing.pad(packed), x * mask[..., None], rtol=0, atol=0)
    positions = torch.tensor([0, 2, 5, 11, 4])  # real, padding, padding, real, padding
    torch.testing.assert_close(packing.gather(packed, positions), (x * mask[..., None]).flatten(0, 1)[positions])
    torch.testing.assert_close(packing.first_tokens(packed), (x * mask[..., None])[:, 0])
    packing.first_tokens(packed).sum().backward()
    assert x.grad[:, 0].abs().sum() > 0 and x.grad[1].abs().sum() == 0

    dense = padding.dense(3, 4, torch.device("cpu"))
    torch.testing.assert_close(dense.pack(x), x.flatten(0, 1), rtol=0, atol=0)
    assert dense.cu_seqlens.tolist() == [0, 4, 8, 12] and dense.max_seqlen == 4


def test_fast_path_unpads_once_and_attends_only_real_tokens(monkeypatch):
    slow, fast = pair()
    batch = padded_batch(fast.config, lengths=[24, 11, 1, 17], seq=24)
    real = int(batch["attention_mask"].sum())
    calls, unpads = [], []
    attention_qkv, unpad = ops.attention_qkv, padding.unpad

    def spy_attention(qkv, *args, **kwargs):
        calls.append((qkv.shape[0], kwargs["site"]))
        return attention_qkv(qkv, *args, **kwargs)

    def spy_unpad(mask):
        unpads.append(mask.shape)
        return unpad(mask)

    monkeypatch.setattr(ops, "attention_qkv", spy_attention)
    monkeypatch.setattr(padding, "unpad", spy_unpad)
    hidden, pooled = fast.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    # Every layer attends over the real tokens only, each at its own dropout site.
    layers = fast.config.num_hidden_layers
    assert calls == [(real, dropout_site("attention", i)) for i in range(layers)] and len(unpads) == 1

    with torch.no_grad():
        expected, expected_pooled = slow.bert(batch["input_ids"], batch["token_type_ids"],
                                              batch["attention_mask"])
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden[keep], expected[keep], rtol=1e-5, atol=1e-5)
    assert torch.all(hidden[~keep] == 0)  # re-padded with zeros
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-5, atol=1e-5)


def test_pretraining_with_holes_in_the_mask_matches_torch_path():
    slow, fast = pair()
    batch = padded_batch(fast.config, lengths=[12, 9, 3], seq=12, seed=1)
    batch["attention_mask"][0, 7] = 0  # a hole in the middle: not a prefix mask
    batch["mlm_labels"][0, 7] = -100
    outs = [m(**batch) for m in (slow, fast)]
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1].mlm_accuracy, outs[0].mlm_accuracy)
    for out in outs:
        out.loss.backward()
    for (name, p), q in zip(slow.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("with_mask", [True, False])
def test_full_logits_and_no_mask_match_torch_path(with_mask):
    slow, fast = pair()
    batch = padded_batch(fast.config, lengths=[9, 16], seq=16, seed=2)
    mask = batch["attention_mask"] if with_mask else None
    with torch.no_grad():
        a = slow(batch["input_ids"], batch["token_type_ids"], mask).mlm_logits
        b = fast(batch["input_ids"], batch["token_type_ids"], mask).mlm_logits
    keep = batch["attention_mask"].bool() if with_mask else torch.ones(2, 16, dtype=torch.bool)
    assert b.shape == a.shape == (2, 16, 120)
    torch.testing.assert_close(b[keep], a[keep], rtol=1e-5, atol=1e-5)


def test_fast_training_with_dropout_runs_and_differs_per_step():
    _, fast = pair(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    fast.train()
    batch = padded_batch(fast.config, lengths=[7, 3], seq=7)
    first, second = fast(**batch).loss, fast(**batch).loss
    assert torch.isfinite(first) and first.item() != second.item()
    first.backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)


def test_dropout_draws_one_seed_per_forward_and_checkpointing_replays_it(monkeypatch):
    # The fast path draws one Philox key per forward (not per layer or call); activation
    # checkpointing recomputes each layer with that key, so its gradients equal the plain ones.
    config = BertConfig.from_preset("tiny", backend="fast", vocab_size=120, max_position_embeddings=24,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3)
    model = BertForPreTraining(config).train()
    batch = padded_batch(config, lengths=[24, 11, 17], seq=24)
    draws = []
    new_seed = ops.new_dropout_seed
    monkeypatch.setattr(ops, "new_dropout_seed", lambda device: draws.append(device) or new_seed(device))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.bert.gradient_checkpointing = checkpointing
        torch.manual_seed(3)
        model(**batch).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert len(draws) == 2  # one per forward, also with recomputation
    for plain, replayed in zip(*grads):
        assert torch.equal(plain, replayed)
    torch.manual_seed(4)
    other = model(**batch).loss
    torch.manual_seed(3)
    assert other != model(**batch).loss  # another seed, another mask


def test_every_dropout_call_has_its_own_site():
    sites = [dropout_site("embeddings")] + [dropout_site(op, layer) for layer in range(24)
                                            for op in ("attention", "attention_output", "output")]
    assert len(set(sites)) == len(sites)
