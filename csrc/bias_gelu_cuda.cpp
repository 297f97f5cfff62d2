// CUDA binding of torch.ops.bert_fast.bias_gelu: tensors -> the torch-free launcher in
// bias_gelu.cu, on the current stream, every launch checked. Built only with CUDA.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bias_gelu.h"

namespace {

int dtype_code(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return BERT_FAST_F32;
    case at::kHalf: return BERT_FAST_F16;
    case at::kBFloat16: return BERT_FAST_BF16;
    default: TORCH_CHECK_TYPE(false, op, ": CUDA supports float32, float16 and bfloat16, got ",
                              t.scalar_type());
  }
  return -1;
}

void check_inputs(const at::Tensor& x, const at::Tensor& bias, const char* op) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == x.size(-1), op,
                    ": bias must have shape [", x.size(-1), "], got ", bias.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == bias.scalar_type(), op, ": x and bias dtypes differ");
  TORCH_CHECK_VALUE(x.device() == bias.device(), op, ": x and bias are on different devices");
}

void check_launch(int error, const char* op) {
  TORCH_CHECK(error == 0, op, ": CUDA launch failed: ", bert_fast_cuda_error_string(error));
}

at::Tensor bias_gelu_cuda(const at::Tensor& x, const at::Tensor& bias, bool approximate_tanh) {
  check_inputs(x, bias, "bias_gelu");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t cols = xc.size(-1);
  const int64_t rows = cols == 0 ? 0 : xc.numel() / cols;
  check_launch(bert_fast_bias_gelu_forward(xc.data_ptr(), bc.data_ptr(), y.data_ptr(), rows, cols,
                                           dtype_code(xc, "bias_gelu"), approximate_tanh,
                                           at::cuda::getCurrentCUDAStream().stream()),
               "bias_gelu");
  return y;
}

at::Tensor bias_gelu_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& bias, bool approximate_tanh) {
  check_inputs(x, bias, "bias_gelu_backward");
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "bias_gelu_backward: grad and x shapes differ");
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "bias_gelu_backward: grad and x dtypes differ");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor gc = grad.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.contiguous();
  at::Tensor dx = at::empty_like(xc);
  const int64_t cols = xc.size(-1);
  const int64_t rows = cols == 0 ? 0 : xc.numel() / cols;
  check_launch(bert_fast_bias_gelu_backward(gc.data_ptr(), xc.data_ptr(), bc.data_ptr(),
                                            dx.data_ptr(), rows, cols,
                                            dtype_code(xc, "bias_gelu_backward"), approximate_tanh,
                                            at::cuda::getCurrentCUDAStream().stream()),
               "bias_gelu_backward");
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(bert_fast, CUDA, m) {
  m.impl("bias_gelu", &bias_gelu_cuda);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cuda);
}
