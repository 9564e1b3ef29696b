#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"

namespace moemesh::kernels {

void softmax_topk(const float* logits, int64_t n_tokens, int64_t n_experts, int64_t top_k,
                  bool renormalize, int32_t* ids, float* weights) {
  std::vector<float> probs(static_cast<std::size_t>(n_experts));
  std::vector<int32_t> order(static_cast<std::size_t>(n_experts));
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* l = logits + t * n_experts;
    const float mx = *std::max_element(l, l + n_experts);
    float sum = 0;
    for (int64_t e = 0; e < n_experts; ++e) {
      probs[e] = std::exp(l[e] - mx);
      sum += probs[e];
    }
    for (int64_t e = 0; e < n_experts; ++e) probs[e] /= sum;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int32_t a, int32_t b) {
      return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);
    });
    float kept = 0;
    for (int64_t i = 0; i < top_k; ++i) kept += probs[order[i]];
    for (int64_t i = 0; i < top_k; ++i) {
      ids[t * top_k + i] = order[i];
      weights[t * top_k + i] = renormalize ? probs[order[i]] / kept : probs[order[i]];
    }
  }
}

}  // namespace moemesh::kernels
