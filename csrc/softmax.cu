// Fused scale + additive mask + softmax over rows of at most 1024 columns, one warp per row.
//
// Attention scores at BERT lengths (<= 1024 keys) fit in one warp's registers (32 values per
// lane), so each score is read once and written once. Lane l owns columns l, l+32, ... so every
// load instruction of the warp touches consecutive addresses (coalesced).
#include <cmath>

#include "common.cuh"

namespace kiln {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxCols = 1024;
constexpr int kPerLane = kMaxCols / kWarpSize;

template <typename T>
__global__ void scale_mask_softmax_kernel(const T* __restrict__ x, const float* __restrict__ mask,
                                          T* __restrict__ out, int rows, int cols, int rows_per_mask,
                                          float scale) {
  const int row = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;
  const int64_t base = static_cast<int64_t>(row) * cols;
  const float* mrow = mask ? mask + static_cast<int64_t>(row / rows_per_mask) * cols : nullptr;

  float vals[kPerLane];
  float row_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + i * kWarpSize;
    float v = -INFINITY;
    if (c < cols) {
      v = to_float(x[base + c]) * scale;
      if (mrow) v += mrow[c];
    }
    vals[i] = v;
    row_max = fmaxf(row_max, v);
  }
  row_max = warp_max(row_max);
  // A fully masked row has no probability mass to distribute: define its output as zeros
  // (rather than the NaN that exp(-inf - -inf) would give).
  const bool empty = row_max == -INFINITY;
  float denom = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const float e = empty ? 0.f : __expf(vals[i] - row_max);
    vals[i] = e;
    denom += e;
  }
  denom = warp_sum(denom);
  const float inv = empty ? 0.f : 1.f / denom;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + i * kWarpSize;
    if (c < cols) out[base + c] = from_float<T>(vals[i] * inv);
  }
}

}  // namespace

cudaError_t scale_mask_softmax(DType dtype, const void* x, const float* mask, void* out, int rows, int cols,
                               int rows_per_mask, float scale, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (cols < 1 || cols > kMaxCols || rows_per_mask < 1) return cudaErrorInvalidValue;
  const dim3 grid((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const dim3 block(kWarpsPerBlock * kWarpSize);
  KILN_DISPATCH_DTYPE(dtype, {
    scale_mask_softmax_kernel<scalar_t><<<grid, block, 0, stream>>>(
        static_cast<const scalar_t*>(x), mask, static_cast<scalar_t*>(out), rows, cols, rows_per_mask, scale);
  });
  return cudaGetLastError();
}

}  // namespace kiln
