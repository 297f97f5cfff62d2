"""Fused bias + GELU, `gelu(x + bias)`, from the C++/CUDA extension (csrc/bias_gelu*).

The FFN's first GEMM runs without its bias; this op adds the bias and applies GELU in one
memory pass, and the backward recomputes `x + bias` instead of storing it (as Megatron-LM's
`bias_gelu_impl` does). The CUDA kernel is csrc/bias_gelu_kernels.cu; the CPU one csrc/bias_gelu.cpp.
Where the extension has no kernels for the device (`extension.use_fallback`), the eager reference
runs instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bert_fast.kernels.checks import check_same, check_tensor
from bert_fast.ops import extension

APPROXIMATIONS = ("none", "tanh")
_registered = False


def _register() -> None:
    """Autograd and fake (shape-only) implementations, so the op works in training and under
    torch.compile / torch.export. Runs once, after the extension has defined the schemas."""
    global _registered
    if _registered:
        return

    @torch.library.register_fake("bert_fast::bias_gelu")
    def _(x, bias, approximate_tanh):
        return x.new_empty(x.shape)

    @torch.library.register_fake("bert_fast::bias_gelu_backward")
    def _(grad, x, bias, approximate_tanh):
        return x.new_empty(x.shape)

    def setup_context(ctx, inputs, output):
        x, bias, approximate_tanh = inputs
        ctx.save_for_backward(x, bias)
        ctx.approximate_tanh = approximate_tanh

    def backward(ctx, grad):
        x, bias = ctx.saved_tensors
        grad_x = torch.ops.bert_fast.bias_gelu_backward(
            grad.contiguous(), x, bias, ctx.approximate_tanh)
        # float32 accumulation over all rows: summing bf16 partials would lose the small terms.
        accum = torch.float64 if bias.dtype == torch.float64 else torch.float32
        grad_bias = grad_x.reshape(-1, bias.shape[0]).sum(0, dtype=accum).to(bias.dtype)
        return grad_x, grad_bias, None

    torch.library.register_autograd("bert_fast::bias_gelu", backward, setup_context=setup_context)
    _registered = True


def check_args(x, bias, approximate) -> None:
    """What `bias_gelu` (and `bert_fast.ops.bias_gelu`, on either backend) accepts."""
    check_tensor("x", x, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    check_tensor("bias", bias, ndim=1, shape=(x.shape[-1],))
    check_same(("x", "bias"), (x, bias), "dtype")
    check_same(("x", "bias"), (x, bias), "device")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """`gelu(x + bias)` over the last dimension of `x` ([..., N]) with `bias` [N]."""
    check_args(x, bias, approximate)
    return bias_gelu_unchecked(x, bias, approximate)


def bias_gelu_unchecked(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """`bias_gelu` for callers that ran `check_args` (bert_fast.ops)."""
    if torch.compiler.is_compiling():  # decided when the step ran eagerly; tracing cannot read the cache
        fallback = extension.fallback_chosen(x.device)
    else:
        fallback = extension.use_fallback(x.device)
        if not fallback:
            _register()
    if fallback:
        return bias_gelu_reference(x, bias, approximate)
    return torch.ops.bert_fast.bias_gelu(x, bias, approximate == "tanh")


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Eager PyTorch: the torch backend and the test oracle."""
    return F.gelu(x + bias, approximate=approximate)


if extension.available():  # registered before anything traces a call (torch.compile cannot)
    _register()
