// CUDA binding of the fused optimizer ops (schemas in optim.cpp): tensor lists -> a device table
// of addresses and chunks (optim.h) -> the torch-free launchers in optim_kernels.cu, on the current
// stream, every launch checked. The table is staged in pinned memory and copied asynchronously,
// so a step never waits on the host. Built only with CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "optim.h"
#include "optim_args.h"

namespace {

using bert_fast::OptimChunk;

int dtype_code(at::ScalarType t, const char* op, const char* name) {
  switch (t) {
    case at::kFloat: return BERT_FAST_OPTIM_F32;
    case at::kHalf: return BERT_FAST_OPTIM_F16;
    case at::kBFloat16: return BERT_FAST_OPTIM_BF16;
    default: TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t);
  }
  return -1;
}

void check_launch(int error, const char* op) {
  TORCH_CHECK(error == 0, op, ": CUDA launch failed: ", bert_fast_optim_error_string(error));
}

// [ntensors][nlists] addresses, [nchunks][4] chunks, [num_slots + 1] slot ranges, on `device`.
at::Tensor device_table(const std::vector<at::TensorList>& lists, const std::vector<OptimChunk>& chunks,
                        int64_t num_slots, const at::Device& device) {
  const int64_t ntensors = int64_t(lists[0].size()), nlists = int64_t(lists.size());
  const int64_t nchunks = int64_t(chunks.size());
  at::Tensor host = at::empty({ntensors * nlists + 4 * nchunks + num_slots + 1},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* p = host.data_ptr<int64_t>();
  for (int64_t t = 0; t < ntensors; ++t) {
    for (int64_t l = 0; l < nlists; ++l) {
      *p++ = reinterpret_cast<int64_t>(lists[l][t].data_ptr());
    }
  }
  for (const OptimChunk& c : chunks) {
    *p++ = c.tensor;
    *p++ = c.start;
    *p++ = c.len;
    *p++ = c.slot;
  }
  int64_t c = 0;  // chunks are sorted by slot (optim_args.h)
  for (int64_t s = 0; s <= num_slots; ++s) {
    while (c < nchunks && chunks[c].slot < s) ++c;
    *p++ = c;
  }
  return host.to(device, /*non_blocking=*/true);
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor optim_sumsq_cuda(at::TensorList tensors) {
  const char* op = "optim_sumsq";
  if (tensors.empty()) return at::zeros({0}, at::kFloat);
  bert_fast::check_list(op, "tensors", tensors, tensors.size(), tensors[0], c10::nullopt);
  const int dtype = dtype_code(tensors[0].scalar_type(), op, "tensors");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto chunks = bert_fast::whole_tensor_chunks(tensors);
  const int64_t n = int64_t(tensors.size());
  const at::Tensor table = device_table({tensors}, chunks, n, tensors[0].device());
  const auto f32 = tensors[0].options().dtype(at::kFloat);
  at::Tensor partials = at::empty({int64_t(chunks.size())}, f32);
  at::Tensor out = at::empty({n}, f32);
  check_launch(bert_fast_optim_sumsq(table.data_ptr<int64_t>(), n, int64_t(chunks.size()), dtype,
                                     partials.data_ptr<float>(), out.data_ptr<float>(), stream()),
               op);
  return out;
}

bert_fast::LambParams lamb_params(double beta1, double beta2, double eps, double weight_decay,
                                  double bias_correction1, double bias_correction2, bool adam_w_mode) {
  return {float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps),
          float(weight_decay), float(1.0 / bias_correction1), float(1.0 / bias_correction2),
          adam_w_mode ? 1 : 0};
}

at::Tensor lamb_phase1_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                            at::TensorList exp_avg_sq, const at::Tensor& segments, int64_t num_slots,
                            const at::Tensor& clip, double beta1, double beta2, double eps,
                            double weight_decay, double bias_correction1, double bias_correction2,
                            bool adam_w_mode) {
  const char* op = "lamb_phase1";
  bert_fast::check_adam_state(op, params, {}, grads, exp_avg, exp_avg_sq, clip, bias_correction1,
                              bias_correction2);
  const at::Tensor& like = params[0];
  const int grad_dtype = dtype_code(grads[0].scalar_type(), op, "grads");
  const auto chunks = bert_fast::make_chunks(op, segments, params, num_slots);
  const c10::cuda::CUDAGuard guard(like.device());
  const at::Tensor table =
      device_table({params, grads, exp_avg, exp_avg_sq}, chunks, num_slots, like.device());
  const auto f32 = like.options().dtype(at::kFloat);
  at::Tensor partials = at::empty({int64_t(chunks.size()), 2}, f32);
  at::Tensor norms = at::zeros({num_slots, 2}, f32);
  check_launch(bert_fast_lamb_phase1(table.data_ptr<int64_t>(), int64_t(params.size()),
                                     int64_t(chunks.size()), num_slots, grad_dtype, clip.data_ptr<float>(),
                                     lamb_params(beta1, beta2, eps, weight_decay, bias_correction1,
                                                 bias_correction2, adam_w_mode),
                                     partials.data_ptr<float>(), norms.data_ptr<float>(), stream()),
               op);
  return norms;
}

void lamb_phase2_cuda(at::TensorList params, at::TensorList model_params, at::TensorList exp_avg,
                      at::TensorList exp_avg_sq, const at::Tensor& segments, const at::Tensor& step_sizes,
                      double beta1, double beta2, double eps, double weight_decay,
                      double bias_correction1, double bias_correction2, bool adam_w_mode) {
  const char* op = "lamb_phase2";
  bert_fast::check_lamb_phase2_state(op, params, model_params, exp_avg, exp_avg_sq, step_sizes,
                                     bias_correction1, bias_correction2);
  const at::Tensor& like = params[0];
  const int copy_dtype = model_params.empty() ? BERT_FAST_OPTIM_NONE
                                              : dtype_code(model_params[0].scalar_type(), op, "model_params");
  const auto chunks = bert_fast::make_chunks(op, segments, params, step_sizes.numel());
  const c10::cuda::CUDAGuard guard(like.device());
  std::vector<at::TensorList> lists{params, exp_avg, exp_avg_sq};
  if (!model_params.empty()) lists.push_back(model_params);
  const at::Tensor table = device_table(lists, chunks, step_sizes.numel(), like.device());
  check_launch(bert_fast_lamb_phase2(table.data_ptr<int64_t>(), int64_t(params.size()),
                                     int64_t(chunks.size()), copy_dtype, step_sizes.data_ptr<float>(),
                                     lamb_params(beta1, beta2, eps, weight_decay, bias_correction1,
                                                 bias_correction2, adam_w_mode),
                                     stream()),
               op);
}

void adamw_step_cuda(at::TensorList params, at::TensorList model_params, at::TensorList grads,
                     at::TensorList exp_avg, at::TensorList exp_avg_sq, const at::Tensor& clip, double lr,
                     double beta1, double beta2, double eps, double weight_decay, double bias_correction1,
                     double bias_correction2) {
  const char* op = "adamw_step";
  bert_fast::check_adam_state(op, params, model_params, grads, exp_avg, exp_avg_sq, clip,
                              bias_correction1, bias_correction2);
  const at::Tensor& like = params[0];
  const int grad_dtype = dtype_code(grads[0].scalar_type(), op, "grads");
  const int copy_dtype = model_params.empty() ? BERT_FAST_OPTIM_NONE
                                              : dtype_code(model_params[0].scalar_type(), op, "model_params");
  const auto chunks = bert_fast::whole_tensor_chunks(params);
  const c10::cuda::CUDAGuard guard(like.device());
  std::vector<at::TensorList> lists{params, grads, exp_avg, exp_avg_sq};
  if (!model_params.empty()) lists.push_back(model_params);
  const at::Tensor table = device_table(lists, chunks, int64_t(params.size()), like.device());
  const bert_fast::AdamWParams h{float(beta2), float(1.0 - beta1), float(1.0 - beta2), float(eps),
                                 float(1.0 - lr * weight_decay), float(lr / bias_correction1),
                                 float(1.0 / std::sqrt(bias_correction2))};
  check_launch(bert_fast_adamw(table.data_ptr<int64_t>(), int64_t(params.size()), int64_t(chunks.size()),
                               grad_dtype, copy_dtype, clip.data_ptr<float>(), h, stream()),
               op);
}

}  // namespace

TORCH_LIBRARY_IMPL(bert_fast, CUDA, m) {
  m.impl("optim_sumsq", &optim_sumsq_cuda);
  m.impl("lamb_phase1", &lamb_phase1_cuda);
  m.impl("lamb_phase2", &lamb_phase2_cuda);
  m.impl("adamw_step", &adamw_step_cuda);
}
