// FP8 of the CUDA simulator (tests/cuda_sim): E4M3 conversions as cuda_fp8.h defines them.
#pragma once

#include "cuda_fp16.h"
#include "moemesh_cuda_sim.h"

using __nv_fp8_storage_t = unsigned char;
using __nv_fp8x2_storage_t = unsigned short;
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };

// Only E4M3 with saturation to the largest finite value is simulated.
inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float v, __nv_saturation_t,
                                                __nv_fp8_interpretation_t) {
  return moemesh_sim::f32_to_e4m3_satfinite(v);
}
inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t two, __nv_fp8_interpretation_t) {
  return {moemesh_sim::f32_to_f16_rn(moemesh_sim::e4m3_to_f32(two & 0xFF)),
          moemesh_sim::f32_to_f16_rn(moemesh_sim::e4m3_to_f32(two >> 8))};
}
