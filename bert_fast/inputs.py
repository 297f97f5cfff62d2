"""Validation of the model's batch (the contract in DESIGN.md): shapes, dtypes, devices and
value ranges, each error naming the argument. Value ranges need one device->host copy per batch;
it happens here, once, before any kernel could index out of range."""

from __future__ import annotations

import torch

from bert_fast.checks import INT_DTYPES, check_tensor
from bert_fast.config import BertConfig

IGNORE_INDEX = -100


def check_batch(config: BertConfig, device: torch.device, input_ids, token_type_ids=None,
                attention_mask=None, mlm_labels=None, next_sentence_label=None) -> None:
    check_tensor("input_ids", input_ids, ndim=2, dtypes=INT_DTYPES)
    batch, seq = input_ids.shape
    if batch == 0 or seq == 0:
        raise ValueError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
    if seq > config.max_position_embeddings:
        raise ValueError(f"input_ids has sequence length {seq}, longer than "
                         f"max_position_embeddings={config.max_position_embeddings}")
    named = {"input_ids": input_ids}
    for name, value in (("token_type_ids", token_type_ids), ("mlm_labels", mlm_labels)):
        if value is not None:
            named[name] = check_tensor(name, value, dtypes=INT_DTYPES, shape=(batch, seq))
    if attention_mask is not None:
        named["attention_mask"] = check_tensor(
            "attention_mask", attention_mask, shape=(batch, seq),
            dtypes=INT_DTYPES + (torch.bool, torch.uint8, torch.int8, torch.float32, torch.float16,
                                 torch.bfloat16))
    if next_sentence_label is not None:
        named["next_sentence_label"] = check_tensor(
            "next_sentence_label", next_sentence_label, dtypes=INT_DTYPES, shape=(batch,))
    for name, value in named.items():
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the model is on {device}")

    # Labels may hold IGNORE_INDEX, a float mask anything: map those to an in-range or an
    # out-of-range value, then take (min, max) of every tensor in one stack and one transfer.
    bounds = {
        "input_ids": (0, config.vocab_size - 1),
        "token_type_ids": (0, config.type_vocab_size - 1),
        "attention_mask": (0, 1),
        "mlm_labels": (0, config.vocab_size - 1),
        "next_sentence_label": (0, 1),
    }
    if "mlm_labels" in named and "attention_mask" in named:
        # A label on padding has no defined target: the unpadded fast path never computes those
        # positions, so both paths refuse it rather than disagree.
        bounds["labels on padding"] = (0, 0)
        named["labels on padding"] = ((mlm_labels != IGNORE_INDEX) & (attention_mask == 0)).to(torch.int32)
    if "mlm_labels" in named:
        named["mlm_labels"] = named["mlm_labels"].masked_fill(mlm_labels == IGNORE_INDEX, 0)
    if "next_sentence_label" in named:
        named["next_sentence_label"] = named["next_sentence_label"].masked_fill(
            next_sentence_label == IGNORE_INDEX, 0)
    if "attention_mask" in named and attention_mask.is_floating_point():
        binary = (attention_mask == 0) | (attention_mask == 1)
        named["attention_mask"] = torch.where(binary, attention_mask, 2.0)
    stats = torch.stack([torch.stack([v.min(), v.max()]).to(torch.float64) for v in named.values()])
    for name, (low, high) in zip(named, stats.tolist()):
        lo, hi = bounds[name]
        if low < lo or high > hi:
            if name == "attention_mask":
                raise ValueError("attention_mask must contain only 0 and 1 (1 = token)")
            if name == "labels on padding":
                raise ValueError(f"mlm_labels predicts a position where attention_mask is 0 (padding); "
                                 f"set those labels to {IGNORE_INDEX}")
            bad = low if low < lo else high
            ignore = f" or {IGNORE_INDEX}" if name in ("mlm_labels", "next_sentence_label") else ""
            raise ValueError(f"{name} contains {bad:g}; allowed values are [{lo}, {hi}]{ignore}")
