// RMSNorm with an optional fused residual add (kernels/cpu rmsnorm.cpp).
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/detail/common.cuh"

namespace moemesh::kernels::cuda {
namespace {

constexpr int64_t kMaxBlocks = 65535;

// One block per row (grid-stride over rows). x and y_f32 may alias, so neither is __restrict__;
// each thread reads back only the elements it wrote itself. kVec4: dim % 4 == 0 and every array
// aligned for 16-byte (float) and 8-byte (bf16) accesses.
template <bool kVec4>
__global__ void rmsnorm_kernel(float* x, const float* __restrict__ residual,
                               const float* __restrict__ weight, int64_t n, int64_t dim, float eps,
                               float* y_f32, uint16_t* __restrict__ y_bf16) {
  __shared__ float scratch[32];
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    float* xr = x + r * dim;
    float ss = 0.0f;
    if constexpr (kVec4) {
      auto* x4 = reinterpret_cast<float4*>(xr);
      const auto* r4 = residual ? reinterpret_cast<const float4*>(residual + r * dim) : nullptr;
      for (int64_t i = threadIdx.x; i < dim / 4; i += blockDim.x) {
        float4 v = x4[i];
        if (residual) {
          const float4 d = r4[i];
          v.x += d.x;
          v.y += d.y;
          v.z += d.z;
          v.w += d.w;
          x4[i] = v;
        }
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
      }
    } else {
      for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = xr[i];
        if (residual) {
          v += residual[r * dim + i];
          xr[i] = v;
        }
        ss += v * v;
      }
    }
    ss = detail::block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
    if constexpr (kVec4) {
      const auto* x4 = reinterpret_cast<const float4*>(xr);
      const auto* w4 = reinterpret_cast<const float4*>(weight);
      for (int64_t i = threadIdx.x; i < dim / 4; i += blockDim.x) {
        const float4 v = x4[i];
        const float4 w = w4[i];
        const float4 y =
            make_float4(w.x * (v.x * inv), w.y * (v.y * inv), w.z * (v.z * inv), w.w * (v.w * inv));
        if (y_f32) reinterpret_cast<float4*>(y_f32 + r * dim)[i] = y;
        if (y_bf16)
          reinterpret_cast<ushort4*>(y_bf16 + r * dim)[i] =
              make_ushort4(detail::f32_to_bf16_bits(y.x), detail::f32_to_bf16_bits(y.y),
                           detail::f32_to_bf16_bits(y.z), detail::f32_to_bf16_bits(y.w));
      }
    } else {
      for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
        const float y = weight[i] * (xr[i] * inv);
        if (y_f32) y_f32[r * dim + i] = y;
        if (y_bf16) y_bf16[r * dim + i] = detail::f32_to_bf16_bits(y);
      }
    }
  }
}

// One block per row (grid-stride): LayerNorm without bias, two passes over the row (mean, then
// the variance of the deviations, as the CPU's). As rmsnorm_kernel, x and y_f32 may alias.
__global__ void layernorm_kernel(float* x, const float* __restrict__ residual,
                                 const float* __restrict__ weight, int64_t n, int64_t dim,
                                 float eps, float* y_f32, uint16_t* __restrict__ y_bf16) {
  __shared__ float scratch[32];
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    float* xr = x + r * dim;
    float sum = 0.0f;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      float v = xr[i];
      if (residual) {
        v += residual[r * dim + i];
        xr[i] = v;
      }
      sum += v;
    }
    const float mean = detail::block_sum(sum, scratch) / static_cast<float>(dim);
    float sq = 0.0f;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      const float d = xr[i] - mean;
      sq += d * d;
    }
    const float inv = 1.0f / sqrtf(detail::block_sum(sq, scratch) / static_cast<float>(dim) + eps);
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      const float y = weight[i] * ((xr[i] - mean) * inv);
      if (y_f32) y_f32[r * dim + i] = y;
      if (y_bf16) y_bf16[r * dim + i] = detail::f32_to_bf16_bits(y);
    }
  }
}

// One block per row (grid-stride): out[r] = sum of x[r, :]^2.
__global__ void row_sum_squares_kernel(const float* __restrict__ x, int64_t n, int64_t dim,
                                       float* __restrict__ out) {
  __shared__ float scratch[32];
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    float ss = 0.0f;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      const float v = x[r * dim + i];
      ss += v * v;
    }
    ss = detail::block_sum(ss, scratch);
    if (threadIdx.x == 0) out[r] = ss;
  }
}

// x[t, i] *= weight[i] / sqrt(sum_squares[t] / total_dim + eps), grid-stride over n * dim.
__global__ void rmsnorm_apply_kernel(float* __restrict__ x, const float* __restrict__ sum_squares,
                                     float total_dim, const float* __restrict__ weight, int64_t n,
                                     int64_t dim, float eps) {
  const int64_t size = n * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < size;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float inv = 1.0f / sqrtf(sum_squares[i / dim] / total_dim + eps);
    x[i] = weight[i % dim] * (x[i] * inv);
  }
}

bool aligned(const void* p, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

}  // namespace

void rmsnorm(float* x, const float* residual, const float* weight, int64_t n, int64_t dim,
             float eps, float* y_f32, uint16_t* y_bf16, Stream stream) {
  if (n <= 0 || dim <= 0) return;
  const bool vec4 = dim % 4 == 0 && aligned(x, 16) && aligned(residual, 16) &&
                    aligned(weight, 16) && aligned(y_f32, 16) && aligned(y_bf16, 8);
  const int64_t items = vec4 ? dim / 4 : dim;
  // A multiple of 32 (block_sum needs whole warps), at most 512.
  const int threads = items >= 512 ? 512 : static_cast<int>((items + 31) / 32 * 32);
  const auto blocks = static_cast<unsigned>(n < kMaxBlocks ? n : kMaxBlocks);
  if (vec4)
    rmsnorm_kernel<true>
        <<<blocks, threads, 0, stream>>>(x, residual, weight, n, dim, eps, y_f32, y_bf16);
  else
    rmsnorm_kernel<false>
        <<<blocks, threads, 0, stream>>>(x, residual, weight, n, dim, eps, y_f32, y_bf16);
}

void layernorm(float* x, const float* residual, const float* weight, int64_t n, int64_t dim,
               float eps, float* y_f32, uint16_t* y_bf16, Stream stream) {
  if (n <= 0 || dim <= 0) return;
  const int threads = dim >= 512 ? 512 : static_cast<int>((dim + 31) / 32 * 32);
  const auto blocks = static_cast<unsigned>(n < kMaxBlocks ? n : kMaxBlocks);
  layernorm_kernel<<<blocks, threads, 0, stream>>>(x, residual, weight, n, dim, eps, y_f32, y_bf16);
}

void row_sum_squares(const float* x, int64_t n, int64_t dim, float* out, Stream stream) {
  if (n <= 0) return;
  if (dim <= 0) {
    fill_bytes(out, 0, static_cast<std::size_t>(n) * sizeof(float), stream);
    return;
  }
  const int threads = dim >= 512 ? 512 : static_cast<int>((dim + 31) / 32 * 32);
  const auto blocks = static_cast<unsigned>(n < kMaxBlocks ? n : kMaxBlocks);
  row_sum_squares_kernel<<<blocks, threads, 0, stream>>>(x, n, dim, out);
}

void rmsnorm_apply(float* x, const float* sum_squares, int64_t total_dim, const float* weight,
                   int64_t n, int64_t dim, float eps, Stream stream) {
  if (n <= 0 || dim <= 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = (n * dim + kThreads - 1) / kThreads;
  rmsnorm_apply_kernel<<<static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreads,
                         0, stream>>>(x, sum_squares, static_cast<float>(total_dim), weight, n, dim,
                                      eps);
}

}  // namespace moemesh::kernels::cuda
