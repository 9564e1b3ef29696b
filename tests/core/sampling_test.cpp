// The Sampler on hand-made logits: each parameter in isolation, its support and (with a fixed
// seed) its empirical distribution against the expected one.
#include "core/sampling.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>

namespace moemesh {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kDraws = 40000;
// Frequencies of kDraws draws: the standard error is at most 0.0025, so 0.012 is ~5 sigma (and the
// seed is fixed, so the test is deterministic anyway).
constexpr double kFreqTolerance = 0.012;

SamplingParams params_with(std::function<void(SamplingParams&)> set) {
  SamplingParams p;
  p.seed = 1234;
  set(p);
  return p;
}

SampledToken sample_once(Sampler& s, std::vector<float> logits,
                         const std::vector<int32_t>& prompt = {},
                         const std::vector<int32_t>& output = {}) {
  return s.sample(logits, prompt, output);
}

// Empirical frequencies of `draws` samples from `logits`.
std::vector<double> frequencies(Sampler& s, const std::vector<float>& logits, int draws = kDraws) {
  std::vector<double> f(logits.size(), 0.0);
  for (int i = 0; i < draws; ++i) {
    const int32_t id = sample_once(s, logits).id;
    EXPECT_GE(id, 0);
    EXPECT_LT(id, static_cast<int32_t>(logits.size()));
    f[static_cast<std::size_t>(id)] += 1.0 / draws;
  }
  return f;
}

// softmax(logits / t) restricted to `keep` (all when empty), renormalised.
std::vector<double> expected_distribution(const std::vector<float>& logits, double t,
                                          const std::set<int32_t>& keep = {}) {
  std::vector<double> p(logits.size(), 0.0);
  double sum = 0;
  for (std::size_t i = 0; i < logits.size(); ++i) {
    if (!keep.empty() && !keep.count(static_cast<int32_t>(i))) continue;
    p[i] = std::exp(logits[i] / t);
    sum += p[i];
  }
  for (double& v : p) v /= sum;
  return p;
}

void expect_distribution(const std::vector<double>& got, const std::vector<double>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (want[i] == 0)
      EXPECT_EQ(got[i], 0.0) << "token " << i << " is outside the support but was drawn";
    else
      EXPECT_NEAR(got[i], want[i], kFreqTolerance) << "token " << i;
  }
}

std::vector<float> log_of(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(static_cast<float>(std::log(p)));
  return l;
}

std::vector<float> random_logits(std::size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, 3.0f);
  std::vector<float> l(n);
  for (float& v : l) v = d(gen);
  return l;
}

// ---- Greedy ------------------------------------------------------------------------------------

TEST(Sampler, GreedyIsTheArgmax) {
  Sampler s(params_with([](SamplingParams& p) { p.temperature = 0; }), {});
  for (uint32_t trial = 0; trial < 20; ++trial) {
    const std::vector<float> l = random_logits(1000, trial);
    const auto best = std::max_element(l.begin(), l.end()) - l.begin();
    EXPECT_EQ(sample_once(s, l).id, best) << "trial " << trial;
  }
}

TEST(Sampler, GreedyTiesGoToTheLowerId) {
  Sampler s(params_with([](SamplingParams& p) { p.temperature = 0; }), {});
  EXPECT_EQ(sample_once(s, {1.0f, 3.0f, 2.0f, 3.0f}).id, 1);
}

TEST(Sampler, TemperatureBelowEpsilonIsGreedy) {
  Sampler s(params_with([](SamplingParams& p) { p.temperature = 1e-6f; }), {});
  const std::vector<float> l = {0.0f, 0.1f, 0.05f};
  for (int i = 0; i < 100; ++i) EXPECT_EQ(sample_once(s, l).id, 1);
}

// ---- Temperature and the unfiltered distribution ---------------------------------------------

TEST(Sampler, TemperatureOneFollowsTheSoftmax) {
  const std::vector<float> l = {1.0f, 2.0f, 0.5f, -1.0f, 1.5f};
  Sampler s(params_with([](SamplingParams&) {}), {});
  expect_distribution(frequencies(s, l), expected_distribution(l, 1.0));
}

TEST(Sampler, TemperatureScalesTheLogits) {
  const std::vector<float> l = {0.0f, 1.0f, 2.0f};
  for (float t : {0.5f, 2.0f}) {
    Sampler s(params_with([t](SamplingParams& p) { p.temperature = t; }), {});
    const std::vector<double> got = frequencies(s, l);
    expect_distribution(got, expected_distribution(l, t));
    // And it is not the T = 1 distribution.
    EXPECT_GT(std::abs(got[2] - expected_distribution(l, 1.0)[2]), 0.05) << "temperature " << t;
  }
}

// ---- Filters ---------------------------------------------------------------------------------

TEST(Sampler, TopKKeepsExactlyTheKMostLikely) {
  const std::vector<float> l = {0.3f, 2.0f, -1.0f, 1.5f, 0.0f, 1.9f, 0.5f, -2.0f};
  Sampler s(params_with([](SamplingParams& p) { p.top_k = 3; }), {});
  expect_distribution(frequencies(s, l), expected_distribution(l, 1.0, {1, 5, 3}));
}

TEST(Sampler, TopKWithTiesKeepsExactlyKLowerIdsFirst) {
  const std::vector<float> l = {1.0f, 1.0f, 1.0f, 1.0f, 0.0f};
  Sampler s(params_with([](SamplingParams& p) { p.top_k = 2; }), {});
  expect_distribution(frequencies(s, l), expected_distribution(l, 1.0, {0, 1}));
}

TEST(Sampler, TopKOffOrAtLeastTheVocabularyKeepsEverything) {
  const std::vector<float> l = {0.0f, 1.0f, 0.5f};
  for (int32_t k : {0, -1, 3, 100}) {
    Sampler s(params_with([k](SamplingParams& p) { p.top_k = k; }), {});
    expect_distribution(frequencies(s, l, 20000), expected_distribution(l, 1.0));
  }
}

TEST(Sampler, TopPKeepsTheSmallestSetReachingP) {
  // Probabilities 0.1, 0.4, 0.2, 0.3 (ids out of order on purpose).
  const std::vector<float> l = log_of({0.1, 0.4, 0.2, 0.3});
  // 0.4 < 0.65 <= 0.4 + 0.3: the two most likely.
  Sampler a(params_with([](SamplingParams& p) { p.top_p = 0.65f; }), {});
  expect_distribution(frequencies(a, l), expected_distribution(l, 1.0, {1, 3}));
  // 0.7 < 0.75 <= 0.9: three.
  Sampler b(params_with([](SamplingParams& p) { p.top_p = 0.75f; }), {});
  expect_distribution(frequencies(b, l), expected_distribution(l, 1.0, {1, 3, 2}));
  // Below the largest probability: only the most likely token.
  Sampler c(params_with([](SamplingParams& p) { p.top_p = 0.3f; }), {});
  expect_distribution(frequencies(c, l, 2000), expected_distribution(l, 1.0, {1}));
}

// The smallest set of most likely tokens whose probability reaches p, computed by a full sort.
std::set<int32_t> reference_top_p(const std::vector<float>& l, double p) {
  const std::vector<double> prob = expected_distribution(l, 1.0);
  std::vector<int32_t> order(l.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return l[a] > l[b]; });
  std::set<int32_t> keep;
  double mass = 0;
  for (int32_t id : order) {
    if (mass >= p) break;
    keep.insert(id);
    mass += prob[static_cast<std::size_t>(id)];
  }
  return keep;
}

TEST(Sampler, TopPOverALargeVocabulary) {
  // 4096 tokens: a head of 200 likely ones (scattered ids, decreasing logits) over a flat tail.
  // p = 0.1 needs 10 head tokens, 0.6 needs 74 (more than a first batch of 64) and 0.999 reaches
  // into the tail (whose equal logits go to the lower ids first).
  std::vector<float> l(4096, 0.0f);
  for (int32_t i = 0; i < 200; ++i) l[static_cast<std::size_t>(i * 37 % 4096)] = 10.0f - 0.01f * i;
  for (float p : {0.1f, 0.6f, 0.999f}) {
    const int draws = p < 0.99f ? 4000 : 1000;  // the last sorts the vocabulary on every draw
    const std::set<int32_t> keep = reference_top_p(l, p);
    ASSERT_GT(keep.size(), 1u);
    Sampler s(params_with([p](SamplingParams& q) { q.top_p = p; }), {});
    const std::vector<double> got = frequencies(s, l, draws);
    const std::vector<double> want = expected_distribution(l, 1.0, keep);
    expect_distribution(got, want);
    // The whole support is reached: a token expected 30+ times is drawn (all but surely).
    for (int32_t id : keep)
      if (want[static_cast<std::size_t>(id)] * draws >= 30) {
        EXPECT_GT(got[static_cast<std::size_t>(id)], 0) << "top_p " << p << ", token " << id;
      }
  }
}

TEST(Sampler, TopPAppliesAfterTopK) {
  // top_k 3 leaves 0.4, 0.3, 0.2, renormalised to 4/9, 3/9, 2/9, where 4/9 + 3/9 = 0.78 reaches
  // top_p 0.75 with two tokens (on the full distribution, 0.4 + 0.3 = 0.7 would need a third).
  const std::vector<float> l = log_of({0.1, 0.4, 0.2, 0.3});
  Sampler s(params_with([](SamplingParams& p) {
              p.top_k = 3;
              p.top_p = 0.75f;
            }),
            {});
  expect_distribution(frequencies(s, l), expected_distribution(l, 1.0, {1, 3}));
}

TEST(Sampler, MinPIsRelativeToTheLargestProbability) {
  // Probabilities 0.5, 0.3, 0.15, 0.05; min_p 0.25 -> threshold 0.125: the first three stay.
  const std::vector<float> l = log_of({0.15, 0.5, 0.05, 0.3});
  Sampler a(params_with([](SamplingParams& p) { p.min_p = 0.25f; }), {});
  expect_distribution(frequencies(a, l), expected_distribution(l, 1.0, {0, 1, 3}));
  // min_p 0.5 -> threshold 0.25.
  Sampler b(params_with([](SamplingParams& p) { p.min_p = 0.5f; }), {});
  expect_distribution(frequencies(b, l), expected_distribution(l, 1.0, {1, 3}));
}

TEST(Sampler, MinPAppliesToTheTemperedDistribution) {
  // At T = 2 the ratios are square roots: 0.05 / 0.5 = 0.1 becomes 0.316 > 0.25: all stay.
  const std::vector<float> l = log_of({0.15, 0.5, 0.05, 0.3});
  Sampler s(params_with([](SamplingParams& p) {
              p.min_p = 0.25f;
              p.temperature = 2.0f;
            }),
            {});
  expect_distribution(frequencies(s, l), expected_distribution(l, 2.0));
}

// ---- Penalties (exact values: a greedy sample leaves the penalised logits in the row) --------

TEST(Sampler, RepetitionPenaltyDividesPositiveAndMultipliesNegativeLogits) {
  Sampler s(params_with([](SamplingParams& p) {
              p.temperature = 0;
              p.repetition_penalty = 2.0f;
            }),
            {});
  std::vector<float> l = {3.0f, 2.0f, -1.0f, 0.5f, -0.5f};
  const std::vector<int32_t> prompt = {1, 2, 1};
  const std::vector<int32_t> output = {2, 4, 4};
  EXPECT_EQ(s.sample(l, prompt, output).id, 0);
  EXPECT_FLOAT_EQ(l[0], 3.0f);   // unseen
  EXPECT_FLOAT_EQ(l[1], 1.0f);   // prompt, positive: divided once despite two occurrences
  EXPECT_FLOAT_EQ(l[2], -2.0f);  // prompt and output, negative: multiplied once
  EXPECT_FLOAT_EQ(l[3], 0.5f);   // unseen
  EXPECT_FLOAT_EQ(l[4], -1.0f);  // output, negative
}

TEST(Sampler, RepetitionPenaltyChangesTheGreedyChoice) {
  Sampler s(params_with([](SamplingParams& p) {
              p.temperature = 0;
              p.repetition_penalty = 1.5f;
            }),
            {});
  const std::vector<int32_t> prompt = {0};
  EXPECT_EQ(sample_once(s, {3.0f, 2.1f}, prompt).id, 1);  // 3 / 1.5 = 2 < 2.1
  EXPECT_EQ(sample_once(s, {3.0f, 1.9f}, prompt).id, 0);  // 2 > 1.9
}

TEST(Sampler, FrequencyAndPresencePenaltiesCountGeneratedTokensOnly) {
  Sampler s(params_with([](SamplingParams& p) {
              p.temperature = 0;
              p.frequency_penalty = 0.5f;
              p.presence_penalty = 0.25f;
            }),
            {});
  std::vector<float> l = {1.0f, 1.0f, 1.0f, 1.0f};
  const std::vector<int32_t> prompt = {0, 0, 0};
  const std::vector<int32_t> output = {2, 1, 2, 2};
  EXPECT_EQ(s.sample(l, prompt, output).id, 0);
  EXPECT_FLOAT_EQ(l[0], 1.0f);                 // prompt only: untouched
  EXPECT_FLOAT_EQ(l[1], 1.0f - 0.5f - 0.25f);  // once
  EXPECT_FLOAT_EQ(l[2], 1.0f - 1.5f - 0.25f);  // three times
  EXPECT_FLOAT_EQ(l[3], 1.0f);
}

TEST(Sampler, NegativePenaltiesEncourageRepetition) {
  Sampler s(params_with([](SamplingParams& p) {
              p.temperature = 0;
              p.presence_penalty = -1.0f;
            }),
            {});
  EXPECT_EQ(sample_once(s, {2.0f, 1.5f}, {}, {1}).id, 1);
}

TEST(Sampler, RepetitionPenaltyAppliesBeforeFrequencyPenalty) {
  Sampler s(params_with([](SamplingParams& p) {
              p.temperature = 0;
              p.repetition_penalty = 2.0f;
              p.frequency_penalty = 1.0f;
            }),
            {});
  std::vector<float> l = {2.0f, -5.0f};
  const std::vector<int32_t> output = {0};
  s.sample(l, {}, output);
  EXPECT_FLOAT_EQ(l[0], 2.0f / 2.0f - 1.0f);  // (2 - 1) / 2 = 0.5 had the order been reversed
}

TEST(Sampler, PenaltiesIgnoreIdsOutsideTheVocabulary) {
  Sampler s(params_with([](SamplingParams& p) {
              p.temperature = 0;
              p.repetition_penalty = 2.0f;
              p.frequency_penalty = 1.0f;
            }),
            {});
  std::vector<float> l = {2.0f, 1.0f};
  const std::vector<int32_t> prompt = {-1, 7};
  const std::vector<int32_t> output = {5, 1};
  s.sample(l, prompt, output);
  EXPECT_FLOAT_EQ(l[0], 2.0f);
  EXPECT_FLOAT_EQ(l[1], 1.0f / 2.0f - 1.0f);
}

// ---- logit_bias, min_tokens, stop ----------------------------------------------------------

TEST(Sampler, LogitBiasForcesAToken) {
  const std::vector<float> l = random_logits(50, 7);
  const auto worst = static_cast<int32_t>(std::min_element(l.begin(), l.end()) - l.begin());
  for (float t : {0.0f, 1.0f}) {
    Sampler s(params_with([&](SamplingParams& p) {
                p.temperature = t;
                p.logit_bias = {{worst, 100.0f}};
              }),
              {});
    for (int i = 0; i < 200; ++i) ASSERT_EQ(sample_once(s, l).id, worst) << "temperature " << t;
  }
}

TEST(Sampler, LogitBiasIsAddedToTheLogit) {
  Sampler s(params_with([](SamplingParams& p) {
              p.temperature = 0;
              p.logit_bias = {{0, -100.0f}, {2, 1.5f}};
            }),
            {});
  std::vector<float> l = {5.0f, 1.0f, 0.0f};
  EXPECT_EQ(s.sample(l, {}, {}).id, 2);
  EXPECT_FLOAT_EQ(l[0], -95.0f);
  EXPECT_FLOAT_EQ(l[2], 1.5f);
}

TEST(Sampler, MinTokensSuppressesEosAndStopIds) {
  // EOS 3 and stop id 4 are the most likely tokens.
  const std::vector<float> l = {0.0f, 1.0f, 0.5f, 5.0f, 4.0f};
  Sampler s(params_with([](SamplingParams& p) {
              p.temperature = 0;
              p.min_tokens = 2;
              p.stop_token_ids = {4};
            }),
            {3});
  std::vector<int32_t> output;
  for (int i = 0; i < 2; ++i) {
    const SampledToken t = sample_once(s, l, {}, output);
    EXPECT_EQ(t.id, 1) << "output length " << output.size();
    EXPECT_FALSE(t.stop);
    output.push_back(t.id);
  }
  const SampledToken t = sample_once(s, l, {}, output);
  EXPECT_EQ(t.id, 3);
  EXPECT_TRUE(t.stop);
  // The stop id is suppressed too: with EOS out of the way it would win.
  Sampler s2(params_with([](SamplingParams& p) {
               p.temperature = 0;
               p.min_tokens = 1;
               p.stop_token_ids = {4};
               p.logit_bias = {{3, -100.0f}};
             }),
             {3});
  EXPECT_EQ(sample_once(s2, l).id, 1);
  EXPECT_EQ(sample_once(s2, l, {}, {1}).id, 4);
}

TEST(Sampler, MinTokensSuppressesStopTokensWhenSampling) {
  const std::vector<float> l = {0.0f, 0.0f, 0.0f, 0.0f};  // uniform
  Sampler s(params_with([](SamplingParams& p) {
              p.min_tokens = 1;
              p.stop_token_ids = {1};
            }),
            {2});
  const std::vector<double> f = frequencies(s, l, 20000);
  expect_distribution(f, expected_distribution(l, 1.0, {0, 3}));
}

TEST(Sampler, MinTokensLeavesEosAloneWithIgnoreEos) {
  const std::vector<float> l = {0.0f, 5.0f};
  Sampler s(params_with([](SamplingParams& p) {
              p.temperature = 0;
              p.min_tokens = 3;
              p.ignore_eos = true;
            }),
            {1});
  const SampledToken t = sample_once(s, l);
  EXPECT_EQ(t.id, 1);
  EXPECT_FALSE(t.stop);
}

TEST(Sampler, EosAndStopTokenIdsStop) {
  const std::vector<float> eos_wins = {0.0f, 5.0f, 1.0f, 2.0f};
  const std::vector<float> stop_wins = {0.0f, 1.0f, 5.0f, 2.0f};
  const std::vector<float> other_wins = {0.0f, 1.0f, 2.0f, 5.0f};
  auto greedy = [](bool ignore_eos) {
    return params_with([ignore_eos](SamplingParams& p) {
      p.temperature = 0;
      p.ignore_eos = ignore_eos;
      p.stop_token_ids = {2};
    });
  };
  Sampler s(greedy(false), {1, 7});
  EXPECT_TRUE(sample_once(s, eos_wins).stop);
  EXPECT_TRUE(sample_once(s, stop_wins).stop);
  EXPECT_FALSE(sample_once(s, other_wins).stop);
  Sampler ignoring(greedy(true), {1, 7});
  const SampledToken t = sample_once(ignoring, eos_wins);
  EXPECT_EQ(t.id, 1);
  EXPECT_FALSE(t.stop);  // EOS is an ordinary token
  EXPECT_TRUE(sample_once(ignoring, stop_wins).stop) << "stop_token_ids stop even with ignore_eos";
}

TEST(Sampler, EverythingMaskedGivesTheLowestIdWithoutStopping) {
  // The whole vocabulary is end-of-sequence, suppressed by min_tokens.
  for (float t : {0.0f, 1.0f}) {
    Sampler s(params_with([t](SamplingParams& p) {
                p.temperature = t;
                p.min_tokens = 1;
              }),
              {0, 1});
    const SampledToken got = sample_once(s, {1.0f, 2.0f});
    EXPECT_EQ(got.id, 0);
    EXPECT_FALSE(got.stop);
  }
}

// ---- logprobs ----------------------------------------------------------------------------------

std::vector<double> log_softmax(const std::vector<float>& l) {
  double mx = *std::max_element(l.begin(), l.end());
  double sum = 0;
  for (float v : l) sum += std::exp(v - mx);
  std::vector<double> out;
  for (float v : l) out.push_back(v - mx - std::log(sum));
  return out;
}

TEST(Sampler, LogprobsAreThoseOfTheRawLogits) {
  const std::vector<float> l = random_logits(300, 3);
  const std::vector<double> want = log_softmax(l);
  // Processing that changes the sampling distribution must not change the reported logprobs.
  Sampler s(params_with([](SamplingParams& p) {
              p.temperature = 0.7f;
              p.top_k = 20;
              p.repetition_penalty = 1.3f;
              p.frequency_penalty = 0.5f;
              p.logit_bias = {{5, 3.0f}};
              p.logprobs = 5;
            }),
            {});
  std::vector<int32_t> output;
  for (int step = 0; step < 10; ++step) {
    const SampledToken t = sample_once(s, l, {1, 2}, output);
    EXPECT_NEAR(t.logprob, want[static_cast<std::size_t>(t.id)], 1e-5);
    ASSERT_EQ(t.top.size(), 5u);
    std::vector<int32_t> order(l.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return l[a] > l[b]; });
    for (std::size_t i = 0; i < 5; ++i) {
      EXPECT_EQ(t.top[i].id, order[i]) << "rank " << i;
      EXPECT_NEAR(t.top[i].logprob, want[static_cast<std::size_t>(order[i])], 1e-5);
      if (i > 0) {
        EXPECT_GE(t.top[i - 1].logprob, t.top[i].logprob);
      }
    }
    output.push_back(t.id);
  }
}

TEST(Sampler, LogprobsZeroGivesTheSampledTokenOnlyAndMinusOneNothing) {
  const std::vector<float> l = {1.0f, 2.0f, 3.0f};
  Sampler zero(params_with([](SamplingParams& p) {
                 p.temperature = 0;
                 p.logprobs = 0;
               }),
               {});
  const SampledToken t = sample_once(zero, l);
  EXPECT_EQ(t.id, 2);
  EXPECT_NEAR(t.logprob, log_softmax(l)[2], 1e-6);
  EXPECT_TRUE(t.top.empty());
  Sampler none(params_with([](SamplingParams& p) { p.temperature = 0; }), {});
  const SampledToken n = sample_once(none, l);
  EXPECT_EQ(n.logprob, 0.0f);
  EXPECT_TRUE(n.top.empty());
}

TEST(Sampler, LogprobsOverTheWholeVocabularyTiesToTheLowerId) {
  const std::vector<float> l = {1.0f, 3.0f, 1.0f, 3.0f};
  Sampler s(params_with([](SamplingParams& p) {
              p.temperature = 0;
              p.logprobs = 4;
            }),
            {});
  const SampledToken t = sample_once(s, l);
  ASSERT_EQ(t.top.size(), 4u);
  EXPECT_EQ(t.top[0].id, 1);
  EXPECT_EQ(t.top[1].id, 3);
  EXPECT_EQ(t.top[2].id, 0);
  EXPECT_EQ(t.top[3].id, 2);
  double total = 0;
  for (const TokenLogprob& e : t.top) total += std::exp(e.logprob);
  EXPECT_NEAR(total, 1.0, 1e-6);
}

// ---- Seeds -------------------------------------------------------------------------------------

std::vector<int32_t> draw_sequence(Sampler& s, int n) {
  const std::vector<float> l(100, 0.0f);  // uniform over 100 tokens
  std::vector<int32_t> ids;
  for (int i = 0; i < n; ++i) ids.push_back(sample_once(s, l).id);
  return ids;
}

TEST(Sampler, SameSeedSameTokensDifferentSeedDifferentTokens) {
  auto seeded = [](uint64_t seed) {
    return params_with([seed](SamplingParams& p) { p.seed = seed; });
  };
  Sampler a(seeded(42), {}), b(seeded(42), {}), c(seeded(43), {});
  const std::vector<int32_t> sa = draw_sequence(a, 50);
  EXPECT_EQ(sa, draw_sequence(b, 50));
  EXPECT_NE(sa, draw_sequence(c, 50));  // equal with probability 1e-100
  EXPECT_EQ(a.seed(), 42u);
}

TEST(Sampler, WithoutASeedEachSamplerDrawsItsOwn) {
  SamplingParams p;  // no seed
  Sampler a(p, {}), b(p, {});
  EXPECT_NE(a.seed(), b.seed());
  EXPECT_NE(draw_sequence(a, 50), draw_sequence(b, 50));
  // The seed it drew reproduces its tokens.
  Sampler a2(params_with([&](SamplingParams& q) { q.seed = a.seed(); }), {});
  Sampler a3(params_with([&](SamplingParams& q) { q.seed = a.seed(); }), {});
  EXPECT_EQ(draw_sequence(a2, 20), draw_sequence(a3, 20));
}

TEST(Sampler, ASeedGivesTheSameTokensOnEveryPlatform) {
  // xoshiro256** seeded by splitmix64 is integer arithmetic only; the uniform draw over 100 equal
  // weights is exact in double. This sequence is fixed (it was checked against an independent
  // Python implementation of both generators): a change breaks the reproducibility of seeds.
  Sampler s(params_with([](SamplingParams& p) { p.seed = 2024; }), {});
  EXPECT_EQ(draw_sequence(s, 8), (std::vector<int32_t>{5, 78, 7, 15, 77, 24, 39, 25}));
}

// ---- validate ----------------------------------------------------------------------------------

TEST(SamplingParams, DefaultsAreValid) {
  EXPECT_TRUE(SamplingParams{}.validate(256).ok());
  EXPECT_EQ(SamplingParams{}.temperature, 1.0f);
  EXPECT_FALSE(SamplingParams{}.seed.has_value());
}

TEST(SamplingParams, ValidateNamesTheParameter) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<std::pair<std::function<void(SamplingParams&)>, std::string>> cases = {
      {[](SamplingParams& p) { p.temperature = -1; }, "temperature must be >= 0, got -1"},
      {[&](SamplingParams& p) { p.temperature = nan; }, "temperature must be >= 0, got nan"},
      {[](SamplingParams& p) { p.temperature = kInf; }, "temperature must be a finite number"},
      {[](SamplingParams& p) { p.top_p = 0; }, "top_p must be in (0, 1], got 0"},
      {[](SamplingParams& p) { p.top_p = 1.5f; }, "top_p must be in (0, 1], got 1.5"},
      {[](SamplingParams& p) { p.top_k = -2; }, "top_k must be -1 or 0 (off) or a positive"},
      {[](SamplingParams& p) { p.min_p = 1.5f; }, "min_p must be in [0, 1], got 1.5"},
      {[](SamplingParams& p) { p.min_p = -0.1f; }, "min_p must be in [0, 1]"},
      {[](SamplingParams& p) { p.presence_penalty = 2.5f; },
       "presence_penalty must be in [-2, 2], got 2.5"},
      {[](SamplingParams& p) { p.frequency_penalty = -3; },
       "frequency_penalty must be in [-2, 2], got -3"},
      {[](SamplingParams& p) { p.repetition_penalty = 0; }, "repetition_penalty must be"},
      {[](SamplingParams& p) {
         p.logit_bias = {{1, 1.0f}, {99999, 1.0f}};
       },
       "logit_bias: token id 99999 is out of range [0, 256)"},
      {[](SamplingParams& p) {
         p.logit_bias = {{-1, 1.0f}};
       },
       "logit_bias: token id -1 is out of range"},
      {[](SamplingParams& p) {
         p.logit_bias = {{3, 101.0f}};
       },
       "logit_bias: the bias of token id 3 must be in [-100, 100], got 101"},
      {[](SamplingParams& p) { p.max_tokens = -1; }, "max_tokens must be >= 0, got -1"},
      {[](SamplingParams& p) { p.max_tokens = INT64_MAX; },
       "max_tokens must be <= 2147483647, got 9223372036854775807"},
      {[](SamplingParams& p) { p.min_tokens = -1; }, "min_tokens must be >= 0, got -1"},
      {[](SamplingParams& p) { p.min_tokens = 17; },
       "min_tokens must be <= max_tokens (16), got 17"},
      {[](SamplingParams& p) { p.stop_token_ids = {256}; },
       "stop_token_ids: token id 256 is out of range [0, 256)"},
      {[](SamplingParams& p) { p.logprobs = -2; }, "logprobs must be -1 (none) or >= 0, got -2"},
      {[](SamplingParams& p) { p.logprobs = 257; },
       "logprobs must be <= the vocabulary size (256), got 257"},
  };
  for (const auto& [set, message] : cases) {
    SamplingParams p;
    set(p);
    const Status s = p.validate(256);
    ASSERT_FALSE(s.ok()) << message;
    EXPECT_NE(s.error().message().find(message), std::string::npos)
        << "got \"" << s.error().message() << "\", expected it to contain \"" << message << "\"";
  }
}

TEST(SamplingParams, ValidateAcceptsTheEdgesOfEachRange) {
  SamplingParams p;
  p.temperature = 0;
  p.top_p = 1;
  p.top_k = -1;
  p.min_p = 1;
  p.presence_penalty = -2;
  p.frequency_penalty = 2;
  p.repetition_penalty = 0.01f;
  p.logit_bias = {{0, -100.0f}, {255, 100.0f}};
  p.max_tokens = 0;
  p.min_tokens = 0;
  p.stop_token_ids = {0, 255};
  p.logprobs = 256;
  const Status s = p.validate(256);
  EXPECT_TRUE(s.ok()) << s.error().message();
}

}  // namespace
}  // namespace moemesh
