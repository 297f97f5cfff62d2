// Argument checks and the [rows, cols] view of bias_gelu's inputs, shared by the CPU
// (bias_gelu.cpp) and CUDA (bias_gelu_cuda.cpp) bindings. Python validates first
// (bert_fast/bias_gelu.py); these keep direct torch.ops callers from reaching a kernel with bad input.
#pragma once
#include <ATen/ATen.h>

namespace bert_fast {

struct BiasGeluArgs {
  at::Tensor x;     // contiguous, [..., cols]
  at::Tensor bias;  // contiguous, [cols]
  int64_t rows;
  int64_t cols;
};

inline BiasGeluArgs bias_gelu_args(const at::Tensor& x, const at::Tensor& bias, const char* op) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == x.size(-1), op,
                    ": bias must have shape [", x.size(-1), "], got ", bias.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == bias.scalar_type(), op, ": x and bias dtypes differ (",
                   x.scalar_type(), " vs ", bias.scalar_type(), ")");
  TORCH_CHECK_VALUE(x.device() == bias.device(), op, ": x and bias are on different devices");
  const int64_t cols = x.size(-1);
  return {x.contiguous(), bias.contiguous(), cols == 0 ? 0 : x.numel() / cols, cols};
}

inline at::Tensor bias_gelu_grad_arg(const at::Tensor& grad, const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), op, ": grad shape ", grad.sizes(),
                    " differs from x shape ", x.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), op, ": grad dtype ",
                   grad.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == x.device(), op, ": grad and x are on different devices");
  return grad.contiguous();
}

}  // namespace bert_fast
