// KvBlockManager (kv_blocks.h): reference counts, the never-used pool, the LRU list of free
// cached blocks (linked through per-block index vectors) and the chain-hash prefix table. Owned by
// one thread; no locking.
#include "core/kv_blocks.h"

#include <algorithm>
#include <cassert>
#include <limits>

namespace moemesh {
namespace {

constexpr uint64_t kPrime1 = 0x9e3779b185ebca87ULL;  // xxh64's primes
constexpr uint64_t kPrime2 = 0xc2b2ae3d27d4eb4fULL;
constexpr uint64_t kPrime4 = 0x85ebca77c2b2ae63ULL;
constexpr uint64_t kSeed = 0x6d6f656d6573686bULL;  // "moemeshk"

uint64_t rotl(uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}

// splitmix64's finaliser: a bijection with full avalanche.
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// One xxh64-style accumulation round over a 64-bit lane.
uint64_t round64(uint64_t acc, uint64_t lane) {
  acc += lane * kPrime2;
  acc = rotl(acc, 31);
  return acc * kPrime1;
}

}  // namespace

KvBlockManager::KvBlockManager(int64_t num_blocks, int64_t block_size, bool prefix_caching)
    : num_blocks_(num_blocks), block_size_(block_size), prefix_caching_(prefix_caching) {
  assert(num_blocks >= 1 && num_blocks <= std::numeric_limits<int32_t>::max());
  assert(block_size >= 1);
  num_blocks_ = std::clamp<int64_t>(num_blocks_, 1, std::numeric_limits<int32_t>::max());
  block_size_ = std::max<int64_t>(block_size_, 1);
  hash_fn_ = &KvBlockManager::chain_hash;
  const auto n = static_cast<size_t>(num_blocks_);
  ref_.assign(n, 0);
  cached_.assign(n, 0);
  key_.assign(n, 0);
  parent_.assign(n, 0);
  lru_prev_.assign(n, kNone);
  lru_next_.assign(n, kNone);
  if (prefix_caching_) tokens_.assign(n * static_cast<size_t>(block_size_), 0);
  // A stack whose back is handed out first: blocks come out as 0, 1, 2, ...
  never_used_.reserve(n);
  for (int64_t b = num_blocks_ - 1; b >= 0; --b) never_used_.push_back(static_cast<int32_t>(b));
}

int64_t KvBlockManager::free_blocks() const {
  return static_cast<int64_t>(never_used_.size()) + lru_size_;
}

double KvBlockManager::usage() const {
  return static_cast<double>(num_blocks_ - free_blocks()) / static_cast<double>(num_blocks_);
}

uint64_t KvBlockManager::chain_hash(uint64_t parent_hash, std::span<const int32_t> tokens) {
  uint64_t acc = mix64(parent_hash ^ kSeed) + static_cast<uint64_t>(tokens.size()) * kPrime4;
  size_t i = 0;
  for (; i + 1 < tokens.size(); i += 2) {
    const uint64_t lane = static_cast<uint64_t>(static_cast<uint32_t>(tokens[i])) |
                          (static_cast<uint64_t>(static_cast<uint32_t>(tokens[i + 1])) << 32);
    acc = round64(acc, lane);
  }
  if (i < tokens.size()) acc = round64(acc, static_cast<uint32_t>(tokens[i]));
  const uint64_t h = mix64(acc ^ parent_hash);
  return h == 0 ? 1 : h;  // 0 is reserved for "no parent"
}

uint64_t KvBlockManager::hash_of(uint64_t parent_hash, std::span<const int32_t> tokens) const {
  const uint64_t h = hash_fn_(parent_hash, tokens);
  return h == 0 ? 1 : h;
}

std::span<const int32_t> KvBlockManager::tokens_of(int32_t block) const {
  return std::span<const int32_t>(tokens_).subspan(
      static_cast<size_t>(block) * static_cast<size_t>(block_size_),
      static_cast<size_t>(block_size_));
}

int32_t KvBlockManager::find_cached(uint64_t key, uint64_t parent_hash,
                                    std::span<const int32_t> tokens) const {
  const auto it = table_.find(key);
  if (it == table_.end()) return kNone;
  const int32_t block = it->second;
  if (parent_[block] != parent_hash) return kNone;
  const std::span<const int32_t> stored = tokens_of(block);
  if (!std::equal(stored.begin(), stored.end(), tokens.begin(), tokens.end())) return kNone;
  return block;
}

void KvBlockManager::uncache(int32_t block) {
  table_.erase(key_[block]);
  cached_[block] = 0;
  key_[block] = 0;
  parent_[block] = 0;
}

void KvBlockManager::lru_push_back(int32_t block) {
  lru_prev_[block] = lru_tail_;
  lru_next_[block] = kNone;
  if (lru_tail_ == kNone) {
    lru_head_ = block;
  } else {
    lru_next_[lru_tail_] = block;
  }
  lru_tail_ = block;
  ++lru_size_;
}

void KvBlockManager::lru_remove(int32_t block) {
  const int32_t prev = lru_prev_[block];
  const int32_t next = lru_next_[block];
  if (prev == kNone) {
    lru_head_ = next;
  } else {
    lru_next_[prev] = next;
  }
  if (next == kNone) {
    lru_tail_ = prev;
  } else {
    lru_prev_[next] = prev;
  }
  lru_prev_[block] = kNone;
  lru_next_[block] = kNone;
  --lru_size_;
}

int32_t KvBlockManager::lru_pop_front() {
  const int32_t block = lru_head_;
  if (block != kNone) lru_remove(block);
  return block;
}

std::optional<std::vector<int32_t>> KvBlockManager::allocate(int64_t n) {
  assert(n >= 0);
  if (n < 0 || n > free_blocks()) return std::nullopt;
  std::vector<int32_t> blocks;
  blocks.reserve(static_cast<size_t>(n));
  while (static_cast<int64_t>(blocks.size()) < n && !never_used_.empty()) {
    blocks.push_back(never_used_.back());
    never_used_.pop_back();
  }
  while (static_cast<int64_t>(blocks.size()) < n) {
    const int32_t block = lru_pop_front();  // only cached blocks are on the list
    uncache(block);
    ++evictions_;
    blocks.push_back(block);
  }
  for (const int32_t block : blocks) ref_[block] = 1;
  return blocks;
}

std::vector<int32_t> KvBlockManager::match_prefix(std::span<const int32_t> tokens,
                                                  int64_t max_blocks) {
  assert(max_blocks >= 0);
  std::vector<int32_t> blocks;
  if (!prefix_caching_) return blocks;
  prefix_queries_tokens_ += tokens.size();
  const auto bs = static_cast<size_t>(block_size_);
  const int64_t limit =
      std::min<int64_t>(std::max<int64_t>(max_blocks, 0), static_cast<int64_t>(tokens.size() / bs));
  uint64_t parent = 0;
  for (int64_t k = 0; k < limit; ++k) {
    const std::span<const int32_t> block_tokens = tokens.subspan(static_cast<size_t>(k) * bs, bs);
    const uint64_t key = hash_of(parent, block_tokens);
    const int32_t block = find_cached(key, parent, block_tokens);
    if (block == kNone) break;
    if (ref_[block] == 0) lru_remove(block);
    ++ref_[block];
    blocks.push_back(block);
    parent = key;
  }
  prefix_hits_tokens_ += blocks.size() * bs;
  return blocks;
}

uint64_t KvBlockManager::commit_full_block(int32_t block, uint64_t parent_hash,
                                           std::span<const int32_t> tokens) {
  const uint64_t key = hash_of(parent_hash, tokens);
  assert(valid(block) && ref_[block] > 0);
  assert(static_cast<int64_t>(tokens.size()) == block_size_);
  if (!prefix_caching_ || !valid(block) || ref_[block] == 0 ||
      static_cast<int64_t>(tokens.size()) != block_size_) {
    return key;
  }
  if (cached_[block]) {
    // Committed before (or found by match_prefix): its contents cannot change.
    assert(find_cached(key, parent_hash, tokens) == block);
    return key;
  }
  const auto it = table_.find(key);
  if (it != table_.end()) {
    // An equal block is already cached (kept), or, with odds of 2^-64, a different block has the
    // same chain hash (counted; this one is not cached).
    if (find_cached(key, parent_hash, tokens) == kNone) ++hash_collisions_;
    return key;
  }
  table_.emplace(key, block);
  cached_[block] = 1;
  key_[block] = key;
  parent_[block] = parent_hash;
  std::copy(tokens.begin(), tokens.end(),
            tokens_.begin() + static_cast<ptrdiff_t>(block) * static_cast<ptrdiff_t>(block_size_));
  return key;
}

void KvBlockManager::retain(std::span<const int32_t> blocks) {
  for (const int32_t block : blocks) {
    assert(valid(block));
    if (!valid(block)) continue;
    if (ref_[block] == 0) {
      // Only a free cached block (on the LRU list) can be revived; a never-used one was never
      // handed out.
      assert(cached_[block]);
      if (!cached_[block]) continue;
      lru_remove(block);
    }
    ++ref_[block];
  }
}

void KvBlockManager::release(std::span<const int32_t> blocks) {
  for (const int32_t block : blocks) {
    assert(valid(block));
    if (!valid(block)) continue;
    assert(ref_[block] > 0 && "release of a free KV block");
    if (ref_[block] <= 0) {
      ++bad_releases_;
      continue;
    }
    if (--ref_[block] > 0) continue;
    if (cached_[block]) {
      lru_push_back(block);
    } else {
      never_used_.push_back(block);
    }
  }
}

int32_t KvBlockManager::ref_count(int32_t block) const {
  assert(valid(block));
  return valid(block) ? ref_[block] : 0;
}

bool KvBlockManager::is_cached(int32_t block) const {
  assert(valid(block));
  return valid(block) && cached_[block] != 0;
}

uint64_t KvBlockManager::cached_hash(int32_t block) const {
  return is_cached(block) ? key_[block] : 0;
}

KvBlockStats KvBlockManager::stats() const {
  KvBlockStats s;
  s.num_blocks = num_blocks_;
  s.free_blocks = free_blocks();
  s.used_blocks = num_blocks_ - s.free_blocks;
  s.cached_blocks = static_cast<int64_t>(table_.size());
  s.prefix_queries_tokens = prefix_queries_tokens_;
  s.prefix_hits_tokens = prefix_hits_tokens_;
  s.evictions = evictions_;
  s.bad_releases = bad_releases_;
  s.hash_collisions = hash_collisions_;
  return s;
}

void KvBlockManager::reset_prefix_cache() {
  for (const auto& [key, block] : table_) {
    cached_[block] = 0;
    key_[block] = 0;
    parent_[block] = 0;
  }
  table_.clear();
  // The free cached blocks become never-used ones, least recently released handed out first.
  while (lru_tail_ != kNone) {
    const int32_t block = lru_tail_;
    lru_remove(block);
    never_used_.push_back(block);
  }
}

void KvBlockManager::set_chain_hash_for_testing(ChainHashFn fn) {
  assert(fn != nullptr && table_.empty());
  if (fn == nullptr || !table_.empty()) return;
  hash_fn_ = fn;
}

}  // namespace moemesh
