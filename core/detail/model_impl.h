// Internal: the state of a loaded Model, shared by the files that implement it (model.cpp: the
// forward pass; model_mla.cpp: multi-head latent attention; model_kv.cpp: caches; model_dbrx.cpp:
// LayerNorm and p-norm routing).
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "core/detail/kv_store.h"
#include "core/detail/weights.h"
#include "core/model.h"
#if MOEMESH_HAVE_CUDA
#include "core/detail/cuda_forward.h"
#endif

namespace moemesh {

struct Model::Impl {
  ModelConfig config;
  detail::ModelWeights weights;
  std::unique_ptr<kernels::ThreadPool> pool;
  std::unique_ptr<ExpertBackend> local;  // LocalExperts, or NoLocalExperts without routed experts
  bool routed_experts = true;
  ExpertBackend* experts = nullptr;
  std::vector<float> inv_freq;  // rotary inverse frequencies (YaRN-scaled when config.yarn)
  float rope_scale = 1.0f;      // multiplies rotated features (YaRN's attention_factor)
  float mla_softmax_scale = 0;  // MLA: qk_head_dim^-0.5, times YaRN's mscale^2 when configured
  // The KV cache: its memory on the CPU, or the block ids of the GPU's pool.
  std::shared_ptr<detail::KvStore> kv;
#if MOEMESH_HAVE_CUDA
  std::unique_ptr<detail::CudaForward> cuda;  // set when the model runs on a GPU
#endif
  // A store for the GPU pool's blocks (on_gpu() only): bf16, the pool's block size and size.
  std::shared_ptr<detail::KvStore> gpu_kv_store(bool prefix_caching);
  bool on_gpu() const {
#if MOEMESH_HAVE_CUDA
    return cuda != nullptr;
#else
    return false;
#endif
  }

  // Rows [begin, begin + n) of a chunk belong to `cache`, at positions cache->length() ...
  struct Segment {
    KVCache* cache;
    int64_t begin;
    int64_t n;
  };

  Status forward(KVCache& cache, std::span<const int32_t> tokens, Logits mode,
                 std::vector<float>& logits);
  Status forward_batch(std::span<KVCache* const> caches, std::span<const int32_t> tokens,
                       std::vector<float>& logits);
  Status forward_step(std::span<const Model::Chunk> chunks, std::vector<float>& logits);
  // Checks every segment's chunk and that the caches are distinct.
  Status check_segments(std::span<const Segment> segments, std::span<const int32_t> tokens) const;
  // After a successful pass: advances each cache and registers its newly full blocks.
  void advance(std::span<const Segment> segments, std::span<const int32_t> tokens);
  // The final norm and LM head over rows `rows` of x [*, hidden] into logits [rows, vocab].
  void logits_of(const std::vector<float>& x, std::span<const int64_t> rows,
                 std::vector<float>& logits);
  Status check_chunk(const KVCache& cache, std::span<const int32_t> tokens) const;
  // Values per token per layer that a KVCache of this model records in KVCache::row_.
  static int64_t cache_row(const ModelConfig& c) {
    return c.mla ? c.mla->cache_row() : c.num_kv_heads * c.head_dim;
  }
  // Sets inv_freq, rope_scale and mla_softmax_scale from the config (model_mla.cpp).
  void init_rope();
  // The GPU pass over `segments` (on_gpu() only); advances the caches on success.
  Status forward_gpu(std::span<const Segment> segments, std::span<const int32_t> tokens,
                     std::span<const int64_t> logit_rows, std::vector<float>& logits);
  // Runs every layer over the chunk x [n, hidden] (advance() moves the caches on).
  Status run_layers(std::span<const Segment> segments, int64_t n, std::vector<float>& x);
  void attention_block(int64_t l, std::span<const Segment> segments, int64_t n, const float* x_norm,
                       float* out);
  // attention_block for multi-head latent attention (model_mla.cpp).
  void mla_attention_block(int64_t l, std::span<const Segment> segments, int64_t n,
                           const float* x_norm, float* out);
  Status ffn_block(int64_t l, int64_t n, const float* x_norm, float* out);
  // The model's norm over n rows of hidden_size at x into y (in-place safe): RMSNorm, or LayerNorm
  // without bias when config.layer_norm (model_dbrx.cpp).
  void norm(const float* x, const float* weight, int64_t n, float* y) const;
};

// Divides each of n rows of k weights by the row's p-norm, (sum |w|^p)^(1/p), as torch.norm
// does in float32 (dbrx's moe_normalize_expert_weights; model_dbrx.cpp).
void divide_by_p_norm(float* weights, int64_t n, int64_t k, double p);

}  // namespace moemesh
