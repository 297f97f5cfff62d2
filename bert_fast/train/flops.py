"""Model FLOPs of a BERT pretraining step, and the device peaks MFU is measured against.

Counted as in the MFU literature (PaLM appendix B; Megatron's formula): matmul FLOPs of the model
as written, forward x 3 for forward + backward, recomputation (activation checkpointing, the
attention backward's recompute) not counted. Per sequence of real length s, with L layers,
hidden H, intermediate I, vocab V:

- encoder GEMMs  2 s (4 H^2 + 2 H I) per layer (QKV 3H^2, output H^2, FFN 2HI)
- attention      4 s^2 H per layer (QK^T and PV)
- MLM head       2 P (H^2 + H V) on the P predicted tokens only (the transform and the decoder)
- pooler + NSP   2 H^2 + 4 H

Padding is never counted: a run that spends FLOPs on it gets no credit for them.
"""

from __future__ import annotations

import torch

from bert_fast.model.config import BertConfig

# Dense bf16 tensor-core peaks (datasheets, no sparsity), TFLOP/s, matched against the CUDA
# device name; `log.peak_tflops` overrides. MFU against the datasheet is the usual convention;
# bench/e2e.py also reports it against the measured matmul rate.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("H100 SXM", 989.0), ("H100 80GB HBM3", 989.0), ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0), ("H100", 756.0), ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0),
    ("A10G", 125.0), ("L40S", 362.0), ("L4", 121.0), ("A6000", 155.0), ("V100", 125.0),
)


def step_flops(config: BertConfig, lengths: torch.Tensor | list[int], predictions: int) -> float:
    """FLOPs of one training step (forward + backward) over sequences of the given real lengths
    with `predictions` MLM targets in total."""
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.detach().to("cpu", torch.float64)
        tokens, squares, count = float(lengths.sum()), float((lengths ** 2).sum()), lengths.numel()
    else:
        tokens, squares, count = float(sum(lengths)), float(sum(n * n for n in lengths)), len(lengths)
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    encoder = n * (2 * tokens * (4 * h * h + 2 * h * i) + 4 * squares * h)
    heads = 2 * predictions * (h * h + h * config.vocab_size) + count * (2 * h * h + 4 * h)
    return 3.0 * (encoder + heads)


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """The device's dense bf16 peak, or None where unknown (CPU, unlisted GPU) unless overridden."""
    if override > 0:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None
