// KvBlockManager: the block bookkeeping of a paged KV cache with prefix caching, as vLLM's block
// pool and prefix cache do it. Only block ids and their state live here; the keys and values are
// stored by whoever owns the cache tensors, indexed by these block ids.
//
// State of a block (ids 0 .. num_blocks-1):
//   - free, never used (or released without being cached): in the never-used pool;
//   - free, cached: registered in the prefix table with reference count 0, on the LRU list; it can
//     still be matched (and then leaves the list) or be evicted to serve an allocation;
//   - used: reference count >= 1 (held by one or more sequences); cached or not.
// free_blocks = never-used pool + LRU list; used_blocks = num_blocks - free_blocks.
//
// Prefix caching: a full block is identified by its chain hash, a 64-bit hash of (the chain hash
// of the block before it, or 0 for the first block of a sequence; the block's block_size tokens).
// The table maps a chain hash to one block and each cached block keeps its parent hash and its
// tokens, so every lookup compares both exactly: a hash collision between two different blocks
// never yields a false hit (the second block is then simply not cached, and counted in
// hash_collisions). As in vLLM, two different whole prefixes are taken to differ in their chain
// hashes; matching walks the chain from the first block, so it never compares more than the
// blocks it returns, plus one.
//
// vLLM conventions the caller follows:
//   - match_prefix(prompt, (prompt.size() - 1) / block_size) leaves at least the last prompt token
//     to compute (vLLM never serves a whole prompt from the cache);
//   - release a sequence's blocks tail first (reverse order): release() treats its span in order,
//     so the first block of a prompt, the most likely to be shared, is then evicted last.
//
// Cost: allocate, release, retain and match_prefix are O(1) per block, plus O(block_size) per
// block matched or committed to hash and compare tokens (an unordered_map from chain hash to block
// and an LRU list linked through per-block index vectors). reset_prefix_cache is O(cached blocks).
// Memory: a few words per block, plus num_blocks * block_size token ids when prefix caching is on.
//
// Threads: a KvBlockManager is owned by one thread (the scheduler's); it has no locking.
// Errors: bad arguments (n < 0, a block id out of range, a token span of the wrong size, releasing
// a free block) are programming errors: they assert in debug builds and are safe no-ops otherwise
// (a release of a free block is counted in bad_releases). Nothing here throws.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

namespace moemesh {

struct KvBlockStats {
  int64_t num_blocks = 0;
  int64_t free_blocks = 0;    // allocatable now: never used + cached-but-unreferenced
  int64_t used_blocks = 0;    // referenced by at least one holder
  int64_t cached_blocks = 0;  // full blocks registered in the prefix table (referenced or not)
  uint64_t prefix_queries_tokens =
      0;                            // tokens looked up by match_prefix (vLLM prefix_cache_queries)
  uint64_t prefix_hits_tokens = 0;  // of those, tokens found (vLLM prefix_cache_hits)
  uint64_t evictions = 0;           // cached blocks reused for new data
  uint64_t bad_releases = 0;        // release() of a block whose count was already 0 (ignored)
  uint64_t hash_collisions = 0;     // commits not cached: another block already has that chain hash
};

class KvBlockManager {
 public:
  // A chain hash function: (parent chain hash, a full block's tokens) -> chain hash.
  using ChainHashFn = uint64_t (*)(uint64_t parent_hash, std::span<const int32_t> tokens);

  // num_blocks >= 1 (at most INT32_MAX), block_size >= 1. With prefix_caching false, match_prefix
  // finds nothing (and counts nothing) and commit_full_block registers nothing (but still returns
  // the chained hash).
  KvBlockManager(int64_t num_blocks, int64_t block_size, bool prefix_caching);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  int64_t free_blocks() const;  // as in KvBlockStats
  // Fraction of blocks referenced (0..1): vLLM's kv_cache_usage_perc.
  double usage() const;

  // Takes n fresh blocks (never-used first, then evicting the least recently released cached
  // blocks, whose prefix entries are then forgotten). All or nothing: std::nullopt, taking nothing,
  // when fewer than n are free (or n < 0). Each returned block has reference count 1.
  std::optional<std::vector<int32_t>> allocate(int64_t n);

  // The longest run of cached full blocks holding tokens[0 .. k*block_size) for the largest k
  // (looked up block by block along the hash chain, each candidate's parent hash and tokens
  // compared exactly, so a hash collision never gives a false hit), at most max_blocks of them.
  // Takes a reference on each returned block (a cached block with reference count 0 leaves the LRU
  // list). Counts tokens.size() as queried and k*block_size as hits. A partial tail block is
  // never matched.
  std::vector<int32_t> match_prefix(std::span<const int32_t> tokens, int64_t max_blocks);

  // Registers `block` (held by the caller, now full) as the block after the chain hash
  // `parent_hash` (0 for the first block of a sequence) holding exactly `tokens`
  // (block_size tokens). Returns the block's chain hash (for the next block). If an equal block
  // (same parent hash and tokens) is already registered, the table keeps the existing one and
  // `block` stays uncached. Committing a block again with the same contents is a no-op.
  uint64_t commit_full_block(int32_t block, uint64_t parent_hash, std::span<const int32_t> tokens);

  // The chain hash of a full block of `tokens` after `parent_hash`, without registering anything.
  // Never 0 (0 is the parent hash of a sequence's first block).
  static uint64_t chain_hash(uint64_t parent_hash, std::span<const int32_t> tokens);

  // Adds a reference to each block (a sequence forked from another shares its full blocks).
  // Retaining a free cached block takes it off the LRU list; retaining a never-used block is a
  // programming error (it was never handed out).
  void retain(std::span<const int32_t> blocks);

  // Drops one reference from each block, in order. A block whose count reaches 0 becomes free: at
  // the most-recently-used end of the LRU list if it is cached (it can still be matched), else
  // back to the never-used pool. Releasing a block with count 0 is a bug: asserts in debug
  // builds, is ignored (and counted in bad_releases) otherwise.
  void release(std::span<const int32_t> blocks);

  int32_t ref_count(int32_t block) const;
  // Whether `block` is registered in the prefix table.
  bool is_cached(int32_t block) const;
  // The chain hash `block` is registered under (0 when it is not cached): what a sequence that
  // matched it passes as the parent hash of its next block.
  uint64_t cached_hash(int32_t block) const;
  KvBlockStats stats() const;

  // Forget every cached block (e.g. when the weights change); referenced blocks stay in use, and
  // go back to the never-used pool when released.
  void reset_prefix_cache();

  // For tests: replaces the chain hash used by the table, match_prefix and commit_full_block
  // (e.g. by a degenerate one, to force collisions). Only while nothing is cached.
  void set_chain_hash_for_testing(ChainHashFn fn);

 private:
  static constexpr int32_t kNone = -1;

  bool valid(int32_t block) const { return block >= 0 && block < num_blocks_; }
  uint64_t hash_of(uint64_t parent_hash, std::span<const int32_t> tokens) const;
  std::span<const int32_t> tokens_of(int32_t block) const;
  // The cached block registered as (parent_hash, tokens), or kNone.
  int32_t find_cached(uint64_t key, uint64_t parent_hash, std::span<const int32_t> tokens) const;
  void uncache(int32_t block);
  void lru_push_back(int32_t block);
  void lru_remove(int32_t block);
  int32_t lru_pop_front();

  int64_t num_blocks_;
  int64_t block_size_;
  bool prefix_caching_;
  ChainHashFn hash_fn_;

  // Per block.
  std::vector<int32_t> ref_;
  std::vector<uint8_t> cached_;
  std::vector<uint64_t> key_;     // chain hash, when cached
  std::vector<uint64_t> parent_;  // parent chain hash, when cached
  std::vector<int32_t> tokens_;   // block_size tokens per block, when cached (prefix caching on)
  std::vector<int32_t> lru_prev_;
  std::vector<int32_t> lru_next_;

  std::vector<int32_t> never_used_;  // a stack; the next block to hand out is at the back
  int32_t lru_head_ = kNone;         // least recently released
  int32_t lru_tail_ = kNone;         // most recently released
  int64_t lru_size_ = 0;
  std::unordered_map<uint64_t, int32_t> table_;  // chain hash -> cached block

  uint64_t prefix_queries_tokens_ = 0;
  uint64_t prefix_hits_tokens_ = 0;
  uint64_t evictions_ = 0;
  uint64_t bad_releases_ = 0;
  uint64_t hash_collisions_ = 0;
};

}  // namespace moemesh
