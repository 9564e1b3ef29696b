// The grouped expert GEMM: every expert's rows (contiguous, in expert order) times that expert's
// weight. Three ways to issue the BF16 products through cuBLAS, chosen by the caller (the
// benchmark bench/cuda_gemm_bench measures them against one dense GEMM of equal FLOPs):
//   Loop     one cublasGemmEx per non-empty group, in order on the caller's stream;
//   Streams  the same, spread over kSideStreams streams (each with its own handle and workspace)
//            that fork from and join back into the caller's stream, so small groups run side by
//            side and fill the GPU; the largest groups go first, each to the least loaded stream;
//   Batched  one cublasGemmGroupedBatchedEx call (each group its own m); cuBLAS offers it with a
//            bf16 output only (float32 C is CUBLAS_STATUS_NOT_SUPPORTED on cuBLAS 13.0), so it
//            writes bf16 scratch that one more pass widens to float32;
//   Wmma     this library's own tensor-core kernel (grouped_gemm_fp8.cu), one launch for all
//            groups (n % 64 == 0, k % 32 == 0).
// FP8 weights always go through that kernel.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/detail/blas.h"
#include "kernels/cuda/detail/fp8_gemm.h"

namespace moemesh::kernels::cuda {

namespace {
constexpr int kSideStreams = 8;
}  // namespace

const char* grouped_method_name(GroupedMethod m) {
  switch (m) {
    case GroupedMethod::Loop:
      return "loop";
    case GroupedMethod::Streams:
      return "streams";
    case GroupedMethod::Batched:
      return "batched";
    case GroupedMethod::Wmma:
      return "wmma";
    case GroupedMethod::Auto:
      return "auto";
  }
  return "?";
}

struct GroupedGemm::Impl {
  GroupedMethod method = GroupedMethod::Loop;
  Stream stream = nullptr;
  detail::BlasHandle main;
  // Streams: side streams with their handles, and the events that fork and join them.
  std::array<StreamHandle, kSideStreams> side_streams;
  std::array<detail::BlasHandle, kSideStreams> side;
  cudaEvent_t fork = nullptr;
  std::array<cudaEvent_t, kSideStreams> join{};
  // Batched: device arrays of the A, B and C pointers (cuBLAS reads them on the device).
  DeviceBuffer pointers;
  std::vector<const void*> host_pointers;
  DeviceBuffer bf16_out;  // Batched: its bf16 result, widened into y
  // FP8: device arrays of the tile list and per-group arguments.
  DeviceBuffer fp8_args;
  std::vector<char> fp8_host;
  int64_t fp8_gemv_rows = kFp8GroupedGemvRows;

  ~Impl() {
    if (fork) cudaEventDestroy(fork);
    for (cudaEvent_t e : join)
      if (e) cudaEventDestroy(e);
  }
};

GroupedGemm::GroupedGemm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GroupedGemm::~GroupedGemm() = default;

GroupedMethod GroupedGemm::method() const {
  return impl_->method;
}

std::unique_ptr<GroupedGemm> GroupedGemm::create(Stream stream, GroupedMethod method,
                                                 std::string* error) {
  auto impl = std::make_unique<Impl>();
  impl->method = method;
  impl->stream = stream;
  auto fail = [&](const std::string& e) -> std::unique_ptr<GroupedGemm> {
    if (error) *error = e;
    return nullptr;
  };
  if (std::string e = impl->main.init(stream); !e.empty()) return fail(e);
  if (method == GroupedMethod::Streams || method == GroupedMethod::Auto) {  // Auto may use streams
    if (cudaEventCreateWithFlags(&impl->fork, cudaEventDisableTiming) != cudaSuccess)
      return fail(check("cudaEventCreate"));
    for (int i = 0; i < kSideStreams; ++i) {
      std::string e;
      impl->side_streams[i] = StreamHandle::create(&e);
      if (!impl->side_streams[i].get()) return fail(e);
      if (e = impl->side[i].init(impl->side_streams[i].get()); !e.empty()) return fail(e);
      if (cudaEventCreateWithFlags(&impl->join[i], cudaEventDisableTiming) != cudaSuccess)
        return fail(check("cudaEventCreate"));
    }
  }
  return std::unique_ptr<GroupedGemm>(new GroupedGemm(std::move(impl)));
}

namespace {

std::string check_groups(const std::vector<GroupWeight>& weights, const std::vector<int64_t>& rows,
                         const std::vector<int64_t>& offsets) {
  if (weights.size() != rows.size() || rows.size() != offsets.size())
    return "grouped GEMM: weights, rows and offsets must have one entry per group (got " +
           std::to_string(weights.size()) + ", " + std::to_string(rows.size()) + " and " +
           std::to_string(offsets.size()) + ")";
  for (std::size_t g = 0; g < rows.size(); ++g)
    if (rows[g] > 0 && weights[g].w == nullptr)
      return "grouped GEMM: group " + std::to_string(g) + " has " + std::to_string(rows[g]) +
             " rows but no weight";
  return {};
}

}  // namespace

std::string GroupedGemm::run_bf16(const uint16_t* x, const std::vector<GroupWeight>& weights,
                                  const std::vector<int64_t>& rows,
                                  const std::vector<int64_t>& offsets, int64_t n, int64_t k,
                                  float* y) {
  if (std::string e = check_groups(weights, rows, offsets); !e.empty()) return e;
  Impl& s = *impl_;
  const int64_t groups = static_cast<int64_t>(rows.size());
  auto at_x = [&](int64_t g) { return x + offsets[g] * k; };
  auto at_y = [&](int64_t g) { return y + offsets[g] * n; };

  GroupedMethod method = s.method;
  if (method == GroupedMethod::Auto) {
    // Small groups (decode, short prefill): one cublasGemmGroupedBatchedEx call beats a GEMM per
    // group (measured on an H200: 3x at 16 rows per expert, 1.6x at 128); large groups (long
    // prefill, 512+ rows per expert): GEMMs on several streams, near dense cuBLAS speed.
    int64_t busy = 0, total = 0;
    for (int64_t r : rows)
      if (r > 0) ++busy, total += r;
    method = total < 256 * busy ? GroupedMethod::Batched : GroupedMethod::Streams;
  }
  switch (method) {
    case GroupedMethod::Loop:
      for (int64_t g = 0; g < groups; ++g) {
        if (rows[g] <= 0) continue;
        if (std::string e =
                s.main.gemm(at_x(g), weights[g].w, at_y(g), CUDA_R_32F, rows[g], n, k, 0.0f);
            !e.empty())
          return e;
      }
      return {};

    case GroupedMethod::Streams: {
      cudaEventRecord(s.fork, s.stream);
      for (int i = 0; i < kSideStreams; ++i) cudaStreamWaitEvent(s.side_streams[i].get(), s.fork);
      std::vector<int64_t> order;
      for (int64_t g = 0; g < groups; ++g)
        if (rows[g] > 0) order.push_back(g);
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return rows[a] > rows[b]; });
      std::array<int64_t, kSideStreams> load{};
      std::string error;
      for (int64_t g : order) {
        const auto next =
            static_cast<std::size_t>(std::min_element(load.begin(), load.end()) - load.begin());
        load[next] += rows[g];
        error = s.side[next].gemm(at_x(g), weights[g].w, at_y(g), CUDA_R_32F, rows[g], n, k, 0.0f);
        if (!error.empty()) break;
      }
      // Join even after an error, so the caller's stream never races the side streams.
      for (int i = 0; i < kSideStreams; ++i) {
        cudaEventRecord(s.join[i], s.side_streams[i].get());
        cudaStreamWaitEvent(s.stream, s.join[i]);
      }
      if (error.empty()) error = check("grouped GEMM (streams)");
      return error;
    }

    case GroupedMethod::Batched: {
      std::vector<cublasOperation_t> ta, tb;
      std::vector<int> m_arr, n_arr, k_arr, lda, ldb, ldc, size;
      std::vector<float> alpha, beta;
      s.host_pointers.clear();
      std::vector<const void*> b_ptrs, c_ptrs;
      std::vector<int64_t> c_rows;
      int64_t total_rows = 0;
      for (int64_t g = 0; g < groups; ++g)
        if (rows[g] > 0) total_rows = std::max(total_rows, offsets[g] + rows[g]);
      const std::size_t out_bytes = static_cast<std::size_t>(total_rows * n * 2);
      if (s.bf16_out.size() < out_bytes) {
        std::string e;
        s.bf16_out = DeviceBuffer::allocate(out_bytes * 2, &e);
        if (!s.bf16_out.data()) return e;
      }
      for (int64_t g = 0; g < groups; ++g) {
        if (rows[g] <= 0) continue;
        ta.push_back(CUBLAS_OP_T);
        tb.push_back(CUBLAS_OP_N);
        m_arr.push_back(static_cast<int>(n));
        n_arr.push_back(static_cast<int>(rows[g]));
        k_arr.push_back(static_cast<int>(k));
        lda.push_back(static_cast<int>(k));
        ldb.push_back(static_cast<int>(k));
        ldc.push_back(static_cast<int>(n));
        size.push_back(1);
        alpha.push_back(1.0f);
        beta.push_back(0.0f);
        s.host_pointers.push_back(weights[g].w);
        b_ptrs.push_back(at_x(g));
        c_ptrs.push_back(nullptr);  // set below, into the bf16 scratch
        c_rows.push_back(offsets[g]);
      }
      const std::size_t count = m_arr.size();
      if (count == 0) return {};
      for (std::size_t i = 0; i < count; ++i) c_ptrs[i] = s.bf16_out.as<uint16_t>() + c_rows[i] * n;
      s.host_pointers.insert(s.host_pointers.end(), b_ptrs.begin(), b_ptrs.end());
      s.host_pointers.insert(s.host_pointers.end(), c_ptrs.begin(), c_ptrs.end());
      const std::size_t bytes = s.host_pointers.size() * sizeof(void*);
      if (s.pointers.size() < bytes) {
        std::string e;
        s.pointers = DeviceBuffer::allocate(bytes * 2, &e);
        if (!s.pointers.data()) return e;
      }
      // From pageable memory the copy is staged before cudaMemcpyAsync returns, so the vector
      // may change afterwards; the stream orders it before the GEMM that reads it.
      if (cudaMemcpyAsync(s.pointers.data(), s.host_pointers.data(), bytes, cudaMemcpyHostToDevice,
                          s.stream) != cudaSuccess)
        return check("grouped GEMM: copying the pointer arrays");
      const auto* dev = s.pointers.as<const void*>();
      const cublasStatus_t st = cublasGemmGroupedBatchedEx(
          s.main.get(), ta.data(), tb.data(), m_arr.data(), n_arr.data(), k_arr.data(),
          alpha.data(), dev, CUDA_R_16BF, lda.data(), dev + count, CUDA_R_16BF, ldb.data(),
          beta.data(), const_cast<void* const*>(dev + 2 * count), CUDA_R_16BF, ldc.data(),
          static_cast<int>(count), size.data(), CUBLAS_COMPUTE_32F);
      if (std::string e = detail::blas_error(st, "cublasGemmGroupedBatchedEx"); !e.empty())
        return e;
      // Rows of empty groups are not in the scratch and need no widening: groups tile the rows.
      bf16_to_f32(s.bf16_out.as<uint16_t>(), total_rows * n, y, s.stream);
      return check("grouped GEMM (batched) widening");
    }
    case GroupedMethod::Wmma:
      return detail::wmma_grouped_gemm(false, x, weights, rows, offsets, n, k, y, s.fp8_args,
                                       s.fp8_host, s.stream);
    case GroupedMethod::Auto:
      break;
  }
  return "grouped GEMM: unknown method";
}

std::string GroupedGemm::run_fp8(const uint16_t* x, const std::vector<GroupWeight>& weights,
                                 const std::vector<int64_t>& rows,
                                 const std::vector<int64_t>& offsets, int64_t n, int64_t k,
                                 float* y) {
  if (std::string e = check_groups(weights, rows, offsets); !e.empty()) return e;
  for (std::size_t g = 0; g < rows.size(); ++g)
    if (rows[g] > 0 && weights[g].block_scale == nullptr)
      return "grouped GEMM (fp8): group " + std::to_string(g) + " has no block scales";
  const int64_t most = rows.empty() ? 0 : *std::max_element(rows.begin(), rows.end());
  if (most <= impl_->fp8_gemv_rows && detail::fp8_gemv_fits(x, weights, rows, k))
    return detail::fp8_grouped_gemv(x, weights, rows, offsets, n, k, y, impl_->fp8_args,
                                    impl_->fp8_host, impl_->stream);
  return detail::wmma_grouped_gemm(true, x, weights, rows, offsets, n, k, y, impl_->fp8_args,
                                   impl_->fp8_host, impl_->stream);
}

void GroupedGemm::set_fp8_gemv_rows(int64_t rows) {
  impl_->fp8_gemv_rows = rows;
}

}  // namespace moemesh::kernels::cuda
