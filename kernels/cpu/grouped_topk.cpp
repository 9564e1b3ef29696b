// The general MoE router: softmax or sigmoid scores, a choice bias, group-limited selection.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"

namespace moemesh::kernels {
namespace {

// NaN ranks as -inf, so that the orders below stay strict weak orders.
float rank_key(float v) {
  return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v;
}

}  // namespace

void grouped_topk(const float* logits, const float* bias, int64_t n_tokens, int64_t n_experts,
                  int64_t top_k, bool sigmoid, bool renormalize, float scaling, int64_t n_groups,
                  int64_t topk_groups, bool group_top2_sum, int32_t* ids, float* weights) {
  const auto E = static_cast<std::size_t>(n_experts);
  std::vector<float> scores(E);
  std::vector<float> choice(E);
  std::vector<uint8_t> allowed(E, 1);
  std::vector<int32_t> order(E);
  const bool grouped = n_groups > 1 && topk_groups < n_groups;
  const int64_t group_size = grouped ? n_experts / n_groups : n_experts;
  const int64_t kept_groups = std::max<int64_t>(topk_groups, 0);
  std::vector<float> group_rank(static_cast<std::size_t>(grouped ? n_groups : 0));
  std::vector<int32_t> group_order(group_rank.size());

  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* l = logits + t * n_experts;
    if (sigmoid) {
      for (std::size_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-l[e]));
    } else {
      // The same arithmetic as softmax_topk, so that the plain configuration matches it exactly.
      const float mx = *std::max_element(l, l + n_experts);
      float sum = 0;
      for (std::size_t e = 0; e < E; ++e) {
        scores[e] = std::exp(l[e] - mx);
        sum += scores[e];
      }
      for (std::size_t e = 0; e < E; ++e) scores[e] /= sum;
    }
    for (std::size_t e = 0; e < E; ++e)
      choice[e] = rank_key(bias ? scores[e] + bias[e] : scores[e]);

    if (grouped) {
      for (int64_t g = 0; g < n_groups; ++g) {
        const float* c = choice.data() + g * group_size;
        const float inf = std::numeric_limits<float>::infinity();
        float first = -inf, second = -inf;
        for (int64_t i = 0; i < group_size; ++i) {
          if (c[i] > first) {
            second = first;
            first = c[i];
          } else if (c[i] > second) {
            second = c[i];
          }
        }
        group_rank[g] = rank_key(group_top2_sum && group_size > 1 ? first + second : first);
      }
      std::iota(group_order.begin(), group_order.end(), 0);
      std::partial_sort(group_order.begin(), group_order.begin() + kept_groups, group_order.end(),
                        [&](int32_t a, int32_t b) {
                          return group_rank[a] > group_rank[b] ||
                                 (group_rank[a] == group_rank[b] && a < b);
                        });
      std::fill(allowed.begin(), allowed.end(), 0);
      for (int64_t i = 0; i < kept_groups; ++i) {
        const int64_t g = group_order[i];
        std::fill(allowed.begin() + g * group_size, allowed.begin() + (g + 1) * group_size, 1);
      }
    }

    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int32_t a, int32_t b) {
      if (allowed[a] != allowed[b]) return allowed[a] > allowed[b];
      return choice[a] > choice[b] || (choice[a] == choice[b] && a < b);
    });
    float kept = 0;
    for (int64_t i = 0; i < top_k; ++i) kept += scores[order[i]];
    for (int64_t i = 0; i < top_k; ++i) {
      const float p = scores[order[i]];
      ids[t * top_k + i] = order[i];
      weights[t * top_k + i] = (renormalize ? p / kept : p) * scaling;
    }
  }
}

}  // namespace moemesh::kernels
