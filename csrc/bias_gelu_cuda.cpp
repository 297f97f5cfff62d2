// CUDA binding of torch.ops.bert_fast.bias_gelu: tensors -> the torch-free launcher in
// bias_gelu_kernels.cu, on the current stream, every launch checked. Built only with CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bias_gelu.h"
#include "bias_gelu_args.h"

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

void check_launch(int error, const char* op) {
  TORCH_CHECK(error == 0, op, ": CUDA launch failed: ", bert_fast_cuda_error_string(error));
}

at::Tensor bias_gelu_cuda(const at::Tensor& x, const at::Tensor& bias, bool approximate_tanh) {
  const auto a = bert_fast::bias_gelu_args(x, bias, "bias_gelu");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(a.x);
  check_launch(bert_fast_bias_gelu_forward(a.x.data_ptr(), a.bias.data_ptr(), y.data_ptr(), a.rows,
                                           a.cols, dtype_code(a.x, "bias_gelu"), approximate_tanh,
                                           c10::cuda::getCurrentCUDAStream().stream()),
               "bias_gelu");
  return y;
}

at::Tensor bias_gelu_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& bias, bool approximate_tanh) {
  const auto a = bert_fast::bias_gelu_args(x, bias, "bias_gelu_backward");
  const at::Tensor g = bert_fast::bias_gelu_grad_arg(grad, x, "bias_gelu_backward");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(a.x);
  check_launch(bert_fast_bias_gelu_backward(g.data_ptr(), a.x.data_ptr(), a.bias.data_ptr(),
                                            dx.data_ptr(), a.rows, a.cols,
                                            dtype_code(a.x, "bias_gelu_backward"), approximate_tanh,
                                            c10::cuda::getCurrentCUDAStream().stream()),
               "bias_gelu_backward");
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(bert_fast, CUDA, m) {
  m.impl("bias_gelu", &bias_gelu_cuda);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cuda);
}
