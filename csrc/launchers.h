// Host-side entry points of the CUDA kernels. Each enqueues work on `stream` and returns the
// launch status; pointers are device pointers validated by the Python wrappers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kiln {

// Storage dtypes the kernels accept; the numbering is shared with the Python wrappers.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Packed sequences. `mask` is [batch, seq] of `mask_bytes`-wide integers (1, 4 or 8), nonzero =
// token. Writes lengths[batch] and cu_seqlens[batch + 1] (int32 prefix sums) and max_len[1].
cudaError_t sequence_lengths(const void* mask, int mask_bytes, int batch, int seq, int32_t* lengths,
                             int32_t* cu_seqlens, int32_t* max_len, cudaStream_t stream);
// token_index[cu_seqlens[b] + k] = b * seq + s for the k-th token of row b, in order.
cudaError_t token_indices(const void* mask, int mask_bytes, int batch, int seq, const int32_t* cu_seqlens,
                          int32_t* token_index, cudaStream_t stream);
// dst[i, :] = src[token_index[i], :] for i < tokens; rows are `row_bytes` wide.
cudaError_t gather_rows(const void* src, const int32_t* token_index, int tokens, int64_t row_bytes, void* dst,
                        cudaStream_t stream);
// dst[token_index[i], :] = src[i, :]; every other row of dst (total_rows of them) is zeroed.
cudaError_t scatter_rows(const void* src, const int32_t* token_index, int tokens, int64_t total_rows,
                         int64_t row_bytes, void* dst, cudaStream_t stream);

// out = LayerNorm(x + bias + residual) * gamma + beta over the last dim (`hidden`, at most 1024
// and a multiple of 16 bytes). bias, residual, beta and sum_out may be null; sum_out receives
// x + bias + residual (the next layer's residual stream).
cudaError_t bias_residual_layer_norm(DType dtype, const void* x, const void* bias, const void* residual,
                                     const void* gamma, const void* beta, void* out, void* sum_out, int rows,
                                     int hidden, float eps, cudaStream_t stream);

// out = softmax(x * scale + mask) over rows of `cols` <= 1024. mask (fp32, additive, may be
// null) has one row per `rows_per_mask` rows of x. A row whose every entry is -inf gives zeros.
cudaError_t scale_mask_softmax(DType dtype, const void* x, const float* mask, void* out, int rows, int cols,
                               int rows_per_mask, float scale, cudaStream_t stream);

}  // namespace kiln
