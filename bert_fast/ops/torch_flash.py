"""PyTorch's own varlen FlashAttention-2 on packed tokens: the kernel behind
`scaled_dot_product_attention`'s flash backend, called with `cu_seqlens` so padding costs nothing.

`aten._flash_attention_forward` / `_backward` are private ops. This uses only the positional
arguments they have kept across the torch versions this project supports, plus `scale` by
keyword; the forward's third and fourth outputs, the dropout RNG state (philox_seed/offset in
older releases, rng_state/unused in newer), go to the backward unchanged. `unavailable_reason`
checks for the op, a CUDA device of compute capability 8.0+, the dtype and head_dim, so
`model.attention_impl: torch_flash` fails with a clear message elsewhere. The RNG state comes from
torch's CUDA generator, so activation checkpointing (which restores it) replays the same mask.
"""

from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16)


def unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why torch's varlen flash attention cannot run these inputs, or None when it can."""
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return f"torch {torch.__version__} has no aten._flash_attention_forward"
    if device.type != "cuda":
        return f"it needs a CUDA device, got {device}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"it needs compute capability 8.0 or newer, {torch.cuda.get_device_name(device)} has less"
    if dtype not in DTYPES:
        return f"it takes float16 or bfloat16, got {dtype}"
    if head_dim % 8 or head_dim > 256:
        return f"it takes head_dim a multiple of 8 up to 256, got {head_dim}"
    return None


class _TorchFlashVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale):
        out, lse, rng_a, rng_b, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, False, False,
            scale=softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_a, rng_b)
        ctx.args = (max_seqlen, dropout_p, softmax_scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens, rng_a, rng_b = ctx.saved_tensors
        max_seqlen, dropout_p, softmax_scale = ctx.args
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            dropout_p, False, rng_a, rng_b, scale=softmax_scale)
        return dq, dk, dv, None, None, None, None


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, dropout_p: float = 0.0,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """q, k, v [T, heads, head_dim] (stride(-1) == 1), cu_seqlens [B + 1] int32 -> [T, heads,
    head_dim]. Arguments are validated by the caller (bert_fast.ops)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return _TorchFlashVarlen.apply(q, k, v, cu_seqlens, int(max_seqlen), float(dropout_p), float(scale))
