// Fused LAMB and AdamW CUDA kernels over chunks of many tensors in one launch (the
// multi-tensor-apply idea of apex, with the tensor table in device memory; see optim.h).
// Float32 math and accumulation whatever the grad / model-copy dtype; loads are issued kIlp at
// a time per thread so enough bytes are in flight to saturate HBM.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_convert.cuh"
#include "optim.h"

namespace {

using bert_fast::AdamWParams;
using bert_fast::LambParams;

constexpr int kThreads = 256;
constexpr int kIlp = 4;

using bert_fast::from_float;
using bert_fast::to_float;

struct Table {
  const int64_t* ptrs;        // [ntensors][nlists] addresses
  const int64_t* chunks;      // [nchunks][4] tensor, start, len, slot
  const int64_t* slot_begin;  // [num_slots + 1]
  int nlists;

  template <typename T>
  __device__ __forceinline__ T* at(int64_t chunk, int list) const {
    const int64_t* c = chunks + 4 * chunk;
    return reinterpret_cast<T*>(ptrs[c[0] * nlists + list]) + c[1];
  }
  __device__ __forceinline__ int64_t len(int64_t chunk) const { return chunks[4 * chunk + 2]; }
  __device__ __forceinline__ int64_t slot(int64_t chunk) const { return chunks[4 * chunk + 3]; }
};

Table make_table(const int64_t* table, int64_t ntensors, int64_t nchunks, int nlists) {
  return {table, table + ntensors * nlists, table + ntensors * nlists + 4 * nchunks, nlists};
}

// Sum over the block in a fixed order (warp shuffles, then warp 0 over the warp sums).
__device__ __forceinline__ float block_sum(float x, float* shared) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  x = lane < kThreads / 32 ? shared[lane] : 0.0f;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  }
  return x;  // valid in thread 0
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sumsq_kernel(Table table, float* __restrict__ partials) {
  const int64_t chunk = blockIdx.x;
  const T* x = table.at<const T>(chunk, 0);
  const int64_t len = table.len(chunk);
  float acc = 0.0f;
  for (int64_t base = 0; base < len; base += int64_t(kThreads) * kIlp) {
    float r[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + threadIdx.x + k * kThreads;
      r[k] = i < len ? to_float(x[i]) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) acc += r[k] * r[k];
  }
  __shared__ float shared[kThreads / 32];
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) partials[chunk] = acc;
}

// out[slot * kParts + p] = sum of partials[c * kParts + p] over the slot's chunks, in order.
template <int kParts>
__global__ void __launch_bounds__(kThreads) reduce_slots_kernel(Table table,
                                                                const float* __restrict__ partials,
                                                                float* __restrict__ out) {
  const int64_t slot = blockIdx.x;
  const int64_t begin = table.slot_begin[slot], end = table.slot_begin[slot + 1];
  __shared__ float shared[kThreads / 32];
#pragma unroll
  for (int p = 0; p < kParts; ++p) {
    float acc = 0.0f;
    for (int64_t c = begin + threadIdx.x; c < end; c += kThreads) acc += partials[c * kParts + p];
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) out[slot * kParts + p] = acc;
  }
}

template <typename G>
__global__ void __launch_bounds__(kThreads) lamb_phase1_kernel(Table table, const float* __restrict__ clip,
                                                               LambParams h, float* __restrict__ partials) {
  const int64_t chunk = blockIdx.x;
  const float* w = table.at<const float>(chunk, 0);
  const G* g = table.at<const G>(chunk, 1);
  float* m = table.at<float>(chunk, 2);
  float* v = table.at<float>(chunk, 3);
  const int64_t len = table.len(chunk);
  const float inv_clip = 1.0f / *clip;
  float acc_w = 0.0f, acc_u = 0.0f;
  for (int64_t base = 0; base < len; base += int64_t(kThreads) * kIlp) {
    float rw[kIlp], rg[kIlp], rm[kIlp], rv[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + threadIdx.x + k * kThreads;
      const bool in = i < len;
      rw[k] = in ? w[i] : 0.0f;
      rg[k] = in ? to_float(g[i]) : 0.0f;
      rm[k] = in ? m[i] : 0.0f;
      rv[k] = in ? v[i] : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + threadIdx.x + k * kThreads;
      if (i < len) {
        bert_fast::lamb_moments(rw[k], rg[k] * inv_clip, rm[k], rv[k], h);
        const float u = bert_fast::lamb_update(rw[k], rm[k], rv[k], h);
        m[i] = rm[k];
        v[i] = rv[k];
        acc_w += rw[k] * rw[k];
        acc_u += u * u;
      }
    }
  }
  __shared__ float shared[kThreads / 32];
  acc_w = block_sum(acc_w, shared);
  acc_u = block_sum(acc_u, shared);
  if (threadIdx.x == 0) {
    partials[2 * chunk] = acc_w;
    partials[2 * chunk + 1] = acc_u;
  }
}

template <typename C, bool kCopy>
__global__ void __launch_bounds__(kThreads) lamb_phase2_kernel(Table table,
                                                               const float* __restrict__ step_sizes,
                                                               LambParams h) {
  const int64_t chunk = blockIdx.x;
  float* w = table.at<float>(chunk, 0);
  const float* m = table.at<const float>(chunk, 1);
  const float* v = table.at<const float>(chunk, 2);
  C* copy = kCopy ? table.at<C>(chunk, 3) : nullptr;
  const int64_t len = table.len(chunk);
  const float step = step_sizes[table.slot(chunk)];
  for (int64_t base = 0; base < len; base += int64_t(kThreads) * kIlp) {
    float rw[kIlp], rm[kIlp], rv[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + threadIdx.x + k * kThreads;
      const bool in = i < len;
      rw[k] = in ? w[i] : 0.0f;
      rm[k] = in ? m[i] : 0.0f;
      rv[k] = in ? v[i] : 1.0f;
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + threadIdx.x + k * kThreads;
      if (i < len) {
        const float out = rw[k] - step * bert_fast::lamb_update(rw[k], rm[k], rv[k], h);
        w[i] = out;
        if (kCopy) copy[i] = from_float<C>(out);
      }
    }
  }
}

template <typename G, typename C, bool kCopy>
__global__ void __launch_bounds__(kThreads) adamw_kernel(Table table, const float* __restrict__ clip,
                                                         AdamWParams h) {
  const int64_t chunk = blockIdx.x;
  float* w = table.at<float>(chunk, 0);
  const G* g = table.at<const G>(chunk, 1);
  float* m = table.at<float>(chunk, 2);
  float* v = table.at<float>(chunk, 3);
  C* copy = kCopy ? table.at<C>(chunk, 4) : nullptr;
  const int64_t len = table.len(chunk);
  const float inv_clip = 1.0f / *clip;
  for (int64_t base = 0; base < len; base += int64_t(kThreads) * kIlp) {
    float rw[kIlp], rg[kIlp], rm[kIlp], rv[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + threadIdx.x + k * kThreads;
      const bool in = i < len;
      rw[k] = in ? w[i] : 0.0f;
      rg[k] = in ? to_float(g[i]) : 0.0f;
      rm[k] = in ? m[i] : 0.0f;
      rv[k] = in ? v[i] : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + threadIdx.x + k * kThreads;
      if (i < len) {
        const float out = bert_fast::adamw_element(rw[k], rg[k] * inv_clip, rm[k], rv[k], h);
        w[i] = out;
        m[i] = rm[k];
        v[i] = rv[k];
        if (kCopy) copy[i] = from_float<C>(out);
      }
    }
  }
}

int last_error() { return int(cudaGetLastError()); }

// Calls f(T{}) with the element type of `dtype`; false for an unknown code.
template <typename F>
bool with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case BERT_FAST_OPTIM_F32: f(float{}); return true;
    case BERT_FAST_OPTIM_F16: f(__half{}); return true;
    case BERT_FAST_OPTIM_BF16: f(__nv_bfloat16{}); return true;
    default: return false;
  }
}

}  // namespace

extern "C" int bert_fast_optim_sumsq(const int64_t* table, int64_t ntensors, int64_t nchunks,
                                     int dtype, float* partials, float* out, void* stream) {
  if (ntensors == 0) return int(cudaSuccess);
  auto s = static_cast<cudaStream_t>(stream);
  const Table t = make_table(table, ntensors, nchunks, 1);
  if (nchunks > 0) {
    const bool ok = with_dtype(dtype, [&](auto x) {
      sumsq_kernel<decltype(x)><<<unsigned(nchunks), kThreads, 0, s>>>(t, partials);
    });
    if (!ok) return int(cudaErrorInvalidValue);
    if (int e = last_error()) return e;
  }
  reduce_slots_kernel<1><<<unsigned(ntensors), kThreads, 0, s>>>(t, partials, out);
  return last_error();
}

extern "C" int bert_fast_lamb_phase1(const int64_t* table, int64_t ntensors, int64_t nchunks,
                                     int64_t num_slots, int grad_dtype, const float* clip,
                                     bert_fast::LambParams params, float* partials, float* norms,
                                     void* stream) {
  if (num_slots == 0) return int(cudaSuccess);
  auto s = static_cast<cudaStream_t>(stream);
  const Table t = make_table(table, ntensors, nchunks, 4);
  if (nchunks > 0) {
    const bool ok = with_dtype(grad_dtype, [&](auto x) {
      lamb_phase1_kernel<decltype(x)><<<unsigned(nchunks), kThreads, 0, s>>>(t, clip, params, partials);
    });
    if (!ok) return int(cudaErrorInvalidValue);
    if (int e = last_error()) return e;
  }
  reduce_slots_kernel<2><<<unsigned(num_slots), kThreads, 0, s>>>(t, partials, norms);
  return last_error();
}

extern "C" int bert_fast_lamb_phase2(const int64_t* table, int64_t ntensors, int64_t nchunks,
                                     int copy_dtype, const float* step_sizes,
                                     bert_fast::LambParams params, void* stream) {
  if (nchunks == 0) return int(cudaSuccess);
  auto s = static_cast<cudaStream_t>(stream);
  if (copy_dtype == BERT_FAST_OPTIM_NONE) {
    lamb_phase2_kernel<float, false><<<unsigned(nchunks), kThreads, 0, s>>>(
        make_table(table, ntensors, nchunks, 3), step_sizes, params);
    return last_error();
  }
  const Table t = make_table(table, ntensors, nchunks, 4);
  const bool ok = with_dtype(copy_dtype, [&](auto x) {
    lamb_phase2_kernel<decltype(x), true><<<unsigned(nchunks), kThreads, 0, s>>>(t, step_sizes, params);
  });
  return ok ? last_error() : int(cudaErrorInvalidValue);
}

extern "C" int bert_fast_adamw(const int64_t* table, int64_t ntensors, int64_t nchunks,
                               int grad_dtype, int copy_dtype, const float* clip,
                               bert_fast::AdamWParams params, void* stream) {
  if (nchunks == 0) return int(cudaSuccess);
  auto s = static_cast<cudaStream_t>(stream);
  bool ok = false;
  if (copy_dtype == BERT_FAST_OPTIM_NONE) {
    const Table t = make_table(table, ntensors, nchunks, 4);
    ok = with_dtype(grad_dtype, [&](auto g) {
      adamw_kernel<decltype(g), float, false><<<unsigned(nchunks), kThreads, 0, s>>>(t, clip, params);
    });
  } else if (with_dtype(copy_dtype, [](auto) {})) {
    const Table t = make_table(table, ntensors, nchunks, 5);
    ok = with_dtype(grad_dtype, [&](auto g) {
      with_dtype(copy_dtype, [&](auto c) {
        adamw_kernel<decltype(g), decltype(c), true><<<unsigned(nchunks), kThreads, 0, s>>>(t, clip, params);
      });
    });
  }
  return ok ? last_error() : int(cudaErrorInvalidValue);
}

extern "C" const char* bert_fast_optim_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}
