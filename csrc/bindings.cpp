// pybind11 bindings of kiln's CUDA kernels (module `kiln_kernels._C`).
//
// The functions take raw device pointers (ints) and a stream handle rather than torch tensors:
// the module then links against nothing but the statically linked CUDA runtime, builds without
// torch's CUDA headers, and imports on machines with no GPU or driver. The Python wrappers in
// kernels/cuda/ validate tensors (device, dtype, contiguity, alignment) before calling in.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "launchers.h"

namespace py = pybind11;

namespace {

#ifndef KILN_CUDA_ARCHS
#define KILN_CUDA_ARCHS "unknown"
#endif

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" / "no device" error
    return 0;
  }
  return count;
}

void require_device() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    cudaGetLastError();
    throw std::runtime_error(std::string("no CUDA device: ") +
                             (status != cudaSuccess ? cudaGetErrorString(status) : "none found"));
  }
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

template <typename T>
T* ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

cudaStream_t stream_of(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kiln CUDA kernels: packed sequences, fused bias+residual+LayerNorm, scale+mask+softmax";
  m.attr("compiled_archs") = KILN_CUDA_ARCHS;
  m.def("device_count", &device_count, "CUDA devices visible (0 without a GPU or driver; never raises)");
  m.def("runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  }, "version of the statically linked CUDA runtime, e.g. 13000");

  m.def("sequence_lengths",
        [](std::uintptr_t mask, int mask_bytes, int batch, int seq, std::uintptr_t lengths, std::uintptr_t cu_seqlens,
           std::uintptr_t max_len, std::uintptr_t stream) {
          require_device();
          check(kiln::sequence_lengths(ptr<const void>(mask), mask_bytes, batch, seq, ptr<int32_t>(lengths),
                                       ptr<int32_t>(cu_seqlens), ptr<int32_t>(max_len), stream_of(stream)),
                "sequence_lengths");
        });
  m.def("token_indices",
        [](std::uintptr_t mask, int mask_bytes, int batch, int seq, std::uintptr_t cu_seqlens, std::uintptr_t index,
           std::uintptr_t stream) {
          require_device();
          check(kiln::token_indices(ptr<const void>(mask), mask_bytes, batch, seq, ptr<const int32_t>(cu_seqlens),
                                    ptr<int32_t>(index), stream_of(stream)),
                "token_indices");
        });
  m.def("gather_rows",
        [](std::uintptr_t src, std::uintptr_t index, int tokens, int64_t row_bytes, std::uintptr_t dst,
           std::uintptr_t stream) {
          require_device();
          check(kiln::gather_rows(ptr<const void>(src), ptr<const int32_t>(index), tokens, row_bytes, ptr<void>(dst),
                                  stream_of(stream)),
                "gather_rows");
        });
  m.def("scatter_rows",
        [](std::uintptr_t src, std::uintptr_t index, int tokens, int64_t total_rows, int64_t row_bytes,
           std::uintptr_t dst, std::uintptr_t stream) {
          require_device();
          check(kiln::scatter_rows(ptr<const void>(src), ptr<const int32_t>(index), tokens, total_rows, row_bytes,
                                   ptr<void>(dst), stream_of(stream)),
                "scatter_rows");
        });
  m.def("bias_residual_layer_norm",
        [](int dtype, std::uintptr_t x, std::uintptr_t bias, std::uintptr_t residual, std::uintptr_t gamma,
           std::uintptr_t beta, std::uintptr_t out, std::uintptr_t sum_out, int rows, int hidden, float eps,
           std::uintptr_t stream) {
          require_device();
          check(kiln::bias_residual_layer_norm(static_cast<kiln::DType>(dtype), ptr<const void>(x),
                                               ptr<const void>(bias), ptr<const void>(residual),
                                               ptr<const void>(gamma), ptr<const void>(beta), ptr<void>(out),
                                               ptr<void>(sum_out), rows, hidden, eps, stream_of(stream)),
                "bias_residual_layer_norm");
        });
  m.def("scale_mask_softmax",
        [](int dtype, std::uintptr_t x, std::uintptr_t mask, std::uintptr_t out, int rows, int cols,
           int rows_per_mask, float scale, std::uintptr_t stream) {
          require_device();
          check(kiln::scale_mask_softmax(static_cast<kiln::DType>(dtype), ptr<const void>(x), ptr<const float>(mask),
                                         ptr<void>(out), rows, cols, rows_per_mask, scale, stream_of(stream)),
                "scale_mask_softmax");
        });
}
