"""bert_fast/train/cuda_graphs.py where no GPU is: refused with the reason and the setting to change.
tests/gpu/test_cuda_graphs_gpu.py checks graphed steps against eager ones on a device."""

import pytest
import torch

from bert_fast import BertConfig, BertForPreTraining
from bert_fast.train.cuda_graphs import GraphedStep


def test_a_model_off_cuda_is_refused_with_the_setting_to_change():
    model = BertForPreTraining(BertConfig.from_preset("tiny", vocab_size=64, backend="torch"))
    with pytest.raises(RuntimeError, match=r"CUDA graphs need the model on a CUDA device; this run has cpu "
                                           r"\(set train.cuda_graphs: false\)"):
        GraphedStep(model)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="warmup must be an int >= 1"):
            GraphedStep(model.cuda(), warmup=0)
