// float32 <-> bfloat16 conversions of whole arrays (kernels/cpu dtype.cpp).
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/detail/common.cuh"

namespace moemesh::kernels::cuda {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU; larger arrays are covered by grid-stride loops.
constexpr int64_t kMaxBlocks = 8192;

// The CPU's rounding bit for bit, NaN payloads included (the hardware conversion would return
// the canonical NaN instead).
__device__ __forceinline__ uint16_t to_bf16_like_cpu(float v) {
  uint32_t u = __float_as_uint(v);
  if (v != v) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Four elements per step when both arrays are 16- and 8-byte aligned: n4 groups of four, the
// scalar tail done by the first threads.
__global__ void f32_to_bf16_kernel(const float* __restrict__ src, int64_t n, bool vec4,
                                   uint16_t* __restrict__ dst) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec4) {
    const int64_t n4 = n / 4;
    const auto* s4 = reinterpret_cast<const float4*>(src);
    auto* d4 = reinterpret_cast<ushort4*>(dst);
    for (int64_t i = tid; i < n4; i += stride) {
      const float4 v = s4[i];
      d4[i] = make_ushort4(to_bf16_like_cpu(v.x), to_bf16_like_cpu(v.y), to_bf16_like_cpu(v.z),
                           to_bf16_like_cpu(v.w));
    }
    done = n4 * 4;
  }
  for (int64_t i = done + tid; i < n; i += stride) dst[i] = to_bf16_like_cpu(src[i]);
}

__global__ void bf16_to_f32_kernel(const uint16_t* __restrict__ src, int64_t n, bool vec4,
                                   float* __restrict__ dst) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec4) {
    const int64_t n4 = n / 4;
    const auto* s4 = reinterpret_cast<const ushort4*>(src);
    auto* d4 = reinterpret_cast<float4*>(dst);
    for (int64_t i = tid; i < n4; i += stride) {
      const ushort4 v = s4[i];
      d4[i] = make_float4(detail::bf16_bits_to_f32(v.x), detail::bf16_bits_to_f32(v.y),
                          detail::bf16_bits_to_f32(v.z), detail::bf16_bits_to_f32(v.w));
    }
    done = n4 * 4;
  }
  for (int64_t i = done + tid; i < n; i += stride) dst[i] = detail::bf16_bits_to_f32(src[i]);
}

bool aligned(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

unsigned grid_for(int64_t items) {
  return detail::blocks_for(items < kMaxBlocks * kThreads ? items : kMaxBlocks * kThreads,
                            kThreads);
}

}  // namespace

void f32_to_bf16(const float* src, int64_t n, uint16_t* dst, Stream stream) {
  if (n <= 0) return;
  const bool vec4 = aligned(src, 16) && aligned(dst, 8);
  f32_to_bf16_kernel<<<grid_for(vec4 ? n / 4 + 1 : n), kThreads, 0, stream>>>(src, n, vec4, dst);
}

void bf16_to_f32(const uint16_t* src, int64_t n, float* dst, Stream stream) {
  if (n <= 0) return;
  const bool vec4 = aligned(src, 8) && aligned(dst, 16);
  bf16_to_f32_kernel<<<grid_for(vec4 ? n / 4 + 1 : n), kThreads, 0, stream>>>(src, n, vec4, dst);
}

}  // namespace moemesh::kernels::cuda
