// Internal: how a model's weights split over the ranks of a tensor-parallel group (the GPU
// forward pass with ModelOptions::tensor_parallel_size > 1), Megatron style.
//
// Rank r of N holds attention heads [r * heads / N, (r + 1) * heads / N) with their KV heads (the
// rows of q, k and v, their biases and a full-width q/k norm's weights) and the matching columns
// of o. When N exceeds the KV heads (a multiple of them, as Qwen3-MoE's 4 KV heads under 8 ranks),
// each KV head is replicated: rank r holds KV head r / (N / kv_heads), the one its q heads read.
// And, of every MLP (dense, shared expert, each routed expert), rows
// [r * inter / N, (r + 1) * inter / N) of gate and up with the matching columns of down. Each
// rank's o and down products are partial sums that the group adds (an all-reduce after
// attention and one after the MLP of each layer). Embeddings, norms, routers and the shared
// expert's gate are whole on every rank; the LM head's rows are split when the ranks divide the
// vocabulary (the GPU forward pass sums the ranks' columns of the logits), else rank 0 holds it.
// Everything here runs on the host and is checked on the CPU (tests/core/tensor_parallel_test.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/error.h"
#include "kernels/cpu/cpu_kernels.h"

namespace moemesh::detail {

// Whether `c` splits over `ranks`; the error names the size that does not divide and what to do.
Status check_tensor_parallel(const ModelConfig& c, int ranks);

// What one rank holds of `c`: heads, KV heads and MLP widths divided by `ranks` (one KV head when
// they are replicated).
ModelConfig rank_config(const ModelConfig& c, int ranks);

// The KV heads rank `rank` holds: [first, first + count).
struct KvShare {
  int64_t first = 0, count = 0;
};
KvShare kv_share(const ModelConfig& c, int rank, int ranks);

enum class Split : uint8_t {
  Rows,  // output features (q, k, v, gate, up)
  Cols,  // input features (o, down)
};

// Rank `rank`'s part of w, as bf16 bits (weight_to_bf16): rows or columns
// [rank * n / ranks, (rank + 1) * n / ranks), row-major. w's split dimension divides by ranks.
std::vector<uint16_t> shard_bf16(const kernels::WeightView& w, Split split, int rank, int ranks);

// Rank `rank`'s part of a vector (a bias or norm weight over split features); empty stays empty.
std::vector<float> shard_vector(const std::vector<float>& v, int rank, int ranks);

// Rows [first, first + count) of w as bf16 bits, and elements [first, first + count) of v (empty
// stays empty): a rank's KV heads of k or v (rows first * head_dim ...) and of their biases.
std::vector<uint16_t> rows_bf16(const kernels::WeightView& w, int64_t first, int64_t count);
std::vector<float> slice_vector(const std::vector<float>& v, int64_t first, int64_t count);

// ---- Routed experts kept in FP8 on the GPU ----

// An FP8 E4M3 matrix on the host with its float32 scales per 128x128 block, laid out as a
// kernels::WeightView of dtype F8E4M3 (and as kernels::cuda::GroupWeight reads it).
struct Fp8Matrix {
  std::vector<uint8_t> codes;  // [rows, cols]
  std::vector<float> scales;   // [fp8_blocks(rows), fp8_blocks(cols)], row-major
  int64_t rows = 0, cols = 0;
};

// "" when a routed expert's FFN can stay FP8 on a GPU split over `ranks`, else why not: gate, up
// and down must be F8E4M3 with block scales (an FP8 checkpoint, or --quantization fp8), each
// rank's share of the expert width a multiple of 128 (shards and the fused gate|up matrix then
// take whole scale blocks) and hidden a multiple of 64 (the tiles of the FP8 grouped GEMM).
std::string fp8_expert_refusal(const kernels::FfnWeights& w, int ranks);

// Rank `rank`'s rows or columns of an F8E4M3 w, codes and the scales of their blocks, as
// shard_bf16 splits; the share must start and end on 128-blocks (whole w with one rank).
Fp8Matrix shard_fp8(const kernels::WeightView& w, Split split, int rank, int ranks);

// Rank `rank`'s rows of gate, then of up, as one [2 * inter / ranks, hidden] matrix, for an FFN
// that fp8_expert_refusal() accepts.
Fp8Matrix gate_up_fp8(const kernels::FfnWeights& w, int rank, int ranks);

// ---- Dense layers kept in FP8 on the GPU ----

// Whether rows [first, first + count) of w can stay FP8: w is F8E4M3 with block scales and the
// rows start on a 128-row block and end on one (or at w's last row), so they take whole scale
// blocks. Columns likewise (dense_fp8_cols).
bool dense_fp8_rows(const kernels::WeightView& w, int64_t first, int64_t count);
bool dense_fp8_cols(const kernels::WeightView& w, int64_t first, int64_t count);
// Rows [first, first + count) of such a w, codes and their blocks' scales.
Fp8Matrix rows_fp8(const kernels::WeightView& w, int64_t first, int64_t count);
// Columns [first, first + count) of such a w.
Fp8Matrix cols_fp8(const kernels::WeightView& w, int64_t first, int64_t count);

}  // namespace moemesh::detail
