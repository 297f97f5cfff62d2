"""The FFN's first FP8 GEMM with its bias + GELU fused into the casts around it (`precision.fp8`).

What: `fp8_linear_gelu(x, W1, b1, state, next_state)` computes y = q(x) @ q(W1)^T in FP8 and
casts h = gelu(y + b1) straight to e4m3 for the FFN's second GEMM, under that GEMM's input scaling
(`next_state`), in both layouts it reads (h for its forward, h^T for its weight gradient). h is never
stored in bf16. The backward takes h's gradient (from the second GEMM's backward), multiplies it by
gelu'(y + b1), casts the product to the gradient format in both layouts and sums its columns into
b1's gradient, all in one pass; then the two gradient GEMMs of the first one.

Why: unfused, an FP8 FFN moves 8 bytes per element of the [tokens, 4 x hidden] activation forward
(bias + GELU reads y and writes h in bf16, the cast reads h and writes two fp8 copies) and 12
backward (the GELU backward reads dh and y and writes dy in bf16, the bias sum and the cast read dy,
the cast writes two fp8 copies). Fused: 4 forward (y in, two fp8 copies out) and 6 backward (dh
and y in, two fp8 copies out), 10 bytes fewer under delayed scaling (current scaling's amax
passes read y, then dh and y, in both forms: 8 fewer). At BERT-large seq 128 x 128 that is 16 GB
per step delayed (13 current), 3.8 ms at H200 copy bandwidth (bench/fp8_prediction.py).
Transformer Engine fuses the same pair (its LayerNormMLP's FP8 GELU and its dgelu + cast +
transpose + dbias kernel).

Autograd across two modules: the second GEMM is another `Linear` (DeepSpeed ZeRO-3 gathers each
module's parameters around its own forward), so the result is an `Fp8Activation`: the cast,
which `bert_fast.ops.linear` hands to the second GEMM, and an `anchor` tensor of h's shape that
carries h's gradient between the two autograd functions (its values are never read: one element,
zero strides). Numerics: h and its gradient are computed in float32 and rounded once, to fp8 (the
unfused path rounds them to bf16 first); the bias gradient is summed in float32 before any
rounding, in a fixed order. On the CPU (FP8 emulation) the same steps run as eager ops.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from bert_fast.ops import fp8
from bert_fast.ops.fp8 import _GRAD, _INPUT, E4M3, Cast, Fp8State

# Off: the unfused path (FP8 GEMM, ops.bias_gelu, then the next GEMM's own cast), for comparisons.
FUSE_GELU = True


class Fp8Activation(NamedTuple):
    """An activation already cast for the next FP8 GEMM: `cast` (both layouts) and `anchor`, a
    tensor of the activation's shape and dtype whose gradient is the activation's (never read)."""

    anchor: torch.Tensor
    cast: Cast


class _Fp8LinearGelu(torch.autograd.Function):
    """(anchor, q(h), q(h)^T, 1 / scale, amax) for h = gelu(q(x) @ q(W)^T + b); backward:
    g = dh * gelu'(y + b) in one cast pass with db = sum(g), dX = q(g) @ q(W), dW = q(g)^T @ q(X)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, state, next_state, record, emulate, approximate, transpose):
        y, saved = fp8._forward_gemm(ctx, x2d, weight, state, record, emulate)
        # h^T is what the next GEMM's weight gradient reads: made when autograd records.
        ch = fp8.cast(y, E4M3, next_state, _INPUT, record, transpose=transpose, bias=bias,
                      approximate=approximate)
        ctx.save_for_backward(*saved, y, bias)
        ctx.approximate = approximate
        anchor = torch.empty_strided(y.shape, (0, 0), dtype=y.dtype, device=y.device)  # never read
        qt = ch.qt if ch.qt is not None else ch.q.new_empty(0)
        ctx.mark_non_differentiable(ch.q, qt, ch.inv, ch.amax)
        # The cast's outputs get no gradient: no zero-filled [M, N] buffers for them in backward.
        ctx.set_materialize_grads(False)
        return anchor, ch.q, qt, ch.inv, ch.amax

    @staticmethod
    def backward(ctx, grad, *_):
        if grad is None:  # grads are not materialised: nothing reached the activation
            return (None,) * 9
        *saved, y, bias = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        cg = fp8.cast(grad, fp8._grad_dtype(ctx.state), ctx.state, _GRAD, ctx.record, rowwise=want_x,
                      transpose=want_w or not want_x, bias=bias, pre=y, approximate=ctx.approximate)
        grad_b = cg.dbias.to(bias.dtype) if want_b else None
        return *fp8._backward_gemms(ctx, cg, saved), grad_b, None, None, None, None, None, None


def fp8_linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, state: Fp8State | None,
                    next_state: Fp8State | None, *, approximate: str = "none", record: bool = True,
                    emulate: bool | None = None) -> Fp8Activation:
    """gelu(x @ weight.T + bias) in FP8, cast for the next FP8 GEMM (scaled by `next_state`'s input
    row): x [..., K], weight [N, K], bias [N]. The anchor has shape [..., N] and x's dtype; pass the
    result to `bert_fast.ops.linear` with `next_state`. `state` / `record` / `emulate` as
    `fp8.fp8_linear`'s. Arguments are checked by `bert_fast.ops.linear_gelu`."""
    anchor, q, qt, inv, amax = _Fp8LinearGelu.apply(x.reshape(-1, x.shape[-1]), weight, bias, state,
                                                    next_state, record, emulate, approximate,
                                                    torch.is_grad_enabled())
    cast = Cast(q, qt if qt.numel() else None, inv, amax)
    return Fp8Activation(anchor.reshape(*x.shape[:-1], weight.shape[0]), cast)

