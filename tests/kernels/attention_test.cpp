#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "kernels/cpu/cpu_kernels.h"
#include "tests/kernels/reference.h"

namespace moemesh::kernels {
namespace {

using test::random_vector;

// Naive causal GQA attention in double precision.
std::vector<double> ref_attention(const std::vector<float>& q, int64_t n_q,
                                  const std::vector<float>& k, const std::vector<float>& v,
                                  int64_t past, int64_t heads, int64_t kv_heads, int64_t d,
                                  double scale, int64_t window) {
  std::vector<double> out(static_cast<std::size_t>(n_q * heads * d), 0.0);
  for (int64_t t = 0; t < n_q; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t kvh = h / (heads / kv_heads);
      const int64_t pos = past + t;
      std::vector<double> s;
      std::vector<int64_t> keys;
      for (int64_t j = 0; j <= pos; ++j) {
        if (window > 0 && pos - j >= window) continue;
        double acc = 0;
        for (int64_t e = 0; e < d; ++e)
          acc += double(q[(t * heads + h) * d + e]) * k[(j * kv_heads + kvh) * d + e];
        s.push_back(acc * scale);
        keys.push_back(j);
      }
      const double mx = *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - mx));
      for (std::size_t i = 0; i < s.size(); ++i)
        for (int64_t e = 0; e < d; ++e)
          out[(t * heads + h) * d + e] += s[i] / sum * v[(keys[i] * kv_heads + kvh) * d + e];
    }
  return out;
}

struct Case {
  int64_t n_q, past, heads, kv_heads, d, window;
};

class AttentionTest : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionTest, MatchesReference) {
  const Case c = GetParam();
  const int64_t total = c.past + c.n_q;
  const auto q = random_vector(c.n_q * c.heads * c.d, 1);
  const auto k = random_vector(total * c.kv_heads * c.d, 2);
  const auto v = random_vector(total * c.kv_heads * c.d, 3);
  const float scale = 1.0f / std::sqrt(float(c.d));
  std::vector<float> out(q.size());
  ThreadPool pool(3);
  attention(q.data(), c.n_q, k.data(), v.data(), c.past, c.heads, c.kv_heads, c.d, scale, c.window,
            out.data(), &pool);
  const auto ref = ref_attention(q, c.n_q, k, v, c.past, c.heads, c.kv_heads, c.d, scale, c.window);
  for (std::size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(out[i], ref[i], 1e-5) << i;
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionTest,
                         ::testing::Values(Case{1, 0, 1, 1, 4, 0},    // first token
                                           Case{5, 0, 4, 2, 8, 0},    // prefill, GQA
                                           Case{1, 9, 6, 1, 16, 0},   // decode, MQA
                                           Case{3, 4, 4, 4, 6, 0},    // chunk after a prefix
                                           Case{7, 3, 2, 1, 8, 4}));  // sliding window

TEST(Attention, FirstTokenReturnsItsValue) {
  // With a single key the softmax weight is 1: the output is that key's value row.
  const auto q = random_vector(2 * 4, 4);
  const auto k = random_vector(1 * 4, 5);
  const auto v = random_vector(1 * 4, 6);
  std::vector<float> out(8);
  attention(q.data(), 1, k.data(), v.data(), 0, 2, 1, 4, 0.5f, 0, out.data(), nullptr);
  for (int h = 0; h < 2; ++h)
    for (int e = 0; e < 4; ++e) EXPECT_FLOAT_EQ(out[h * 4 + e], v[e]);
}

}  // namespace
}  // namespace moemesh::kernels
