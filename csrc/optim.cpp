// Fused LAMB and AdamW steps on the CPU, and the schemas of the optimizer ops (the CUDA
// implementations register in optim_cuda.cpp). Work is cut into fixed chunks (optim_args.h)
// that run in parallel; each chunk is one pass over its elements in a loop the compiler
// vectorises, and sums of squares reduce per chunk, then per slot in chunk order, so results
// do not depend on the thread count. A LAMB step reads the grads once for their norm, then
// w, g, m, v (writing m, v) and w, m, v (writing w): the update is recomputed, never stored.
//
//   optim_sumsq: per-tensor sums of squares (the global grad norm for clipping).
//   lamb_phase1: clipped grad -> moments, and per-slot sums of w^2 and update^2.
//   lamb_phase2: w -= step_sizes[slot] * update, recomputing the update from the moments.
//   adamw_step:  torch.optim.AdamW's step (decoupled weight decay) in one pass.
// params are float32 (master weights); model_params, when given, receive a copy in their dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>

#include "optim_args.h"
#include "optim_math.h"

namespace {

using bert_fast::OptimChunk;
constexpr int kLanes = 16;  // independent partial sums, so the reductions vectorise

// The extension is built for baseline x86-64 (SSE2); GCC clones the hot loops for AVX2 and
// AVX-512 and picks one at load time, as torch's own CPU kernels do by CPU_CAPABILITY.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define BERT_FAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BERT_FAST_CLONES
#endif

template <typename T>
T* ptr(const at::Tensor& t, int64_t offset) {
  return static_cast<T*>(t.data_ptr()) + offset;
}

// Sums partials[c] (kParts values per chunk) into out[slot] in chunk order, in double.
template <int kParts>
at::Tensor reduce_slots(const std::vector<OptimChunk>& chunks,
                        const std::vector<std::array<float, kParts>>& partials, int64_t num_slots) {
  std::vector<double> acc(size_t(num_slots) * kParts, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    for (int k = 0; k < kParts; ++k) acc[chunks[c].slot * kParts + k] += partials[c][k];
  }
  at::Tensor out = at::empty({num_slots, kParts}, at::kFloat);
  float* o = out.data_ptr<float>();
  for (size_t i = 0; i < acc.size(); ++i) o[i] = float(acc[i]);
  return out;
}

template <typename T>
BERT_FAST_CLONES float chunk_sumsq(const T* x, int64_t len) {
  std::array<float, kLanes> acc{};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float v = float(x[i + j]);
      acc[j] += v * v;
    }
  }
  for (; i < len; ++i) acc[0] += float(x[i]) * float(x[i]);
  float s = 0.0f;
  for (float a : acc) s += a;
  return s;
}

at::Tensor optim_sumsq_cpu(at::TensorList tensors) {
  const char* op = "optim_sumsq";
  if (tensors.empty()) return at::zeros({0}, at::kFloat);
  bert_fast::check_float_dtype(op, "tensors", tensors[0].scalar_type());
  bert_fast::check_list(op, "tensors", tensors, tensors.size(), tensors[0], c10::nullopt);
  const auto chunks = bert_fast::whole_tensor_chunks(tensors);
  std::vector<std::array<float, 1>> partials(chunks.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "optim_sumsq", [&] {
    at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const OptimChunk& k = chunks[c];
        partials[c][0] = chunk_sumsq(ptr<const scalar_t>(tensors[k.tensor], k.start), k.len);
      }
    });
  });
  return reduce_slots<1>(chunks, partials, int64_t(tensors.size())).view({-1});
}

bert_fast::LambParams lamb_params(double beta1, double beta2, double eps, double weight_decay,
                                  double bias_correction1, double bias_correction2,
                                  bool adam_w_mode) {
  return {float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps),
          float(weight_decay), float(1.0 / bias_correction1), float(1.0 / bias_correction2),
          adam_w_mode ? 1 : 0};
}

template <typename G>
BERT_FAST_CLONES std::array<float, 2> lamb_phase1_chunk(const float* __restrict__ w,
                                                        const G* __restrict__ g, float* __restrict__ m,
                                                        float* __restrict__ v, int64_t len, float inv_clip,
                                                        bert_fast::LambParams h) {
  std::array<float, kLanes> aw{}, au{};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      bert_fast::lamb_moments(w[i + j], float(g[i + j]) * inv_clip, m[i + j], v[i + j], h);
      const float u = bert_fast::lamb_update(w[i + j], m[i + j], v[i + j], h);
      aw[j] += w[i + j] * w[i + j];
      au[j] += u * u;
    }
  }
  for (; i < len; ++i) {
    bert_fast::lamb_moments(w[i], float(g[i]) * inv_clip, m[i], v[i], h);
    const float u = bert_fast::lamb_update(w[i], m[i], v[i], h);
    aw[0] += w[i] * w[i];
    au[0] += u * u;
  }
  std::array<float, 2> out{0.0f, 0.0f};
  for (int j = 0; j < kLanes; ++j) {
    out[0] += aw[j];
    out[1] += au[j];
  }
  return out;
}

BERT_FAST_CLONES void lamb_phase2_chunk(float* __restrict__ w, const float* __restrict__ m,
                                        const float* __restrict__ v, int64_t len, float step,
                                        bert_fast::LambParams h) {
  for (int64_t i = 0; i < len; ++i) w[i] -= step * bert_fast::lamb_update(w[i], m[i], v[i], h);
}

template <typename G>
BERT_FAST_CLONES void adamw_chunk(float* __restrict__ w, const G* __restrict__ g, float* __restrict__ m,
                                  float* __restrict__ v, int64_t len, float inv_clip,
                                  bert_fast::AdamWParams h) {
  for (int64_t i = 0; i < len; ++i) {
    float mi = m[i], vi = v[i];
    w[i] = bert_fast::adamw_element(w[i], float(g[i]) * inv_clip, mi, vi, h);
    m[i] = mi;
    v[i] = vi;
  }
}

template <typename C>
void copy_chunk(C* __restrict__ out, const float* __restrict__ w, int64_t len) {
  for (int64_t i = 0; i < len; ++i) out[i] = C(w[i]);
}

at::Tensor lamb_phase1_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                           at::TensorList exp_avg_sq, const at::Tensor& segments,
                           int64_t num_slots, const at::Tensor& clip, double beta1, double beta2,
                           double eps, double weight_decay, double bias_correction1,
                           double bias_correction2, bool adam_w_mode) {
  const char* op = "lamb_phase1";
  bert_fast::check_adam_state(op, params, {}, grads, exp_avg, exp_avg_sq, clip, bias_correction1,
                              bias_correction2);
  const auto chunks = bert_fast::make_chunks(op, segments, params, num_slots);
  const auto h = lamb_params(beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2,
                             adam_w_mode);
  const float inv_clip = 1.0f / clip.data_ptr<float>()[0];
  std::vector<std::array<float, 2>> partials(chunks.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "lamb_phase1", [&] {
    at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const OptimChunk& k = chunks[i];
        partials[i] = lamb_phase1_chunk(
            ptr<float>(params[k.tensor], k.start), ptr<const scalar_t>(grads[k.tensor], k.start),
            ptr<float>(exp_avg[k.tensor], k.start), ptr<float>(exp_avg_sq[k.tensor], k.start),
            k.len, inv_clip, h);
      }
    });
  });
  return reduce_slots<2>(chunks, partials, num_slots);
}

void lamb_phase2_cpu(at::TensorList params, at::TensorList model_params, at::TensorList exp_avg,
                     at::TensorList exp_avg_sq, const at::Tensor& segments,
                     const at::Tensor& step_sizes, double beta1, double beta2, double eps,
                     double weight_decay, double bias_correction1, double bias_correction2,
                     bool adam_w_mode) {
  const char* op = "lamb_phase2";
  bert_fast::check_lamb_phase2_state(op, params, model_params, exp_avg, exp_avg_sq, step_sizes,
                                     bias_correction1, bias_correction2);
  const auto chunks = bert_fast::make_chunks(op, segments, params, step_sizes.numel());
  const auto h = lamb_params(beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2,
                             adam_w_mode);
  const float* lr = step_sizes.data_ptr<float>();
  const at::ScalarType copy_dtype = model_params.empty() ? at::kFloat : model_params[0].scalar_type();
  if (!model_params.empty()) bert_fast::check_float_dtype(op, "model_params", copy_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, copy_dtype, "lamb_phase2", [&] {
    at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const OptimChunk& k = chunks[i];
        float* w = ptr<float>(params[k.tensor], k.start);
        lamb_phase2_chunk(w, ptr<const float>(exp_avg[k.tensor], k.start),
                          ptr<const float>(exp_avg_sq[k.tensor], k.start), k.len, lr[k.slot], h);
        if (!model_params.empty()) copy_chunk(ptr<scalar_t>(model_params[k.tensor], k.start), w, k.len);
      }
    });
  });
}

void adamw_step_cpu(at::TensorList params, at::TensorList model_params, at::TensorList grads,
                    at::TensorList exp_avg, at::TensorList exp_avg_sq, const at::Tensor& clip,
                    double lr, double beta1, double beta2, double eps, double weight_decay,
                    double bias_correction1, double bias_correction2) {
  const char* op = "adamw_step";
  bert_fast::check_adam_state(op, params, model_params, grads, exp_avg, exp_avg_sq, clip,
                              bias_correction1, bias_correction2);
  const at::ScalarType copy_dtype = model_params.empty() ? at::kFloat : model_params[0].scalar_type();
  if (!model_params.empty()) bert_fast::check_float_dtype(op, "model_params", copy_dtype);
  const bert_fast::AdamWParams h{float(beta2), float(1.0 - beta1), float(1.0 - beta2), float(eps),
                                 float(1.0 - lr * weight_decay), float(lr / bias_correction1),
                                 float(1.0 / std::sqrt(bias_correction2))};
  const float inv_clip = 1.0f / clip.data_ptr<float>()[0];
  const auto chunks = bert_fast::whole_tensor_chunks(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "adamw_step", [&] {
    using grad_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, copy_dtype, "adamw_step", [&] {
      at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const OptimChunk& k = chunks[i];
          float* w = ptr<float>(params[k.tensor], k.start);
          adamw_chunk(w, ptr<const grad_t>(grads[k.tensor], k.start),
                      ptr<float>(exp_avg[k.tensor], k.start), ptr<float>(exp_avg_sq[k.tensor], k.start),
                      k.len, inv_clip, h);
          if (!model_params.empty()) copy_chunk(ptr<scalar_t>(model_params[k.tensor], k.start), w, k.len);
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bert_fast, m) {
  m.def("optim_sumsq(Tensor[] tensors) -> Tensor");
  m.def("lamb_phase1(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avg, "
        "Tensor(b!)[] exp_avg_sq, Tensor segments, int num_slots, Tensor clip, float beta1, "
        "float beta2, float eps, float weight_decay, float bias_correction1, "
        "float bias_correction2, bool adam_w_mode) -> Tensor");
  m.def("lamb_phase2(Tensor(a!)[] params, Tensor(b!)[] model_params, Tensor[] exp_avg, "
        "Tensor[] exp_avg_sq, Tensor segments, Tensor step_sizes, float beta1, float beta2, "
        "float eps, float weight_decay, float bias_correction1, float bias_correction2, "
        "bool adam_w_mode) -> ()");
  m.def("adamw_step(Tensor(a!)[] params, Tensor(b!)[] model_params, Tensor[] grads, "
        "Tensor(c!)[] exp_avg, Tensor(d!)[] exp_avg_sq, Tensor clip, float lr, float beta1, "
        "float beta2, float eps, float weight_decay, float bias_correction1, "
        "float bias_correction2) -> ()");
}

TORCH_LIBRARY_IMPL(bert_fast, CPU, m) {
  m.impl("optim_sumsq", &optim_sumsq_cpu);
  m.impl("lamb_phase1", &lamb_phase1_cpu);
  m.impl("lamb_phase2", &lamb_phase2_cpu);
  m.impl("adamw_step", &adamw_step_cpu);
}
