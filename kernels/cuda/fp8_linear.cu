// Dense layers with FP8 E4M3 weights and 128x128 float32 block scales (DeepSeek-V3's
// weight_scale_inv layout): a product for a few rows that reads each code once on CUDA cores, and
// the weights dequantised to bf16 for cuBLAS when there are many rows.
//
// fp8_gemv: a block of 256 threads per kRows output features; the threads split k into 16-code
// chunks (thread t takes chunks t, t + 256, ...: consecutive threads read consecutive 16 bytes of
// each feature's row), so every thread has several independent 16-byte loads in flight and every
// block reads its features' rows once, whatever k. A chunk lies in one 128-wide scale block, and
// kRows divides 128, so one scale serves a chunk of every feature of the block. Codes become
// floats two at a time (cvt.f16x2.e4m3x2 on sm_89 and later), are scaled and rounded to bf16
// (bf16_weight); x stays packed bf16 in registers and is widened at each use. Partial sums meet in
// shared memory, warp by warp in a fixed order: the result does not depend on timing.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/detail/common.cuh"
#include "kernels/cuda/detail/fp8_gemm.h"

namespace moemesh::kernels::cuda {
namespace {

constexpr int kGemvThreads = 256;
constexpr int kChunk = 16;  // codes per thread and step: one 16-byte load

// kMaxM: input rows this instantiation takes (m <= kMaxM); kRows: output features per block.
// A weight as every FP8 product of this library uses it (the tile kernel, the bf16 copy for
// cuBLAS, the CPU's packed FP8 kernels): code times block scale, rounded to bf16. Products with
// bf16 inputs are then exact in float32, and a layer gives the same values whichever kernel its
// number of rows picks.
__device__ __forceinline__ float bf16_weight(float v) {
  return __uint_as_float(static_cast<uint32_t>(detail::f32_to_bf16_bits(v)) << 16);
}

// The block's share: features row0 .. row0 + kRows - 1 (those below n) of y [m, n] = x [m, k]
// times w^T.
template <int kMaxM, int kRows>
__device__ __forceinline__ void gemv_block(const uint16_t* __restrict__ x,
                                           const uint8_t* __restrict__ w,
                                           const float* __restrict__ scale, int m, int64_t n,
                                           int64_t k, float* __restrict__ y, int64_t row0) {
  static_assert(128 % kRows == 0, "a block's features must share their scale block");
  const int rows = n - row0 < kRows ? static_cast<int>(n - row0) : kRows;
  const int64_t k_blocks = (k + 127) / 128;
  const float* row_scale = scale + (row0 / 128) * k_blocks;
  float acc[kRows][kMaxM];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) acc[r][i] = 0.0f;

  const int64_t chunks = k / kChunk;
  for (int64_t c = threadIdx.x; c < chunks; c += kGemvThreads) {
    const int64_t c0 = c * kChunk;
    uint4 codes[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      codes[r] = r < rows ? __ldg(reinterpret_cast<const uint4*>(w + (row0 + r) * k + c0))
                          : make_uint4(0, 0, 0, 0);
    uint4 xs[kMaxM][2];
#pragma unroll
    for (int i = 0; i < kMaxM; ++i)
      if (i < m) {
        const uint16_t* xr = x + i * k + c0;
        xs[i][0] = __ldg(reinterpret_cast<const uint4*>(xr));
        xs[i][1] = __ldg(reinterpret_cast<const uint4*>(xr + 8));
      }
    const float s = __ldg(row_scale + c0 / 128);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const uint32_t cw[4] = {codes[r].x, codes[r].y, codes[r].z, codes[r].w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        // Codes 4q..4q+3 of the chunk; x words 2q and 2q+1 hold the matching bf16 pairs.
        const float2 lo = detail::fp8x2_to_float2(cw[q] & 0xFFFFu);
        const float2 hi = detail::fp8x2_to_float2(cw[q] >> 16);
        const float w0 = bf16_weight(lo.x * s), w1 = bf16_weight(lo.y * s);
        const float w2 = bf16_weight(hi.x * s), w3 = bf16_weight(hi.y * s);
#pragma unroll
        for (int i = 0; i < kMaxM; ++i)
          if (i < m) {
            const uint4& xv = xs[i][q / 2];
            const uint32_t a = (q % 2 == 0) ? xv.x : xv.z;
            const uint32_t b = (q % 2 == 0) ? xv.y : xv.w;
            float t = acc[r][i];
            t = fmaf(w0, __uint_as_float(a << 16), t);
            t = fmaf(w1, __uint_as_float(a & 0xFFFF0000u), t);
            t = fmaf(w2, __uint_as_float(b << 16), t);
            acc[r][i] = fmaf(w3, __uint_as_float(b & 0xFFFF0000u), t);
          }
      }
    }
  }

  __shared__ float partial[kGemvThreads / 32][kRows * kMaxM];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) {
      const float v = detail::warp_sum(acc[r][i]);
      if (lane == 0) partial[warp][r * kMaxM + i] = v;
    }
  __syncthreads();
  for (int j = threadIdx.x; j < kRows * kMaxM; j += kGemvThreads) {
    const int r = j / kMaxM, i = j % kMaxM;
    if (r >= rows || i >= m) continue;
    float total = 0.0f;
    for (int v = 0; v < kGemvThreads / 32; ++v) total += partial[v][j];
    y[i * n + row0 + r] = total;
  }
}

template <int kMaxM, int kRows>
__global__ void __launch_bounds__(kGemvThreads)
    fp8_gemv_kernel(const uint16_t* __restrict__ x, const uint8_t* __restrict__ w,
                    const float* __restrict__ scale, int m, int64_t n, int64_t k,
                    float* __restrict__ y) {
  gemv_block<kMaxM, kRows>(x, w, scale, m, n, k, y, static_cast<int64_t>(blockIdx.x) * kRows);
}

// Grouped: blockIdx.y picks a tile (an expert's weights and up to kMaxM of its rows).
using detail::RowTile;

template <int kMaxM, int kRows>
__global__ void __launch_bounds__(kGemvThreads)
    fp8_grouped_gemv_kernel(const uint16_t* __restrict__ x, const RowTile* __restrict__ tiles,
                            int64_t n, int64_t k, float* __restrict__ y) {
  const RowTile t = tiles[blockIdx.y];
  gemv_block<kMaxM, kRows>(x + t.row0 * k, t.w, t.scale, t.rows, n, k, y + t.row0 * n,
                           static_cast<int64_t>(blockIdx.x) * kRows);
}

template <int kMaxM, int kRows>
void launch_gemv(const uint16_t* x, const uint8_t* w, const float* scale, int m, int64_t n,
                 int64_t k, float* y, Stream stream) {
  const auto blocks = static_cast<unsigned>((n + kRows - 1) / kRows);
  fp8_gemv_kernel<kMaxM, kRows><<<blocks, kGemvThreads, 0, stream>>>(x, w, scale, m, n, k, y);
}

template <int kMaxM, int kRows>
void launch_grouped_gemv(const uint16_t* x, const RowTile* tiles, unsigned count, int64_t n,
                         int64_t k, float* y, Stream stream) {
  const dim3 grid(static_cast<unsigned>((n + kRows - 1) / kRows), count);
  fp8_grouped_gemv_kernel<kMaxM, kRows><<<grid, kGemvThreads, 0, stream>>>(x, tiles, n, k, y);
}

// One thread per 16 codes (one 16-byte load, two 16-byte stores) where cols is a multiple of 16;
// out = bf16(code value * its block's scale).
__global__ void fp8_dequantize_x16_kernel(const uint8_t* __restrict__ w,
                                          const float* __restrict__ scale, int64_t rows,
                                          int64_t cols, uint16_t* __restrict__ out) {
  const int64_t k_blocks = (cols + 127) / 128;
  const int64_t per_row = cols / kChunk;
  const int64_t total = rows * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, c0 = (i % per_row) * kChunk;
    const float s = __ldg(scale + (r / 128) * k_blocks + c0 / 128);
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(w + r * cols + c0));
    const uint32_t cw[4] = {v.x, v.y, v.z, v.w};
    uint32_t o[8];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 lo = detail::fp8x2_to_float2(cw[q] & 0xFFFFu);
      const float2 hi = detail::fp8x2_to_float2(cw[q] >> 16);
      o[2 * q] = detail::f32_to_bf16_bits(lo.x * s) |
                 (static_cast<uint32_t>(detail::f32_to_bf16_bits(lo.y * s)) << 16);
      o[2 * q + 1] = detail::f32_to_bf16_bits(hi.x * s) |
                     (static_cast<uint32_t>(detail::f32_to_bf16_bits(hi.y * s)) << 16);
    }
    uint4* dst = reinterpret_cast<uint4*>(out + r * cols + c0);
    dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
    dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
  }
}

// One thread per code, for any shape.
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
  // Fewer features per block for more input rows: the accumulators (kRows x kMaxM) stay in
  // registers.
  const int mi = static_cast<int>(m);
  if (m == 1)
    launch_gemv<1, 4>(x, w, scale, mi, n, k, y, stream);
  else if (m == 2)
    launch_gemv<2, 4>(x, w, scale, mi, n, k, y, stream);
  else if (m <= 4)
    launch_gemv<4, 4>(x, w, scale, mi, n, k, y, stream);
  else
    launch_gemv<8, 2>(x, w, scale, mi, n, k, y, stream);
  return check("fp8_gemv launch");
}

void fp8_dequantize_bf16(const uint8_t* w, const float* scale, int64_t rows, int64_t cols,
                         uint16_t* out, Stream stream) {
  constexpr int kThreads = 256;
  const int64_t total = rows * cols;
  if (total <= 0) return;
  const bool x16 = cols % kChunk == 0 && reinterpret_cast<std::uintptr_t>(w) % 16 == 0 &&
                   reinterpret_cast<std::uintptr_t>(out) % 16 == 0;
  const int64_t items = x16 ? total / kChunk : total;
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  const auto grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  if (x16)
    fp8_dequantize_x16_kernel<<<grid, kThreads, 0, stream>>>(w, scale, rows, cols, out);
  else
    fp8_dequantize_kernel<<<grid, kThreads, 0, stream>>>(w, scale, rows, cols, out);
}

namespace detail {

bool fp8_gemv_fits(const uint16_t* x, const std::vector<GroupWeight>& weights,
                   const std::vector<int64_t>& rows, int64_t k) {
  if (k < 1 || k % kChunk != 0 || reinterpret_cast<std::uintptr_t>(x) % 16 != 0) return false;
  for (std::size_t g = 0; g < rows.size(); ++g)
    if (rows[g] > 0 && reinterpret_cast<std::uintptr_t>(weights[g].w) % 16 != 0) return false;
  return true;
}

std::string fp8_grouped_gemv(const uint16_t* x, const std::vector<GroupWeight>& weights,
                             const std::vector<int64_t>& rows, const std::vector<int64_t>& offsets,
                             int64_t n, int64_t k, float* y, DeviceBuffer& args,
                             std::vector<char>& host, Stream stream) {
  if (n < 1 || !fp8_gemv_fits(x, weights, rows, k))
    return "grouped GEMV (fp8): needs n >= 1, k a multiple of 16 and x and every group's weights "
           "16-byte aligned, got n = " +
           std::to_string(n) + ", k = " + std::to_string(k);
  std::vector<RowTile> tiles;
  if (std::string e = upload_row_tiles(weights, rows, offsets, kFp8GemvMaxRows, args, host, stream,
                                       "grouped GEMV (fp8)", &tiles);
      !e.empty() || tiles.empty())
    return e;
  if (tiles.size() > 65535)
    return "grouped GEMV (fp8): " + std::to_string(tiles.size()) +
           " tiles of 8 rows, more than one launch takes: use the grouped GEMM";
  int widest = 0;
  for (const RowTile& t : tiles) widest = std::max(widest, t.rows);
  const auto* t = args.as<const RowTile>();
  const auto count = static_cast<unsigned>(tiles.size());
  if (widest == 1)
    launch_grouped_gemv<1, 4>(x, t, count, n, k, y, stream);
  else if (widest == 2)
    launch_grouped_gemv<2, 4>(x, t, count, n, k, y, stream);
  else if (widest <= 4)
    launch_grouped_gemv<4, 4>(x, t, count, n, k, y, stream);
  else
    launch_grouped_gemv<8, 2>(x, t, count, n, k, y, stream);
  return check("grouped GEMV (fp8) launch");
}

}  // namespace detail

}  // namespace moemesh::kernels::cuda
