// The CUDA router (route_topk) against kernels/cpu grouped_topk and softmax_topk.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

struct Routed {
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

Routed run_gpu(const std::vector<float>& logits, const std::vector<float>* bias, int64_t n,
               const RouterSpec& spec) {
  DeviceBuffer d_logits = ct::upload(logits);
  DeviceBuffer d_bias = bias ? ct::upload(*bias) : DeviceBuffer();
  DeviceBuffer d_ids = ct::poisoned<int32_t>(n * spec.top_k);
  DeviceBuffer d_w = ct::poisoned<float>(n * spec.top_k);
  route_topk(d_logits.as<float>(), bias ? d_bias.as<float>() : nullptr, n, spec,
             d_ids.as<int32_t>(), d_w.as<float>(), nullptr);
  EXPECT_EQ(check("route_topk"), "");
  return {ct::download<int32_t>(d_ids, n * spec.top_k), ct::download<float>(d_w, n * spec.top_k)};
}

Routed run_cpu(const std::vector<float>& logits, const std::vector<float>* bias, int64_t n,
               const RouterSpec& spec) {
  Routed r{std::vector<int32_t>(n * spec.top_k), std::vector<float>(n * spec.top_k)};
  grouped_topk(logits.data(), bias ? bias->data() : nullptr, n, spec.n_experts, spec.top_k,
               spec.scoring == Scoring::Sigmoid, spec.renormalize, spec.scaling, spec.n_groups,
               spec.topk_groups, spec.group_score == GroupScore::Top2Sum, r.ids.data(),
               r.weights.data());
  return r;
}

void expect_same(const Routed& got, const Routed& ref, int64_t top_k, const std::string& what) {
  ASSERT_EQ(got.ids.size(), ref.ids.size());
  int wrong = 0;
  for (std::size_t i = 0; i < got.ids.size(); ++i) {
    const bool ok =
        got.ids[i] == ref.ids[i] && std::abs(got.weights[i] - ref.weights[i]) <=
                                        1e-5f * std::max(std::abs(ref.weights[i]), 1e-6f);
    if (!ok && ++wrong <= 5)
      ADD_FAILURE() << what << ": token " << static_cast<int64_t>(i) / top_k << " rank "
                    << static_cast<int64_t>(i) % top_k << ": expert " << got.ids[i] << " weight "
                    << got.weights[i] << ", CPU expert " << ref.ids[i] << " weight "
                    << ref.weights[i];
  }
}

// Logits on a grid of distinct values (a random permutation per token), so that the scores of
// any two experts differ by far more than the float32 rounding of exp in two libraries.
std::vector<float> grid_logits(int64_t n, int64_t experts, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<float> out(n * experts);
  std::vector<int32_t> perm(experts);
  const float step = 4.0f / static_cast<float>(experts);
  for (int64_t t = 0; t < n; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int64_t e = 0; e < experts; ++e)
      out[t * experts + e] = (static_cast<float>(perm[e]) - experts / 2.0f) * step;
  }
  return out;
}

// True when, in double precision, no two biased scores and no two group ranks of this token are
// closer than 1e-5 of their size: then the few float32 ulps by which the GPU's scores may differ
// from the CPU's cannot change a choice.
bool well_separated(const float* logits, const std::vector<float>* bias, const RouterSpec& spec) {
  const int64_t E = spec.n_experts;
  std::vector<double> choice(E);
  double mx = logits[0], sum = 0;
  for (int64_t e = 1; e < E; ++e) mx = std::max(mx, double(logits[e]));
  for (int64_t e = 0; e < E; ++e) sum += std::exp(logits[e] - mx);
  for (int64_t e = 0; e < E; ++e) {
    choice[e] = spec.scoring == Scoring::Sigmoid ? 1.0 / (1.0 + std::exp(-double(logits[e])))
                                                 : std::exp(logits[e] - mx) / sum;
    if (bias) choice[e] += (*bias)[e];
  }
  auto separated = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    for (std::size_t i = 1; i < v.size(); ++i)
      if (v[i] - v[i - 1] <= 1e-5 * std::max(std::abs(v[i]), 1e-6)) return false;
    return true;
  };
  if (!separated(choice)) return false;
  if (spec.n_groups <= 1 || spec.topk_groups >= spec.n_groups) return true;
  const int64_t size = E / spec.n_groups;
  std::vector<double> rank(spec.n_groups);
  for (int64_t g = 0; g < spec.n_groups; ++g) {
    std::vector<double> v(choice.begin() + g * size, choice.begin() + (g + 1) * size);
    std::sort(v.rbegin(), v.rend());
    rank[g] = spec.group_score == GroupScore::Top2Sum && size > 1 ? v[0] + v[1] : v[0];
  }
  return separated(rank);
}

// grid_logits, each token reshuffled until it is well separated.
std::vector<float> separated_logits(int64_t n, const RouterSpec& spec,
                                    const std::vector<float>* bias, uint32_t seed) {
  const int64_t E = spec.n_experts;
  std::vector<float> out(n * E);
  for (int64_t t = 0; t < n; ++t) {
    for (uint32_t attempt = 0;; ++attempt) {
      const std::vector<float> row = grid_logits(1, E, seed + 7919u * attempt);
      if (well_separated(row.data(), bias, spec) || attempt == 100) {
        std::copy(row.begin(), row.end(), out.begin() + t * E);
        break;
      }
    }
    seed += 104729u;
  }
  return out;
}

struct Case {
  const char* name;
  RouterSpec spec;
  bool bias;
};

RouterSpec spec_of(int64_t experts, int64_t k, Scoring scoring, bool renorm, float scaling,
                   int64_t groups, int64_t topk_groups, GroupScore gs) {
  RouterSpec s;
  s.n_experts = experts;
  s.top_k = k;
  s.scoring = scoring;
  s.renormalize = renorm;
  s.scaling = scaling;
  s.n_groups = groups;
  s.topk_groups = topk_groups;
  s.group_score = gs;
  return s;
}

TEST(CudaRouting, MatchesCpuGroupedTopk) {
  MOEMESH_REQUIRE_GPU();
  const Case cases[] = {
      {"deepseek-v3", spec_of(256, 8, Scoring::Sigmoid, true, 2.5f, 8, 4, GroupScore::Top2Sum),
       true},
      {"deepseek-v2", spec_of(160, 6, Scoring::Softmax, false, 16.0f, 8, 3, GroupScore::Max),
       false},
      {"mixtral", spec_of(8, 2, Scoring::Softmax, true, 1.0f, 1, 1, GroupScore::Max), false},
      {"qwen3", spec_of(128, 8, Scoring::Softmax, true, 1.0f, 1, 1, GroupScore::Max), false},
      {"sigmoid-bias-nogroups", spec_of(64, 6, Scoring::Sigmoid, true, 1.0f, 1, 1, GroupScore::Max),
       true},
      {"odd", spec_of(5, 3, Scoring::Softmax, false, 1.0f, 1, 1, GroupScore::Max), false},
      {"one-expert", spec_of(1, 1, Scoring::Softmax, true, 1.0f, 1, 1, GroupScore::Max), false},
      {"max-size", spec_of(512, 32, Scoring::Softmax, true, 1.0f, 16, 5, GroupScore::Top2Sum),
       true},
      {"every-expert", spec_of(32, 32, Scoring::Sigmoid, false, 1.0f, 4, 2, GroupScore::Max),
       false},  // chosen groups hold too few experts: the rest come from the others
      {"groups-of-one", spec_of(12, 3, Scoring::Sigmoid, true, 1.5f, 12, 5, GroupScore::Top2Sum),
       true},
      {"many-groups", spec_of(320, 9, Scoring::Softmax, false, 1.0f, 64, 40, GroupScore::Max),
       false}};
  for (const Case& c : cases) {
    for (const int64_t n : {1, 7, 300}) {
      const auto seed = static_cast<uint32_t>(n * 7 + c.spec.n_experts);
      // A bias of the size of DeepSeek-V3's, enough to reorder experts.
      std::vector<float> bias = grid_logits(1, c.spec.n_experts, seed + 1);
      for (float& x : bias) x *= 0.05f;
      const std::vector<float>* b = c.bias ? &bias : nullptr;
      const std::vector<float> logits = separated_logits(n, c.spec, b, seed);
      const std::string what = std::string(c.name) + " n " + std::to_string(n);
      expect_same(run_gpu(logits, b, n, c.spec), run_cpu(logits, b, n, c.spec), c.spec.top_k, what);
    }
  }
}

TEST(CudaRouting, PlainSoftmaxMatchesSoftmaxTopk) {
  MOEMESH_REQUIRE_GPU();
  for (const int64_t experts : {4, 60, 128}) {
    for (const bool renorm : {false, true}) {
      const int64_t n = 33, k = std::min<int64_t>(experts, 4);
      const RouterSpec spec =
          spec_of(experts, k, Scoring::Softmax, renorm, 1.0f, 1, 1, GroupScore::Max);
      const std::vector<float> logits = separated_logits(n, spec, nullptr, 5);
      Routed ref{std::vector<int32_t>(n * k), std::vector<float>(n * k)};
      softmax_topk(logits.data(), n, experts, k, renorm, ref.ids.data(), ref.weights.data());
      expect_same(run_gpu(logits, nullptr, n, spec), ref, k,
                  "softmax_topk experts " + std::to_string(experts));
    }
  }
}

TEST(CudaRouting, TiesGoToLowerIdsAndLowerGroups) {
  MOEMESH_REQUIRE_GPU();
  // Equal logits give bit-identical scores on both sides: every tie is exercised.
  const int64_t n = 4, experts = 16;
  std::vector<float> logits(n * experts, 0.5f);  // token 0: all equal
  for (int64_t e = 0; e < experts; ++e) {
    logits[1 * experts + e] = static_cast<float>(e % 3);               // token 1: three levels
    logits[2 * experts + e] = e >= 8 ? 1.0f : (e == 3 ? 1.0f : 0.0f);  // token 2: group tie
    logits[3 * experts + e] = static_cast<float>((experts - e) / 4);   // token 3: runs of four
  }
  for (const RouterSpec& spec :
       {spec_of(experts, 5, Scoring::Softmax, true, 1.0f, 1, 1, GroupScore::Max),
        spec_of(experts, 5, Scoring::Sigmoid, false, 1.0f, 4, 2, GroupScore::Max),
        spec_of(experts, 3, Scoring::Softmax, true, 1.0f, 4, 1, GroupScore::Top2Sum),
        spec_of(experts, 6, Scoring::Sigmoid, true, 2.0f, 8, 3, GroupScore::Top2Sum)}) {
    const Routed ref = run_cpu(logits, nullptr, n, spec);
    expect_same(run_gpu(logits, nullptr, n, spec), ref, spec.top_k,
                "ties, k " + std::to_string(spec.top_k));
  }
  // All equal, no groups: the lowest ids in order.
  const Routed all = run_gpu(
      logits, nullptr, n, spec_of(experts, 5, Scoring::Softmax, true, 1.0f, 1, 1, GroupScore::Max));
  for (int32_t i = 0; i < 5; ++i) EXPECT_EQ(all.ids[i], i);
}

TEST(CudaRouting, UnsupportedShapesFailTheLaunch) {
  MOEMESH_REQUIRE_GPU();
  const std::vector<float> logits(2 * 600, 0.0f);
  DeviceBuffer d_logits = ct::upload(logits);
  DeviceBuffer d_ids = ct::poisoned<int32_t>(2 * 40);
  DeviceBuffer d_w = ct::poisoned<float>(2 * 40);
  ASSERT_EQ(check("before"), "");
  for (const RouterSpec& spec :
       {spec_of(600, 8, Scoring::Softmax, true, 1.0f, 1, 1, GroupScore::Max),    // > 512 experts
        spec_of(64, 40, Scoring::Softmax, true, 1.0f, 1, 1, GroupScore::Max),    // top_k > 32
        spec_of(60, 4, Scoring::Softmax, true, 1.0f, 8, 2, GroupScore::Max)}) {  // 8 ∤ 60
    route_topk(d_logits.as<float>(), nullptr, 2, spec, d_ids.as<int32_t>(), d_w.as<float>(),
               nullptr);
    EXPECT_NE(check("route_topk"), "") << spec.n_experts << " experts, top_k " << spec.top_k;
  }
  EXPECT_EQ(synchronize(nullptr, "after"), "");
}

// dbrx's router weights divided by their p-norm, p = 1, 2 and 3, against the formula in double.
TEST(CudaRouting, DivideByPNorm) {
  MOEMESH_REQUIRE_GPU();
  const int64_t n = 1000, k = 4;
  const auto w = ct::random_floats(static_cast<std::size_t>(n * k), 17, 0.01f, 1.0f);
  for (double p : {1.0, 2.0, 3.0}) {
    std::vector<float> want(w.size());
    for (int64_t t = 0; t < n; ++t) {
      double acc = 0;
      for (int64_t j = 0; j < k; ++j) acc += std::pow(std::fabs(double{w[t * k + j]}), p);
      const double norm = std::pow(acc, 1.0 / p);
      for (int64_t j = 0; j < k; ++j)
        want[t * k + j] = static_cast<float>(w[t * k + j] / static_cast<float>(norm));
    }
    auto d = ct::upload(w);
    divide_by_p_norm(d.as<float>(), n, k, p, nullptr);
    ASSERT_EQ(synchronize(nullptr, "divide_by_p_norm"), "");
    EXPECT_LT(ct::rel_error(ct::download<float>(d, w.size()), want), 1e-6) << "p=" << p;
  }
  // Rows wider than any router's top k fail the launch.
  ASSERT_EQ(check("before"), "");
  auto d = ct::upload(w);
  divide_by_p_norm(d.as<float>(), 1, 33, 1.0, nullptr);
  EXPECT_NE(check("divide_by_p_norm"), "");
  EXPECT_EQ(synchronize(nullptr, "after"), "");
}

}  // namespace
}  // namespace moemesh::kernels::cuda
