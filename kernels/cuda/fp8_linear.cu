// Dense layers with FP8 E4M3 weights and 128x128 float32 block scales (DeepSeek-V3's
// weight_scale_inv layout): a product for a few rows that reads each code once on CUDA cores, and
// the weights dequantised to bf16 for cuBLAS when there are many rows.
//
// fp8_gemv: one warp per output feature; each lane walks its 16-code chunks of the feature's row
// (one 16-byte load, all in one scale block since 16 divides 128), decodes them once and adds
// their products with every input row. Decode (a few rows) reads the weights once, half the
// bytes of bf16.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/detail/common.cuh"

namespace moemesh::kernels::cuda {
namespace {

constexpr int kGemvWarps = 8;
constexpr int kChunk = 16;  // codes per lane and step

__global__ void __launch_bounds__(kGemvWarps * 32)
    fp8_gemv_kernel(const uint16_t* __restrict__ x, const uint8_t* __restrict__ w,
                    const float* __restrict__ scale, int m, int64_t n, int64_t k,
                    float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  if (row >= n) return;  // whole warps leave together
  const int64_t k_blocks = (k + 127) / 128;
  const float* row_scale = scale + (row / 128) * k_blocks;
  const uint8_t* codes = w + row * k;
  float acc[kFp8GemvMaxRows];
#pragma unroll
  for (int r = 0; r < kFp8GemvMaxRows; ++r) acc[r] = 0.0f;
  for (int64_t c0 = static_cast<int64_t>(lane) * kChunk; c0 < k; c0 += 32 * kChunk) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(codes + c0));
    const float s = __ldg(row_scale + c0 / 128);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
    float wv[kChunk];
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int b = 0; b < 4; ++b)
        wv[q * 4 + b] = detail::e4m3_to_f32((words[q] >> (8 * b)) & 0xFFu) * s;
#pragma unroll
    for (int r = 0; r < kFp8GemvMaxRows; ++r) {
      if (r >= m) break;
      const uint16_t* xr = x + r * k + c0;
      const uint4 a = __ldg(reinterpret_cast<const uint4*>(xr));
      const uint4 b = __ldg(reinterpret_cast<const uint4*>(xr + 8));
      const uint32_t xs[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        sum =
            fmaf(detail::bf16_bits_to_f32(static_cast<uint16_t>(xs[i] & 0xFFFFu)), wv[2 * i], sum);
        sum =
            fmaf(detail::bf16_bits_to_f32(static_cast<uint16_t>(xs[i] >> 16)), wv[2 * i + 1], sum);
      }
      acc[r] += sum;
    }
  }
#pragma unroll
  for (int r = 0; r < kFp8GemvMaxRows; ++r) {
    if (r >= m) break;
    const float total = detail::warp_sum(acc[r]);
    if (lane == 0) y[r * n + row] = total;
  }
}

// One thread per code: out = bf16(code value * its block's scale).
__global__ void fp8_dequantize_kernel(const uint8_t* __restrict__ w,
                                      const float* __restrict__ scale, int64_t rows, int64_t cols,
                                      uint16_t* __restrict__ out) {
  const int64_t k_blocks = (cols + 127) / 128;
  const int64_t total = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    out[i] =
        detail::f32_to_bf16_bits(detail::e4m3_to_f32(w[i]) * scale[(r / 128) * k_blocks + c / 128]);
  }
}

}  // namespace

std::string fp8_gemv(const uint16_t* x, const uint8_t* w, const float* scale, int64_t m, int64_t n,
                     int64_t k, float* y, Stream stream) {
  if (m < 1 || m > kFp8GemvMaxRows || n < 1 || k < 1 || k % kChunk != 0)
    return "fp8_gemv: needs 1 <= m <= " + std::to_string(kFp8GemvMaxRows) +
           ", n >= 1 and k a multiple of 16, got m = " + std::to_string(m) +
           ", n = " + std::to_string(n) + ", k = " + std::to_string(k);
  if (reinterpret_cast<std::uintptr_t>(x) % 16 != 0 ||
      reinterpret_cast<std::uintptr_t>(w) % 16 != 0)
    return "fp8_gemv: x and w must be 16-byte aligned";
  const unsigned blocks = static_cast<unsigned>((n + kGemvWarps - 1) / kGemvWarps);
  fp8_gemv_kernel<<<blocks, kGemvWarps * 32, 0, stream>>>(x, w, scale, static_cast<int>(m), n, k,
                                                          y);
  return check("fp8_gemv launch");
}

void fp8_dequantize_bf16(const uint8_t* w, const float* scale, int64_t rows, int64_t cols,
                         uint16_t* out, Stream stream) {
  constexpr int kThreads = 256;
  const int64_t total = rows * cols;
  if (total <= 0) return;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  fp8_dequantize_kernel<<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), kThreads, 0,
                          stream>>>(w, scale, rows, cols, out);
}

}  // namespace moemesh::kernels::cuda
