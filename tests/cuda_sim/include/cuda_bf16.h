// bf16 of the CUDA simulator (tests/cuda_sim): the type and the conversions kernels/cuda uses.
#pragma once

#include "moemesh_cuda_sim.h"

struct __nv_bfloat16 {
  unsigned short __x = 0;
  __nv_bfloat16() = default;
  __nv_bfloat16(float v) : __x(moemesh_sim::f32_to_bf16_rn(v)) {}
  operator float() const { return __uint_as_float(static_cast<unsigned>(__x) << 16); }
};
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  return __nv_bfloat16(v);
}
inline __nv_bfloat16 __float2bfloat16(float v) {
  return __nv_bfloat16(v);
}
inline float __bfloat162float(__nv_bfloat16 v) {
  return static_cast<float>(v);
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 v) {
  return v.__x;
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) {
  __nv_bfloat16 v;
  v.__x = b;
  return v;
}
