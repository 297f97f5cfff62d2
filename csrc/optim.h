// C launcher API of the fused optimizer CUDA kernels (optim_kernels.cu). Free of torch headers so the
// kernels compile with plain nvcc; optim_cuda.cpp binds them to tensors.
//
// Multi-tensor apply through a device table (int64, built by the binding each step):
//   table[t * nlists + l]                 address of tensor t of list l        (ntensors * nlists)
//   chunks = table + ntensors * nlists    [nchunks][4]: tensor, start, len, slot (sorted by slot)
//   slot_begin = chunks + 4 * nchunks     [num_slots + 1]: chunk range of each slot
// One launch covers every chunk of every tensor; sums of squares go to per-chunk partials, then a
// second kernel reduces each slot's chunks in order (deterministic, no atomics).
#pragma once
#include <stdint.h>

#include "optim_math.h"

#ifdef __cplusplus
extern "C" {
#endif

enum BertFastOptimDtype { BERT_FAST_OPTIM_F32 = 0, BERT_FAST_OPTIM_F16 = 1, BERT_FAST_OPTIM_BF16 = 2,
                          BERT_FAST_OPTIM_NONE = -1 };

// out[t] = sum of squares of tensor t (lists: x of `dtype`). partials: [nchunks] scratch.
int bert_fast_optim_sumsq(const int64_t* table, int64_t ntensors, int64_t nchunks, int dtype,
                          float* partials, float* out, void* stream);

// Lists: w (f32), g (grad_dtype), m (f32), v (f32). Moments updated in place; norms[slot] =
// (sum w^2, sum update^2). clip: device float32 [1], grads are divided by it.
int bert_fast_lamb_phase1(const int64_t* table, int64_t ntensors, int64_t nchunks,
                          int64_t num_slots, int grad_dtype, const float* clip,
                          bert_fast::LambParams params, float* partials, float* norms,
                          void* stream);

// Lists: w (f32), m, v (f32), copy (copy_dtype, or absent when BERT_FAST_OPTIM_NONE).
// w -= step_sizes[slot] * update; copy = w rounded.
int bert_fast_lamb_phase2(const int64_t* table, int64_t ntensors, int64_t nchunks, int copy_dtype,
                          const float* step_sizes, bert_fast::LambParams params, void* stream);

// Lists: w (f32), g (grad_dtype), m, v (f32), copy (copy_dtype or absent). One AdamW step.
int bert_fast_adamw(const int64_t* table, int64_t ntensors, int64_t nchunks, int grad_dtype,
                    int copy_dtype, const float* clip, bert_fast::AdamWParams params, void* stream);

const char* bert_fast_optim_error_string(int error);

#ifdef __cplusplus
}
#endif
