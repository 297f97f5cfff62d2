// Argument checks and the chunk list of the fused optimizer ops, shared by the CPU
// (optim.cpp) and CUDA (optim_cuda.cpp) bindings. Python validates first (bert_fast/optim.py);
// these keep direct torch.ops callers from reaching a kernel with bad input.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

namespace bert_fast {

// A contiguous run of elements [start, start + len) of list entry `tensor`, whose sums of
// squares go to norm slot `slot`. Segments come from Python (one per tensor, or under ZeRO one
// per piece of an original tensor inside the flat partition); chunks cut them into fixed-size
// pieces, the unit of parallel work and of the deterministic partial sums.
struct OptimChunk {
  int64_t tensor, start, len, slot;
};

constexpr int64_t kOptimChunk = 16384;

inline void check_list(const char* op, const char* name, at::TensorList list, size_t size,
                       const at::Tensor& like, c10::optional<at::ScalarType> dtype) {
  TORCH_CHECK_VALUE(list.size() == size, op, ": ", name, " has ", list.size(),
                    " tensors, expected ", size);
  at::ScalarType first = list.empty() ? at::kFloat : list[0].scalar_type();
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK_TYPE(t.scalar_type() == dtype.value_or(first), op, ": ", name, "[", i,
                     "] has dtype ", t.scalar_type(), ", expected ", dtype.value_or(first));
    TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, "[", i, "] is on ", t.device(),
                      ", expected ", like.device());
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
  }
}

// Every list must match `ref` (the params) in numel, element for element.
inline void check_numels(const char* op, const char* name, at::TensorList list,
                         at::TensorList ref) {
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK_VALUE(list[i].numel() == ref[i].numel(), op, ": ", name, "[", i, "] has ",
                      list[i].numel(), " elements but params[", i, "] has ", ref[i].numel());
  }
}

inline void check_float_dtype(const char* op, const char* name, at::ScalarType t) {
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", t);
}

// Cuts `segments` ([n, 4] int64 on the CPU: tensor, start, len, slot) into chunks sorted by
// slot (stable), so each slot's chunks are contiguous and reduce in a fixed order.
inline std::vector<OptimChunk> make_chunks(const char* op, const at::Tensor& segments,
                                           at::TensorList params, int64_t num_slots) {
  TORCH_CHECK_VALUE(segments.device().is_cpu() && segments.scalar_type() == at::kLong &&
                        segments.dim() == 2 && segments.size(1) == 4,
                    op, ": segments must be an int64 CPU tensor of shape [n, 4], got ",
                    segments.scalar_type(), " ", segments.sizes(), " on ", segments.device());
  TORCH_CHECK_VALUE(num_slots >= 0, op, ": num_slots must be >= 0, got ", num_slots);
  const at::Tensor seg = segments.contiguous();
  const int64_t* s = seg.data_ptr<int64_t>();
  std::vector<OptimChunk> chunks;
  for (int64_t i = 0; i < seg.size(0); ++i) {
    const int64_t t = s[4 * i], start = s[4 * i + 1], len = s[4 * i + 2], slot = s[4 * i + 3];
    TORCH_CHECK_VALUE(t >= 0 && t < int64_t(params.size()), op, ": segments[", i,
                      "] names tensor ", t, " of ", params.size());
    // Compared without forming start + len, which a corrupt segment could overflow.
    TORCH_CHECK_VALUE(start >= 0 && len >= 0 && start <= params[t].numel() &&
                          len <= params[t].numel() - start,
                      op, ": segments[", i, "] (start ", start, ", length ", len,
                      ") lies outside params[", t, "] of ", params[t].numel(), " elements");
    TORCH_CHECK_VALUE(slot >= 0 && slot < num_slots, op, ": segments[", i, "] slot ", slot,
                      " is outside [0, ", num_slots, ")");
    for (int64_t c = 0; c < len; c += kOptimChunk) {
      chunks.push_back({t, start + c, std::min(kOptimChunk, len - c), slot});
    }
  }
  std::stable_sort(chunks.begin(), chunks.end(),
                   [](const OptimChunk& a, const OptimChunk& b) { return a.slot < b.slot; });
  return chunks;
}

// One slot per tensor, covering all of it.
inline std::vector<OptimChunk> whole_tensor_chunks(at::TensorList tensors) {
  std::vector<OptimChunk> chunks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t c = 0; c < n; c += kOptimChunk) {
      chunks.push_back({int64_t(t), c, std::min(kOptimChunk, n - c), int64_t(t)});
    }
  }
  return chunks;
}

inline void check_bias_corrections(const char* op, double bias_correction1, double bias_correction2) {
  TORCH_CHECK_VALUE(bias_correction1 > 0 && bias_correction1 <= 1 && bias_correction2 > 0 &&
                        bias_correction2 <= 1,
                    op, ": bias_correction1 and bias_correction2 must lie in (0, 1], got ",
                    bias_correction1, " and ", bias_correction2);
}

// Scalar tensors passed by device pointer (so no host sync reads them): float32, one element,
// on the params' device.
inline void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t,
                                const at::Tensor& like, int64_t numel) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == numel && t.is_contiguous(), op, ": ", name,
                    " must be a contiguous tensor of ", numel, " elements, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device(),
                    ", expected ", like.device());
}

// The checks every Adam-style step makes of its state (lamb_phase1 and adamw_step, CPU and CUDA):
// float32 params and moments, float grads, optional model copies (empty = none), one of each per
// parameter, a one-element clip factor and valid bias corrections.
// The float32 state every fused step takes: params (masters), the optional low-precision model
// copies, exp_avg, exp_avg_sq, and grads where the op reads them (`grads` null: lamb_phase2,
// which recomputes the update from the moments).
inline void check_optimizer_state(const char* op, at::TensorList params, at::TensorList model_params,
                                  const at::TensorList* grads, at::TensorList exp_avg,
                                  at::TensorList exp_avg_sq, double bias_correction1,
                                  double bias_correction2) {
  TORCH_CHECK_VALUE(!params.empty(), op, ": params is empty");
  const at::Tensor& like = params[0];
  check_list(op, "params", params, params.size(), like, at::kFloat);
  check_list(op, "model_params", model_params, model_params.empty() ? 0 : params.size(), like,
             c10::nullopt);
  if (grads != nullptr) {
    check_list(op, "grads", *grads, params.size(), like, c10::nullopt);
    check_float_dtype(op, "grads", (*grads)[0].scalar_type());
  }
  check_list(op, "exp_avg", exp_avg, params.size(), like, at::kFloat);
  check_list(op, "exp_avg_sq", exp_avg_sq, params.size(), like, at::kFloat);
  check_numels(op, "model_params", model_params, params);
  if (grads != nullptr) check_numels(op, "grads", *grads, params);
  check_numels(op, "exp_avg", exp_avg, params);
  check_numels(op, "exp_avg_sq", exp_avg_sq, params);
  check_bias_corrections(op, bias_correction1, bias_correction2);
}

inline void check_adam_state(const char* op, at::TensorList params, at::TensorList model_params,
                             at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                             const at::Tensor& clip, double bias_correction1, double bias_correction2) {
  check_optimizer_state(op, params, model_params, &grads, exp_avg, exp_avg_sq, bias_correction1,
                        bias_correction2);
  check_scalar_tensor(op, "clip", clip, params[0], 1);
}

// lamb_phase2's state: no grads; one step size per slot.
inline void check_lamb_phase2_state(const char* op, at::TensorList params, at::TensorList model_params,
                                    at::TensorList exp_avg, at::TensorList exp_avg_sq,
                                    const at::Tensor& step_sizes, double bias_correction1,
                                    double bias_correction2) {
  check_optimizer_state(op, params, model_params, nullptr, exp_avg, exp_avg_sq, bias_correction1,
                        bias_correction2);
  check_scalar_tensor(op, "step_sizes", step_sizes, params[0], step_sizes.numel());
}

}  // namespace bert_fast
