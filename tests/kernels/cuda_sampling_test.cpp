// The CUDA argmax and sample against a host implementation of core/sampling.cpp's rule (steps
// 5-10 of core/sampling.h, with the uniform number given).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cuda/cuda_kernels.h"
#include "tests/kernels/cuda_test_util.h"

namespace moemesh::kernels::cuda {
namespace {

namespace ct = ::moemesh::kernels::cuda::testing;

constexpr float kInf = std::numeric_limits<float>::infinity();

// The first index of the largest value; NaN and -inf never win; 0 when nothing is larger.
int32_t ref_argmax(const float* v, int64_t n) {
  int32_t best = -1;
  for (int64_t i = 0; i < n; ++i)
    if (v[i] > -kInf && (best < 0 || v[i] > v[best])) best = static_cast<int32_t>(i);
  return best < 0 ? 0 : best;
}

struct Params {
  float temperature, top_p;
  int32_t top_k;
  float min_p, uniform;
};

// Why a row's result could depend on float32 rounding that differs between the host's exp and
// the GPU's (a few ulps, so that any running mass may differ by up to ~4e-7 of the total): a
// weight within 1e-5 of min_p, a running mass within 1e-6 of the total from the top_p target,
// the uniform draw within 1e-6 of the total from a boundary between two tokens.
enum Fragile : int { kNone = 0, kMinP = 1, kTopP = 2, kDraw = 4 };

// core/sampling.cpp's Sampler::sample_random, spelled out with a full sort.
int32_t ref_sample(const float* raw, int64_t V, const Params& p, int* fragile) {
  *fragile = kNone;
  if (p.temperature < 1e-5f) return ref_argmax(raw, V);
  std::vector<float> l(raw, raw + V);
  for (float& x : l) x /= p.temperature;
  float mx = -kInf;
  for (float x : l) mx = x > mx ? x : mx;
  if (!(mx > -kInf)) return 0;
  std::vector<float> w(V);
  double total = 0;
  int64_t n_left = 0;
  for (int64_t i = 0; i < V; ++i) {
    float wi = l[i] == mx ? 1.0f : std::exp(l[i] - mx);
    if (p.min_p > 0 && wi > 0 && std::abs(wi - p.min_p) <= 1e-5f * p.min_p) *fragile |= kMinP;
    if (!(wi >= p.min_p) || !(wi > 0)) wi = 0;
    w[i] = wi;
    total += wi;
    n_left += wi > 0;
  }
  auto draw = [&](const std::vector<int32_t>& order, double sum) {
    const double x = static_cast<double>(p.uniform) * sum;
    double before = 0;
    for (std::size_t k = 0; k < order.size(); ++k) {
      const double after = before + w[order[k]];
      if (x < after) {
        if ((k > 0 && x - before < 1e-6 * sum) || (k + 1 < order.size() && after - x < 1e-6 * sum))
          *fragile |= kDraw;
        return order[k];
      }
      before = after;
    }
    return order.back();
  };
  std::vector<int32_t> order;
  for (int64_t i = 0; i < V; ++i)
    if (w[i] > 0) order.push_back(static_cast<int32_t>(i));
  const bool use_k = p.top_k > 0 && p.top_k < n_left;
  const bool use_p = p.top_p < 1.0f;
  if (!use_k && !use_p) return draw(order, total);  // in id order

  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return l[a] > l[b]; });
  if (use_k) {
    order.resize(p.top_k);
    total = 0;
    for (int32_t c : order) total += w[c];
  }
  if (use_p) {
    const double target = static_cast<double>(p.top_p) * total;
    double mass = 0;
    std::size_t keep = 0;
    while (keep < order.size() && mass < target) {
      const double before = mass;
      mass += w[order[keep++]];
      if (mass >= target && (target - before < 1e-6 * total || mass - target < 1e-6 * total))
        *fragile |= kTopP;
    }
    order.resize(std::max<std::size_t>(keep, 1));
    total = 0;
    for (int32_t c : order) total += w[c];
  }
  return draw(order, total);
}

struct Batch {
  std::vector<float> temperature, top_p, min_p, uniform;
  std::vector<int32_t> top_k;
};

std::vector<int32_t> sample_on_gpu(const std::vector<float>& logits, int64_t n, int64_t vocab,
                                   const Batch& b) {
  DeviceBuffer d_logits = ct::upload(logits);
  DeviceBuffer d_t = ct::upload(b.temperature);
  DeviceBuffer d_p = ct::upload(b.top_p);
  DeviceBuffer d_k = ct::upload(b.top_k);
  DeviceBuffer d_m = ct::upload(b.min_p);
  DeviceBuffer d_u = ct::upload(b.uniform);
  DeviceBuffer d_ids = ct::poisoned<int32_t>(n);
  SamplingBatch params;
  params.temperature = d_t.as<float>();
  params.top_p = d_p.as<float>();
  params.top_k = d_k.as<int32_t>();
  params.min_p = d_m.as<float>();
  params.uniform = d_u.as<float>();
  sample(d_logits.as<float>(), n, vocab, params, d_ids.as<int32_t>(), nullptr);
  EXPECT_EQ(check("sample"), "");
  return ct::download<int32_t>(d_ids, n);
}

std::vector<int32_t> argmax_on_gpu(const std::vector<float>& logits, int64_t n, int64_t vocab) {
  DeviceBuffer d_logits = ct::upload(logits);
  DeviceBuffer d_ids = ct::poisoned<int32_t>(n);
  argmax(d_logits.as<float>(), n, vocab, d_ids.as<int32_t>(), nullptr);
  EXPECT_EQ(check("argmax"), "");
  return ct::download<int32_t>(d_ids, n);
}

// Rows of random logits; every third row on a coarse grid (many exact ties), some rows with
// masked (-inf) tokens and a NaN.
std::vector<float> test_logits(int64_t n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_int_distribution<int64_t> any(0, vocab - 1);
  std::vector<float> out(n * vocab);
  for (int64_t t = 0; t < n; ++t) {
    float* row = out.data() + t * vocab;
    for (int64_t i = 0; i < vocab; ++i) row[i] = normal(rng);
    if (t % 3 == 1)
      for (int64_t i = 0; i < vocab; ++i) row[i] = std::round(row[i] * 2.0f) / 2.0f;
    if (t % 4 == 2 && vocab > 2) {
      for (int64_t k = 0; k < vocab / 20 + 1; ++k) row[any(rng)] = -kInf;
      row[any(rng)] = std::numeric_limits<float>::quiet_NaN();
    }
  }
  return out;
}

TEST(CudaSampling, ArgmaxMatchesTheFirstLargest) {
  MOEMESH_REQUIRE_GPU();
  for (const int64_t vocab : {1, 7, 33, 1000, 151936}) {
    const int64_t n = vocab > 1000 ? 9 : 300;
    std::vector<float> logits = test_logits(n, vocab, static_cast<uint32_t>(vocab));
    if (vocab > 2) {
      // Row 0: the largest value twice; row 1: all NaN; row 2: all -inf; row 3: +inf twice.
      float* r0 = logits.data();
      r0[vocab - 1] = r0[vocab / 2] = 100.0f;
      std::fill_n(logits.data() + vocab, vocab, std::numeric_limits<float>::quiet_NaN());
      std::fill_n(logits.data() + 2 * vocab, vocab, -kInf);
      logits[3 * vocab + vocab - 2] = logits[3 * vocab + vocab - 1] = kInf;
    }
    const std::vector<int32_t> got = argmax_on_gpu(logits, n, vocab);
    for (int64_t t = 0; t < n; ++t)
      ASSERT_EQ(got[t], ref_argmax(logits.data() + t * vocab, vocab))
          << "vocab " << vocab << " row " << t;
    if (vocab > 2) {
      EXPECT_EQ(got[0], vocab / 2);
      EXPECT_EQ(got[1], 0);
      EXPECT_EQ(got[2], 0);
      EXPECT_EQ(got[3], vocab - 2);
    }
  }
}

TEST(CudaSampling, MatchesTheCpuRuleWithTheSameUniforms) {
  MOEMESH_REQUIRE_GPU();
  // temperature, top_p, top_k, min_p (uniform filled in per row).
  const Params configs[] = {{1.0f, 1.0f, 0, 0.0f, 0},    // plain: the draw in id order
                            {0.7f, 1.0f, 50, 0.0f, 0},   // top_k
                            {1.3f, 0.9f, 0, 0.0f, 0},    // top_p
                            {0.8f, 0.8f, 40, 0.05f, 0},  // everything
                            {1.0f, 1.0f, 0, 0.1f, 0},    // min_p alone: still in id order
                            {1.0f, 1.0f, 1, 0.0f, 0},  // top_k 1: the argmax of the tempered logits
                            {1.0f, 1.0f, 1 << 30, 0.0f, 0},  // top_k above the tokens left: off
                            {0.9f, 0.01f, 0, 0.0f, 0},       // a tiny top_p keeps one token
                            {1.0f, 0.95f, 5, 0.0f, 0},       // top_p within a small top_k
                            {0.5f, 0.6f, 0, 0.2f, 0},        // top_p after a strong min_p
                            {0.0f, 1.0f, 0, 0.0f, 0},        // greedy
                            {9e-6f, 0.5f, 3, 0.0f, 0}};      // below the greedy epsilon
  const int n_configs = static_cast<int>(std::size(configs));
  for (const int64_t vocab : {1, 7, 33, 1000, 32000, 151936, 256000}) {
    const int64_t n = vocab >= 32000 ? 2 * n_configs : 300;
    const std::vector<float> logits = test_logits(n, vocab, static_cast<uint32_t>(vocab + 1));
    std::mt19937 rng(static_cast<uint32_t>(vocab));
    std::uniform_real_distribution<float> unif(0.0f, 1.0f);
    Batch b;
    std::vector<int32_t> ref(n);
    int adjusted = 0;
    for (int64_t t = 0; t < n; ++t) {
      Params p = configs[t % n_configs];
      p.uniform = unif(rng);
      if (t % 50 == 7) p.uniform = 0.0f;
      if (t % 50 == 8) p.uniform = std::nextafter(1.0f, 0.0f);
      int fragile = kNone;
      for (int attempt = 0; attempt < 50; ++attempt) {
        ref[t] = ref_sample(logits.data() + t * vocab, vocab, p, &fragile);
        if (fragile == kNone) break;
        ++adjusted;
        if (fragile & kMinP) p.min_p *= 0.999f;
        if (fragile & kTopP) p.top_p -= 0.0007f;
        if (fragile & kDraw) p.uniform = std::fmod(p.uniform + 0.0123f, 1.0f);
      }
      ASSERT_EQ(fragile, kNone) << "no robust parameters for row " << t;
      b.temperature.push_back(p.temperature);
      b.top_p.push_back(p.top_p);
      b.top_k.push_back(p.top_k);
      b.min_p.push_back(p.min_p);
      b.uniform.push_back(p.uniform);
    }
    const std::vector<int32_t> got = sample_on_gpu(logits, n, vocab, b);
    int wrong = 0;
    for (int64_t t = 0; t < n; ++t)
      if (got[t] != ref[t] && ++wrong <= 10)
        ADD_FAILURE() << "vocab " << vocab << " row " << t << " (temperature " << b.temperature[t]
                      << " top_p " << b.top_p[t] << " top_k " << b.top_k[t] << " min_p "
                      << b.min_p[t] << " uniform " << b.uniform[t] << "): " << got[t] << ", CPU "
                      << ref[t];
    EXPECT_EQ(wrong, 0) << "vocab " << vocab << " (" << adjusted << " rows adjusted)";

    // Greedy rows are the argmax of the raw logits.
    const std::vector<int32_t> am = argmax_on_gpu(logits, n, vocab);
    for (int64_t t = 0; t < n; ++t) {
      if (b.temperature[t] < 1e-5f) {
        EXPECT_EQ(got[t], am[t]) << "vocab " << vocab << " row " << t;
      }
    }
  }
}

// One row, one parameter set, one uniform: the id drawn on the GPU.
int32_t draw_one(const std::vector<float>& logits, Params p) {
  Batch b{{p.temperature}, {p.top_p}, {p.min_p}, {p.uniform}, {p.top_k}};
  return sample_on_gpu(logits, 1, static_cast<int64_t>(logits.size()), b)[0];
}

TEST(CudaSampling, FixedUniformsPickTheInverseCdfToken) {
  MOEMESH_REQUIRE_GPU();
  // Weights 1 : 3 : 2 : 4 (sum 10).
  const std::vector<float> logits = {std::log(1.0f), std::log(3.0f), std::log(2.0f),
                                     std::log(4.0f)};
  // No top_k / top_p: cumulative in id order 1, 4, 6, 10.
  EXPECT_EQ(draw_one(logits, {1.0f, 1.0f, 0, 0.0f, 0.05f}), 0);
  EXPECT_EQ(draw_one(logits, {1.0f, 1.0f, 0, 0.0f, 0.35f}), 1);
  EXPECT_EQ(draw_one(logits, {1.0f, 1.0f, 0, 0.0f, 0.55f}), 2);
  EXPECT_EQ(draw_one(logits, {1.0f, 1.0f, 4, 0.0f, 0.95f}), 3);  // top_k = all: off
  // top_p < 1: most likely first, 4, 7, 9, 10.
  EXPECT_EQ(draw_one(logits, {1.0f, 0.999f, 0, 0.0f, 0.05f}), 3);
  EXPECT_EQ(draw_one(logits, {1.0f, 0.999f, 0, 0.0f, 0.35f}), 3);
  EXPECT_EQ(draw_one(logits, {1.0f, 0.999f, 0, 0.0f, 0.55f}), 1);
  EXPECT_EQ(draw_one(logits, {1.0f, 0.999f, 0, 0.0f, 0.85f}), 2);
  EXPECT_EQ(draw_one(logits, {1.0f, 0.999f, 0, 0.0f, 0.95f}), 0);
  // top_k 2 keeps 3 and 1 (sum 7): 4/7 = 0.571.
  EXPECT_EQ(draw_one(logits, {1.0f, 1.0f, 2, 0.0f, 0.55f}), 3);
  EXPECT_EQ(draw_one(logits, {1.0f, 1.0f, 2, 0.0f, 0.6f}), 1);
  // top_p 0.5: the mass before token 1 (0.4) is < 0.5, so 3 and 1 stay.
  EXPECT_EQ(draw_one(logits, {1.0f, 0.5f, 0, 0.0f, 0.6f}), 1);
  // top_p 0.39: the mass before token 1 (0.4) is not < 0.39: token 3 alone.
  EXPECT_EQ(draw_one(logits, {1.0f, 0.39f, 0, 0.0f, 0.99f}), 3);
  // min_p 0.6 drops everything below 0.6 * 4: tokens 3 and 1 are left, in id order.
  EXPECT_EQ(draw_one(logits, {1.0f, 1.0f, 0, 0.6f, 0.3f}), 1);
  EXPECT_EQ(draw_one(logits, {1.0f, 1.0f, 0, 0.6f, 0.5f}), 3);
}

TEST(CudaSampling, EqualLogitsKeepTheLowerIds) {
  MOEMESH_REQUIRE_GPU();
  const std::vector<float> flat(1000, 0.25f);
  // top_k 10 keeps ids 0..9, each of weight 1: 0.55 * 10 = 5.5 falls in id 5.
  EXPECT_EQ(draw_one(flat, {1.0f, 1.0f, 10, 0.0f, 0.55f}), 5);
  // top_p 0.5 keeps ids 0..499 (before id 500 the mass is 500, not < 500).
  EXPECT_EQ(draw_one(flat, {1.0f, 0.5f, 0, 0.0f, 0.999f}), 499);
  EXPECT_EQ(draw_one(flat, {1.0f, 0.5f, 0, 0.0f, 0.0f}), 0);
  // Both: top_p 0.35 of ids 0..9 keeps 0..3.
  EXPECT_EQ(draw_one(flat, {1.0f, 0.35f, 10, 0.0f, 0.99f}), 3);
  // No cut: the draw in id order over all 1000.
  EXPECT_EQ(draw_one(flat, {1.0f, 1.0f, 0, 0.0f, 0.7777f}), 777);
  // A run of ties straddling the top_k cut: ids 500..999 are the larger ones.
  std::vector<float> steps(1000, 0.0f);
  std::fill(steps.begin() + 500, steps.end(), 1.0f);
  EXPECT_EQ(draw_one(steps, {1.0f, 1.0f, 3, 0.0f, 0.9f}), 502);
  EXPECT_EQ(draw_one(steps, {1.0f, 0.99f, 0, 0.0f, 0.0f}), 500);
}

TEST(CudaSampling, MaskedRowsGiveTheLowestId) {
  MOEMESH_REQUIRE_GPU();
  std::vector<float> masked(77, -kInf);
  EXPECT_EQ(draw_one(masked, {1.0f, 0.9f, 5, 0.0f, 0.5f}), 0);
  masked[40] = 3.0f;  // the only token left
  EXPECT_EQ(draw_one(masked, {1.0f, 0.9f, 5, 0.0f, 0.5f}), 40);
  EXPECT_EQ(draw_one(masked, {1.0f, 1.0f, 0, 0.0f, 0.99f}), 40);
  masked[41] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(draw_one(masked, {1.0f, 1.0f, 0, 0.0f, 0.99f}), 40);
}

}  // namespace
}  // namespace moemesh::kernels::cuda
