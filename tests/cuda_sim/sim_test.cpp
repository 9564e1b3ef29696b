// The CUDA simulator itself (tests/cuda_sim): indices, barriers, warp exchanges with CUDA's
// semantics, launch errors, cuBLAS's column-major GEMM and the FP8 conversion, so that the GPU
// tests it runs test the kernels and not the simulator.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "cublas_v2.h"
#include "cuda_fp8.h"
#include "cuda_runtime.h"
#include "kernels/cpu/cpu_kernels.h"

namespace {

using moemesh_sim::launch;

__global__ void write_ids(int* out) {
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int per_block = blockDim.x * blockDim.y * blockDim.z;
  out[block * per_block + thread] = block * 1000 + thread;
}

TEST(CudaSim, EveryThreadOfAGridRunsWithItsIndices) {
  std::vector<int> out(2 * 3 * 4 * 2 * 5, -1);
  launch(dim3(2, 3), dim3(4, 2, 5))(write_ids, out.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  for (int b = 0; b < 6; ++b)
    for (int t = 0; t < 40; ++t) EXPECT_EQ(out[b * 40 + t], b * 1000 + t);
}

// Each thread reads its neighbour's value after a barrier: right only if the barrier waits for
// every thread's write (threads run one after another between barriers).
__global__ void rotate(const int* in, int* out) {
  __shared__ int sh[256];
  const int t = threadIdx.x;
  sh[t] = in[blockIdx.x * blockDim.x + t] * 2;
  __syncthreads();
  const int v = sh[(t + 1) % blockDim.x];
  __syncthreads();  // everyone has read before the next write
  sh[t] = v + 1;
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = sh[(t + blockDim.x - 1) % blockDim.x];
}

TEST(CudaSim, SyncthreadsOrdersSharedMemory) {
  const int n = 256;
  std::vector<int> in(3 * n), out(3 * n);
  for (int i = 0; i < 3 * n; ++i) in[i] = i;
  launch(3, n)(rotate, in.data(), out.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  // out[t] = sh[t-1] = in[t] * 2 + 1 (the neighbour of t - 1 is t)
  for (int i = 0; i < 3 * n; ++i) EXPECT_EQ(out[i], in[i] * 2 + 1) << i;
}

__global__ void shuffles(int* xor1, int* xor16w, int* up3, int* bcast, unsigned* ballot) {
  const int lane = threadIdx.x & 31;
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  xor1[g] = __shfl_xor_sync(0xffffffffu, lane * 10, 1);
  xor16w[g] = __shfl_xor_sync(0xffffffffu, lane, 8, 16);  // within 16-lane segments
  up3[g] = __shfl_up_sync(0xffffffffu, lane, 3);
  bcast[g] = __shfl_sync(0xffffffffu, lane + 100, 5);
  ballot[g] = __ballot_sync(0xffffffffu, lane % 3 == 0);
}

TEST(CudaSim, WarpShufflesAndVotesFollowCuda) {
  const int n = 64;
  std::vector<int> x1(n), x16(n), up(n), bc(n);
  std::vector<unsigned> bal(n);
  launch(1, n)(shuffles, x1.data(), x16.data(), up.data(), bc.data(), bal.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  unsigned expect_ballot = 0;
  for (int l = 0; l < 32; l += 3) expect_ballot |= 1u << l;
  for (int i = 0; i < n; ++i) {
    const int lane = i & 31;
    EXPECT_EQ(x1[i], (lane ^ 1) * 10);
    EXPECT_EQ(x16[i], lane ^ 8);
    EXPECT_EQ(up[i], lane < 3 ? lane : lane - 3);
    EXPECT_EQ(bc[i], 105);
    EXPECT_EQ(bal[i], expect_ballot);
  }
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = 1;
}

TEST(CudaSim, BadLaunchesAndDeadlocksAreLaunchErrors) {
  std::vector<int> out(64, 0);
  launch(1, 0)(write_ids, out.data());
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  launch(0, 32)(write_ids, out.data());
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  launch(1, 2048)(write_ids, out.data());
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // read once
  launch(1, 32)(divergent_barrier, out.data());
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(out[i], 0) << "a deadlocked thread went on";
  launch(1, 64)(write_ids, out.data());  // the next launch runs
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(out[63], 63);
}

__global__ void read_one_past(const float* in, float* out, int n) {
  out[0] = in[n + threadIdx.x];
}

// A device buffer ends at an inaccessible page: a kernel that reads past its end stops the
// process with a message naming the kernel, instead of reading a neighbour's data.
TEST(CudaSimDeathTest, ReadingPastADeviceBufferStopsTheProcess) {
  void* in = nullptr;
  void* out = nullptr;
  ASSERT_EQ(cudaMalloc(&in, 100 * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&out, sizeof(float)), cudaSuccess);
  auto* f = static_cast<float*>(in);
  launch(1, 1).named("read_one_past")(read_one_past, f, static_cast<float*>(out), 99);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // the last element is in bounds
  EXPECT_DEATH(launch(1, 32).named("read_one_past")(read_one_past, f, static_cast<float*>(out), 99),
               "kernel read_one_past touched memory outside its buffers");
  cudaFree(in);
  cudaFree(out);
}

__global__ void copy_ints(const int* in, int* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[i];
}

// An upload on the default stream lands before the next work of the default stream or of a
// blocking stream, but not before a non-blocking stream's: a kernel there reads the old bytes
// until the default stream is synchronised.
TEST(CudaSim, NonBlockingStreamsDoNotWaitForTheDefaultStream) {
  const int n = 64;
  int *dev = nullptr, *out = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dev), n * sizeof(int)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&out), n * sizeof(int)), cudaSuccess);
  ASSERT_EQ(cudaMemsetAsync(dev, 0, n * sizeof(int), nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cudaStream_t free_running = nullptr, blocking = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&free_running, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaStreamCreate(&blocking), cudaSuccess);
  std::vector<int> host(n), got(n);
  for (int i = 0; i < n; ++i) host[i] = i + 1;

  ASSERT_EQ(cudaMemcpyAsync(dev, host.data(), n * sizeof(int), cudaMemcpyHostToDevice, nullptr),
            cudaSuccess);
  host.assign(n, -1);  // the copy took its bytes when issued
  launch(1, n, 0, free_running)(copy_ints, dev, out, n);
  ASSERT_EQ(cudaStreamSynchronize(free_running), cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(got.data(), out, n * sizeof(int), cudaMemcpyDeviceToHost, free_running),
            cudaSuccess);
  EXPECT_EQ(got[5], 0) << "the non-blocking stream waited for the default stream";
  ASSERT_EQ(cudaStreamSynchronize(nullptr), cudaSuccess);
  launch(1, n, 0, free_running)(copy_ints, dev, out, n);
  ASSERT_EQ(cudaMemcpyAsync(got.data(), out, n * sizeof(int), cudaMemcpyDeviceToHost, free_running),
            cudaSuccess);
  EXPECT_EQ(got[5], 6);

  // A blocking stream and the default stream itself are ordered after the upload.
  for (cudaStream_t s : {blocking, static_cast<cudaStream_t>(nullptr)}) {
    ASSERT_EQ(cudaMemsetAsync(dev, 0, n * sizeof(int), nullptr), cudaSuccess);
    launch(1, n, 0, s)(copy_ints, dev, out, n);
    ASSERT_EQ(cudaMemcpy(got.data(), out, n * sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(got[5], 0);
  }
  EXPECT_EQ(cudaStreamDestroy(free_running), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(blocking), cudaSuccess);
  EXPECT_EQ(cudaFree(dev), cudaSuccess);
  EXPECT_EQ(cudaFree(out), cudaSuccess);
}

// cuBLAS's column-major contract: C (m x n) = op(A) op(B), with leading dimensions.
TEST(CudaSim, CublasGemmIsColumnMajor) {
  const int m = 3, n = 4, k = 5, lda = 7, ldb = 6, ldc = 5;
  std::vector<float> a(lda * m), b(ldb * n), c(ldc * n, -1.0f);
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1, 1);
  for (float& v : a) v = u(rng);
  for (float& v : b) v = u(rng);
  cublasHandle_t h = nullptr;
  ASSERT_EQ(cublasCreate(&h), CUBLAS_STATUS_SUCCESS);
  const float one = 1.0f, zero = 0.0f;
  // op(A) = A^T with A stored k x m (lda), op(B) = B stored k x n (ldb).
  ASSERT_EQ(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, a.data(), CUDA_R_32F, lda,
                         b.data(), CUDA_R_32F, ldb, &zero, c.data(), CUDA_R_32F, ldc,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_SUCCESS);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double want = 0;
      for (int l = 0; l < k; ++l) want += double(a[l + i * lda]) * b[l + j * ldb];
      EXPECT_NEAR(c[i + j * ldc], want, 1e-5);
    }
  EXPECT_EQ(c[m], -1.0f);  // rows past m of a column are not written
  EXPECT_EQ(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, a.data(), CUDA_R_32F, 2,
                         b.data(), CUDA_R_32F, ldb, &zero, c.data(), CUDA_R_32F, ldc,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_INVALID_VALUE);  // lda < m
  cublasDestroy(h);
}

// The E4M3 conversion: every code back to itself, and random values as the CPU kernels round.
TEST(CudaSim, Fp8ConversionRoundsAsTheCpuKernels) {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7F) == 0x7F) continue;  // NaN
    const float v = moemesh_sim::e4m3_to_f32(static_cast<uint8_t>(c));
    EXPECT_EQ(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3), c == 0x80 ? 0x80 : c) << c;
  }
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-500, 500);
  for (int i = 0; i < 100000; ++i) {
    const float v = u(rng) / static_cast<float>(1 + i % 1000);
    ASSERT_EQ(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3),
              moemesh::kernels::f32_to_fp8_e4m3(v))
        << v;
  }
  // Ties between two codes go to the even one.
  for (int c = 0; c < 125; ++c) {
    const float lo = moemesh_sim::e4m3_to_f32(static_cast<uint8_t>(c));
    const float hi = moemesh_sim::e4m3_to_f32(static_cast<uint8_t>(c + 1));
    EXPECT_EQ(__nv_cvt_float_to_fp8((lo + hi) / 2, __NV_SATFINITE, __NV_E4M3), c % 2 ? c + 1 : c);
  }
  EXPECT_EQ(__nv_cvt_float_to_fp8(1e6f, __NV_SATFINITE, __NV_E4M3), 0x7E);
  EXPECT_EQ(__nv_cvt_float_to_fp8(-1e6f, __NV_SATFINITE, __NV_E4M3), 0xFE);
}

}  // namespace
