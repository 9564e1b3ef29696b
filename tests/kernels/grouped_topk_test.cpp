// grouped_topk against a brute-force reference and against softmax_topk.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "tests/kernels/reference.h"

namespace moemesh::kernels {
namespace {

struct Config {
  int64_t experts, k;
  bool sigmoid, bias, renorm;
  float scaling;
  int64_t groups, topk_groups;
  bool top2;
};

// The router spelled out: score every expert, rank every group by sorting its scores, then take
// the best remaining allowed expert top_k times (a linear scan, lowest id on ties).
void brute_force(const Config& c, const float* logits, const float* bias, std::vector<int32_t>& ids,
                 std::vector<double>& weights) {
  const int64_t E = c.experts;
  std::vector<float> score(E), choice(E);
  if (c.sigmoid) {
    for (int64_t e = 0; e < E; ++e) score[e] = 1.0f / (1.0f + std::exp(-logits[e]));
  } else {
    float mx = logits[0];
    for (int64_t e = 1; e < E; ++e) mx = std::max(mx, logits[e]);
    float sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += (score[e] = std::exp(logits[e] - mx));
    for (int64_t e = 0; e < E; ++e) score[e] /= sum;
  }
  for (int64_t e = 0; e < E; ++e) choice[e] = bias ? score[e] + bias[e] : score[e];

  std::vector<bool> allowed(E, true);
  if (c.groups > 1 && c.topk_groups < c.groups) {
    const int64_t size = E / c.groups;
    std::vector<float> rank(c.groups);
    for (int64_t g = 0; g < c.groups; ++g) {
      std::vector<float> v(choice.begin() + g * size, choice.begin() + (g + 1) * size);
      std::sort(v.begin(), v.end(), std::greater<float>());
      rank[g] = c.top2 && size > 1 ? v[0] + v[1] : v[0];
    }
    std::vector<bool> picked(c.groups, false);
    for (int64_t r = 0; r < c.topk_groups; ++r) {
      int64_t best = -1;
      for (int64_t g = 0; g < c.groups; ++g)
        if (!picked[g] && (best < 0 || rank[g] > rank[best])) best = g;
      picked[best] = true;
    }
    for (int64_t e = 0; e < E; ++e) allowed[e] = picked[e / size];
  }

  std::vector<bool> taken(E, false);
  ids.clear();
  for (int64_t r = 0; r < c.k; ++r) {
    int64_t best = -1;
    for (int pass = 0; pass < 2 && best < 0; ++pass)  // pass 1: only if allowed ones run out
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && allowed[e] == (pass == 0) && (best < 0 || choice[e] > choice[best]))
          best = e;
    taken[best] = true;
    ids.push_back(static_cast<int32_t>(best));
  }
  double kept = 0;
  for (int32_t id : ids) kept += score[id];
  weights.clear();
  for (int32_t id : ids) weights.push_back((c.renorm ? score[id] / kept : score[id]) * c.scaling);
}

class GroupedTopk : public ::testing::TestWithParam<Config> {};

TEST_P(GroupedTopk, MatchesBruteForce) {
  const Config c = GetParam();
  const int64_t n = 9;
  const auto logits = test::random_vector(n * c.experts, 21, 2.0f);
  const auto bias = test::random_vector(c.experts, 22, 0.1f);
  std::vector<int32_t> ids(n * c.k, -1);
  std::vector<float> w(n * c.k, NAN);
  grouped_topk(logits.data(), c.bias ? bias.data() : nullptr, n, c.experts, c.k, c.sigmoid,
               c.renorm, c.scaling, c.groups, c.topk_groups, c.top2, ids.data(), w.data());
  std::vector<int32_t> ref_ids;
  std::vector<double> ref_w;
  for (int64_t t = 0; t < n; ++t) {
    brute_force(c, logits.data() + t * c.experts, c.bias ? bias.data() : nullptr, ref_ids, ref_w);
    for (int64_t i = 0; i < c.k; ++i) {
      EXPECT_EQ(ids[t * c.k + i], ref_ids[i]) << "token " << t << " rank " << i;
      EXPECT_NEAR(w[t * c.k + i], ref_w[i], 1e-6 * std::max(1.0, std::abs(ref_w[i])));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Configs, GroupedTopk,
    ::testing::Values(
        // DeepSeek-V3: sigmoid, correction bias, 8 groups ranked by their top-2 sum, 4 kept.
        Config{256, 8, true, true, true, 2.5f, 8, 4, true},
        // DeepSeek-V2: softmax, 8 groups ranked by their max, 3 kept, no renormalisation.
        Config{160, 6, false, false, false, 16.0f, 8, 3, false},
        Config{64, 6, false, false, true, 1.0f, 8, 3, false},
        Config{64, 4, true, false, false, 1.0f, 4, 1, true},
        Config{12, 3, true, true, true, 1.5f, 12, 5, true},  // groups of one expert
        Config{60, 4, false, true, true, 1.0f, 1, 1, false},
        Config{5, 3, true, false, true, 1.0f, 1, 1, false},
        Config{3, 1, false, false, false, 0.5f, 1, 1, false},
        Config{32, 32, false, false, true, 1.0f, 4, 4, true}));  // every expert chosen

TEST(GroupedTopkPlain, EqualsSoftmaxTopkExactly) {
  for (const bool renorm : {false, true}) {
    for (const int64_t experts : {1, 5, 64, 257}) {
      for (const int64_t k : {int64_t{1}, std::min<int64_t>(experts, 3), experts}) {
        const int64_t n = 7;
        const auto logits = test::random_vector(n * experts, 31, 3.0f);
        std::vector<int32_t> ids_a(n * k), ids_b(n * k);
        std::vector<float> w_a(n * k), w_b(n * k);
        softmax_topk(logits.data(), n, experts, k, renorm, ids_a.data(), w_a.data());
        grouped_topk(logits.data(), nullptr, n, experts, k, false, renorm, 1.0f, 1, 1, false,
                     ids_b.data(), w_b.data());
        EXPECT_EQ(ids_a, ids_b) << experts << " experts, k " << k;
        EXPECT_EQ(w_a, w_b) << experts << " experts, k " << k;
      }
    }
  }
}

TEST(GroupedTopkTies, LowerIdsAndLowerGroupsWin) {
  // Four groups of two; groups 1 and 2 tie on their max (3) and group 1 wins the tie.
  const float logits[8] = {1.0f, 0.0f, 3.0f, 3.0f, 3.0f, 2.0f, 2.5f, 0.0f};
  int32_t ids[3];
  float w[3];
  grouped_topk(logits, nullptr, 1, 8, 2, false, true, 1.0f, 4, 1, false, ids, w);
  EXPECT_EQ(ids[0], 2);
  EXPECT_EQ(ids[1], 3);
  EXPECT_FLOAT_EQ(w[0], 0.5f);
  // Ranked by top-2 sums instead, group 1 (6) beats group 2 (5).
  grouped_topk(logits, nullptr, 1, 8, 2, false, true, 1.0f, 4, 2, true, ids, w);
  EXPECT_EQ(ids[0], 2);
  EXPECT_EQ(ids[1], 3);
  // Two groups kept (1 and 2): expert 4 ties 2 and 3 and loses on its id.
  grouped_topk(logits, nullptr, 1, 8, 3, false, false, 1.0f, 4, 2, false, ids, w);
  EXPECT_EQ(ids[2], 4);
}

TEST(GroupedTopkBias, ChoosesByBiasedScoreButWeighsUnbiased) {
  const float logits[4] = {2.0f, 1.0f, 0.0f, -1.0f};
  const float bias[4] = {0.0f, 0.0f, 0.0f, 1.0f};
  int32_t ids[2];
  float w[2];
  grouped_topk(logits, bias, 1, 4, 2, true, false, 2.0f, 1, 1, false, ids, w);
  EXPECT_EQ(ids[0], 3);  // sigmoid(-1) + 1 = 1.27 beats sigmoid(2) = 0.88
  EXPECT_EQ(ids[1], 0);
  EXPECT_FLOAT_EQ(w[0], 2.0f / (1.0f + std::exp(1.0f)));
  EXPECT_FLOAT_EQ(w[1], 2.0f / (1.0f + std::exp(-2.0f)));
}

TEST(GroupedTopkGroups, BestExpertOfALosingGroupIsLeftOut) {
  // Two groups of three; group 0 has the single best expert, group 1 the better top-2 sum.
  const float logits[6] = {5.0f, -3.0f, -3.0f, 4.0f, 4.0f, -3.0f};
  int32_t ids[2];
  float w[2];
  grouped_topk(logits, nullptr, 1, 6, 2, true, true, 1.0f, 2, 1, true, ids, w);
  EXPECT_EQ(ids[0], 3);
  EXPECT_EQ(ids[1], 4);
  EXPECT_FLOAT_EQ(w[0], 0.5f);
  // Ranked by the max, group 0 wins: expert 0, then the best left in group 0.
  grouped_topk(logits, nullptr, 1, 6, 2, true, true, 1.0f, 2, 1, false, ids, w);
  EXPECT_EQ(ids[0], 0);
  EXPECT_EQ(ids[1], 1);
}

TEST(GroupedTopkGroups, TooFewCompetingExpertsAreFilledFromOtherGroups) {
  const float logits[4] = {0.0f, 1.0f, 3.0f, 2.0f};
  int32_t ids[3];
  float w[3];
  grouped_topk(logits, nullptr, 1, 4, 3, false, false, 1.0f, 2, 1, false, ids, w);
  EXPECT_EQ(ids[0], 2);
  EXPECT_EQ(ids[1], 3);
  EXPECT_EQ(ids[2], 1);
}

}  // namespace
}  // namespace moemesh::kernels
