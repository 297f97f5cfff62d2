// GELU and its derivative, shared by the CPU implementation and the CUDA kernel.
// Exact form: 0.5 u (1 + erf(u / sqrt 2)), as BERT trained; tanh form: HF's "gelu_new".
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define BERT_FAST_HD __host__ __device__ __forceinline__
#else
#define BERT_FAST_HD inline
#endif

namespace bert_fast {

#if !defined(__CUDACC__)
// Host code: pick the float and double overloads from std (device code has them globally).
using std::erf;
using std::exp;
using std::tanh;
#endif

template <typename T>
BERT_FAST_HD T gelu(T u, bool approximate_tanh) {
  if (approximate_tanh) {
    const T k = T(0.7978845608028654);  // sqrt(2 / pi)
    return T(0.5) * u * (T(1) + tanh(k * (u + T(0.044715) * u * u * u)));
  }
  return T(0.5) * u * (T(1) + erf(u * T(0.7071067811865476)));
}

template <typename T>
BERT_FAST_HD T gelu_grad(T u, bool approximate_tanh) {
  if (approximate_tanh) {
    const T k = T(0.7978845608028654);
    const T t = tanh(k * (u + T(0.044715) * u * u * u));
    return T(0.5) * (T(1) + t) + T(0.5) * u * (T(1) - t * t) * k * (T(1) + T(3 * 0.044715) * u * u);
  }
  const T cdf = T(0.5) * (T(1) + erf(u * T(0.7071067811865476)));
  const T pdf = exp(T(-0.5) * u * u) * T(0.3989422804014327);  // 1 / sqrt(2 pi)
  return cdf + u * pdf;
}

}  // namespace bert_fast
