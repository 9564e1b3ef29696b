// Embedding lookup in a bf16 table (kernels/cpu embedding.cpp).
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/detail/common.cuh"

namespace moemesh::kernels::cuda {
namespace {

constexpr int64_t kMaxBlocks = 65535;

// One block per token (grid-stride over tokens). kVec4: hidden % 4 == 0 and the table and the
// output aligned for 8-byte and 16-byte accesses.
template <bool kVec4>
__global__ void embedding_kernel(const uint16_t* __restrict__ table, int64_t hidden,
                                 const int32_t* __restrict__ ids, int64_t n,
                                 float* __restrict__ out) {
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const uint16_t* row = table + static_cast<int64_t>(ids[t]) * hidden;
    float* o = out + t * hidden;
    if constexpr (kVec4) {
      const auto* r4 = reinterpret_cast<const ushort4*>(row);
      auto* o4 = reinterpret_cast<float4*>(o);
      for (int64_t i = threadIdx.x; i < hidden / 4; i += blockDim.x) {
        const ushort4 v = r4[i];
        o4[i] = make_float4(detail::bf16_bits_to_f32(v.x), detail::bf16_bits_to_f32(v.y),
                            detail::bf16_bits_to_f32(v.z), detail::bf16_bits_to_f32(v.w));
      }
    } else {
      for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x)
        o[i] = detail::bf16_bits_to_f32(row[i]);
    }
  }
}

}  // namespace

void embedding(const uint16_t* table, int64_t hidden, const int32_t* ids, int64_t n, float* out,
               Stream stream) {
  if (n <= 0 || hidden <= 0) return;
  const bool vec4 = hidden % 4 == 0 && reinterpret_cast<std::uintptr_t>(table) % 8 == 0 &&
                    reinterpret_cast<std::uintptr_t>(out) % 16 == 0;
  const int64_t items = vec4 ? hidden / 4 : hidden;
  const int threads = items >= 256 ? 256 : static_cast<int>((items + 31) / 32 * 32);
  const auto blocks = static_cast<unsigned>(n < kMaxBlocks ? n : kMaxBlocks);
  if (vec4)
    embedding_kernel<true><<<blocks, threads, 0, stream>>>(table, hidden, ids, n, out);
  else
    embedding_kernel<false><<<blocks, threads, 0, stream>>>(table, hidden, ids, n, out);
}

}  // namespace moemesh::kernels::cuda
