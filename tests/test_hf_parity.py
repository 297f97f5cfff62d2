"""Parity with transformers.BertForPreTraining on random weights, float32, eval mode, a padded
batch: MLM logits on predicted positions, NSP logits, losses and every parameter gradient."""

import pytest
import torch

from bert_fast import BertConfig, BertForPreTraining
from bert_fast.model.hf import to_hf_state_dict
from helpers import hf_reference, max_rel_err, padded_batch

RTOL = 1e-5


@pytest.mark.parametrize("backend", ["torch", "fast"])
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_matches_transformers(backend, hidden_act):
    config = BertConfig.from_preset("tiny", vocab_size=1000, max_position_embeddings=64,
                                    num_hidden_layers=3, hidden_act=hidden_act, backend=backend)
    model = BertForPreTraining(config).eval()
    # Non-trivial LayerNorm and bias values, so a swapped or missing parameter cannot hide.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    reference = hf_reference(model).eval()
    batch = padded_batch(config, lengths=[23, 9, 1, 17], seq=23)

    ours = model(**batch, return_mlm_logits=True)
    theirs = reference(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                       attention_mask=batch["attention_mask"], labels=batch["mlm_labels"],
                       next_sentence_label=batch["next_sentence_label"])
    predicted = batch["mlm_labels"] != -100
    errors = {
        "mlm_logits": max_rel_err(ours.mlm_logits, theirs.prediction_logits[predicted]),
        "nsp_logits": max_rel_err(ours.nsp_logits, theirs.seq_relationship_logits),
        "loss": max_rel_err(ours.loss, theirs.loss),
    }

    ours.loss.backward()
    theirs.loss.backward()
    ours_grads = to_hf_state_dict({n: p.grad for n, p in model.named_parameters()}, config)
    theirs_grads = {n: p.grad for n, p in reference.named_parameters()}
    assert set(theirs_grads) <= set(ours_grads) | {"cls.predictions.decoder.weight"}
    scale = max(g.abs().max().item() for g in theirs_grads.values())
    for name, expected in theirs_grads.items():
        if name not in ours_grads:
            continue
        if expected.abs().max().item() < 1e-6 * scale:
            # Analytically zero (the key bias shifts every score of a query equally): both sides
            # hold rounding noise only, so compare against the model's gradient scale.
            assert ours_grads[name].abs().max().item() < 1e-6 * scale, name
            continue
        errors[f"grad {name}"] = max_rel_err(ours_grads[name], expected)

    worst = max(errors, key=errors.get)
    print(f"worst relative error: {worst} = {errors[worst]:.2e}")
    assert errors[worst] < RTOL, {k: v for k, v in errors.items() if v >= RTOL}


def test_losses_are_mean_mlm_plus_nsp():
    config = BertConfig.from_preset("tiny", vocab_size=500, backend="torch")
    model = BertForPreTraining(config).eval()
    batch = padded_batch(config, lengths=[12, 5], seq=12)
    out = model(**batch, return_mlm_logits=True)
    labels = batch["mlm_labels"][batch["mlm_labels"] != -100]
    mlm = torch.nn.functional.cross_entropy(out.mlm_logits.double(), labels)
    nsp = torch.nn.functional.cross_entropy(out.nsp_logits.double(), batch["next_sentence_label"])
    torch.testing.assert_close(out.mlm_loss.double(), mlm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), mlm + nsp, rtol=1e-6, atol=1e-6)
    accuracy = (out.mlm_logits.argmax(-1) == labels).double().mean()
    torch.testing.assert_close(out.mlm_accuracy.double(), accuracy)
    assert out.mlm_predictions.item() == labels.numel()
