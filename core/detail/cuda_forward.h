// Internal: the forward pass on an NVIDIA GPU (Model with ModelOptions::device "cuda[:N]").
//
// CudaForward uploads the model's weights once, as bf16 (the routed experts of a layer as one
// [experts, 2 * inter, hidden] gate/up tensor and one [experts, hidden, inter] down tensor), keeps
// a paged KV cache pool on the device (bf16 values, or FP8 E4M3 ones with a float32 scale per
// token and kv head: CudaOptions::kv_fp8), and runs chunks of tokens of one or several sequences
// through the model with the kernels of kernels/cuda. Which blocks of the pool a sequence holds
// is the model's KvStore's business (core/detail/kv_store.h: the same block manager as on the
// CPU, prefix cache included); a forward call gets each sequence's block table. It computes what
// the CPU path computes, with bf16 matrix operands and float32 accumulation.
//
// Routed experts run on the GPU when the model holds them and no other backend is set; with an
// outside ExpertBackend (an attention worker whose experts are remote) the normalised hidden
// states, expert ids and weights are staged through pinned host buffers, the backend runs while the
// GPU computes the shared expert, and its result comes back the same way.
//
// Tensor parallelism (CudaOptions::tensor_parallel N > 1): N ranks each hold a shard of the model
// (core/detail/tensor_parallel.h) on their own GPU (devices device .. device + N - 1) and add
// their partial results with NCCL after each layer's attention and MLP; a forward call runs rank
// 0 on the calling thread and the others on a thread each; each rank computes the logits of its
// rows of the LM head when the ranks divide the vocabulary (an all-reduce assembles them on rank
// 0), else rank 0 computes all of them. The
// KV pool's block ids are the same on every rank (each holds its KV heads of a block). An expert
// backend is driven by rank 0 alone.
//
// Threads: used by the model's one thread at a time; every call makes its device current.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/detail/weights.h"
#include "core/model.h"
#include "kernels/cuda/cuda_kernels.h"

namespace moemesh::detail {

struct CudaOptions {
  int device = 0;
  int64_t kv_cache_bytes = 0;  // 0: half of the GPU memory free after the weights
  int64_t block_size = 16;
  // The pool's values: bf16, or (true) FP8 E4M3 codes with a float32 scale per stored row (one
  // token, one kv head; latent attention: one token's row), as the CPU's FP8 cache stores them.
  bool kv_fp8 = false;
  std::string grouped_gemm = "auto";  // auto | loop | streams | batched | wmma
  int tensor_parallel = 1;            // ranks; the model's heads and MLP widths must divide
  // How ranks add their parts: "auto" (NCCL when there are several ranks), "nccl" (also for one
  // rank: a one-rank communicator), or "one-gpu" (every rank on `device`, adding through device
  // memory: tensor parallelism's arithmetic on a machine with one GPU; no speed-up).
  std::string collective = "auto";
  // Rotary embeddings as the CPU forward pass computes them (Model::Impl::init_rope): inverse
  // frequencies over the rotary width (YaRN-scaled where the config asks), the factor the rotated
  // features are multiplied by, and multi-head latent attention's softmax scale. Empty inv_freq:
  // plain rotary tables over config.rotary_dim.
  std::vector<float> inv_freq;
  float rope_scale = 1.0f;
  float mla_softmax_scale = 0.0f;
  int64_t mla_expanded_min_tokens = 64;  // ModelOptions::mla_expanded_min_tokens
};

// Parses "cpu", "cuda" or "cuda:N"; sets *cuda and *device. Errors name the value.
Status parse_device(const std::string& text, bool* cuda, int* device);

class CudaForward {
 public:
  static Expected<std::unique_ptr<CudaForward>> create(const ModelConfig& config,
                                                       const ModelWeights& weights,
                                                       const CudaOptions& options);
  ~CudaForward();

  int64_t block_size() const;
  int64_t num_blocks() const;  // blocks in the pool, ids 0 .. num_blocks() - 1
  bool kv_fp8() const;         // CudaOptions::kv_fp8
  // Bytes of one cached token on each rank (every layer's values, FP8 scales included).
  int64_t kv_bytes_per_token() const;
  // Bytes of weights rank 0 holds on its GPU (FP8 codes one a weight, with their scales).
  int64_t weight_bytes() const;
  // Copies block `src`'s keys and values into block `dst` (every layer, every rank); returns an
  // error message or "".
  std::string copy_block(int32_t src, int32_t dst);
  std::string description() const;

  // A chunk of one sequence: tokens [begin, begin + n) of the call, at positions past ..., whose
  // cache is in blocks[0 .. n_blocks) of the pool (enough for past + n tokens).
  struct Segment {
    const int32_t* blocks;
    int64_t n_blocks;
    int64_t past;
    int64_t begin;
    int64_t n;
  };
  // Runs `tokens` through every layer; `external` (may be null) computes the routed experts
  // instead of the GPU. `logits` receives the logits of the rows `logit_rows` (ascending).
  Status forward(std::span<const Segment> segments, std::span<const int32_t> tokens,
                 ExpertBackend* external, std::span<const int64_t> logit_rows,
                 std::vector<float>& logits);

  struct Impl;

 private:
  CudaForward(std::vector<std::unique_ptr<Impl>> ranks,
              std::vector<std::unique_ptr<kernels::cuda::Collective>> group);
  // The forward pass of one rank. `external`: the expert backend (rank 0 only); `remote`: the
  // routed experts are computed elsewhere (by rank 0's backend).
  static Status run_rank(Impl& m, std::span<const Segment> segments,
                         std::span<const int32_t> tokens, ExpertBackend* external, bool remote,
                         std::span<const int64_t> logit_rows, std::vector<float>& logits);
  std::vector<std::unique_ptr<kernels::cuda::Collective>> group_;  // empty: no collective
  std::vector<std::unique_ptr<Impl>> ranks_;                       // rank 0 first
};

}  // namespace moemesh::detail
