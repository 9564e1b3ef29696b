// The paged KV cache store: lazily backed blocks (CPU models), the block manager, per-layer views.
#include "core/detail/kv_store.h"

#include <algorithm>
#include <cstring>

namespace moemesh::detail {

namespace {

int64_t blocks_for(const KvStoreOptions& o, int64_t block_bytes) {
  if (o.max_tokens > 0) return (o.max_tokens + o.block_size - 1) / o.block_size;
  if (o.max_bytes > 0) return std::max<int64_t>(1, o.max_bytes / block_bytes);
  return KvStore::kUnboundedBlocks;
}

int64_t bytes_per_block(const ModelConfig& c, const KvStoreOptions& o) {
  const int64_t values = c.num_layers * o.block_size * c.kv_values_per_token_layer();
  const int64_t rows = c.mla ? 1 : 2 * c.num_kv_heads;  // scaled rows per token per layer
  const int64_t scales = o.dtype == kernels::KvDtype::FP8 ? c.num_layers * o.block_size * rows : 0;
  const int64_t bytes = values * static_cast<int64_t>(kernels::kv_dtype_size(o.dtype)) + scales * 4;
  return (bytes + 63) / 64 * 64;  // keep every block 64-byte aligned
}

}  // namespace

Expected<KvStoreOptions> kv_store_options(const std::string& dtype, kernels::DType checkpoint_dtype,
                                          int64_t block_size, int64_t max_tokens, int64_t max_bytes,
                                          bool prefix_caching) {
  KvStoreOptions o;
  if (dtype == "auto")
    o.dtype =
        checkpoint_dtype == kernels::DType::BF16 ? kernels::KvDtype::BF16 : kernels::KvDtype::F32;
  else if (dtype == "f32" || dtype == "float32")
    o.dtype = kernels::KvDtype::F32;
  else if (dtype == "bf16" || dtype == "bfloat16")
    o.dtype = kernels::KvDtype::BF16;
  else if (dtype == "fp8" || dtype == "fp8_e4m3")
    o.dtype = kernels::KvDtype::FP8;
  else
    return Error("KV cache dtype '" + dtype + "' is not one of auto, bf16, fp8, f32");
  if (block_size < 1 || block_size > 4096)
    return Error("the KV cache block size must be between 1 and 4096 tokens, got " +
                 std::to_string(block_size));
  o.block_size = block_size;
  o.max_tokens = max_tokens;
  o.max_bytes = max_bytes;
  o.prefix_caching = prefix_caching;
  return o;
}

KvStore::KvStore(const ModelConfig& config, const KvStoreOptions& options)
    : options_(options),
      layers_(config.num_layers),
      n_kv_heads_(config.mla ? 1 : config.num_kv_heads),
      head_dim_(config.mla ? config.mla->cache_row() : config.head_dim),
      planes_(config.mla ? 1 : 2),
      plane_bytes_(options.block_size * n_kv_heads_ * head_dim_ *
                   static_cast<int64_t>(kernels::kv_dtype_size(options.dtype))),
      block_bytes_(bytes_per_block(config, options)),
      manager_(blocks_for(options, block_bytes_), options.block_size, options.prefix_caching) {
  block_ptr_.assign(static_cast<std::size_t>(manager_.num_blocks()), nullptr);
  chunks_.resize(
      static_cast<std::size_t>((manager_.num_blocks() + kChunkBlocks - 1) / kChunkBlocks));
}

kernels::PagedKv KvStore::layer_view(int64_t layer) const {
  kernels::PagedKv v;
  v.blocks = block_ptr_.data();
  // With one plane per layer (MLA) keys and values are the same rows.
  const int64_t last = planes_ - 1;
  v.k_offset = (planes_ * layer) * plane_bytes_;
  v.v_offset = (planes_ * layer + last) * plane_bytes_;
  const int64_t scales_start = planes_ * layers_ * plane_bytes_;
  const int64_t scale_plane = options_.block_size * n_kv_heads_ * 4;
  v.k_scale_offset = scales_start + (planes_ * layer) * scale_plane;
  v.v_scale_offset = scales_start + (planes_ * layer + last) * scale_plane;
  v.dtype = options_.dtype;
  v.block_size = options_.block_size;
  v.n_kv_heads = n_kv_heads_;
  v.head_dim = head_dim_;
  return v;
}

void KvStore::back(int32_t block) {
  if (block_ptr_[block] || options_.device_copy) return;
  const auto chunk = static_cast<std::size_t>(block / kChunkBlocks);
  if (!chunks_[chunk]) {
    // Zeroed, so that a row never written reads as 0 (never NaN) should a bug ever read it.
    chunks_[chunk].reset(new char[static_cast<std::size_t>(kChunkBlocks * block_bytes_) + 64]());
    char* base = chunks_[chunk].get();
    base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
    for (int64_t i = 0; i < kChunkBlocks; ++i) {
      const int64_t b = static_cast<int64_t>(chunk) * kChunkBlocks + i;
      if (b < static_cast<int64_t>(block_ptr_.size())) block_ptr_[b] = base + i * block_bytes_;
    }
  }
}

std::optional<std::vector<int32_t>> KvStore::allocate(int64_t n) {
  std::lock_guard lock(mu_);
  std::optional<std::vector<int32_t>> blocks = manager_.allocate(n);
  if (blocks)
    for (int32_t b : *blocks) back(b);
  return blocks;
}

void KvStore::retain(std::span<const int32_t> blocks) {
  std::lock_guard lock(mu_);
  manager_.retain(blocks);
}

void KvStore::release(std::span<const int32_t> blocks) {
  std::lock_guard lock(mu_);
  manager_.release(blocks);
}

std::vector<int32_t> KvStore::match_prefix(std::span<const int32_t> tokens, int64_t max_blocks) {
  std::lock_guard lock(mu_);
  return manager_.match_prefix(tokens, max_blocks);
}

uint64_t KvStore::commit(int32_t block, uint64_t parent_hash, std::span<const int32_t> tokens) {
  std::lock_guard lock(mu_);
  return manager_.commit_full_block(block, parent_hash, tokens);
}

uint64_t KvStore::cached_hash(int32_t block) const {
  std::lock_guard lock(mu_);
  return manager_.cached_hash(block);
}

void KvStore::copy_block(int32_t src, int32_t dst) {
  std::lock_guard lock(mu_);
  if (options_.device_copy) return options_.device_copy(src, dst);
  std::memcpy(block_ptr_[dst], block_ptr_[src], static_cast<std::size_t>(block_bytes_));
}

KvBlockStats KvStore::stats() const {
  std::lock_guard lock(mu_);
  return manager_.stats();
}

}  // namespace moemesh::detail
