// Packed variable-length batches: remove padding from [batch, seq, ...] tensors given the
// attention mask, and restore it at the end (the FasterTransformer "remove padding" idea).
//
//   mask --(row counts)--> lengths --(prefix sum)--> cu_seqlens --(row scans)--> token_index
//   hidden[batch*seq, H] --gather--> packed[tokens, H] --...model...--> scatter --> [batch*seq, H]
//
// The mask need not be left-aligned: each row is scanned, so tokens keep their order.
#include <type_traits>

#include "common.cuh"

namespace kiln {
namespace {

constexpr int kThreads = 256;

template <typename M>
__device__ __forceinline__ int is_token(const M* mask, int64_t i) { return mask[i] != 0; }

// Inclusive scan of one int per thread across the block (warp shuffles, then warp totals).
__device__ __forceinline__ int block_inclusive_scan(int value, int* warp_totals) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, value, offset);
    if (lane >= offset) value += n;
  }
  if (lane == kWarpSize - 1) warp_totals[warp] = value;
  __syncthreads();
  if (warp == 0) {
    int total = lane < blockDim.x / kWarpSize ? warp_totals[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, total, offset);
      if (lane >= offset) total += n;
    }
    warp_totals[lane] = total;  // inclusive totals per warp
  }
  __syncthreads();
  const int result = value + (warp > 0 ? warp_totals[warp - 1] : 0);
  __syncthreads();  // warp_totals is reused by the caller's next round
  return result;
}

template <typename M>
__global__ void row_lengths_kernel(const M* __restrict__ mask, int seq, int32_t* __restrict__ lengths) {
  __shared__ int warp_sums[kThreads / kWarpSize];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * seq;
  int count = 0;
  for (int s = threadIdx.x; s < seq; s += blockDim.x) count += is_token(mask, base + s);
  count = __reduce_add_sync(0xffffffffu, count);
  if (threadIdx.x % kWarpSize == 0) warp_sums[threadIdx.x / kWarpSize] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int w = 0; w < kThreads / kWarpSize; ++w) total += warp_sums[w];
    lengths[blockIdx.x] = total;
  }
}

// One block: cu_seqlens = [0, exclusive prefix sums..., total] and the longest row.
__global__ void prefix_sum_kernel(const int32_t* __restrict__ lengths, int batch, int32_t* __restrict__ cu_seqlens,
                                  int32_t* __restrict__ max_len) {
  __shared__ int warp_totals[kWarpSize];
  __shared__ int chunk_total;
  int carry = 0;
  int longest = 0;
  if (threadIdx.x == 0) cu_seqlens[0] = 0;
  for (int start = 0; start < batch; start += blockDim.x) {
    const int b = start + threadIdx.x;
    const int len = b < batch ? lengths[b] : 0;
    longest = max(longest, len);
    const int inclusive = block_inclusive_scan(len, warp_totals);
    if (b < batch) cu_seqlens[b + 1] = carry + inclusive;
    // the last thread's inclusive value is this chunk's total
    if (threadIdx.x == blockDim.x - 1) chunk_total = inclusive;
    __syncthreads();
    carry += chunk_total;
    __syncthreads();
  }
  longest = __reduce_max_sync(0xffffffffu, longest);
  __shared__ int warp_max_len[kThreads / kWarpSize];
  if (threadIdx.x % kWarpSize == 0) warp_max_len[threadIdx.x / kWarpSize] = longest;
  __syncthreads();
  if (threadIdx.x == 0) {
    int m = 0;
    for (int w = 0; w < kThreads / kWarpSize; ++w) m = max(m, warp_max_len[w]);
    *max_len = m;
  }
}

template <typename M>
__global__ void token_index_kernel(const M* __restrict__ mask, int seq, const int32_t* __restrict__ cu_seqlens,
                                   int32_t* __restrict__ token_index) {
  __shared__ int warp_totals[kWarpSize];
  __shared__ int chunk_total;
  const int b = blockIdx.x;
  const int64_t base = static_cast<int64_t>(b) * seq;
  int carry = cu_seqlens[b];
  for (int start = 0; start < seq; start += blockDim.x) {
    const int s = start + threadIdx.x;
    const int flag = s < seq ? is_token(mask, base + s) : 0;
    const int inclusive = block_inclusive_scan(flag, warp_totals);
    if (flag) token_index[carry + inclusive - 1] = static_cast<int32_t>(base + s);
    if (threadIdx.x == blockDim.x - 1) chunk_total = inclusive;
    __syncthreads();
    carry += chunk_total;
    __syncthreads();
  }
}

// One block per packed row; 16-byte copies when the row allows, bytes otherwise.
template <typename U>
__global__ void copy_rows_kernel(const U* __restrict__ src, const int32_t* __restrict__ index, int64_t row_units,
                                 U* __restrict__ dst, bool scatter) {
  const int64_t i = blockIdx.x;
  const int64_t from = scatter ? i : index[i];
  const int64_t to = scatter ? index[i] : i;
  for (int64_t u = threadIdx.x; u < row_units; u += blockDim.x) dst[to * row_units + u] = src[from * row_units + u];
}

template <typename Fn>
cudaError_t with_mask_type(int mask_bytes, Fn fn) {
  switch (mask_bytes) {
    case 1: return fn(static_cast<const uint8_t*>(nullptr));
    case 4: return fn(static_cast<const int32_t*>(nullptr));
    case 8: return fn(static_cast<const int64_t*>(nullptr));
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t copy_rows(const void* src, const int32_t* index, int tokens, int64_t row_bytes, void* dst, bool scatter,
                      cudaStream_t stream) {
  if (tokens == 0 || row_bytes == 0) return cudaSuccess;
  const bool wide = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  if (wide) {
    copy_rows_kernel<uint4><<<tokens, 128, 0, stream>>>(static_cast<const uint4*>(src), index, row_bytes / 16,
                                                        static_cast<uint4*>(dst), scatter);
  } else {
    copy_rows_kernel<uint8_t><<<tokens, 128, 0, stream>>>(static_cast<const uint8_t*>(src), index, row_bytes,
                                                          static_cast<uint8_t*>(dst), scatter);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t sequence_lengths(const void* mask, int mask_bytes, int batch, int seq, int32_t* lengths,
                             int32_t* cu_seqlens, int32_t* max_len, cudaStream_t stream) {
  if (batch == 0) return cudaMemsetAsync(cu_seqlens, 0, sizeof(int32_t), stream);
  cudaError_t status = with_mask_type(mask_bytes, [&](auto tag) {
    using M = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    row_lengths_kernel<M><<<batch, kThreads, 0, stream>>>(static_cast<const M*>(mask), seq, lengths);
    return cudaGetLastError();
  });
  if (status != cudaSuccess) return status;
  prefix_sum_kernel<<<1, kThreads, 0, stream>>>(lengths, batch, cu_seqlens, max_len);
  return cudaGetLastError();
}

cudaError_t token_indices(const void* mask, int mask_bytes, int batch, int seq, const int32_t* cu_seqlens,
                          int32_t* token_index, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  return with_mask_type(mask_bytes, [&](auto tag) {
    using M = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    token_index_kernel<M><<<batch, kThreads, 0, stream>>>(static_cast<const M*>(mask), seq, cu_seqlens, token_index);
    return cudaGetLastError();
  });
}

cudaError_t gather_rows(const void* src, const int32_t* token_index, int tokens, int64_t row_bytes, void* dst,
                        cudaStream_t stream) {
  return copy_rows(src, token_index, tokens, row_bytes, dst, false, stream);
}

cudaError_t scatter_rows(const void* src, const int32_t* token_index, int tokens, int64_t total_rows,
                         int64_t row_bytes, void* dst, cudaStream_t stream) {
  const cudaError_t status = cudaMemsetAsync(dst, 0, total_rows * row_bytes, stream);
  if (status != cudaSuccess) return status;
  return copy_rows(src, token_index, tokens, row_bytes, dst, true, stream);
}

}  // namespace kiln
