// A model's KV caches: making, growing, forking and clearing them, and the pool's state.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>

#include "core/detail/model_impl.h"

namespace moemesh {

// ---- KVCache -----------------------------------------------------------------------------------

KVCache::KVCache(KVCache&& other) noexcept {
  *this = std::move(other);
}

KVCache& KVCache::operator=(KVCache&& other) noexcept {
  if (this == &other) return *this;
  release();
  length_ = std::exchange(other.length_, 0);
  capacity_ = std::exchange(other.capacity_, 0);
  row_ = other.row_;
  store_ = std::move(other.store_);
  blocks_ = std::move(other.blocks_);
  tokens_ = std::move(other.tokens_);
  committed_ = std::exchange(other.committed_, 0);
  chain_hash_ = std::exchange(other.chain_hash_, 0);
  other.store_.reset();
  other.blocks_.clear();
  return *this;
}

KVCache::~KVCache() {
  release();
}

void KVCache::release() {
  if (store_ && !blocks_.empty()) store_->release(blocks_);
  blocks_.clear();
}

void KVCache::clear() {
  length_ = 0;
  tokens_.clear();
  committed_ = 0;
  chain_hash_ = 0;
  if (!store_ || blocks_.empty()) return;
  // Blocks may be shared (a fork, the prefix cache): swap them all for fresh ones.
  const auto n = static_cast<int64_t>(blocks_.size());
  store_->release(blocks_);
  blocks_.clear();
  if (std::optional<std::vector<int32_t>> fresh = store_->allocate(n))
    blocks_ = std::move(*fresh);
  else
    capacity_ = 0;
}

// ---- Model -------------------------------------------------------------------------------------

KVCache Model::new_cache(int64_t capacity) const {
  const ModelConfig& c = impl_->config;
  KVCache cache;
  cache.row_ = Impl::cache_row(c);
  capacity = std::max<int64_t>(0, capacity);
  cache.store_ = impl_->kv;
  const int64_t bs = impl_->kv->block_size();
  const int64_t need = (capacity + bs - 1) / bs;
  if (need == 0) return cache;
  if (std::optional<std::vector<int32_t>> blocks = impl_->kv->allocate(need)) {
    cache.blocks_ = std::move(*blocks);
    cache.capacity_ = capacity;  // the blocks may hold a few more: the capacity is what was asked
  } else {
    cache.store_.reset();  // capacity 0: forward() says the pool was full
  }
  return cache;
}

KVCache Model::new_cache_from_prefix(std::span<const int32_t> prompt, int64_t* cached) {
  *cached = 0;
  KVCache cache = new_cache(0);
  if (!impl_->kv->prefix_caching() || prompt.size() < 2) return cache;
  const int64_t bs = impl_->kv->block_size();
  // Leave at least the last prompt token to compute: its logits start the completion.
  const int64_t max_blocks = (static_cast<int64_t>(prompt.size()) - 1) / bs;
  std::vector<int32_t> blocks = impl_->kv->match_prefix(prompt, max_blocks);
  if (blocks.empty()) return cache;
  const auto n = static_cast<int64_t>(blocks.size());
  cache.blocks_ = std::move(blocks);
  cache.capacity_ = n * bs;
  cache.length_ = n * bs;
  cache.committed_ = n;
  cache.tokens_.assign(prompt.begin(), prompt.begin() + n * bs);
  cache.chain_hash_ = impl_->kv->cached_hash(cache.blocks_.back());  // the matched chain's end
  *cached = n * bs;
  return cache;
}

Status Model::reserve(KVCache& cache, int64_t capacity) {
  if (capacity <= cache.capacity_) return {};
  if (!cache.store_) {
    if (!cache.blocks_.empty() || cache.length_ > 0)
      return Error("the KV cache was not made by this model's new_cache()");
    cache.store_ = impl_->kv;
    cache.row_ = Impl::cache_row(impl_->config);
  }
  const int64_t bs = impl_->kv->block_size();
  const int64_t need = (capacity + bs - 1) / bs - static_cast<int64_t>(cache.blocks_.size());
  if (need > 0) {
    std::optional<std::vector<int32_t>> more = impl_->kv->allocate(need);
    if (!more)
      return Error(
          fmt::format("the KV cache pool has no room for {} more blocks of {} tokens", need, bs));
    cache.blocks_.insert(cache.blocks_.end(), more->begin(), more->end());
  }
  cache.capacity_ = capacity;
  return {};
}

Expected<KVCache> Model::fork(const KVCache& cache) {
  KVCache copy;
  copy.row_ = cache.row_;
  copy.length_ = cache.length_;
  copy.capacity_ = cache.capacity_;
  if (!cache.store_) return copy;  // an empty cache
  const int64_t bs = impl_->kv->block_size();
  const int64_t full = cache.length_ / bs;
  const auto total = static_cast<int64_t>(cache.blocks_.size());
  // Full blocks are never written again: share them. The rest are copied (the partly filled
  // one) or fresh (the unused capacity).
  std::optional<std::vector<int32_t>> own = impl_->kv->allocate(total - full);
  if (!own) return Error("the KV cache pool has no room to copy a sequence");
  std::vector<int32_t> shared(cache.blocks_.begin(), cache.blocks_.begin() + full);
  impl_->kv->retain(shared);
  if (cache.length_ % bs != 0) impl_->kv->copy_block(cache.blocks_[full], own->front());
  copy.store_ = impl_->kv;
  copy.blocks_ = std::move(shared);
  copy.blocks_.insert(copy.blocks_.end(), own->begin(), own->end());
  copy.tokens_ = cache.tokens_;
  copy.committed_ = cache.committed_;
  copy.chain_hash_ = cache.chain_hash_;
  return copy;
}

KvCacheStats Model::kv_stats() const {
  KvCacheStats s;
  const KvBlockStats b = impl_->kv->stats();
  s.block_size = impl_->kv->block_size();
  s.num_blocks = b.num_blocks;
  s.free_blocks = b.free_blocks;
  s.usage =
      b.num_blocks ? static_cast<double>(b.used_blocks) / static_cast<double>(b.num_blocks) : 0.0;
  s.prefix_queries_tokens = b.prefix_queries_tokens;
  s.prefix_hits_tokens = b.prefix_hits_tokens;
  return s;
}

Status Model::configure_kv_cache(const std::string& dtype, int64_t block_size, int64_t max_tokens,
                                 int64_t max_bytes, bool prefix_caching) {
  if (impl_->on_gpu()) {
    // The GPU's pool was made when the model loaded (ModelOptions::kv_cache_dtype and
    // kv_block_size): only prefix caching is taken from here.
    if (impl_->kv->stats().used_blocks > 0)
      return Error("the KV cache cannot be reconfigured while sequences hold blocks of it");
    impl_->kv = impl_->gpu_kv_store(prefix_caching);
    const bool fp8 = impl_->kv->dtype() == kernels::KvDtype::FP8;
    const bool same = fp8 ? (dtype == "fp8" || dtype == "fp8_e4m3")
                          : (dtype == "auto" || dtype == "bf16" || dtype == "bfloat16");
    if (!same || block_size != impl_->kv->block_size())
      spdlog::warn(
          "the GPU KV cache was made at load, {} in blocks of {} tokens: --kv-cache-dtype {} and "
          "--block-size {} do not change it",
          fp8 ? "fp8" : "bf16", impl_->kv->block_size(), dtype, block_size);
    return {};
  }
  Expected<detail::KvStoreOptions> o = detail::kv_store_options(
      dtype, impl_->weights.embed.dtype, block_size, max_tokens, max_bytes, prefix_caching);
  if (!o) return o.error();
  if (impl_->kv && impl_->kv->stats().used_blocks > 0)
    return Error("the KV cache cannot be reconfigured while sequences hold blocks of it");
  impl_->kv = std::make_shared<detail::KvStore>(impl_->config, *o);
  return {};
}

int64_t Model::kv_bytes_per_token() const {
#if MOEMESH_HAVE_CUDA
  if (impl_->cuda) return impl_->cuda->kv_bytes_per_token();
#endif
  return impl_->kv->block_bytes() / impl_->kv->block_size();
}

}  // namespace moemesh
