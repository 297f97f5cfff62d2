"""Bad batches raise TypeError/ValueError naming the argument, before any kernel runs."""

import pytest
import torch

from bert_fast import BertConfig, BertForPreTraining

CONFIG = BertConfig.from_preset("tiny", vocab_size=100, max_position_embeddings=16, backend="torch")


@pytest.fixture(scope="module")
def model():
    return BertForPreTraining(CONFIG).eval()


def good(**changes):
    batch = dict(input_ids=torch.randint(0, 100, (2, 8)), token_type_ids=torch.zeros(2, 8, dtype=torch.long),
                 attention_mask=torch.ones(2, 8, dtype=torch.long),
                 mlm_labels=torch.full((2, 8), -100), next_sentence_label=torch.tensor([0, 1]))
    batch["mlm_labels"][:, 3] = 7
    batch.update(changes)
    return batch


CASES = [
    ("ids above vocab", dict(input_ids=torch.full((2, 8), 100)), ValueError, r"input_ids contains 100; allowed values are \[0, 99\]"),
    ("negative ids", dict(input_ids=torch.full((2, 8), -1)), ValueError, "input_ids contains -1"),
    ("too long", dict(input_ids=torch.zeros(2, 17, dtype=torch.long), token_type_ids=None, attention_mask=None,
                      mlm_labels=None), ValueError, "sequence length 17, longer than max_position_embeddings=16"),
    ("1-D ids", dict(input_ids=torch.zeros(8, dtype=torch.long)), ValueError, "input_ids must have 2 dimension"),
    ("float ids", dict(input_ids=torch.zeros(2, 8)), TypeError, "input_ids must have dtype"),
    ("list ids", dict(input_ids=[[1, 2]]), TypeError, "input_ids must be a torch.Tensor"),
    ("empty", dict(input_ids=torch.zeros(0, 8, dtype=torch.long), token_type_ids=None, attention_mask=None,
                   mlm_labels=None, next_sentence_label=None), ValueError, "input_ids must be non-empty"),
    ("type ids range", dict(token_type_ids=torch.full((2, 8), 2)), ValueError, "token_type_ids contains 2"),
    ("type ids shape", dict(token_type_ids=torch.zeros(2, 7, dtype=torch.long)), ValueError, r"token_type_ids must have shape \(2, 8\)"),
    ("mask values", dict(attention_mask=torch.full((2, 8), 2)), ValueError, "attention_mask must contain only 0 and 1"),
    ("float mask values", dict(attention_mask=torch.full((2, 8), 0.5)), ValueError, "attention_mask must contain only 0 and 1"),
    ("mask dtype", dict(attention_mask=torch.ones(2, 8, dtype=torch.complex64)), TypeError, "attention_mask must have dtype"),
    ("labels shape", dict(mlm_labels=torch.full((2, 9), -100)), ValueError, r"mlm_labels must have shape \(2, 8\)"),
    ("labels range", dict(mlm_labels=torch.full((2, 8), 100)), ValueError, r"mlm_labels contains 100; allowed values are \[0, 99\] or -100"),
    ("labels negative", dict(mlm_labels=torch.full((2, 8), -5)), ValueError, "mlm_labels contains -5"),
    ("labels dtype", dict(mlm_labels=torch.zeros(2, 8)), TypeError, "mlm_labels must have dtype"),
    ("label on padding", dict(attention_mask=torch.tensor([[1] * 8, [1] * 3 + [0] * 5])), ValueError,
     "mlm_labels predicts a position where attention_mask is 0"),
    ("nsp shape", dict(next_sentence_label=torch.tensor([0, 1, 1])), ValueError, r"next_sentence_label must have shape \(2,\)"),
    ("nsp range", dict(next_sentence_label=torch.tensor([0, 2])), ValueError, "next_sentence_label contains 2"),
]


@pytest.mark.parametrize("changes, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_batch_raises(model, changes, error, match):
    with pytest.raises(error, match=match):
        model(**good(**changes))


def test_wrong_device_is_named(model):
    # A meta tensor stands in for "another device" on a CPU-only machine.
    with pytest.raises(ValueError, match="token_type_ids is on meta but the model is on cpu"):
        model(**good(token_type_ids=torch.zeros(2, 8, dtype=torch.long, device="meta")))


def test_ignore_index_and_good_batch_pass(model):
    out = model(**good(next_sentence_label=torch.tensor([-100, 1])))
    assert torch.isfinite(out.loss)


def test_encoder_validates_too(model):
    with pytest.raises(ValueError, match="input_ids contains 100"):
        model.bert(torch.full((1, 4), 100))


@pytest.mark.parametrize("field, value, error, match", [
    ("num_attention_heads", 5, ValueError, r"hidden_size \(128\) must be divisible by num_attention_heads \(5\)"),
    ("hidden_size", 0, ValueError, "hidden_size must be >= 1"),
    ("vocab_size", 1.5, TypeError, "vocab_size must be an int"),
    ("hidden_dropout_prob", 1.0, ValueError, r"hidden_dropout_prob must be a float in \[0, 1\)"),
    ("hidden_act", "swish", ValueError, "hidden_act must be one of"),
    ("backend", "cuda", ValueError, "backend must be one of"),
    ("layer_norm_eps", 0, ValueError, "layer_norm_eps must be a positive float"),
])
def test_bad_config(field, value, error, match):
    with pytest.raises(error, match=match):
        BertConfig.from_preset("tiny", **{field: value})


def test_unknown_config_fields():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        BertConfig.from_preset("huge")
    with pytest.raises(ValueError, match=r"unknown BertConfig field\(s\) \['hiden_size'\]"):
        BertConfig.from_dict({"hiden_size": 64})


def test_int32_inputs_work_and_small_int_types_are_refused(model):
    batch = good()
    int32 = {k: v.to(torch.int32) for k, v in batch.items()}
    torch.testing.assert_close(model(**int32).loss, model(**batch).loss)
    with pytest.raises(TypeError, match=r"input_ids must have dtype in \(int64, int32\)"):
        model(**good(input_ids=batch["input_ids"].to(torch.uint8)))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.float32])
def test_attention_mask_dtypes_agree(model, dtype):
    batch = good(attention_mask=torch.tensor([[1] * 8, [1] * 5 + [0] * 3]))
    expected = model(**batch).loss
    batch["attention_mask"] = batch["attention_mask"].to(dtype)
    torch.testing.assert_close(model(**batch).loss, expected)
