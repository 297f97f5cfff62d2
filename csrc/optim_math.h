// Per-element LAMB and AdamW math, shared by the CPU loops (optim.cpp) and the CUDA kernels
// (optim_kernels.cu) so both evaluate the same float32 expressions in the same order. Scalar
// coefficients (1 - beta, lr / bc1, 1 / bc2, ...) are computed once on the host in double; only
// the one division that depends on the data per element remains (divisions, not memory, bound a
// vectorised CPU loop), so results may differ from torch's op-by-op rounding by an ulp.
#pragma once
#include <math.h>

#if defined(__CUDACC__)
#define BERT_FAST_OPTIM_HD __host__ __device__ __forceinline__
#else
#define BERT_FAST_OPTIM_HD inline
#endif

namespace bert_fast {

struct LambParams {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  float inv_bias_correction1, inv_bias_correction2;  // 1 / (1 - beta^step) (1 when off)
  int adam_w_mode;                           // 1: decoupled decay in the update; 0: L2 on the grad
};

// Phase 1 of apex's FusedLAMB: the clipped grad (g * 1/clip) updates the moments in place.
BERT_FAST_OPTIM_HD void lamb_moments(float w, float g, float& m, float& v, const LambParams& h) {
  if (!h.adam_w_mode) g = g + h.weight_decay * w;
  m = h.beta1 * m + h.one_minus_beta1 * g;
  v = h.beta2 * v + h.one_minus_beta2 * g * g;
}

// The update direction m_hat / (sqrt(v_hat) + eps) (+ wd * w when decoupled), a function of the
// moments and the weight alone: phase 2 recomputes it instead of storing it (saves a write and
// a read of a full fp32 buffer).
BERT_FAST_OPTIM_HD float lamb_update(float w, float m, float v, const LambParams& h) {
  const float u = (m * h.inv_bias_correction1) / (sqrtf(v * h.inv_bias_correction2) + h.eps);
  return h.adam_w_mode ? u + h.weight_decay * w : u;
}

struct AdamWParams {
  float beta2, one_minus_beta1, one_minus_beta2, eps;
  float decay_factor;           // 1 - lr * weight_decay
  float step_size;              // lr / (1 - beta1^step)
  float inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^step)
};

// torch.optim.AdamW's single-tensor step in its order of operations: decay the weight, lerp m,
// update v, then w -= step_size * m / (sqrt(v) / sqrt(bc2) + eps).
BERT_FAST_OPTIM_HD float adamw_element(float w, float g, float& m, float& v, const AdamWParams& h) {
  w = w * h.decay_factor;
  m = m + h.one_minus_beta1 * (g - m);
  v = v * h.beta2 + h.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) * h.inv_bias_correction2_sqrt + h.eps;
  return w + (-h.step_size) * (m / denom);
}

}  // namespace bert_fast
