// CPU implementation of torch.ops.bert_fast.bias_gelu and its backward (schemas in
// extension.cpp). Rows run in parallel; each row is a contiguous loop the compiler vectorises.
// Half and bfloat16 compute in float, float32 in float, float64 in double (at::opmath_type).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bias_gelu_args.h"
#include "bias_gelu_math.h"

namespace {

at::Tensor bias_gelu_cpu(const at::Tensor& x, const at::Tensor& bias, bool approximate_tanh) {
  const auto a = bert_fast::bias_gelu_args(x, bias, "bias_gelu");
  at::Tensor y = at::empty_like(a.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "bias_gelu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = a.x.data_ptr<scalar_t>();
    const scalar_t* bp = a.bias.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t cols = a.cols;
    at::parallel_for(0, a.rows, 1, [&](int64_t begin, int64_t end) {
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
  const auto a = bert_fast::bias_gelu_args(x, bias, "bias_gelu_backward");
  const at::Tensor g = bert_fast::bias_gelu_grad_arg(grad, x, "bias_gelu_backward");
  at::Tensor dx = at::empty_like(a.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(),
                                  "bias_gelu_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* xp = a.x.data_ptr<scalar_t>();
    const scalar_t* bp = a.bias.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    const int64_t cols = a.cols;
    at::parallel_for(0, a.rows, 1, [&](int64_t begin, int64_t end) {
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
