"""ZeRO-3 partition padding, zeroed.

DeepSpeed 0.19's ZeRO-3 gives every parameter a partition of ceil(numel / world) elements per rank
(zero/partition_parameters.py `_partition_param`), allocated with torch.empty: the elements past
the tensor's end, on the last rank(s), are never written. Stage 3 copies those partitions, padding
included, into each sub-group's flat 16-bit buffer (`fp16_partitioned_groups_flat`) and its fp32
master copy (`fp32_partitioned_groups_flat`), which the optimizer steps and every checkpoint saves
with the optimizer's moments. The padding held whatever the memory held before: two saves of the
same state differed, and a resumed run's state compared as NaN whenever that memory held a NaN or
an inf (issue 16). `zero_padding` zeroes it in all of them; the gradients there are zero (DeepSpeed
reduces into a zeroed buffer), so AdamW and LAMB keep it zero. ZeRO 1/2 and BF16_Optimizer pad
their flat groups with torch.zeros themselves.
"""

from __future__ import annotations

import torch


def _stage3(engine):
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    wrapper = getattr(engine, "optimizer", None)
    return wrapper if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3) else None


def padding_ranges(engine) -> list[list[tuple[int, int]]]:
    """Per ZeRO-3 sub-group, the [start, end) ranges of this rank's flat partition that hold no
    element of any parameter; [] for an engine that is not ZeRO-3."""
    from bert_fast.optim.zero import zero_layouts

    wrapper = _stage3(engine)
    if wrapper is None:
        return []
    ranges = []
    for partition, layout in zero_layouts(wrapper):
        gaps, end = [], 0
        for _, offset, length, _ in sorted(layout.segments.tolist(), key=lambda row: row[1]):
            if offset > end:
                gaps.append((end, offset))
            end = max(end, offset + length)
        if end < partition.numel():
            gaps.append((end, partition.numel()))
        ranges.append(gaps)
    return ranges


def padded_tensors(engine) -> list[list[torch.Tensor]]:
    """Per ZeRO-3 sub-group, every flat tensor laid out like its partition: the fp32 masters, the
    16-bit copy the module's partitions live in, and the optimizer's state of the same shape
    (Adam's moments); [] for an engine that is not ZeRO-3."""
    wrapper = _stage3(engine)
    if wrapper is None:
        return []
    state = getattr(wrapper, "optimizer", None)
    state = state.state if state is not None else {}
    groups = []
    for i, master in enumerate(wrapper.fp32_partitioned_groups_flat):
        low = wrapper.fp16_partitioned_groups_flat[i]  # in fp32 runs, the masters themselves
        tensors = [master] + ([low] if low is not None else [])
        tensors += [t for t in state.get(master, {}).values()
                    if torch.is_tensor(t) and t.shape == master.shape]
        groups.append(tensors)
    return groups


def zero_padding(engine) -> None:
    """Zeroes the padding of every ZeRO-3 flat partition of `engine` (see the module docstring);
    a no-op for other stages. Local to this rank: no collective."""
    with torch.no_grad():
        for gaps, tensors in zip(padding_ranges(engine), padded_tensors(engine)):
            for start, end in gaps:
                for tensor in tensors:
                    tensor[start:end].zero_()
