"""Validation of the model's batch (the contract in DESIGN.md): shapes, dtypes, devices and
value ranges, each error naming the argument. Value ranges need one device->host copy per batch;
it happens here, once, before any kernel could index out of range."""

from __future__ import annotations

import torch

from bert_fast.kernels.checks import INT_DTYPES, check_tensor
from bert_fast.labels import IGNORE_INDEX
from bert_fast.model.config import BertConfig


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


def check_packed_batch(config: BertConfig, device: torch.device, input_ids, token_type_ids, cu_seqlens,
                       max_seqlen, mlm_positions=None, mlm_labels=None, next_sentence_label=None, *,
                       validate: bool = True) -> None:
    """The packed form (what the training loader builds): input_ids and token_type_ids [T],
    cu_seqlens [B + 1] int32 (rows from cu_seqlens[-1] to T are filler), max_seqlen an int at
    least every sequence's length, mlm_positions and mlm_labels [N] (rows of the predicted tokens
    and their labels, -100 for unused slots), next_sentence_label [B]. Shapes, dtypes and devices
    always; the values too with `validate` (one device->host copy), which the training loop skips
    for batches bert_fast.data built and checked on the host."""
    check_tensor("input_ids", input_ids, ndim=1, dtypes=INT_DTYPES)
    total = input_ids.shape[0]
    if total == 0:
        raise ValueError("input_ids must be non-empty, got shape (0,)")
    named = {"input_ids": input_ids}
    if token_type_ids is not None:
        named["token_type_ids"] = check_tensor("token_type_ids", token_type_ids, dtypes=INT_DTYPES,
                                               shape=(total,))
    named["cu_seqlens"] = check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    batch = cu_seqlens.shape[0] - 1
    if batch < 1:
        raise ValueError(f"cu_seqlens must have at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)
            or not 1 <= max_seqlen <= config.max_position_embeddings):
        raise ValueError(f"max_seqlen must be an int in [1, max_position_embeddings="
                         f"{config.max_position_embeddings}], got {max_seqlen!r}")
    if (mlm_positions is None) != (mlm_labels is None):
        raise ValueError("mlm_positions and mlm_labels come together (rows and their labels)")
    if mlm_positions is not None:
        named["mlm_positions"] = check_tensor("mlm_positions", mlm_positions, ndim=1, dtypes=INT_DTYPES)
        named["mlm_labels"] = check_tensor("mlm_labels", mlm_labels, dtypes=INT_DTYPES,
                                           shape=tuple(mlm_positions.shape))
    if next_sentence_label is not None:
        named["next_sentence_label"] = check_tensor("next_sentence_label", next_sentence_label,
                                                    dtypes=INT_DTYPES, shape=(batch,))
    for name, value in named.items():
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the model is on {device}")
    if not validate:
        return
    lengths = cu_seqlens.diff()
    predicted = mlm_labels != IGNORE_INDEX if mlm_labels is not None else None
    # (value, low, high) per check, reduced to one [k, 2] tensor and copied to the host once.
    checks = {
        "input_ids": (input_ids, 0, config.vocab_size - 1),
        "token_type_ids": (token_type_ids, 0, config.type_vocab_size - 1),
        "cu_seqlens[0]": (cu_seqlens[:1], 0, 0),
        "cu_seqlens[-1]": (cu_seqlens[-1:], 0, total),
        "sequence lengths (cu_seqlens' steps)": (lengths, 0, max_seqlen),
        "mlm_positions": (mlm_positions, 0, total - 1),
        "mlm_labels": (None if predicted is None else mlm_labels.masked_fill(~predicted, 0), 0,
                       config.vocab_size - 1),
        # a label past cu_seqlens[-1] would train on filler
        "predicted rows": (None if predicted is None else
                           torch.where(predicted, mlm_positions - cu_seqlens[-1], -1), -total, -1),
        "next_sentence_label": (None if next_sentence_label is None else
                                next_sentence_label.masked_fill(next_sentence_label == IGNORE_INDEX, 0),
                                0, 1),
    }
    checks = {k: v for k, v in checks.items() if v[0] is not None and v[0].numel()}
    stats = torch.stack([torch.stack([v.min(), v.max()]).to(torch.float64) for v, _, _ in checks.values()])
    for (name, (_, lo, hi)), (low, high) in zip(checks.items(), stats.tolist()):
        if low < lo or high > hi:
            if name == "predicted rows":
                raise ValueError("mlm_positions points a label at a filler row (at or past cu_seqlens[-1])")
            bad = low if low < lo else high
            ignore = f" or {IGNORE_INDEX}" if name in ("mlm_labels", "next_sentence_label") else ""
            raise ValueError(f"{name} contains {bad:g}; allowed values are [{lo}, {hi}]{ignore}")
