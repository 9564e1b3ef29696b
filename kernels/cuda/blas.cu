// Dense products through cuBLAS: the projections of attention, routers, shared experts and the
// LM head.
#include <string>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/detail/blas.h"

namespace moemesh::kernels::cuda {

namespace detail {

std::string blas_error(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return {};
  return std::string(what) + ": cuBLAS " + cublasGetStatusName(s) + " (" +
         cublasGetStatusString(s) + ")";
}

BlasHandle::~BlasHandle() {
  if (handle_) cublasDestroy(handle_);
}

std::string BlasHandle::init(Stream stream) {
  stream_ = stream;
  if (cublasStatus_t s = cublasCreate(&handle_); s != CUBLAS_STATUS_SUCCESS) {
    handle_ = nullptr;
    return blas_error(s, "cublasCreate");
  }
  if (cublasStatus_t s = cublasSetStream(handle_, stream); s != CUBLAS_STATUS_SUCCESS)
    return blas_error(s, "cublasSetStream");
  // Hopper kernels want a workspace; 32 MiB is what cuBLAS recommends there.
  std::string error;
  workspace_ = DeviceBuffer::allocate(32u << 20, &error);
  if (!workspace_.data()) return error;
  if (cublasStatus_t s = cublasSetWorkspace(handle_, workspace_.data(), workspace_.size());
      s != CUBLAS_STATUS_SUCCESS)
    return blas_error(s, "cublasSetWorkspace");
  return {};
}

std::string BlasHandle::gemm(const void* x, const void* w, void* y, cudaDataType_t y_type,
                             int64_t m, int64_t n, int64_t k, float beta) {
  if (m == 0) return {};
  const float alpha = 1.0f;
  const cublasStatus_t s =
      cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                   static_cast<int>(k), &alpha, w, CUDA_R_16BF, static_cast<int>(k), x, CUDA_R_16BF,
                   static_cast<int>(k), &beta, y, y_type, static_cast<int>(n), CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT);
  return blas_error(s, "cublasGemmEx");
}

}  // namespace detail

struct Blas::Impl {
  detail::BlasHandle handle;
};

Blas::Blas(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Blas::~Blas() = default;

std::unique_ptr<Blas> Blas::create(Stream stream, std::string* error) {
  auto impl = std::make_unique<Impl>();
  if (std::string e = impl->handle.init(stream); !e.empty()) {
    if (error) *error = e;
    return nullptr;
  }
  return std::unique_ptr<Blas>(new Blas(std::move(impl)));
}

std::string Blas::gemm(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t n,
                       int64_t k, float beta) {
  return impl_->handle.gemm(x, w, y, CUDA_R_32F, m, n, k, beta);
}

std::string Blas::gemm_bf16_out(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t m,
                                int64_t n, int64_t k) {
  return impl_->handle.gemm(x, w, y, CUDA_R_16BF, m, n, k, 0.0f);
}

std::string Blas::gemm_strided_batched(const StridedBatch& b, int64_t m, int64_t n, int64_t k,
                                       int64_t batch) {
  if (m == 0 || batch == 0) return {};
  const float alpha = 1.0f, beta = 0.0f;
  // Row-major y_b = x_b w_b^T is the column-major y_b^T = w_b^T' x_b^T: w as [n, k] row-major is
  // column-major k x n (transposed by the op); as [k, n] it is column-major n x k already.
  const cublasStatus_t s = cublasGemmStridedBatchedEx(
      impl_->handle.get(), b.w_k_major ? CUBLAS_OP_N : CUBLAS_OP_T, CUBLAS_OP_N,
      static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, b.w, CUDA_R_16BF,
      static_cast<int>(b.ldw), b.w_stride, b.x, CUDA_R_16BF, static_cast<int>(b.ldx), b.x_stride,
      &beta, b.y, CUDA_R_32F, static_cast<int>(b.ldy), b.y_stride, static_cast<int>(batch),
      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  return detail::blas_error(s, "cublasGemmStridedBatchedEx");
}

Stream Blas::stream() const {
  return impl_->handle.stream();
}

}  // namespace moemesh::kernels::cuda
