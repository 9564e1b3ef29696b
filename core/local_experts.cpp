#include <fmt/format.h>

#include "core/detail/local_experts.h"

namespace moemesh::detail {

Status LocalExperts::compute(int64_t layer, const float* x, int64_t n, const int32_t* ids,
                             const float* weights, int64_t top_k, float* out) {
  if (layer < 0 || layer >= static_cast<int64_t>(weights_.layers.size()) ||
      !weights_.layers[layer].moe)
    return Error(fmt::format("layer {} has no routed experts", layer));
  const std::vector<kernels::FfnWeights>& experts = weights_.layers[layer].experts;
  const int64_t n_experts = static_cast<int64_t>(experts.size());
  const int64_t H = hidden_;

  // Bucket the (token, slot) pairs by expert: counting sort keeps token order within an expert.
  std::vector<int64_t> count(n_experts + 1, 0);
  for (int64_t i = 0; i < n * top_k; ++i) {
    if (ids[i] < 0 || ids[i] >= n_experts)
      return Error(fmt::format("expert id {} out of range for layer {} ({} experts)", ids[i], layer,
                               n_experts));
    ++count[ids[i] + 1];
  }
  for (int64_t e = 0; e < n_experts; ++e) count[e + 1] += count[e];
  rows_.resize(static_cast<std::size_t>(n * top_k));
  std::vector<int64_t> fill(count.begin(), count.end() - 1);
  for (int64_t i = 0; i < n * top_k; ++i) rows_[fill[ids[i]]++] = i;

  for (int64_t e = 0; e < n_experts; ++e) {
    const int64_t begin = count[e];
    const int64_t m = count[e + 1] - begin;
    if (m == 0) continue;
    const kernels::FfnWeights& w = experts[e];
    const int64_t inter = w.gate.rows;
    gathered_.resize(static_cast<std::size_t>(m * H));
    result_.resize(static_cast<std::size_t>(m * H));
    scratch_.resize(static_cast<std::size_t>(2 * m * inter));
    for (int64_t r = 0; r < m; ++r) {
      const int64_t token = rows_[begin + r] / top_k;
      std::copy(x + token * H, x + (token + 1) * H, gathered_.begin() + r * H);
    }
    kernels::swiglu_ffn(gathered_.data(), m, w, scratch_.data(), result_.data(), pool_);
    for (int64_t r = 0; r < m; ++r) {
      const int64_t slot = rows_[begin + r];
      const int64_t token = slot / top_k;
      const float g = weights[slot];
      float* o = out + token * H;
      const float* y = result_.data() + r * H;
      for (int64_t d = 0; d < H; ++d) o[d] += g * y[d];
    }
  }
  return {};
}

}  // namespace moemesh::detail
