"""How DeepSpeed's optimizer wrappers lay out the tensors our optimizer steps (DeepSpeed internals).

DeepSpeed hands the client optimizer flat fp32 tensors instead of the model's parameters; for each,
`attach` tells FusedLAMB/FusedAdamW which [start, start + len) range belongs to which original
tensor (a ZeroLayout, bert_fast/optim/zero.py says what it does with it). The layouts are read from
the wrappers' internal attributes, as in DeepSpeed 0.19.0-0.19.8 (see the package docstring); the
ZeRO-3 sub-groups (`stage3_sub_groups`) also serve the padding (bert_fast/train/partitions.py) and
the checkpoint loads (checkpoints.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bert_fast.optim import zero as zero_lamb
from bert_fast.optim.fused import ZeroLayout, _Fused


def attach(engine) -> None:
    """Tells the client FusedLAMB/FusedAdamW of a DeepSpeed engine how DeepSpeed laid out the
    tensors it steps. A no-op without a wrapper (stage 0, fp32: it sees the original tensors).
    Stage 0 with bf16/fp16 needs `initialize` (the wrapper would step the optimizer while built).
    Internals (0.19.0-0.19.8): the wrapper classes, `wrapper.optimizer` (the client),
    `cpu_offload`/`offload_optimizer`, FP16_UnfusedOptimizer's `fp32_groups`."""
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
        optimizer.adopt(p for group in wrapper.fp32_groups for p in group)
        return
    for partition, layout in zero_layouts(wrapper):
        optimizer.set_zero_layout(partition, layout)
    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        _hold_step_per_sub_group(wrapper, optimizer)


# ---- the flat partitions of the optimizer wrappers -------------------------------------------

def _rank_in(group) -> int:
    """This rank's index in a wrapper's process group, through DeepSpeed's comm (its groups are its
    own objects; 0.19.0-0.19.8)."""
    from deepspeed import comm as dist

    return dist.get_rank(group=group)


def _grad_norm(wrapper) -> Callable[[], object]:
    """DeepSpeed's global grad norm of the step, over every partition and group: the wrapper sets
    `_global_grad_norm` before it steps the client optimizer (0.19.0-0.19.8, every ZeRO wrapper)."""
    return lambda: wrapper._global_grad_norm


def _check(name, i, partition, size):
    if partition.numel() != size:
        raise RuntimeError(f"{name} group {i}: partition has {partition.numel()} elements, expected {size}")


def _zero12_layouts(wrapper):
    """DeepSpeedZeroOptimizer (ZeRO 1/2, zero/stage_1_and_2.py): per group, the tensors of
    `round_robin_bit16_groups[i]` at `round_robin_bit16_offsets[i]` (0.19.0: back to back, sized
    by `round_robin_bit16_meta`), cut into `dp_world_size` partitions as
    `parallel_partitioned_bit16_groups[i]`; this rank steps `single_partition_of_fp32_groups[i]`."""
    pairs = []
    for i, partition in enumerate(wrapper.single_partition_of_fp32_groups):
        group = wrapper.real_dp_process_group[i]
        pieces = wrapper.parallel_partitioned_bit16_groups[i]  # every rank's slice, as DeepSpeed cut it
        rank = _rank_in(group)
        start, size = sum(p.numel() for p in pieces[:rank]), pieces[rank].numel()
        _check("ZeRO", i, partition, size)
        metas = getattr(wrapper, "round_robin_bit16_meta", None)
        sizes = [t.numel() for t in (metas[i] if metas is not None else wrapper.round_robin_bit16_groups[i])]
        all_offsets = getattr(wrapper, "round_robin_bit16_offsets", None)
        offsets = all_offsets[i] if all_offsets is not None else zero_lamb.packed_offsets(sizes)
        rows = zero_lamb.partition_segments(sizes, offsets, start, size)
        pairs.append((partition, zero_lamb.layout(rows, len(sizes), group, _grad_norm(wrapper))))
    return pairs


def _bf16_layouts(wrapper):
    """BF16_Optimizer (ZeRO 1 with bf16 and `data_types.grad_accum_dtype: fp32`, bf16_optimizer.py):
    each group's tensors (`bf16_groups[i]`) back to back, padded, cut into equal partitions
    (`bf16_partitioned_groups[i]`); this rank steps `fp32_groups_flat_partition[i]` (0.19.0-0.19.8)."""
    pairs = []
    for i, partition in enumerate(wrapper.fp32_groups_flat_partition):
        group = wrapper.real_dp_process_group[i]
        size = wrapper.bf16_partitioned_groups[i][0].numel()
        _check("BF16_Optimizer", i, partition, size)
        sizes = [t.numel() for t in wrapper.bf16_groups[i]]
        start = _rank_in(group) * size
        rows = zero_lamb.partition_segments(sizes, zero_lamb.packed_offsets(sizes), start, size)
        pairs.append((partition, zero_lamb.layout(rows, len(sizes), group, _grad_norm(wrapper))))
    return pairs


def _stage3_layouts(wrapper):
    """DeepSpeedZeroOptimizer_Stage3: one layout per sub-group (`stage3_sub_groups`). Every rank
    steps every sub-group and all-reduces all of its slots, also those it holds no element of."""
    pairs = []
    for sub in _sub_groups(wrapper):
        rows = [(0, piece.offset, piece.held, slot) for slot, piece in enumerate(sub.pieces) if piece.held]
        pairs.append((sub.master, zero_lamb.layout(rows, len(sub.pieces), sub.group, _grad_norm(wrapper))))
    return pairs


def zero_layouts(wrapper) -> list[tuple[torch.Tensor, ZeroLayout]]:
    """(flat tensor the client optimizer steps, its ZeroLayout) for a DeepSpeed optimizer wrapper:
    the ones our configs reach for a client optimizer DeepSpeed did not build (FP16_Optimizer, for
    instance, only wraps DeepSpeed's own FusedAdam). The classes are 0.19.0-0.19.8's."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls, build in ((DeepSpeedZeroOptimizer, _zero12_layouts), (BF16_Optimizer, _bf16_layouts),
                       (DeepSpeedZeroOptimizer_Stage3, _stage3_layouts)):
        if isinstance(wrapper, cls):
            return build(wrapper)
    raise ValueError(f"DeepSpeed wrapped the optimizer in {type(wrapper).__name__}, whose flat groups "
                     f"{__name__} has no layout for")


def _hold_step_per_sub_group(wrapper, optimizer) -> None:
    """ZeRO-3 steps the client optimizer once per sub-group, through `wrapper._optimizer_step(
    sub_group_id)`, which would count a group's step once per sub-group (bias correction). Wraps
    that method to give each sub-group the count its group had when its first sub-group stepped;
    `sub_group_to_group_id` maps them (0.19.0-0.19.8). No public hook runs per sub-group."""
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


# ---- ZeRO-3 partitions -----------------------------------------------------------------------

@dataclass
class Piece:
    """One parameter's share of a ZeRO-3 flat partition: `width` elements from `offset`, of which the
    first `held` are elements [start, start + held) of the flattened parameter, the rest padding."""
    param: torch.nn.Parameter
    offset: int
    start: int
    held: int
    width: int


@dataclass
class SubGroup:
    """One ZeRO-3 sub-group on this rank: the fp32 `master` partition the optimizer steps, every
    flat tensor laid out like it (`tensors`: master, 16-bit copy, optimizer moments), its process
    group and its parameters' pieces in flat order."""
    master: torch.Tensor
    tensors: list[torch.Tensor]
    group: object
    pieces: list[Piece]

    def padding(self) -> list[tuple[int, int]]:
        """[start, end) ranges of the partition that hold no parameter's element."""
        gaps = [(p.offset + p.held, p.offset + p.width) for p in self.pieces if p.width > p.held]
        end = sum(p.width for p in self.pieces)
        return gaps + ([(end, self.master.numel())] if end < self.master.numel() else [])


def _sub_groups(wrapper) -> list[SubGroup]:
    """DeepSpeedZeroOptimizer_Stage3 (zero/stage3.py, zero/partition_parameters.py): per sub-group,
    `fp16_groups[i]` (its parameters) and `fp32_partitioned_groups_flat[i]`, the concatenation of
    this rank's partition of each: `partition_numel()` elements, [rank * width, ...) of the
    flattened tensor of `ds_numel` elements, zero padded at the end. Its process group is
    `sub_group_process_groups[i]` (0.19.0: `dp_process_group`); the 16-bit copy is
    `fp16_partitioned_groups_flat[i]` (None in fp32 runs) and the moments are the client
    optimizer's state of the master. 0.19.0-0.19.8; no public API describes the partitions."""
    groups = getattr(wrapper, "sub_group_process_groups", None)
    state = getattr(getattr(wrapper, "optimizer", None), "state", {})
    subs = []
    for i, (params, master) in enumerate(zip(wrapper.fp16_groups, wrapper.fp32_partitioned_groups_flat)):
        group = groups[i] if groups else wrapper.dp_process_group
        rank, pieces, offset = _rank_in(group), [], 0
        for p in params:
            width = p.partition_numel()
            held = min(width, max(0, p.ds_numel - rank * width))
            pieces.append(Piece(p, offset, rank * width, held, width))
            offset += width
        _check("ZeRO-3 sub", i, master, offset)
        low = wrapper.fp16_partitioned_groups_flat[i]
        tensors = [master] + ([low] if low is not None else [])
        moments = state.get(master, {}).values()
        tensors += [t for t in moments if torch.is_tensor(t) and t.shape == master.shape]
        subs.append(SubGroup(master, tensors, group, pieces))
    return subs


def stage3_sub_groups(engine) -> list[SubGroup]:
    """This rank's ZeRO-3 sub-groups (see SubGroup); [] for an engine that is not ZeRO-3."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    wrapper = getattr(engine, "optimizer", None)
    return _sub_groups(wrapper) if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3) else []


def full_numel(param: torch.Tensor) -> int:
    """A parameter's element count, also under ZeRO-3, where it holds a partition and its full size
    is `ds_numel` (0.19.0-0.19.8)."""
    return getattr(param, "ds_numel", param.numel())
