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
their flat groups with torch.zeros themselves. Where the padding lies is read from DeepSpeed's
internals by bert_fast/train/deepspeed_compat/wrappers.py (`stage3_sub_groups`).
"""

from __future__ import annotations

import torch

from bert_fast.train.deepspeed_compat.wrappers import stage3_sub_groups


def zero_padding(engine) -> None:
    """Zeroes the padding of every ZeRO-3 flat partition of `engine` (see the module docstring):
    the fp32 masters, the 16-bit copy and the optimizer's moments; a no-op for other stages. Local
    to this rank: no collective."""
    with torch.no_grad():
        for sub in stage3_sub_groups(engine):
            for start, end in sub.padding():
                for tensor in sub.tensors:
                    tensor[start:end].zero_()
