// FP8 E4M3 (OCP "fn": bias 7, no infinities, S.1111.111 is NaN, max 448) on the host.
#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"

namespace moemesh::kernels::cuda {

float fp8_e4m3_to_f32(uint8_t bits) {
  const float sign = (bits & 0x80) ? -1.0f : 1.0f;
  const int exp = (bits >> 3) & 0xF;
  const int mant = bits & 0x7;
  if (exp == 0xF && mant == 0x7) return std::nanf("");
  if (exp == 0) return sign * std::ldexp(static_cast<float>(mant), -9);
  return sign * std::ldexp(1.0f + static_cast<float>(mant) / 8.0f, exp - 7);
}

uint8_t f32_to_fp8_e4m3(float v) {
  if (std::isnan(v)) return 0x7F;
  const uint8_t sign = std::signbit(v) ? 0x80 : 0x00;
  float a = std::fabs(v);
  if (a >= 448.0f) return sign | 0x7E;
  if (a < std::ldexp(1.0f, -6)) {
    // Subnormal (or the smallest normal, when it rounds up): steps of 2^-9.
    const float q = std::nearbyint(a * 512.0f);  // round half to even (default rounding mode)
    return sign | static_cast<uint8_t>(q);       // q == 8 is the encoding of 2^-6
  }
  int e = 0;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int exp = e - 1;                    // a = (2m) * 2^(e-1), 2m in [1, 2)
  int q = static_cast<int>(std::nearbyint((2.0f * m - 1.0f) * 8.0f));
  if (q == 8) {
    q = 0;
    ++exp;
  }
  const int code = ((exp + 7) << 3) | q;
  return sign | static_cast<uint8_t>(code > 0x7E ? 0x7E : code);
}

}  // namespace moemesh::kernels::cuda
