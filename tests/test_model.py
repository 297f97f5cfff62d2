"""Properties of the encoder beyond parity: sizes, padding invariance, dropout, backends."""

import pytest
import torch
import transformers

from bert_fast import BertConfig, BertForPreTraining, ops
from bert_fast.model.config import PRESETS
from bert_fast.model.hf import config_to_hf
from helpers import padded_batch


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameter_count_matches_transformers(preset):
    config = BertConfig.from_preset(preset)
    values = {k: v for k, v in config_to_hf(config).items() if k != "architectures"}
    with torch.device("meta"):
        ours = sum(p.numel() for p in BertForPreTraining(config).parameters())
        theirs = sum(p.numel() for p in transformers.BertForPreTraining(transformers.BertConfig(**values)).parameters())
    assert ours == theirs
    if preset == "base":
        assert 110e6 < ours < 111e6  # BERT-base: 110M with the tied decoder counted once


def small_model(**overrides):
    values = {"vocab_size": 200, "max_position_embeddings": 32, "backend": "torch", **overrides}
    config = BertConfig.from_preset("tiny", **values)
    return BertForPreTraining(config)


def test_padding_does_not_change_real_tokens():
    model = small_model().eval()
    batch = padded_batch(model.config, lengths=[20, 6], seq=20)
    with torch.no_grad():
        hidden, pooled = model.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        alone, alone_pooled = model.bert(batch["input_ids"][1:, :6], batch["token_type_ids"][1:, :6])
        # Different padding content must not matter either.
        noisy = batch["input_ids"].clone()
        noisy[1, 6:] = torch.randint(1, 200, (14,))
        hidden_noisy, _ = model.bert(noisy, batch["token_type_ids"], batch["attention_mask"])
    torch.testing.assert_close(hidden[1, :6], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled[1], alone_pooled[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden_noisy[1, :6], hidden[1, :6], rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
    model = small_model()
    batch = padded_batch(model.config, lengths=[12, 12], seq=12)
    model.train()
    a, b = model(**batch).loss, model(**batch).loss
    assert a.item() != b.item()
    model.eval()
    with torch.no_grad():
        assert model(**batch).loss.item() == model(**batch).loss.item()


def test_fast_backend_matches_torch_backend_on_cpu():
    torch_model = small_model().eval()
    fast_model = small_model(backend="fast").eval()
    fast_model.load_state_dict(torch_model.state_dict())
    batch = padded_batch(torch_model.config, lengths=[16, 9, 2], seq=16)
    a, b = torch_model(**batch), fast_model(**batch)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(torch_model.named_parameters(), fast_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_mlm_head_runs_on_predicted_positions_only(monkeypatch):
    model = small_model().eval()
    batch = padded_batch(model.config, lengths=[16, 5], seq=16)
    seen = []
    real = ops.mlm_loss

    def spy(hidden, *args, **kwargs):
        seen.append(hidden.shape[0])
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(ops, "mlm_loss", spy)
    out = model(**batch)
    n = int((batch["mlm_labels"] != -100).sum())
    assert seen == [n] and n < 0.5 * batch["input_ids"].numel()
    assert out.mlm_logits is None  # no [N, vocab] logits unless asked for

    with torch.no_grad():
        full = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).mlm_logits
        picked = model(**batch, return_mlm_logits=True).mlm_logits
    assert full.shape == (2, 16, 200)
    torch.testing.assert_close(picked, full[batch["mlm_labels"] != -100], rtol=1e-5, atol=1e-5)


def test_all_ignored_labels_give_zero_loss_not_nan():
    model = small_model().eval()
    batch = padded_batch(model.config, lengths=[8, 4], seq=8)
    batch["mlm_labels"].fill_(-100)
    out = model(**batch)
    assert out.mlm_loss.item() == 0.0 and out.mlm_predictions.item() == 0
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(out.nsp_loss.item())
    batch["next_sentence_label"].fill_(-100)
    out = model(**batch)
    assert out.nsp_loss.item() == 0.0 and out.loss.item() == 0.0


def test_initialisation_follows_bert():
    model = small_model(vocab_size=5000, initializer_range=0.02)
    word = model.bert.embeddings.word.weight
    assert torch.all(word[0] == 0)  # the pad row
    assert abs(word[1:].std().item() - 0.02) < 1e-3
    assert torch.all(model.bert.layers[0].qkv.bias == 0)
    assert torch.all(model.mlm_norm.weight == 1) and torch.all(model.mlm_bias == 0)
    assert model.decoder_weight is word
