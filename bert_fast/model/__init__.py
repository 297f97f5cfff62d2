"""The model layer: `BertConfig` (config.py), the encoder and its pretraining heads (bert.py), the
batch contract's checks (inputs.py) and the Hugging Face weight mapping (hf.py). It computes through
`bert_fast.ops` below it and never imports training."""

from bert_fast.model.bert import BertForPreTraining, BertModel, PretrainingOutput
from bert_fast.model.config import BertConfig

__all__ = ["BertConfig", "BertForPreTraining", "BertModel", "PretrainingOutput"]
