"""bert_fast: BERT pretraining (masked LM + next-sentence prediction) on fused kernels."""

from bert_fast.config import BertConfig
from bert_fast.model import BertForPreTraining, BertModel, PretrainingOutput

__all__ = ["BertConfig", "BertForPreTraining", "BertModel", "PretrainingOutput"]
__version__ = "0.1.0"
