// C launcher API of the bias+GELU CUDA kernels. Free of torch headers so bias_gelu_kernels.cu compiles
// with plain nvcc; bias_gelu_cuda.cpp binds it to tensors.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum BertFastDtype { BERT_FAST_F32 = 0, BERT_FAST_F16 = 1, BERT_FAST_BF16 = 2 };

// y[r, c] = gelu(x[r, c] + bias[c]); x, y: [rows, cols] row-major; bias: [cols].
// Returns the cudaError_t of the launch (0 on success).
int bert_fast_bias_gelu_forward(const void* x, const void* bias, void* y, int64_t rows,
                                int64_t cols, int dtype, int approximate_tanh, void* stream);

// dx[r, c] = dy[r, c] * gelu'(x[r, c] + bias[c]).
int bert_fast_bias_gelu_backward(const void* dy, const void* x, const void* bias, void* dx,
                                 int64_t rows, int64_t cols, int dtype, int approximate_tanh,
                                 void* stream);

const char* bert_fast_cuda_error_string(int error);

#ifdef __cplusplus
}
#endif
