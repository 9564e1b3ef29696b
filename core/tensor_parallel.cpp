// How a model splits over the ranks of a tensor-parallel group (core/detail/tensor_parallel.h).
#include "core/detail/tensor_parallel.h"

#include <fmt/format.h>

#include <algorithm>

#include "core/detail/weights.h"

namespace moemesh::detail {

Status check_tensor_parallel(const ModelConfig& c, int ranks) {
  if (ranks < 1) return Error(fmt::format("--tensor-parallel-size {} must be 1 or more", ranks));
  if (ranks == 1) return {};
  auto refuse = [&](const char* what, int64_t n) {
    return Error(
        fmt::format("--tensor-parallel-size {}: {} has {} {}, which does not divide into {} equal "
                    "parts; use a size that divides it",
                    ranks, c.model_type, n, what, ranks));
  };
  if (c.num_heads % ranks) return refuse("attention heads", c.num_heads);
  if (c.num_kv_heads % ranks) return refuse("key/value heads", c.num_kv_heads);
  if (c.intermediate_size % ranks)
    return refuse("MLP features (intermediate_size)", c.intermediate_size);
  if (c.moe_intermediate_size % ranks)
    return refuse("routed-expert features (moe_intermediate_size)", c.moe_intermediate_size);
  if (c.shared_expert_intermediate_size % ranks)
    return refuse("shared-expert features", c.shared_expert_intermediate_size);
  return {};
}

ModelConfig rank_config(const ModelConfig& c, int ranks) {
  ModelConfig r = c;
  r.num_heads /= ranks;
  r.num_kv_heads /= ranks;
  r.intermediate_size /= ranks;
  r.moe_intermediate_size /= ranks;
  r.shared_expert_intermediate_size /= ranks;
  return r;
}

std::vector<uint16_t> shard_bf16(const kernels::WeightView& w, Split split, int rank, int ranks) {
  std::vector<uint16_t> whole(static_cast<std::size_t>(w.rows * w.cols));
  weight_to_bf16(w, whole.data());
  if (ranks == 1) return whole;
  if (split == Split::Rows) {
    const int64_t n = w.rows / ranks;
    const auto begin = whole.begin() + rank * n * w.cols;
    return {begin, begin + n * w.cols};
  }
  const int64_t n = w.cols / ranks;
  std::vector<uint16_t> part(static_cast<std::size_t>(w.rows * n));
  for (int64_t r = 0; r < w.rows; ++r)
    std::copy_n(whole.begin() + r * w.cols + rank * n, n, part.begin() + r * n);
  return part;
}

std::vector<float> shard_vector(const std::vector<float>& v, int rank, int ranks) {
  if (v.empty() || ranks == 1) return v;
  const auto n = static_cast<int64_t>(v.size()) / ranks;
  return {v.begin() + rank * n, v.begin() + (rank + 1) * n};
}

}  // namespace moemesh::detail
