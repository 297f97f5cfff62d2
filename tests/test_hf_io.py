"""Loading and exporting Hugging Face folders: export -> from_pretrained -> identical outputs,
HF-saved folders (safetensors, .bin, sharded, BertModel) -> load_hf, config round trip, errors."""

import json
import warnings

import pytest
import torch
import transformers

from bert_fast import BertConfig, BertForPreTraining
from bert_fast.model.hf import config_from_hf, config_to_hf, export_hf, load_hf
from helpers import hf_reference, padded_batch


def tiny_model(**overrides):
    config = BertConfig.from_preset("tiny", vocab_size=300, max_position_embeddings=40,
                                    backend="torch", **overrides)
    model = BertForPreTraining(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def compare(model, reference):
    batch = padded_batch(model.config, lengths=[16, 7, 3], seq=16)
    with torch.no_grad():
        ours = model(**batch, return_mlm_logits=True)
        theirs = reference(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                           attention_mask=batch["attention_mask"], labels=batch["mlm_labels"],
                           next_sentence_label=batch["next_sentence_label"])
    predicted = batch["mlm_labels"] != -100
    torch.testing.assert_close(ours.mlm_logits, theirs.prediction_logits[predicted], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.nsp_logits, theirs.seq_relationship_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-5)


def test_export_reads_back_in_transformers(tmp_path):
    model = tiny_model()
    export_hf(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    # Readable as a plain write makes a file here (save_pretrained's 0644 under the usual umask).
    (tmp_path / "plain").write_text("")
    mode = (tmp_path / "plain").stat().st_mode & 0o777
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {mode}
    reference, info = transformers.BertForPreTraining.from_pretrained(
        str(tmp_path / "out"), output_loading_info=True, attn_implementation="eager")
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    compare(model, reference.eval())

    # ... and back into bert_fast, bit for bit.
    again, report = load_hf(tmp_path / "out", backend="torch")
    assert report.missing == [] and report.unexpected == []
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("layout", ["safetensors", "bin", "sharded", "bert_model"])
def test_load_folders_saved_by_transformers(tmp_path, layout):
    source = tiny_model()
    reference = hf_reference(source).eval()
    if layout == "bert_model":  # encoder only: heads are initialised, encoder must match
        reference.bert.save_pretrained(tmp_path)
    elif layout == "bin":  # the legacy format (transformers 5 no longer writes it)
        reference.config.save_pretrained(tmp_path)
        torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        reference.save_pretrained(tmp_path, max_shard_size="100KB" if layout == "sharded" else "10GB")
    if layout == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, report = load_hf(tmp_path, backend="torch")
    # Only an encoder-only checkpoint warns (about the initialised heads).
    assert any("load_hf" in str(w.message) for w in caught) == (layout == "bert_model")
    model.eval()
    if layout == "bert_model":
        assert set(report.missing) == {"mlm_transform.weight", "mlm_transform.bias", "mlm_norm.weight",
                                       "mlm_norm.bias", "mlm_bias", "nsp.weight", "nsp.bias"}
        batch = padded_batch(model.config, lengths=[10, 4], seq=10)
        with torch.no_grad():
            hidden, _ = model.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
            expected, _ = source.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        torch.testing.assert_close(hidden, expected, rtol=0, atol=0)
    else:
        assert report.missing == [] and report.unexpected == []
        compare(model, reference)


def test_config_round_trip():
    config = BertConfig.from_preset("small", vocab_size=1234, hidden_act="gelu_new", layer_norm_eps=1e-7)
    hf = transformers.BertConfig(**{k: v for k, v in config_to_hf(config).items() if k != "architectures"})
    back = config_from_hf(hf.to_dict(), backend=config.backend)
    assert back == config


def test_config_from_hf_refuses_unsupported_settings():
    values = config_to_hf(BertConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="position_embedding_type"):
        config_from_hf({**values, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({**values, "model_type": "roberta"})
    with pytest.raises(ValueError, match="num_attention_heads"):
        config_from_hf({**values, "num_attention_heads": 5})


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text('{\n  "hidden_size": 128,\n  oops\n}\n')
    with pytest.raises(ValueError, match=r"config.json:3: invalid JSON"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(BertConfig.from_preset("tiny"))))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(tmp_path)


def test_load_refuses_wrong_shapes_and_missing_encoder(tmp_path):
    model = tiny_model()
    export_hf(model, tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**values, "intermediate_size": 256}))
    with pytest.raises(ValueError, match="ffn_in.weight has shape"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**values, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="lacks encoder weights"):
        load_hf(tmp_path)


def test_export_is_atomic(tmp_path, monkeypatch):
    """A crash while writing the weights leaves the previous export intact and no temp files."""
    model = tiny_model()
    export_hf(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    import safetensors.torch

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_hf(tiny_model(), tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
