// Fused bias + GELU for the BERT FFN (y = gelu(x + b)), forward and backward, in one memory
// pass each instead of eager PyTorch's two. Torch-free: see bias_gelu.h for the launcher API.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_convert.cuh"
#include "bias_gelu.h"
#include "bias_gelu_math.h"

namespace {

using bert_fast::from_float;
using bert_fast::to_float;

constexpr int kThreads = 256;
constexpr int kMaxRowBlocks = 1024;

// Grid: x over columns, y strides over rows, so each thread loads its bias element once.
template <typename T>
__global__ void bias_gelu_forward_kernel(const T* __restrict__ x,     // [rows, cols]
                                         const T* __restrict__ bias,  // [cols]
                                         T* __restrict__ y,           // [rows, cols]
                                         int64_t rows, int64_t cols, bool approximate_tanh) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  const float b = to_float(bias[col]);
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t i = row * cols + col;
    y[i] = from_float<T>(bert_fast::gelu(to_float(x[i]) + b, approximate_tanh));
  }
}

template <typename T>
__global__ void bias_gelu_backward_kernel(const T* __restrict__ dy,    // [rows, cols]
                                          const T* __restrict__ x,     // [rows, cols]
                                          const T* __restrict__ bias,  // [cols]
                                          T* __restrict__ dx,          // [rows, cols]
                                          int64_t rows, int64_t cols, bool approximate_tanh) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  const float b = to_float(bias[col]);
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t i = row * cols + col;
    const float g = bert_fast::gelu_grad(to_float(x[i]) + b, approximate_tanh);
    dx[i] = from_float<T>(to_float(dy[i]) * g);
  }
}

dim3 grid_for(int64_t rows, int64_t cols) {
  const int64_t col_blocks = (cols + kThreads - 1) / kThreads;
  const int64_t row_blocks = rows < kMaxRowBlocks ? rows : kMaxRowBlocks;
  return dim3(unsigned(col_blocks), unsigned(row_blocks > 0 ? row_blocks : 1));
}

template <typename T>
int launch_forward(const void* x, const void* bias, void* y, int64_t rows, int64_t cols,
                   bool approximate_tanh, cudaStream_t stream) {
  bias_gelu_forward_kernel<T><<<grid_for(rows, cols), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(y), rows, cols,
      approximate_tanh);
  return int(cudaGetLastError());
}

template <typename T>
int launch_backward(const void* dy, const void* x, const void* bias, void* dx, int64_t rows,
                    int64_t cols, bool approximate_tanh, cudaStream_t stream) {
  bias_gelu_backward_kernel<T><<<grid_for(rows, cols), kThreads, 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(bias),
      static_cast<T*>(dx), rows, cols, approximate_tanh);
  return int(cudaGetLastError());
}

}  // namespace

extern "C" int bert_fast_bias_gelu_forward(const void* x, const void* bias, void* y, int64_t rows,
                                           int64_t cols, int dtype, int approximate_tanh,
                                           void* stream) {
  if (rows == 0 || cols == 0) return int(cudaSuccess);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case BERT_FAST_F32: return launch_forward<float>(x, bias, y, rows, cols, approximate_tanh, s);
    case BERT_FAST_F16: return launch_forward<__half>(x, bias, y, rows, cols, approximate_tanh, s);
    case BERT_FAST_BF16:
      return launch_forward<__nv_bfloat16>(x, bias, y, rows, cols, approximate_tanh, s);
    default: return int(cudaErrorInvalidValue);
  }
}

extern "C" int bert_fast_bias_gelu_backward(const void* dy, const void* x, const void* bias,
                                            void* dx, int64_t rows, int64_t cols, int dtype,
                                            int approximate_tanh, void* stream) {
  if (rows == 0 || cols == 0) return int(cudaSuccess);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case BERT_FAST_F32:
      return launch_backward<float>(dy, x, bias, dx, rows, cols, approximate_tanh, s);
    case BERT_FAST_F16:
      return launch_backward<__half>(dy, x, bias, dx, rows, cols, approximate_tanh, s);
    case BERT_FAST_BF16:
      return launch_backward<__nv_bfloat16>(dy, x, bias, dx, rows, cols, approximate_tanh, s);
    default: return int(cudaErrorInvalidValue);
  }
}

extern "C" const char* bert_fast_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}
