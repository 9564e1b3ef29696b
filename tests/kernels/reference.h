// Naive double-precision references for the CPU kernels, written for clarity, not speed.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace moemesh::test {

inline std::vector<float> random_vector(int64_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

// y = x W^T + b with W [rows, cols].
inline std::vector<double> ref_linear(const std::vector<float>& x, int64_t n,
                                      const std::vector<float>& w, int64_t rows, int64_t cols,
                                      const float* bias) {
  std::vector<double> y(static_cast<std::size_t>(n * rows));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      double acc = bias ? bias[r] : 0.0;
      for (int64_t c = 0; c < cols; ++c) acc += double(x[t * cols + c]) * double(w[r * cols + c]);
      y[t * rows + r] = acc;
    }
  return y;
}

inline double ref_silu(double x) {
  return x / (1.0 + std::exp(-x));
}

}  // namespace moemesh::test
