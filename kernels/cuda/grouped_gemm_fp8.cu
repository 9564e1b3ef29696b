// This library's own grouped GEMM kernel, for FP8 E4M3 weights with 128x128 float32 block scales
// (DeepSeek-V3's weight_scale_inv layout) and for BF16 weights (GroupedMethod::Wmma): bf16
// activations, float32 accumulation on the tensor cores (WMMA).
//
// Design: one block of 4 warps computes a 64x64 tile of one group's output (64 rows of the group
// x 64 output features); the launch covers every (row tile of every group, column tile) pair, so
// all experts of a layer run in one launch. Per 32-wide step of k, the block stages 64x32 bf16
// activations and 64x32 FP8 weights, dequantised with their block's scale (constant over the
// step, since steps never straddle a 128 boundary) into bf16 shared memory; each warp then
// multiplies a 32x32 sub-tile with 2x2 WMMA 16x16x16 fragments. Weights are read once per row
// tile, which for decode (a few rows per expert) is once: the kernel is then bound by reading the
// FP8 weights, half the bytes of BF16.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <string>
#include <vector>

#include "kernels/cuda/detail/common.cuh"
#include "kernels/cuda/detail/fp8_gemm.h"

namespace moemesh::kernels::cuda::detail {

namespace {

constexpr int kBm = 64;
constexpr int kBn = 64;
constexpr int kBk = 32;
constexpr int kPad = 8;
constexpr int kThreads = 128;

using Tile = RowTile;

template <bool kFp8>
__global__ void __launch_bounds__(kThreads)
    grouped_kernel(const __nv_bfloat16* __restrict__ x, const Tile* __restrict__ tiles, int64_t n,
                   int64_t k, float* __restrict__ y) {
  using namespace nvcuda;
  __shared__ __align__(32) __nv_bfloat16 as[kBm][kBk + kPad];
  __shared__ __align__(32) __nv_bfloat16 bs[kBn][kBk + kPad];
  __shared__ __align__(32) float cs[kBm][kBn + 4];

  const Tile t = tiles[blockIdx.x];
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBn;
  const int64_t k_blocks = (k + 127) / 128;
  const int warp = threadIdx.x >> 5;
  const int wm = warp >> 1;
  const int wn = warp & 1;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t k0 = 0; k0 < k; k0 += kBk) {
    // Activations: 64 rows x 32 bf16 = 256 vectors of 8; rows past the group's end read as 0.
    for (int i = threadIdx.x; i < kBm * kBk / 8; i += kThreads) {
      const int r = i / (kBk / 8);
      const int c = (i % (kBk / 8)) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < t.rows) v = *reinterpret_cast<const uint4*>(x + (t.row0 + r) * k + k0 + c);
      *reinterpret_cast<uint4*>(&as[r][c]) = v;
    }
    if constexpr (!kFp8) {
      // BF16 weights: 64 rows x 32 values = 256 vectors of 8, two per thread.
      const auto* w16 = reinterpret_cast<const __nv_bfloat16*>(t.w);
      for (int i = threadIdx.x; i < kBn * kBk / 8; i += kThreads) {
        const int r = i / (kBk / 8);
        const int c = (i % (kBk / 8)) * 8;
        *reinterpret_cast<uint4*>(&bs[r][c]) =
            *reinterpret_cast<const uint4*>(w16 + (n0 + r) * k + k0 + c);
      }
    } else {
      // FP8 weights: 64 rows x 32 bytes, 16 bytes per thread, dequantised with the block's scale.
      const int r = threadIdx.x >> 1;
      const int c = (threadIdx.x & 1) * 16;
      const uint4 v = *reinterpret_cast<const uint4*>(t.w + (n0 + r) * k + k0 + c);
      const float s = t.scale[((n0 + r) >> 7) * k_blocks + ((k0 + c) >> 7)];
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int b = 0; b < 4; ++b)
          bs[r][c + q * 4 + b] =
              __float2bfloat16_rn(detail::e4m3_to_f32((words[q] >> (8 * b)) & 0xFFu) * s);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBk; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(a[i], &as[wm * 32 + i * 16][kk], kBk + kPad);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(b[j], &bs[wn * 32 + j * 16][kk], kBk + kPad);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&cs[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], kBn + 4,
                              wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < kBm * kBn; i += kThreads) {
    const int r = i / kBn;
    const int c = i % kBn;
    if (r < t.rows) y[(t.row0 + r) * n + n0 + c] = cs[r][c];
  }
}

}  // namespace

std::string upload_row_tiles(const std::vector<GroupWeight>& weights,
                             const std::vector<int64_t>& rows, const std::vector<int64_t>& offsets,
                             int64_t per_tile, DeviceBuffer& args, std::vector<char>& host,
                             Stream stream, const char* what, std::vector<RowTile>* tiles) {
  tiles->clear();
  for (std::size_t g = 0; g < rows.size(); ++g)
    for (int64_t r = 0; r < rows[g]; r += per_tile)
      tiles->push_back(RowTile{static_cast<const uint8_t*>(weights[g].w), weights[g].block_scale,
                               offsets[g] + r,
                               static_cast<int32_t>(std::min<int64_t>(per_tile, rows[g] - r)), 0});
  if (tiles->empty()) return {};
  const std::size_t bytes = tiles->size() * sizeof(RowTile);
  if (args.size() < bytes) {
    std::string e;
    args = DeviceBuffer::allocate(bytes * 2, &e);
    if (!args.data()) return e;
  }
  host.assign(reinterpret_cast<const char*>(tiles->data()),
              reinterpret_cast<const char*>(tiles->data()) + bytes);
  if (cudaMemcpyAsync(args.data(), host.data(), bytes, cudaMemcpyHostToDevice, stream) !=
      cudaSuccess)
    return check((std::string(what) + ": copying the tile list").c_str());
  return {};
}

std::string wmma_grouped_gemm(bool fp8, const uint16_t* x, const std::vector<GroupWeight>& weights,
                              const std::vector<int64_t>& rows, const std::vector<int64_t>& offsets,
                              int64_t n, int64_t k, float* y, DeviceBuffer& args,
                              std::vector<char>& host, Stream stream) {
  if (n % kBn != 0 || k % kBk != 0)
    return std::string("grouped GEMM (") + (fp8 ? "fp8" : "wmma") +
           "): needs n % 64 == 0 and k % 32 == 0, got n = " + std::to_string(n) +
           ", k = " + std::to_string(k);
  std::vector<Tile> tiles;
  if (std::string e = upload_row_tiles(weights, rows, offsets, kBm, args, host, stream,
                                       fp8 ? "grouped GEMM (fp8)" : "grouped GEMM (wmma)", &tiles);
      !e.empty() || tiles.empty())
    return e;
  const dim3 grid(static_cast<unsigned>(tiles.size()), static_cast<unsigned>(n / kBn));
  const auto* xb = reinterpret_cast<const __nv_bfloat16*>(x);
  if (fp8)
    grouped_kernel<true><<<grid, kThreads, 0, stream>>>(xb, args.as<const Tile>(), n, k, y);
  else
    grouped_kernel<false><<<grid, kThreads, 0, stream>>>(xb, args.as<const Tile>(), n, k, y);
  return check(fp8 ? "grouped GEMM (fp8) launch" : "grouped GEMM (wmma) launch");
}

}  // namespace moemesh::kernels::cuda::detail
