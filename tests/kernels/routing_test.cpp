#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "kernels/cpu/cpu_kernels.h"
#include "tests/kernels/reference.h"

namespace moemesh::kernels {
namespace {

class SoftmaxTopk : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, bool>> {};

TEST_P(SoftmaxTopk, PicksLargestProbabilities) {
  const auto [experts, k, renorm] = GetParam();
  const int64_t n = 6;
  const auto logits = test::random_vector(n * experts, 11, 2.0f);
  std::vector<int32_t> ids(n * k);
  std::vector<float> w(n * k);
  softmax_topk(logits.data(), n, experts, k, renorm, ids.data(), w.data());
  for (int64_t t = 0; t < n; ++t) {
    const float* l = logits.data() + t * experts;
    std::vector<double> p(experts);
    double sum = 0;
    for (int64_t e = 0; e < experts; ++e) sum += (p[e] = std::exp(double(l[e])));
    for (double& x : p) x /= sum;
    std::vector<int32_t> order(experts);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    double kept = 0;
    for (int64_t i = 0; i < k; ++i) kept += p[order[i]];
    for (int64_t i = 0; i < k; ++i) {
      EXPECT_EQ(ids[t * k + i], order[i]);
      EXPECT_NEAR(w[t * k + i], renorm ? p[order[i]] / kept : p[order[i]], 1e-6);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Configs, SoftmaxTopk,
    ::testing::Values(std::make_tuple(8, 2, true), std::make_tuple(8, 2, false),
                      std::make_tuple(5, 3, true), std::make_tuple(60, 4, false),
                      std::make_tuple(4, 4, true), std::make_tuple(3, 1, false)));

TEST(SoftmaxTopkTies, LowerExpertIdWins) {
  const float logits[4] = {1.0f, 3.0f, 3.0f, 3.0f};
  int32_t ids[2];
  float w[2];
  softmax_topk(logits, 1, 4, 2, true, ids, w);
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(ids[1], 2);
  EXPECT_FLOAT_EQ(w[0], 0.5f);
}

}  // namespace
}  // namespace moemesh::kernels
