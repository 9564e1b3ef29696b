#include <cmath>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"

namespace moemesh::kernels {

void rope_inv_freq(double theta, int64_t rotary_dim, float* inv_freq) {
  // Hugging Face computes this in float32: 1 / theta ** (arange(0, d, 2).float() / d).
  for (int64_t i = 0; i < rotary_dim / 2; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(rotary_dim);
    inv_freq[i] = 1.0f / static_cast<float>(std::pow(theta, static_cast<double>(exponent)));
  }
}

void rope(float* x, int64_t n_tokens, int64_t token_stride, int64_t n_heads, int64_t head_dim,
          int64_t rotary_dim, const int32_t* positions, const float* inv_freq) {
  const int64_t half = rotary_dim / 2;
  std::vector<float> cos_t(static_cast<std::size_t>(half));
  std::vector<float> sin_t(static_cast<std::size_t>(half));
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float pos = static_cast<float>(positions[t]);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = pos * inv_freq[i];
      cos_t[i] = std::cos(angle);
      sin_t[i] = std::sin(angle);
    }
    for (int64_t h = 0; h < n_heads; ++h) {
      float* v = x + t * token_stride + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i];
        const float b = v[i + half];
        v[i] = a * cos_t[i] - b * sin_t[i];
        v[i + half] = b * cos_t[i] + a * sin_t[i];
      }
    }
  }
}

}  // namespace moemesh::kernels
