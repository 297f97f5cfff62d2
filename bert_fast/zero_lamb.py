"""Exact LAMB (and clipped AdamW) under DeepSpeed ZeRO stages 1 and 2.

ZeRO 1/2 (deepspeed/runtime/zero/stage_1_and_2.py, DeepSpeedZeroOptimizer) flattens each
parameter group into one buffer, in the order of `round_robin_bit16_groups[i]` at the offsets
`round_robin_bit16_offsets[i]` (alignment padding in between), cuts it into `dp_world_size`
partitions of `partition_size[i]` elements, and hands the client optimizer only this rank's
partition as one flat fp32 tensor (`single_partition_of_fp32_groups[i]`). A per-tensor trust ratio
computed on that tensor would mix unrelated tensors and see only a piece of each.

`attach` rebuilds, for every group, which [start, start + len) range of the partition belongs to
which original tensor (the `slot`); FusedLAMB then sums ||w||^2 and ||update||^2 per slot over its
own segments, all-reduces the [slots, 2] sums over the data-parallel group and applies exactly the
trust ratios of an unpartitioned run. Global grad-norm clipping uses DeepSpeed's global norm
(`_global_grad_norm`, computed over every partition and group before the optimizer runs) with
apex's rule, so DeepSpeed's own `gradient_clipping` must be 0 (it would clip a second time, with a
slightly different formula).

Refused at start, naming the setting: ZeRO stage 3 (parameters are partitioned too and the
optimizer runs per sub-group), optimizer/parameter offload (DeepSpeed's CPU path steps its own
optimizer), stage 0 with bf16/fp16 (BF16_Optimizer / FP16_Optimizer hand over flat groups without
a partition map), and double clipping.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bert_fast.optim import ZeroLayout, _Fused


def _section(config: dict, key: str) -> dict:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"DeepSpeed config {key} must be a mapping, got {value!r}")
    return value


def _load(config) -> dict:
    if isinstance(config, (str, Path)):
        return json.loads(Path(config).read_text())
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")
    return config


def check_config(config, optimizer: torch.optim.Optimizer) -> None:
    """Raises ValueError naming the DeepSpeed setting under which `optimizer` would not be exact."""
    config = _load(config)
    if not isinstance(optimizer, _Fused):
        raise TypeError(f"optimizer must be a FusedLAMB or FusedAdamW, got {type(optimizer).__name__}")
    zero = _section(config, "zero_optimization")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(f"zero_optimization.stage={stage!r} is not supported: ZeRO-3 partitions the "
                         "parameters and steps the optimizer per sub-group, so per-tensor trust ratios "
                         "cannot be made exact; use stage 1 or 2")
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
    mixed = any(_section(config, k).get("enabled", False) for k in ("bf16", "fp16"))
    if stage == 0 and mixed:
        raise ValueError("bf16/fp16 with zero_optimization.stage=0 is not supported: DeepSpeed's "
                         "BF16_Optimizer/FP16_Optimizer hand the optimizer flat groups without a "
                         "partition map; use zero_optimization.stage=1 (same memory, exact)")
    clip = config.get("gradient_clipping", 0.0) or 0.0
    if clip > 0 and optimizer.defaults["max_grad_norm"] > 0:
        raise ValueError(f"gradient_clipping={clip} and the optimizer's max_grad_norm="
                         f"{optimizer.defaults['max_grad_norm']} would clip twice; set gradient_clipping "
                         "to 0 (the optimizer clips exactly with DeepSpeed's global norm)")
    if stage in (1, 2) and zero.get("compute_grad_norm") is False and optimizer.defaults["max_grad_norm"] > 0:
        raise ValueError("zero_optimization.compute_grad_norm=false leaves no global grad norm for the "
                         "optimizer's max_grad_norm clipping")


def zero_layouts(zero_optimizer) -> list[ZeroLayout]:
    """One ZeroLayout per parameter group of a DeepSpeedZeroOptimizer (ZeRO 1/2)."""
    from deepspeed import comm as dist

    layouts = []
    for i, partition in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        group = zero_optimizer.real_dp_process_group[i]
        rank = dist.get_rank(group=group)
        # This rank's slice of the flat buffer, as DeepSpeed cut it.
        pieces = zero_optimizer.parallel_partitioned_bit16_groups[i]
        start, size = sum(p.numel() for p in pieces[:rank]), pieces[rank].numel()
        if partition.numel() != size:
            raise RuntimeError(f"ZeRO group {i}: partition has {partition.numel()} elements, expected {size}")
        # Tensors in flat order and where each starts (older DeepSpeed packs them back to back).
        metas = getattr(zero_optimizer, "round_robin_bit16_meta", None)
        tensors = metas[i] if metas is not None else zero_optimizer.round_robin_bit16_groups[i]
        all_offsets = getattr(zero_optimizer, "round_robin_bit16_offsets", None)
        offsets = (all_offsets[i] if all_offsets is not None
                   else [sum(t.numel() for t in tensors[:k]) for k in range(len(tensors))])
        rows = []
        for slot, (tensor, offset) in enumerate(zip(tensors, offsets)):
            lo, hi = max(offset, start), min(offset + tensor.numel(), start + size)
            if hi > lo:
                rows.append((0, lo - start, hi - lo, slot))
        segments = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
        layouts.append(ZeroLayout(segments, len(tensors), group,
                                  lambda z=zero_optimizer: z._global_grad_norm))
    return layouts


def attach(engine) -> None:
    """Tells the client FusedLAMB/FusedAdamW of a DeepSpeed engine how ZeRO laid out its groups.
    A no-op without ZeRO (stage 0, fp32: the optimizer sees the original tensors)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    wrapper = engine.optimizer
    if isinstance(wrapper, _Fused):
        return
    if not isinstance(wrapper, DeepSpeedZeroOptimizer):
        raise ValueError(f"DeepSpeed wrapped the optimizer in {type(wrapper).__name__}; only ZeRO stages "
                         "1 and 2 (DeepSpeedZeroOptimizer) keep LAMB exact")
    optimizer = wrapper.optimizer
    if not isinstance(optimizer, _Fused):
        raise TypeError(f"the engine's client optimizer is {type(optimizer).__name__}, not a fused one")
    if wrapper.cpu_offload:
        raise ValueError("zero_optimization.offload_optimizer is not supported (DeepSpeed's CPU path)")
    for partition, layout in zip(wrapper.single_partition_of_fp32_groups, zero_layouts(wrapper)):
        optimizer.set_zero_layout(partition, layout)


def initialize(model, optimizer, config, **kwargs):
    """`deepspeed.initialize` with a FusedLAMB/FusedAdamW client optimizer: checks the config
    first (nothing starts under a setting that would not be exact), then attaches the layout."""
    try:
        import deepspeed
    except ImportError as err:
        raise RuntimeError("DeepSpeed is not installed (pip install deepspeed)") from err
    config = _load(config)
    check_config(config, optimizer)
    result = deepspeed.initialize(model=model, optimizer=optimizer, config=config, **kwargs)
    attach(result[0])
    return result
