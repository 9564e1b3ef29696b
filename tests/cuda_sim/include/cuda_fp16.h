// fp16 of the CUDA simulator (tests/cuda_sim): the pair type and conversions kernels/cuda uses.
#pragma once

#include "moemesh_cuda_sim.h"

struct __half2_raw {
  unsigned short x, y;
};
struct __half2 {
  unsigned short x = 0, y = 0;
  __half2() = default;
  __half2(const __half2_raw& r) : x(r.x), y(r.y) {}
};
inline float2 __half22float2(__half2 h) {
  return make_float2(moemesh_sim::f16_to_f32(h.x), moemesh_sim::f16_to_f32(h.y));
}
