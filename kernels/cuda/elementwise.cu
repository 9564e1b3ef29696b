// Elementwise ops on the residual stream and activations: add, clamp, add_bias, swiglu (kernels/cpu
// swiglu.cpp on a fused gate/up projection) and add_gated_rows.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/detail/common.cuh"

namespace moemesh::kernels::cuda {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU; larger arrays are covered by grid-stride loops.
constexpr int64_t kMaxBlocks = 8192;

unsigned grid_for(int64_t items) {
  return detail::blocks_for(items < kMaxBlocks * kThreads ? items : kMaxBlocks * kThreads,
                            kThreads);
}

__device__ __forceinline__ int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

__global__ void add_kernel(float* __restrict__ x, const float* __restrict__ d, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) x[i] += d[i];
}

__global__ void add4_kernel(float4* __restrict__ x, const float4* __restrict__ d, int64_t n4) {
  for (int64_t i = first_index(); i < n4; i += grid_stride()) {
    float4 a = x[i];
    const float4 b = d[i];
    a.x += b.x;
    a.y += b.y;
    a.z += b.z;
    a.w += b.w;
    x[i] = a;
  }
}

// NaN stays NaN, as std::clamp leaves it.
__global__ void clamp_kernel(float* __restrict__ x, int64_t n, float limit) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const float v = x[i];
    x[i] = v < -limit ? -limit : (v > limit ? limit : v);
  }
}

__global__ void add_bias_kernel(float* __restrict__ x, const float* __restrict__ bias,
                                int64_t total, int64_t dim) {
  for (int64_t i = first_index(); i < total; i += grid_stride()) x[i] += bias[i % dim];
}

__global__ void swiglu_kernel(const float* __restrict__ gate_up, int64_t n, int64_t inter,
                              uint16_t* __restrict__ out) {
  const int64_t total = n * inter;
  for (int64_t idx = first_index(); idx < total; idx += grid_stride()) {
    const int64_t t = idx / inter;
    const int64_t i = idx - t * inter;
    const float g = gate_up[t * 2 * inter + i];
    const float u = gate_up[t * 2 * inter + inter + i];
    out[idx] = detail::f32_to_bf16_bits(g / (1.0f + expf(-g)) * u);
  }
}

__global__ void add_gated_rows_kernel(float* __restrict__ out, const float* __restrict__ x,
                                      const float* __restrict__ row_gate, int64_t n, int64_t dim) {
  const int64_t total = n * dim;
  for (int64_t idx = first_index(); idx < total; idx += grid_stride()) {
    if (row_gate) {
      const float g = row_gate[idx / dim];
      out[idx] += 1.0f / (1.0f + expf(-g)) * x[idx];
    } else {
      out[idx] += x[idx];
    }
  }
}

bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

}  // namespace

void add(float* x, const float* d, int64_t n, Stream stream) {
  if (n <= 0) return;
  int64_t done = 0;
  if (aligned16(x) && aligned16(d) && n >= 4) {
    const int64_t n4 = n / 4;
    add4_kernel<<<grid_for(n4), kThreads, 0, stream>>>(reinterpret_cast<float4*>(x),
                                                       reinterpret_cast<const float4*>(d), n4);
    done = n4 * 4;
  }
  if (done < n)
    add_kernel<<<grid_for(n - done), kThreads, 0, stream>>>(x + done, d + done, n - done);
}

void clamp(float* x, int64_t n, float limit, Stream stream) {
  if (n <= 0) return;
  clamp_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, n, limit);
}

void add_bias(float* x, const float* bias, int64_t n, int64_t dim, Stream stream) {
  if (n <= 0 || dim <= 0) return;
  add_bias_kernel<<<grid_for(n * dim), kThreads, 0, stream>>>(x, bias, n * dim, dim);
}

void swiglu(const float* gate_up, int64_t n, int64_t inter, uint16_t* out, Stream stream) {
  if (n <= 0 || inter <= 0) return;
  swiglu_kernel<<<grid_for(n * inter), kThreads, 0, stream>>>(gate_up, n, inter, out);
}

void add_gated_rows(float* out, const float* x, const float* row_gate, int64_t n, int64_t dim,
                    Stream stream) {
  if (n <= 0 || dim <= 0) return;
  add_gated_rows_kernel<<<grid_for(n * dim), kThreads, 0, stream>>>(out, x, row_gate, n, dim);
}

}  // namespace moemesh::kernels::cuda
