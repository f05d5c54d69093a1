// Shared device helpers for kiln's CUDA kernels: dtype conversion, 16-byte vectors, warp
// reductions. Every kernel accumulates in fp32 whatever its storage dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace kiln {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 16 bytes of T: one 128-bit load/store (LDG.128 / STG.128) when the address is 16-byte aligned,
// which the Python wrappers check.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

constexpr int kWarpSize = 32;

}  // namespace kiln

// Instantiate `body` with `scalar_t` bound to the storage type named by a kiln::DType.
// Variadic so that commas inside the body (template arguments, launch configs) pass through.
#define KILN_DISPATCH_DTYPE(dtype, ...)                                                  \
  switch (dtype) {                                                                       \
    case kiln::DType::kFloat32: { using scalar_t = float; __VA_ARGS__; break; }          \
    case kiln::DType::kFloat16: { using scalar_t = __half; __VA_ARGS__; break; }         \
    case kiln::DType::kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return cudaErrorInvalidValue;                                               \
  }
