// RMSNorm, RoPE, SwiGLU and the SwiGLU feed-forward block against naive references.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/cpu/cpu_kernels.h"
#include "tests/kernels/reference.h"

namespace moemesh::kernels {
namespace {

using test::random_vector;

TEST(RmsNorm, MatchesReferenceAndWorksInPlace) {
  const int64_t n = 3, dim = 37;
  const float eps = 1e-5f;
  std::vector<float> x = random_vector(n * dim, 1, 3.0f);
  const std::vector<float> w = random_vector(dim, 2);
  std::vector<float> y(x.size());
  rmsnorm(x.data(), w.data(), n, dim, eps, y.data());
  for (int64_t r = 0; r < n; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += double(x[r * dim + i]) * x[r * dim + i];
    const double inv = 1.0 / std::sqrt(ss / dim + eps);
    for (int64_t i = 0; i < dim; ++i)
      ASSERT_NEAR(y[r * dim + i], w[i] * x[r * dim + i] * inv, 1e-5);
  }
  rmsnorm(x.data(), w.data(), n, dim, eps, x.data());
  EXPECT_EQ(x, y);
}

TEST(Rope, InvFreqFollowsTheta) {
  float f[4];
  rope_inv_freq(10000.0, 8, f);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(f[i], std::pow(10000.0, -2.0 * i / 8), 1e-7);
}

TEST(Rope, RotatesHalvesAtEachPosition) {
  const int64_t n = 3, heads = 2, head_dim = 8, rot = 8, stride = heads * head_dim + 5;
  std::vector<float> x = random_vector(n * stride, 3);
  const std::vector<float> orig = x;
  std::vector<float> inv(rot / 2);
  rope_inv_freq(500.0, rot, inv.data());
  const int32_t pos[3] = {0, 7, 1234};
  rope(x.data(), n, stride, heads, head_dim, rot, pos, inv.data());
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* a = orig.data() + t * stride + h * head_dim;
      const float* b = x.data() + t * stride + h * head_dim;
      for (int64_t i = 0; i < rot / 2; ++i) {
        const double ang = double(pos[t]) * double(inv[i]);
        ASSERT_NEAR(b[i], a[i] * std::cos(ang) - a[i + rot / 2] * std::sin(ang), 2e-4);
        ASSERT_NEAR(b[i + rot / 2], a[i + rot / 2] * std::cos(ang) + a[i] * std::sin(ang), 2e-4);
      }
    }
    // Padding after the heads is untouched.
    for (int64_t i = heads * head_dim; i < stride; ++i)
      EXPECT_EQ(x[t * stride + i], orig[t * stride + i]);
  }
  // Position 0 is the identity.
  for (int64_t i = 0; i < heads * head_dim; ++i) EXPECT_FLOAT_EQ(x[i], orig[i]);
}

TEST(Rope, PartialRotaryLeavesTheRestAlone) {
  const int64_t head_dim = 8, rot = 4;
  std::vector<float> x = random_vector(head_dim, 4);
  const std::vector<float> orig = x;
  std::vector<float> inv(rot / 2);
  rope_inv_freq(10000.0, rot, inv.data());
  const int32_t pos = 5;
  rope(x.data(), 1, head_dim, 1, head_dim, rot, &pos, inv.data());
  for (int64_t i = rot; i < head_dim; ++i) EXPECT_EQ(x[i], orig[i]);
  EXPECT_NE(x[0], orig[0]);
}

TEST(SwiGlu, IsSiluTimesUp) {
  const std::vector<float> g = random_vector(50, 5, 4.0f);
  const std::vector<float> u = random_vector(50, 6);
  std::vector<float> out(50);
  swiglu(g.data(), u.data(), 50, out.data());
  for (int i = 0; i < 50; ++i) ASSERT_NEAR(out[i], test::ref_silu(g[i]) * u[i], 1e-5);
}

TEST(SwiGluFfn, MatchesReference) {
  const int64_t n = 4, hidden = 24, inter = 13;
  const std::vector<float> x = random_vector(n * hidden, 7);
  const std::vector<float> wg = random_vector(inter * hidden, 8, 0.3f);
  const std::vector<float> wu = random_vector(inter * hidden, 9, 0.3f);
  const std::vector<float> wd = random_vector(hidden * inter, 10, 0.3f);
  FfnWeights w{{wg.data(), DType::F32, inter, hidden},
               {wu.data(), DType::F32, inter, hidden},
               {wd.data(), DType::F32, hidden, inter}};
  std::vector<float> scratch(2 * n * inter), out(n * hidden);
  ThreadPool pool(2);
  swiglu_ffn(x.data(), n, w, scratch.data(), out.data(), &pool);
  const auto g = test::ref_linear(x, n, wg, inter, hidden, nullptr);
  const auto u = test::ref_linear(x, n, wu, inter, hidden, nullptr);
  std::vector<float> h(n * inter);
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = static_cast<float>(test::ref_silu(g[i]) * u[i]);
  const auto ref = test::ref_linear(h, n, wd, hidden, inter, nullptr);
  for (std::size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(out[i], ref[i], 1e-4) << i;
}

}  // namespace
}  // namespace moemesh::kernels
