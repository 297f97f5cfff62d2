"""Exact LAMB (and clipped AdamW) under DeepSpeed ZeRO: the settings it needs and the layout math.

DeepSpeed hands the client optimizer flat fp32 tensors instead of the model's parameters. A
per-tensor trust ratio computed on such a tensor would mix unrelated tensors and see only a piece
of each. For every flat tensor the optimizer will step, a ZeroLayout says which [start, start +
len) range belongs to which original tensor (its `slot`); FusedLAMB then sums ||w||^2 and
||update||^2 per slot over its own segments, all-reduces the [slots, 2] sums over the
data-parallel group and applies exactly the trust ratios of an unpartitioned run. Global grad-norm
clipping uses DeepSpeed's global norm (over every partition and group, set before the client
optimizer runs) with apex's rule, so DeepSpeed's `gradient_clipping` must be 0 (it would clip a
second time, with a slightly different formula).

This module holds what is DeepSpeed-independent: `check_config` refuses, naming the setting, what
cannot be exact (optimizer/parameter offload, whose CPU path steps DeepSpeed's own optimizer;
ZenFlow; clipping twice), and `partition_segments` cuts a flat buffer of tensors into a partition's
segments. Reading how DeepSpeed's wrappers laid the tensors out is DeepSpeed internals:
bert_fast/train/deepspeed_compat/wrappers.py does it and `deepspeed_compat.initialize` starts an
engine with both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bert_fast.optim.fused import ZeroLayout, _Fused


def _section(config: dict, key: str) -> dict:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"DeepSpeed config {key} must be a mapping, got {value!r}")
    return value


def load_config(config) -> dict:
    """A DeepSpeed config given as a dict or the path of its JSON file."""
    if isinstance(config, (str, Path)):
        return json.loads(Path(config).read_text())
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")
    return config


def check_config(config, optimizer: torch.optim.Optimizer) -> None:
    """Raises ValueError naming the DeepSpeed setting under which `optimizer` would not be exact."""
    config = load_config(config)
    if not isinstance(optimizer, _Fused):
        raise TypeError(f"optimizer must be a FusedLAMB or FusedAdamW, got {type(optimizer).__name__}")
    zero = _section(config, "zero_optimization")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={stage!r} is not a ZeRO stage (0, 1, 2 or 3)")
    for key in ("offload_optimizer", "offload_param"):
        setting = zero.get(key)
        device = setting.get("device", "none") if isinstance(setting, dict) else setting
        if device not in (None, "none", False):
            raise ValueError(f"zero_optimization.{key}={zero[key]!r} is not supported: with offload "
                             "DeepSpeed steps the optimizer on its CPU path, outside this exact layout")
    if zero.get("cpu_offload"):
        raise ValueError("zero_optimization.cpu_offload=true is not supported (optimizer offload)")
    if zero.get("zenflow"):
        raise ValueError("zero_optimization.zenflow is not supported (it steps the optimizer itself)")
    clip = config.get("gradient_clipping", 0.0) or 0.0
    if clip > 0 and optimizer.defaults["max_grad_norm"] > 0:
        raise ValueError(f"gradient_clipping={clip} and the optimizer's max_grad_norm="
                         f"{optimizer.defaults['max_grad_norm']} would clip twice; set gradient_clipping "
                         "to 0 (the optimizer clips exactly with DeepSpeed's global norm)")
    if stage in (1, 2) and zero.get("compute_grad_norm") is False and optimizer.defaults["max_grad_norm"] > 0:
        raise ValueError("zero_optimization.compute_grad_norm=false leaves no global grad norm for the "
                         "optimizer's max_grad_norm clipping")


def layout(rows, num_slots: int, group, grad_norm) -> ZeroLayout:
    """A ZeroLayout from (0, start, len, slot) rows; grad_norm() returns DeepSpeed's global norm."""
    return ZeroLayout(torch.tensor(rows, dtype=torch.int64).reshape(-1, 4), num_slots, group, grad_norm)


def partition_segments(sizes, offsets, start: int, size: int) -> list[tuple]:
    """Segment rows (0, offset in the partition, length, slot) of the partition [start, start +
    size) of a flat buffer holding tensors of `sizes` at `offsets`; tensors that miss the partition
    get no row (their slot stays)."""
    rows = []
    for slot, (numel, offset) in enumerate(zip(sizes, offsets)):
        lo, hi = max(offset, start), min(offset + numel, start + size)
        if hi > lo:
            rows.append((0, lo - start, hi - lo, slot))
    return rows


def packed_offsets(sizes) -> list[int]:
    """Where each tensor starts when they lie back to back."""
    return [sum(sizes[:k]) for k in range(len(sizes))]
