// CPU implementation of torch.ops.bert_fast.bias_gelu and its backward (schemas in
// extension.cpp). Rows run in parallel; each row is a contiguous loop the compiler vectorises.
// Half and bfloat16 compute in float, float32 in float, float64 in double (at::opmath_type).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bias_gelu_math.h"

namespace {

void check_inputs(const at::Tensor& x, const at::Tensor& bias, const char* op) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == x.size(-1), op,
                    ": bias must have shape [", x.size(-1), "], got ", bias.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == bias.scalar_type(), op, ": x and bias dtypes differ (",
                   x.scalar_type(), " vs ", bias.scalar_type(), ")");
}

at::Tensor bias_gelu_cpu(const at::Tensor& x, const at::Tensor& bias, bool approximate_tanh) {
  check_inputs(x, bias, "bias_gelu");
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t cols = xc.size(-1);
  const int64_t rows = cols == 0 ? 0 : xc.numel() / cols;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "bias_gelu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* bp = bc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          const opmath_t u = opmath_t(xp[r * cols + c]) + opmath_t(bp[c]);
          yp[r * cols + c] = scalar_t(bert_fast::gelu(u, approximate_tanh));
        }
      }
    });
  });
  return y;
}

at::Tensor bias_gelu_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                  const at::Tensor& bias, bool approximate_tanh) {
  check_inputs(x, bias, "bias_gelu_backward");
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "bias_gelu_backward: grad shape ", grad.sizes(),
                    " differs from x shape ", x.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "bias_gelu_backward: grad dtype ",
                   grad.scalar_type(), " differs from x dtype ", x.scalar_type());
  const at::Tensor gc = grad.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.contiguous();
  at::Tensor dx = at::empty_like(xc);
  const int64_t cols = xc.size(-1);
  const int64_t rows = cols == 0 ? 0 : xc.numel() / cols;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(),
                                  "bias_gelu_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* bp = bc.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t i = r * cols + c;
          const opmath_t u = opmath_t(xp[i]) + opmath_t(bp[c]);
          dp[i] = scalar_t(opmath_t(gp[i]) * bert_fast::gelu_grad(u, approximate_tanh));
        }
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(bert_fast, CPU, m) {
  m.impl("bias_gelu", &bias_gelu_cpu);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cpu);
}
