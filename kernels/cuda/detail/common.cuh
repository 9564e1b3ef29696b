// Internal helpers shared by the CUDA kernels of this folder.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moemesh::kernels::cuda::detail {

// bf16 bit patterns (uint16_t) <-> float, as the CPU kernels round (nearest even).
__device__ __forceinline__ float bf16_bits_to_f32(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// Blocks needed to cover n items with `threads` per block, at least 1.
inline unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

// The OCP E4M3 (fn) value of `bits`: bias 7, no infinities, 0x7F / 0xFF are NaN.
__device__ __forceinline__ float e4m3_to_f32(uint32_t bits) {
  const uint32_t sign = (bits & 0x80u) << 24;
  const uint32_t exp = (bits >> 3) & 0xFu;
  const uint32_t mant = bits & 0x7u;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * (1.0f / 512.0f);  // mant * 2^-9
    return __uint_as_float(__float_as_uint(v) | sign);
  }
  if (exp == 0xF && mant == 0x7) return __uint_as_float(0x7FC00000u | sign);
  return __uint_as_float(sign | ((exp + 120u) << 23) | (mant << 20));
}

// Two FP8 E4M3 codes (the one at the lower address in the low byte) as floats; exact (E4M3 values
// are fp16 values). One instruction on sm_89 and later.
__device__ __forceinline__ float2 fp8x2_to_float2(uint32_t two) {
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xffffu), __NV_E4M3);
  return __half22float2(__half2(h));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over a block of blockDim.x (a multiple of 32, <= 1024) threads; every thread gets the sum.
// `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

// A float as an unsigned key with the same order, for radix selection and for packing a value
// and an id into one integer: NaN ranks as -inf and -0 as +0, so that keys are equal exactly
// when the CPU's comparisons call the values equal.
__device__ __forceinline__ uint32_t float_order_key(float v) {
  uint32_t u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) u = 0xff800000u;  // NaN: -inf
  if ((u << 1) == 0) u = 0;                              // -0: +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
// The inverse of float_order_key (for keys it returned).
__device__ __forceinline__ float order_key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

}  // namespace moemesh::kernels::cuda::detail
