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


class _PartitionedOutsideForward:
    """What DeepSpeed ZeRO-3 does to the parameters: each module's own (recurse=False) are
    present only while its forward runs and an empty tensor otherwise. A module whose forward
    reads another module's parameter then meets an empty tensor and fails."""

    def __init__(self, model: torch.nn.Module):
        self.full = {p: p.data for p in model.parameters()}
        self.hooks, self.calls = [], []
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if own:
                self.hooks.append(module.register_forward_pre_hook(lambda m, args, own=own: self._gather(m, own)))
                self.hooks.append(module.register_forward_hook(lambda m, args, out, own=own: self._release(own)))

    def _gather(self, module, own):
        self.calls.append(module)
        for p in own:
            p.data = self.full[p]

    def _release(self, own):
        for p in own:
            p.data = torch.empty(0, dtype=p.dtype)

    def __enter__(self):
        self._release(self.full)
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        for p, data in self.full.items():
            p.data = data


@pytest.mark.parametrize("backend, fp8_scaling", [("torch", None), ("fast", None), ("torch", "delayed")])
def test_every_parameter_is_read_inside_its_own_modules_forward(backend, fp8_scaling):
    """DeepSpeed ZeRO-3 gathers a module's parameters around that module's forward only, so this
    is what lets it train the model with no parameter registered as external (fused ops read
    their bias, LayerNorm and tables inside those modules' forwards). Emulated, the padded forward
    (losses, MLM logits at the predicted positions, full logits) and the packed one give what they
    give with every parameter in place, and every module holding parameters ran."""
    from bert_fast.ops import fp8
    from helpers import packed_from_padded

    model = small_model(backend=backend, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if fp8_scaling:
        fp8.enable(model, fp8.Fp8Recipe(fp8_scaling))
    batch = padded_batch(model.config, lengths=[16, 9, 2], seq=16)
    runs = {"padded": lambda: model(**batch, return_mlm_logits=True),
            "logits": lambda: model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]),
            "packed": lambda: model(**packed_from_padded(batch, filler=5, empty_slots=1))}
    for name, run in runs.items():
        state = {k: v.clone() for k, v in model.state_dict().items()}  # FP8 histories roll per forward
        expected = run()
        model.load_state_dict(state)
        with _PartitionedOutsideForward(model) as emulation:
            got = run()
        assert {id(m) for m in emulation.calls} == {
            id(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}, name
        for field, value in expected.items():
            if value is not None:
                torch.testing.assert_close(got[field], value, rtol=0, atol=0, msg=f"{name}: {field}")
