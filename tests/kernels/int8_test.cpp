// linear() over int8 weights with a float32 scale per row (DType::I8): on every ISA this machine
// supports it must match a double-precision reference of scale * int8, and give a token the same
// bits alone or in any batch.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "tests/kernels/isa_guard.h"
#include "tests/kernels/reference.h"

namespace moemesh::kernels {
namespace {

using test::expect_batches_match_alone;
using test::IsaGuard;
using test::random_vector;
using test::supported_isas;

// Random int8 weights over the full range [-127, 127] (and -128, which linear must take as it
// is), random positive scales, and the float32 matrix they stand for.
struct Int8Matrix {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<float> values;  // scale[r] * q[r, c], exact in float32
  WeightView view;
};
Int8Matrix make_int8(int64_t rows, int64_t cols, uint32_t seed) {
  Int8Matrix m;
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> qd(-128, 127);
  std::uniform_real_distribution<float> sd(0.001f, 0.02f);
  m.q.resize(static_cast<std::size_t>(rows * cols));
  for (int8_t& v : m.q) v = static_cast<int8_t>(qd(rng));
  m.scale.resize(static_cast<std::size_t>(rows));
  for (float& s : m.scale) s = sd(rng);
  m.values.resize(m.q.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      m.values[r * cols + c] = static_cast<float>(m.q[r * cols + c]) * m.scale[r];
  m.view = {m.q.data(), DType::I8, rows, cols, m.scale.data()};
  return m;
}

TEST(Int8, DtypeBasics) {
  EXPECT_EQ(dtype_size(DType::I8), 1u);
  EXPECT_STREQ(dtype_name(DType::I8), "I8");
  const int8_t q[4] = {-128, -1, 0, 127};
  float out[4];
  to_f32(q, DType::I8, 4, out);
  EXPECT_EQ(out[0], -128.0f);
  EXPECT_EQ(out[1], -1.0f);
  EXPECT_EQ(out[2], 0.0f);
  EXPECT_EQ(out[3], 127.0f);
  const WeightView w{q, DType::I8, 2, 2, nullptr};
  EXPECT_EQ(static_cast<const int8_t*>(w.row(1)), q + 2);
}

// Avx512Bf16 and Amx quantize each token's activations to int8 (scale absmax / 127, round to
// nearest even) and sums the int8 products exactly: the same computation here, in scalar code,
// gives the same integers, and the float32 steps after them (fma(sum * token scale, row scale,
// bias)) the same bits.
void expect_amx_int8(const std::vector<float>& x, int64_t n, const Int8Matrix& w, const float* bias,
                     const std::vector<float>& y, const std::string& label) {
  const int64_t rows = w.view.rows, cols = w.view.cols;
  for (int64_t t = 0; t < n; ++t) {
    float absmax = 0.0f;
    for (int64_t c = 0; c < cols; ++c) absmax = std::max(absmax, std::fabs(x[t * cols + c]));
    const float inv = absmax > 0.0f ? 127.0f / absmax : 0.0f;
    const float token_scale = absmax > 0.0f ? absmax / 127.0f : 0.0f;
    std::vector<int32_t> q(static_cast<std::size_t>(cols));
    for (int64_t c = 0; c < cols; ++c)
      q[c] =
          static_cast<int32_t>(std::clamp(std::nearbyint(x[t * cols + c] * inv), -127.0f, 127.0f));
    for (int64_t r = 0; r < rows; ++r) {
      int32_t sum = 0;
      for (int64_t c = 0; c < cols; ++c) sum += q[c] * w.q[r * cols + c];
      const float want =
          std::fma(static_cast<float>(sum) * token_scale, w.scale[r], bias ? bias[r] : 0.0f);
      ASSERT_EQ(y[t * rows + r], want) << "amx" << label << " t=" << t << " r=" << r;
    }
  }
}

// Every supported ISA against the reference: shapes that hit each ISA's full vectors, partial
// tails (cols not a multiple of 8 or 16, fewer than one vector), partial row tiles, and both the
// direct (few tokens) and packed (many tokens, k blocks of 512) paths.
TEST(Int8, LinearMatchesReferenceOnEveryIsa) {
  IsaGuard guard;
  struct Shape {
    int64_t n, rows, cols;
  };
  const Shape shapes[] = {{1, 1, 1},    {1, 7, 5},      {3, 13, 17},  {4, 6, 16},
                          {5, 9, 33},   {7, 25, 100},   {8, 11, 47},  {9, 31, 130},
                          {17, 5, 515}, {70, 19, 1100}, {300, 9, 200}};
  for (Isa isa : supported_isas()) {
    ASSERT_TRUE(force_isa(isa));
    for (const Shape& s : shapes) {
      const Int8Matrix w = make_int8(s.rows, s.cols, static_cast<uint32_t>(s.rows * 131 + s.cols));
      const std::vector<float> x = random_vector(s.n * s.cols, static_cast<uint32_t>(s.n + 7));
      const std::vector<float> bias = random_vector(s.rows, 99, 0.1f);
      for (const float* b : {static_cast<const float*>(nullptr), bias.data()}) {
        const std::vector<double> ref = test::ref_linear(x, s.n, w.values, s.rows, s.cols, b);
        // |x| * |w| bounds the rounding of the float32 sum; the reference of the terms is exact.
        std::vector<double> mag(ref.size(), 0.0);
        for (int64_t t = 0; t < s.n; ++t)
          for (int64_t r = 0; r < s.rows; ++r)
            for (int64_t c = 0; c < s.cols; ++c)
              mag[t * s.rows + r] +=
                  std::fabs(double(x[t * s.cols + c]) * w.values[r * s.cols + c]);
        std::vector<float> y(static_cast<std::size_t>(s.n * s.rows), -1.0f);
        linear(x.data(), s.n, w.view, b, y.data(), nullptr);
        if (isa >= Isa::Avx512Bf16) {
          expect_amx_int8(x, s.n, w, b, y,
                          " n=" + std::to_string(s.n) + " rows=" + std::to_string(s.rows) +
                              " cols=" + std::to_string(s.cols));
          continue;
        }
        for (std::size_t i = 0; i < y.size(); ++i)
          ASSERT_NEAR(y[i], ref[i], 1e-5 * (mag[i] + std::fabs(ref[i])) + 1e-30)
              << isa_name(isa) << " n=" << s.n << " rows=" << s.rows << " cols=" << s.cols
              << " i=" << i << " bias=" << (b != nullptr);
      }
    }
  }
}

// y = scale[r] * (the sum of int8 * x) + bias: with one column the sum is exact, so the result is
// exactly the float32 product.
TEST(Int8, ScaleAppliesToTheFinishedSum) {
  IsaGuard guard;
  const int8_t q[3] = {-127, 5, 0};
  const float scale[3] = {0.5f, 3.0f, 7.0f};
  const float bias[3] = {1.0f, -2.0f, 0.25f};
  const WeightView w{q, DType::I8, 3, 1, scale};
  const float x[1] = {2.0f};
  for (Isa isa : supported_isas()) {
    ASSERT_TRUE(force_isa(isa));
    float y[3];
    linear(x, 1, w, bias, y, nullptr);
    EXPECT_EQ(y[0], -127.0f * 2.0f * 0.5f + 1.0f) << isa_name(isa);
    EXPECT_EQ(y[1], 5.0f * 2.0f * 3.0f - 2.0f) << isa_name(isa);
    EXPECT_EQ(y[2], 0.25f) << isa_name(isa);
  }
}

// A token's outputs are the same bits alone, in batches of any size at any position, and with
// any thread split of the rows.
TEST(Int8, BatchInvariantOnEveryIsa) {
  IsaGuard guard;
  ThreadPool pool(3);
  for (Isa isa : supported_isas()) {
    ASSERT_TRUE(force_isa(isa));
    for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{37, 75}, {50, 600}, {9, 16}}) {
      const Int8Matrix w = make_int8(rows, cols, static_cast<uint32_t>(rows + cols));
      const std::vector<float> bias = random_vector(rows, 5, 0.1f);
      const int64_t max_n = 130;
      const std::vector<float> x = random_vector(max_n * cols, 11);
      for (int64_t n : {1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 130}) {
        // Batches of n tokens covering all of x (the last one partial).
        std::vector<std::pair<int64_t, int64_t>> batches;
        for (int64_t t0 = 0; t0 < max_n; t0 += n) batches.emplace_back(std::min(n, max_n - t0), t0);
        for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool})
          expect_batches_match_alone(w.view, bias.data(), x, max_n, batches, p,
                                     std::string(isa_name(isa)) + " rows=" + std::to_string(rows) +
                                         " cols=" + std::to_string(cols) + (p ? " pool" : ""));
      }
    }
  }
}

// The int8 path reads the same sums as a float32 matrix of the integers, then scales: on each
// ISA, linear over I8 equals scale * linear over the F32 integers, to the bit, with no bias.
TEST(Int8, SameSumsAsFloatIntegers) {
  IsaGuard guard;
  const int64_t rows = 21, cols = 77, n = 12;
  const Int8Matrix w = make_int8(rows, cols, 3);
  std::vector<float> ints(w.q.begin(), w.q.end());
  const WeightView f32{ints.data(), DType::F32, rows, cols};
  const std::vector<float> x = random_vector(n * cols, 4);
  for (Isa isa : supported_isas()) {
    if (isa >= Isa::Avx512Bf16) continue;  // int8 activations (LinearMatchesReferenceOnEveryIsa)
    ASSERT_TRUE(force_isa(isa));
    for (int64_t m : {int64_t{1}, n}) {
      std::vector<float> yq(static_cast<std::size_t>(m * rows));
      std::vector<float> yf(static_cast<std::size_t>(m * rows));
      linear(x.data(), m, w.view, nullptr, yq.data(), nullptr);
      linear(x.data(), m, f32, nullptr, yf.data(), nullptr);
      for (int64_t t = 0; t < m; ++t)
        for (int64_t r = 0; r < rows; ++r)
          ASSERT_EQ(yq[t * rows + r], yf[t * rows + r] * w.scale[r])
              << isa_name(isa) << " m=" << m << " t=" << t << " r=" << r;
    }
  }
}

}  // namespace
}  // namespace moemesh::kernels
