// Rotary position embeddings, rotate_half pairing, in place (kernels/cpu rope.cpp).
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/detail/common.cuh"

namespace moemesh::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxBlocks = 65535;

// One thread per (token, frequency), looping over the heads so that each angle's cosine and sine
// are computed once. The angle is float(pos) * inv_freq in float32 and cosf / sinf are the
// accurate (not fast-math) functions, as the CPU computes them; the products are kept out of FMA
// contraction so that only the trigonometry can differ from the CPU.
__global__ void rope_kernel(float* __restrict__ x, int64_t n_tokens, int64_t token_stride,
                            int64_t n_heads, int64_t head_dim, int64_t half,
                            const int32_t* __restrict__ positions,
                            const float* __restrict__ inv_freq) {
  const int64_t total = n_tokens * half;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t t = idx / half;
    const int64_t i = idx - t * half;
    const float angle = static_cast<float>(positions[t]) * inv_freq[i];
    const float c = cosf(angle);
    const float s = sinf(angle);
    float* v = x + t * token_stride + i;
    for (int64_t h = 0; h < n_heads; ++h, v += head_dim) {
      const float a = v[0];
      const float b = v[half];
      v[0] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
      v[half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
  }
}

}  // namespace

void rope(float* x, int64_t n_tokens, int64_t token_stride, int64_t n_heads, int64_t head_dim,
          int64_t rotary_dim, const int32_t* positions, const float* inv_freq, Stream stream) {
  const int64_t half = rotary_dim / 2;
  if (n_tokens <= 0 || n_heads <= 0 || half <= 0) return;
  const int64_t blocks = (n_tokens * half + kThreads - 1) / kThreads;
  rope_kernel<<<static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreads, 0,
                stream>>>(x, n_tokens, token_stride, n_heads, head_dim, half, positions, inv_freq);
}

}  // namespace moemesh::kernels::cuda
