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
  if (c.num_kv_heads % ranks != 0) {
    // More ranks than KV heads: each KV head is replicated over ranks / kv_heads ranks.
    if (ranks % c.num_kv_heads != 0)
      return Error(fmt::format(
          "--tensor-parallel-size {}: {} has {} key/value heads, which neither divide into {} "
          "equal parts nor replicate evenly over {} ranks; use a size that divides them or that "
          "they divide",
          ranks, c.model_type, c.num_kv_heads, ranks, ranks));
    if (c.qk_norm == QkNorm::Full)
      return Error(fmt::format(
          "--tensor-parallel-size {}: {} normalises k over all of its {} key/value heads, which "
          "cannot be replicated over {} ranks; use a size that divides {}",
          ranks, c.model_type, c.num_kv_heads, ranks, c.num_kv_heads));
  }
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
  r.num_kv_heads = c.num_kv_heads >= ranks ? c.num_kv_heads / ranks : 1;
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

KvShare kv_share(const ModelConfig& c, int rank, int ranks) {
  if (c.num_kv_heads >= ranks) {
    const int64_t n = c.num_kv_heads / ranks;
    return {rank * n, n};
  }
  return {rank / (ranks / c.num_kv_heads), 1};
}

std::vector<uint16_t> rows_bf16(const kernels::WeightView& w, int64_t first, int64_t count) {
  std::vector<uint16_t> whole(static_cast<std::size_t>(w.rows * w.cols));
  weight_to_bf16(w, whole.data());
  const auto begin = whole.begin() + first * w.cols;
  return {begin, begin + count * w.cols};
}

std::vector<float> slice_vector(const std::vector<float>& v, int64_t first, int64_t count) {
  if (v.empty()) return v;
  return {v.begin() + first, v.begin() + first + count};
}

std::vector<float> shard_vector(const std::vector<float>& v, int rank, int ranks) {
  if (v.empty() || ranks == 1) return v;
  const auto n = static_cast<int64_t>(v.size()) / ranks;
  return {v.begin() + rank * n, v.begin() + (rank + 1) * n};
}

std::string fp8_expert_refusal(const kernels::FfnWeights& w, int ranks) {
  for (const kernels::WeightView* m : {&w.gate, &w.up, &w.down})
    if (m->dtype != kernels::DType::F8E4M3 || m->scale == nullptr)
      return fmt::format("its weights are {}, not FP8 with block scales",
                         kernels::dtype_name(m->dtype));
  const int64_t inter = w.gate.rows, hidden = w.gate.cols;
  if (inter % ranks != 0 || (inter / ranks) % 128 != 0)
    return fmt::format("its width {} over {} rank(s) is not a multiple of 128", inter, ranks);
  if (hidden % 64 != 0) return fmt::format("hidden {} is not a multiple of 64", hidden);
  if (w.up.rows != inter || w.up.cols != hidden || w.down.rows != hidden || w.down.cols != inter)
    return "gate, up and down do not have matching shapes";
  return {};
}

Fp8Matrix shard_fp8(const kernels::WeightView& w, Split split, int rank, int ranks) {
  const auto* codes = static_cast<const uint8_t*>(w.data);
  const int64_t brows = kernels::fp8_blocks(w.rows), bcols = kernels::fp8_blocks(w.cols);
  Fp8Matrix out;
  if (split == Split::Rows) {
    const int64_t n = w.rows / ranks, r0 = rank * n;
    out.rows = n;
    out.cols = w.cols;
    out.codes.assign(codes + r0 * w.cols, codes + (r0 + n) * w.cols);
    const int64_t b0 = ranks == 1 ? 0 : r0 / 128, nb = ranks == 1 ? brows : n / 128;
    out.scales.assign(w.scale + b0 * bcols, w.scale + (b0 + nb) * bcols);
    return out;
  }
  const int64_t n = w.cols / ranks, c0 = rank * n;
  out.rows = w.rows;
  out.cols = n;
  out.codes.resize(static_cast<std::size_t>(w.rows * n));
  for (int64_t r = 0; r < w.rows; ++r)
    std::copy_n(codes + r * w.cols + c0, n, out.codes.begin() + r * n);
  const int64_t b0 = ranks == 1 ? 0 : c0 / 128, nb = ranks == 1 ? bcols : n / 128;
  out.scales.resize(static_cast<std::size_t>(brows * nb));
  for (int64_t br = 0; br < brows; ++br)
    std::copy_n(w.scale + br * bcols + b0, nb, out.scales.begin() + br * nb);
  return out;
}

Fp8Matrix gate_up_fp8(const kernels::FfnWeights& w, int rank, int ranks) {
  Fp8Matrix gu = shard_fp8(w.gate, Split::Rows, rank, ranks);
  const Fp8Matrix up = shard_fp8(w.up, Split::Rows, rank, ranks);
  gu.codes.insert(gu.codes.end(), up.codes.begin(), up.codes.end());
  gu.scales.insert(gu.scales.end(), up.scales.begin(), up.scales.end());
  gu.rows += up.rows;
  return gu;
}

namespace {
bool whole_blocks(int64_t first, int64_t count, int64_t total) {
  return count > 0 && first >= 0 && first + count <= total && first % kernels::kFp8Block == 0 &&
         (count % kernels::kFp8Block == 0 || first + count == total);
}
}  // namespace

bool dense_fp8_rows(const kernels::WeightView& w, int64_t first, int64_t count) {
  return w.dtype == kernels::DType::F8E4M3 && w.scale != nullptr &&
         whole_blocks(first, count, w.rows);
}

bool dense_fp8_cols(const kernels::WeightView& w, int64_t first, int64_t count) {
  return w.dtype == kernels::DType::F8E4M3 && w.scale != nullptr &&
         whole_blocks(first, count, w.cols);
}

Fp8Matrix rows_fp8(const kernels::WeightView& w, int64_t first, int64_t count) {
  const auto* codes = static_cast<const uint8_t*>(w.data);
  const int64_t bcols = kernels::fp8_blocks(w.cols);
  const int64_t b0 = first / kernels::kFp8Block, b1 = kernels::fp8_blocks(first + count);
  Fp8Matrix out;
  out.rows = count;
  out.cols = w.cols;
  out.codes.assign(codes + first * w.cols, codes + (first + count) * w.cols);
  out.scales.assign(w.scale + b0 * bcols, w.scale + b1 * bcols);
  return out;
}

Fp8Matrix cols_fp8(const kernels::WeightView& w, int64_t first, int64_t count) {
  const auto* codes = static_cast<const uint8_t*>(w.data);
  const int64_t brows = kernels::fp8_blocks(w.rows), bcols = kernels::fp8_blocks(w.cols);
  const int64_t b0 = first / kernels::kFp8Block, nb = kernels::fp8_blocks(first + count) - b0;
  Fp8Matrix out;
  out.rows = w.rows;
  out.cols = count;
  out.codes.resize(static_cast<std::size_t>(w.rows * count));
  for (int64_t r = 0; r < w.rows; ++r)
    std::copy_n(codes + r * w.cols + first, count, out.codes.begin() + r * count);
  out.scales.resize(static_cast<std::size_t>(brows * nb));
  for (int64_t br = 0; br < brows; ++br)
    std::copy_n(w.scale + br * bcols + b0, nb, out.scales.begin() + br * nb);
  return out;
}

}  // namespace moemesh::detail
