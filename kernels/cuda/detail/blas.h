// Internal: cuBLAS handles with their own workspace, shared by Blas and GroupedGemm.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "kernels/cuda/cuda_kernels.h"

namespace moemesh::kernels::cuda::detail {

// "WHAT: cuBLAS NAME (DESCRIPTION)"; "" for CUBLAS_STATUS_SUCCESS.
std::string blas_error(cublasStatus_t s, const char* what);

// A cuBLAS handle bound to one stream, with a workspace of its own (so handles on different
// streams never share scratch).
class BlasHandle {
 public:
  BlasHandle() = default;
  ~BlasHandle();
  BlasHandle(const BlasHandle&) = delete;
  BlasHandle& operator=(const BlasHandle&) = delete;
  // Returns an error message or "".
  std::string init(Stream stream);
  cublasHandle_t get() const { return handle_; }
  Stream stream() const { return stream_; }

  // y[m, n] = x[m, k] * w[n, k]^T + beta * y, all row-major: the column-major product
  // y^T = w * x^T. x and w bf16; y of type y_type (CUDA_R_32F or CUDA_R_16BF).
  std::string gemm(const void* x, const void* w, void* y, cudaDataType_t y_type, int64_t m,
                   int64_t n, int64_t k, float beta);

 private:
  cublasHandle_t handle_ = nullptr;
  Stream stream_ = nullptr;
  DeviceBuffer workspace_;
};

}  // namespace moemesh::kernels::cuda::detail
