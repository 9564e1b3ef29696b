// Internal: the paged KV cache of a model (the store behind its KVCaches).
//
// Memory is a set of blocks, each holding block_size tokens of every layer's keys and values:
// [layer][K | V][block_size][n_kv_heads][head_dim] values of the store's dtype, then for FP8 the
// float32 scales [layer][K | V][block_size][n_kv_heads]. A model with multi-head latent attention
// (config.mla) caches one compressed row per token and layer instead, its latent then its rotated
// rotary key: [layer][block_size][kv_lora_rank + qk_rope_head_dim], FP8 scales
// [layer][block_size]; its layer views present that row as the only kv head, as keys and as values
// alike (k_offset == v_offset). Blocks are backed lazily, 64 at a time,
// so a large limit costs nothing until used. Which blocks are free, shared or cached for prefix
// reuse is the KvBlockManager's business (core/kv_blocks.h).
//
// A GPU model's store holds no memory (KvStoreOptions::device_copy set): its block ids index the
// GPU's pool (core/detail/cuda_forward.h), and the store only manages them, prefix cache included.
//
// Threads: the model's thread uses the store; KVCache destructors may run on whichever thread
// drops the cache, so every call takes the store's mutex.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/error.h"
#include "core/kv_blocks.h"
#include "kernels/cpu/cpu_kernels.h"

namespace moemesh::detail {

struct KvStoreOptions {
  int64_t block_size = 16;
  kernels::KvDtype dtype = kernels::KvDtype::F32;
  // The pool's size: max_tokens (rounded up to whole blocks) when > 0, else max_bytes; both 0:
  // up to kUnboundedBlocks blocks, backed as they are used.
  int64_t max_tokens = 0;
  int64_t max_bytes = 0;
  bool prefix_caching = false;
  // Set for blocks that live elsewhere (a GPU's pool): no host memory is backed, layer_view() is
  // not to be used, and copy_block() calls this.
  std::function<void(int32_t src, int32_t dst)> device_copy;
};

// Checked options from the user's settings: dtype "auto" (the checkpoint's: bf16 for a bf16
// checkpoint, else f32), "f32", "bf16" or "fp8" (e4m3 with per-row scales); a block size of 1 to
// 4096 tokens. Errors name the value at fault.
Expected<KvStoreOptions> kv_store_options(const std::string& dtype, kernels::DType checkpoint_dtype,
                                          int64_t block_size, int64_t max_tokens, int64_t max_bytes,
                                          bool prefix_caching);

class KvStore {
 public:
  static constexpr int64_t kUnboundedBlocks = int64_t{1} << 16;  // 1M tokens at 16 per block
  static constexpr int64_t kChunkBlocks = 64;

  KvStore(const ModelConfig& config, const KvStoreOptions& options);

  int64_t block_size() const { return options_.block_size; }
  int64_t block_bytes() const { return block_bytes_; }
  kernels::KvDtype dtype() const { return options_.dtype; }
  bool prefix_caching() const { return options_.prefix_caching; }
  // Layer `layer`'s view of the blocks (valid while the store lives; the block table it points at
  // grows in place, never moves).
  kernels::PagedKv layer_view(int64_t layer) const;

  // KvBlockManager's operations, with backing memory ensured for allocated blocks.
  std::optional<std::vector<int32_t>> allocate(int64_t n);
  void retain(std::span<const int32_t> blocks);
  void release(std::span<const int32_t> blocks);
  std::vector<int32_t> match_prefix(std::span<const int32_t> tokens, int64_t max_blocks);
  uint64_t commit(int32_t block, uint64_t parent_hash, std::span<const int32_t> tokens);
  uint64_t cached_hash(int32_t block) const;
  void copy_block(int32_t src, int32_t dst);
  KvBlockStats stats() const;

 private:
  void back(int32_t block);  // under mu_

  KvStoreOptions options_;
  int64_t layers_ = 0;
  int64_t n_kv_heads_ = 0;
  int64_t head_dim_ = 0;
  int64_t planes_ = 2;       // per layer: K and V, or the one latent plane (MLA)
  int64_t plane_bytes_ = 0;  // one layer's K (or V, or latent) of one block
  int64_t block_bytes_ = 0;
  mutable std::mutex mu_;
  KvBlockManager manager_;                       // guarded by mu_
  std::vector<char*> block_ptr_;                 // guarded by mu_ (sized once: pointers are stable)
  std::vector<std::unique_ptr<char[]>> chunks_;  // guarded by mu_
};

}  // namespace moemesh::detail
