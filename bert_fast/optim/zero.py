"""Exact LAMB (and clipped AdamW) under every DeepSpeed optimizer wrapper our configs reach.

DeepSpeed hands the client optimizer flat fp32 tensors instead of the model's parameters. A
per-tensor trust ratio computed on such a tensor would mix unrelated tensors and see only a piece
of each. `attach` rebuilds, for every flat tensor the optimizer will step, which [start, start +
len) range belongs to which original tensor (the `slot`, a ZeroLayout); FusedLAMB then sums ||w||^2
and ||update||^2 per slot over its own segments, all-reduces the [slots, 2] sums over the
data-parallel group and applies exactly the trust ratios of an unpartitioned run. Global grad-norm
clipping uses DeepSpeed's global norm (`_global_grad_norm`, over every partition and group, set
before the client optimizer runs) with apex's rule, so DeepSpeed's `gradient_clipping` must be 0
(it would clip a second time, with a slightly different formula).

The wrappers, as in DeepSpeed 0.19.8 (what the engine picks for a non-DeepSpeed client optimizer):
- ZeRO 1/2, DeepSpeedZeroOptimizer (zero/stage_1_and_2.py): per group, the tensors of
  `round_robin_bit16_groups[i]` at `round_robin_bit16_offsets[i]`, cut into `dp_world_size`
  partitions; this rank gets `single_partition_of_fp32_groups[i]`.
- ZeRO 1 with bf16 and `data_types.grad_accum_dtype: fp32`, BF16_Optimizer (bf16_optimizer.py):
  the group's tensors back to back, cut into equal partitions, `fp32_groups_flat_partition[i]`.
- ZeRO 3, DeepSpeedZeroOptimizer_Stage3 (zero/stage3.py): per sub-group, the concatenation of
  this rank's `ds_tensor` of each parameter (elements [rank * partition_numel, (rank + 1) *
  partition_numel) of the flattened tensor, zero padded at the end), `fp32_partitioned_groups_flat`.
  It steps the client optimizer once per sub-group, with that sub-group's flat tensor as the only
  one of its param group; the group's step count is held back so that every sub-group of a group
  sees the same step (bias correction), and the global norm is the same for all of them. Every
  rank steps every sub-group and all-reduces all of its slots, also the ones it holds no element of.
- Stage 0 with bf16/fp16, FP16_UnfusedOptimizer (fp16/unfused_optimizer.py): unflattened fp32
  copies of each parameter, unscaled before the step; the optimizer is exact on them as they are
  (its own global norm over whole tensors) and only needs to accept them.
- Stage 0 in fp32: no wrapper, the optimizer sees the model's parameters.

Refused, naming the setting: optimizer/parameter offload (DeepSpeed's CPU path steps its own
optimizer), ZenFlow, clipping twice, and any other wrapper (e.g. FP16_Optimizer, which DeepSpeed
only builds around its own FusedAdam).
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


def _layout(rows, num_slots, group, wrapper) -> ZeroLayout:
    segments = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
    return ZeroLayout(segments, num_slots, group, lambda: wrapper._global_grad_norm)


def _cut(sizes, offsets, start, size) -> list[tuple]:
    """Segments of the partition [start, start + size) of a flat buffer holding tensors of
    `sizes` at `offsets`; tensors that miss the partition get no row (their slot stays)."""
    rows = []
    for slot, (numel, offset) in enumerate(zip(sizes, offsets)):
        lo, hi = max(offset, start), min(offset + numel, start + size)
        if hi > lo:
            rows.append((0, lo - start, hi - lo, slot))
    return rows


def _packed(sizes) -> list[int]:
    return [sum(sizes[:k]) for k in range(len(sizes))]


def _check(name, i, partition, size):
    if partition.numel() != size:
        raise RuntimeError(f"{name} group {i}: partition has {partition.numel()} elements, expected {size}")


def _zero12_layouts(wrapper, rank_of):
    """DeepSpeedZeroOptimizer (ZeRO 1/2): one layout per parameter group."""
    pairs = []
    for i, partition in enumerate(wrapper.single_partition_of_fp32_groups):
        group = wrapper.real_dp_process_group[i]
        pieces = wrapper.parallel_partitioned_bit16_groups[i]  # every rank's slice, as DeepSpeed cut it
        rank = rank_of(group)
        start, size = sum(p.numel() for p in pieces[:rank]), pieces[rank].numel()
        _check("ZeRO", i, partition, size)
        # Tensors in flat order and where each starts (older DeepSpeed packs them back to back).
        metas = getattr(wrapper, "round_robin_bit16_meta", None)
        sizes = [t.numel() for t in (metas[i] if metas is not None else wrapper.round_robin_bit16_groups[i])]
        all_offsets = getattr(wrapper, "round_robin_bit16_offsets", None)
        offsets = all_offsets[i] if all_offsets is not None else _packed(sizes)
        pairs.append((partition, _layout(_cut(sizes, offsets, start, size), len(sizes), group, wrapper)))
    return pairs


def _bf16_layouts(wrapper, rank_of):
    """BF16_Optimizer: each group's tensors back to back, padded, cut into equal partitions."""
    pairs = []
    for i, partition in enumerate(wrapper.fp32_groups_flat_partition):
        group = wrapper.real_dp_process_group[i]
        size = wrapper.bf16_partitioned_groups[i][0].numel()
        _check("BF16_Optimizer", i, partition, size)
        sizes = [t.numel() for t in wrapper.bf16_groups[i]]
        rows = _cut(sizes, _packed(sizes), rank_of(group) * size, size)
        pairs.append((partition, _layout(rows, len(sizes), group, wrapper)))
    return pairs


def _stage3_layouts(wrapper, rank_of):
    """DeepSpeedZeroOptimizer_Stage3: one layout per sub-group (see the module docstring)."""
    pairs = []
    for i, (params, partition) in enumerate(zip(wrapper.fp16_groups, wrapper.fp32_partitioned_groups_flat)):
        groups = getattr(wrapper, "sub_group_process_groups", None)  # older DeepSpeed: one dp group
        group = groups[i] if groups else wrapper.dp_process_group
        rank, rows, offset = rank_of(group), [], 0
        for slot, p in enumerate(params):
            width = p.partition_numel()
            held = min(width, max(0, p.ds_numel - rank * width))  # the rest is padding
            if held:
                rows.append((0, offset, held, slot))
            offset += width
        _check("ZeRO-3 sub", i, partition, offset)
        pairs.append((partition, _layout(rows, len(params), group, wrapper)))
    return pairs


def _hold_step_per_sub_group(wrapper, optimizer) -> None:
    """ZeRO-3 calls optimizer.step() once per sub-group, which would count a group's step once
    per sub-group: give each sub-group the count its group had when its first sub-group stepped."""
    first, base = {}, {}
    for sub, gid in sorted(wrapper.sub_group_to_group_id.items()):
        first.setdefault(gid, sub)
    step_sub_group = wrapper._optimizer_step

    def _optimizer_step(sub_group_id):
        gid = wrapper.sub_group_to_group_id[sub_group_id]
        group = optimizer.param_groups[gid]
        if sub_group_id == first[gid]:
            base[gid] = group["step"]
        else:
            group["step"] = base[gid]
        return step_sub_group(sub_group_id)

    wrapper._optimizer_step = _optimizer_step


def zero_layouts(wrapper) -> list[tuple[torch.Tensor, ZeroLayout]]:
    """(flat tensor the client optimizer steps, its ZeroLayout) for a DeepSpeed optimizer wrapper."""
    from deepspeed import comm as dist
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    def rank_of(group):
        return dist.get_rank(group=group)

    for cls, build in ((DeepSpeedZeroOptimizer, _zero12_layouts), (BF16_Optimizer, _bf16_layouts),
                       (DeepSpeedZeroOptimizer_Stage3, _stage3_layouts)):
        if isinstance(wrapper, cls):
            return build(wrapper, rank_of)
    raise ValueError(f"DeepSpeed wrapped the optimizer in {type(wrapper).__name__}, whose flat groups "
                     "bert_fast.optim.zero has no layout for")


def attach(engine) -> None:
    """Tells the client FusedLAMB/FusedAdamW of a DeepSpeed engine how DeepSpeed laid out the
    tensors it steps. A no-op without a wrapper (stage 0, fp32: it sees the original tensors).
    Stage 0 with bf16/fp16 needs `initialize` (the wrapper would step the optimizer while built)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    wrapper = engine.optimizer
    if isinstance(wrapper, _Fused):
        return
    optimizer = getattr(wrapper, "optimizer", None)
    if not isinstance(optimizer, _Fused):
        raise TypeError(f"the engine's client optimizer is {type(optimizer).__name__}, not a fused one")
    if getattr(wrapper, "cpu_offload", False) or getattr(wrapper, "offload_optimizer", False):
        raise ValueError("zero_optimization.offload_optimizer is not supported (DeepSpeed's CPU path)")
    if isinstance(wrapper, FP16_UnfusedOptimizer):  # whole fp32 copies: exact as they are
        optimizer._own.update(id(p) for group in wrapper.fp32_groups for p in group)
        return
    for partition, layout in zero_layouts(wrapper):
        optimizer.set_zero_layout(partition, layout)
    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        _hold_step_per_sub_group(wrapper, optimizer)


def initialize(model, optimizer, config, **kwargs):
    """`deepspeed.initialize` with a FusedLAMB/FusedAdamW client optimizer: checks the config
    first (nothing starts under a setting that would not be exact), then attaches the layout."""
    try:
        import deepspeed
    except ImportError as err:
        raise RuntimeError("DeepSpeed is not installed (pip install deepspeed)") from err
    config = _load(config)
    check_config(config, optimizer)
    # FP16_UnfusedOptimizer (stage 0 with bf16/fp16; ZeRO 1/2 of older DeepSpeed too) steps the
    # client optimizer once with zero grads while it is built, to create its state. For LAMB and
    # AdamW that is a real step (weight decay, trust ratio 1/wd, one more step count); skip it,
    # our state is created at the first real step.
    optimizer.step = lambda closure=None: None
    try:
        result = deepspeed.initialize(model=model, optimizer=optimizer, config=config, **kwargs)
    finally:
        del optimizer.step
    attach(result[0])
    return result
