// KvBlockManager (core/kv_blocks.h): allocation and reference counting, prefix matching along the
// hash chain (exact, collision-safe), LRU eviction, reset, the stats counters, and a randomized
// run against a simple reference model. Single-threaded, as the manager is.
#include "core/kv_blocks.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <list>
#include <map>
#include <numeric>
#include <random>
#include <set>

namespace moemesh {
namespace {

using Tokens = std::vector<int32_t>;
using Blocks = std::vector<int32_t>;

Tokens range_tokens(int32_t start, int64_t n) {
  Tokens t(static_cast<size_t>(n));
  std::iota(t.begin(), t.end(), start);
  return t;
}

Tokens slice(const Tokens& t, int64_t from, int64_t n) {
  return Tokens(t.begin() + from, t.begin() + from + n);
}

Blocks reversed(Blocks b) {
  std::reverse(b.begin(), b.end());
  return b;
}

// Runs one sequence's prompt the way the scheduler will: match the cached prefix (leaving the last
// token to compute), allocate the rest, commit every full block. Returns its blocks.
Blocks run_prompt(KvBlockManager& m, const Tokens& prompt) {
  const int64_t bs = m.block_size();
  const auto size = static_cast<int64_t>(prompt.size());
  Blocks blocks = m.match_prefix(prompt, (size - 1) / bs);
  uint64_t parent = 0;
  for (size_t k = 0; k < blocks.size(); ++k) {
    parent = KvBlockManager::chain_hash(parent, slice(prompt, static_cast<int64_t>(k) * bs, bs));
  }
  const int64_t needed = (size + bs - 1) / bs - static_cast<int64_t>(blocks.size());
  auto fresh = m.allocate(needed);
  EXPECT_TRUE(fresh.has_value());
  if (!fresh) return blocks;
  blocks.insert(blocks.end(), fresh->begin(), fresh->end());
  for (int64_t k = static_cast<int64_t>(blocks.size()) - needed; k < size / bs; ++k) {
    parent = m.commit_full_block(blocks[static_cast<size_t>(k)], parent, slice(prompt, k * bs, bs));
  }
  return blocks;
}

TEST(KvBlockManagerTest, AllocateReleaseAndReuse) {
  KvBlockManager m(4, 16, true);
  EXPECT_EQ(m.num_blocks(), 4);
  EXPECT_EQ(m.block_size(), 16);
  EXPECT_EQ(m.free_blocks(), 4);
  EXPECT_DOUBLE_EQ(m.usage(), 0.0);

  auto a = m.allocate(3);
  ASSERT_TRUE(a.has_value());
  ASSERT_EQ(a->size(), 3u);
  EXPECT_EQ(std::set<int32_t>(a->begin(), a->end()).size(), 3u);
  for (const int32_t b : *a) EXPECT_EQ(m.ref_count(b), 1);
  EXPECT_EQ(m.free_blocks(), 1);
  EXPECT_DOUBLE_EQ(m.usage(), 0.75);

  // All or nothing: two are asked for, one is free, nothing is taken.
  EXPECT_FALSE(m.allocate(2).has_value());
  EXPECT_EQ(m.free_blocks(), 1);
  auto empty = m.allocate(0);
  ASSERT_TRUE(empty.has_value());
  EXPECT_TRUE(empty->empty());

  auto b = m.allocate(1);
  ASSERT_TRUE(b.has_value());
  ASSERT_EQ(b->size(), 1u);
  EXPECT_EQ(std::count(a->begin(), a->end(), (*b)[0]), 0);
  EXPECT_EQ(m.free_blocks(), 0);
  EXPECT_DOUBLE_EQ(m.usage(), 1.0);
  EXPECT_FALSE(m.allocate(1).has_value());

  // A released block is handed out again.
  const int32_t victim = (*a)[1];
  m.release(std::span<const int32_t>(&victim, 1));
  EXPECT_EQ(m.ref_count(victim), 0);
  EXPECT_EQ(m.free_blocks(), 1);
  auto again = m.allocate(1);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(*again, Blocks{victim});

  m.release(*a);
  m.release(*b);
  EXPECT_EQ(m.free_blocks(), 4);
  EXPECT_EQ(m.stats().used_blocks, 0);
  EXPECT_EQ(m.stats().evictions, 0u);
  EXPECT_EQ(m.stats().bad_releases, 0u);
}

TEST(KvBlockManagerTest, RetainSharesBlocksOfAForkedSequence) {
  KvBlockManager m(8, 4, true);
  const Tokens prompt = range_tokens(100, 10);  // two full blocks and a partial one
  const Blocks parent_blocks = run_prompt(m, prompt);
  ASSERT_EQ(parent_blocks.size(), 3u);

  // The fork shares the full blocks and copies the partial tail into a block of its own.
  const Blocks shared(parent_blocks.begin(), parent_blocks.begin() + 2);
  m.retain(shared);
  auto tail = m.allocate(1);
  ASSERT_TRUE(tail.has_value());
  EXPECT_EQ(m.ref_count(shared[0]), 2);
  EXPECT_EQ(m.ref_count(shared[1]), 2);
  EXPECT_EQ(m.ref_count(parent_blocks[2]), 1);
  EXPECT_EQ(m.stats().used_blocks, 4);

  // The parent finishes: the shared blocks stay with the child.
  m.release(reversed(parent_blocks));
  EXPECT_EQ(m.ref_count(shared[0]), 1);
  EXPECT_EQ(m.ref_count(shared[1]), 1);
  EXPECT_EQ(m.ref_count(parent_blocks[2]), 0);
  EXPECT_EQ(m.stats().used_blocks, 3);

  Blocks child = shared;
  child.push_back((*tail)[0]);
  m.release(reversed(child));
  for (int32_t b = 0; b < 8; ++b) EXPECT_EQ(m.ref_count(b), 0);
  EXPECT_EQ(m.free_blocks(), 8);
  EXPECT_EQ(m.stats().bad_releases, 0u);
}

TEST(KvBlockManagerTest, RepeatedPromptHitsItsFullBlocksOnly) {
  KvBlockManager m(16, 4, true);
  const Tokens prompt = range_tokens(7, 10);  // blocks [7..10] [11..14], partial [15 16]
  const Blocks first = run_prompt(m, prompt);
  ASSERT_EQ(first.size(), 3u);
  EXPECT_EQ(m.stats().cached_blocks, 2);
  EXPECT_TRUE(m.is_cached(first[0]));
  EXPECT_TRUE(m.is_cached(first[1]));
  EXPECT_FALSE(m.is_cached(first[2]));
  m.release(reversed(first));
  EXPECT_EQ(m.free_blocks(), 16);

  // The same prompt again: both full blocks come from the cache, the partial tail does not.
  const Blocks hit = m.match_prefix(prompt, 100);
  EXPECT_EQ(hit, Blocks(first.begin(), first.begin() + 2));
  EXPECT_EQ(m.ref_count(first[0]), 1);
  EXPECT_EQ(m.stats().prefix_hits_tokens, 8u);
  m.release(reversed(hit));

  // A longer prompt that completes the third block still finds only the two committed blocks.
  Tokens longer = prompt;
  longer.push_back(17);
  longer.push_back(18);
  EXPECT_EQ(m.match_prefix(longer, 100), Blocks(first.begin(), first.begin() + 2));
  m.release(reversed(Blocks(first.begin(), first.begin() + 2)));

  // A prompt of exactly two blocks: the scheduler's cap (size - 1) / block_size leaves one.
  const Tokens exact = slice(prompt, 0, 8);
  const Blocks capped = m.match_prefix(exact, (8 - 1) / 4);
  EXPECT_EQ(capped, Blocks{first[0]});
  m.release(capped);
  EXPECT_EQ(m.match_prefix(exact, 2), Blocks(first.begin(), first.begin() + 2));
}

TEST(KvBlockManagerTest, PartialPrefixMatchStopsAtTheDivergingBlock) {
  KvBlockManager m(16, 4, true);
  const Tokens prompt = range_tokens(0, 20);  // five full blocks
  const Blocks blocks = run_prompt(m, prompt);
  ASSERT_EQ(blocks.size(), 5u);
  EXPECT_EQ(m.stats().cached_blocks, 5);
  m.release(reversed(blocks));

  // The third block differs in its last token: blocks one and two match.
  Tokens diverged = prompt;
  diverged[11] = 999;
  const Blocks hit = m.match_prefix(diverged, 100);
  EXPECT_EQ(hit, Blocks(blocks.begin(), blocks.begin() + 2));
  m.release(reversed(hit));

  // The fourth block differs in its first token: three match, and the fifth (equal again) does not
  // come back, as its parent differs.
  diverged = prompt;
  diverged[12] = 999;
  const Blocks hit3 = m.match_prefix(diverged, 100);
  EXPECT_EQ(hit3, Blocks(blocks.begin(), blocks.begin() + 3));
  m.release(reversed(hit3));

  // The first token differs: nothing matches.
  diverged = prompt;
  diverged[0] = 999;
  EXPECT_TRUE(m.match_prefix(diverged, 100).empty());
  for (const int32_t b : blocks) EXPECT_EQ(m.ref_count(b), 0);
}

TEST(KvBlockManagerTest, MaxBlocksCapsTheMatch) {
  KvBlockManager m(8, 2, true);
  const Tokens prompt = range_tokens(50, 8);
  const Blocks blocks = run_prompt(m, prompt);
  m.release(reversed(blocks));

  const Blocks two = m.match_prefix(prompt, 2);
  EXPECT_EQ(two, Blocks(blocks.begin(), blocks.begin() + 2));
  EXPECT_EQ(m.ref_count(blocks[2]), 0);  // the rest is not taken
  EXPECT_EQ(m.stats().prefix_hits_tokens, 4u);
  EXPECT_TRUE(m.match_prefix(prompt, 0).empty());
  EXPECT_EQ(m.stats().prefix_hits_tokens, 4u);
  EXPECT_EQ(m.stats().prefix_queries_tokens, 24u);  // run_prompt's query and these two
  m.release(two);
}

TEST(KvBlockManagerTest, DifferentTokensOrParentsNeverMatch) {
  KvBlockManager m(8, 4, true);
  const Tokens a = {1, 2, 3, 4};
  const Tokens b = {5, 6, 7, 8};
  const Tokens c = {9, 10, 11, 12};
  Tokens ab = a;
  ab.insert(ab.end(), b.begin(), b.end());
  const Blocks chain = run_prompt(m, ab);  // [a, b]
  Tokens cb = c;
  cb.insert(cb.end(), b.begin(), b.end());
  const Blocks c_only = run_prompt(m, c);  // [c]
  m.release(reversed(chain));
  m.release(c_only);

  // One token off in the block: no match.
  Tokens off = a;
  off[2] = 33;
  EXPECT_TRUE(m.match_prefix(off, 1).empty());
  // b is cached, but after a, not after c: [c, b] finds c only.
  EXPECT_EQ(m.match_prefix(cb, 2), c_only);
  // b alone, as a first block, is not b-after-a.
  EXPECT_TRUE(m.match_prefix(b, 1).empty());
}

// A degenerate chain hash: every block collides with every other.
uint64_t constant_hash(uint64_t, std::span<const int32_t>) {
  return 42;
}

// A weak chain hash that a crafted block defeats: the sum of the tokens plus the parent.
uint64_t sum_hash(uint64_t parent, std::span<const int32_t> tokens) {
  uint64_t h = parent;
  for (const int32_t t : tokens) h += static_cast<uint32_t>(t);
  return h;
}

TEST(KvBlockManagerTest, HashCollisionNeverGivesAFalseHit) {
  KvBlockManager m(8, 4, true);
  m.set_chain_hash_for_testing(&constant_hash);
  const Tokens t1 = {1, 2, 3, 4};
  const Tokens t2 = {4, 3, 2, 1};
  auto blocks = m.allocate(3);
  ASSERT_TRUE(blocks.has_value());
  const int32_t x = (*blocks)[0];
  const int32_t y = (*blocks)[1];
  const int32_t z = (*blocks)[2];

  EXPECT_EQ(m.commit_full_block(x, 0, t1), 42u);
  // Same chain hash, other tokens: not cached (the table keeps x), and counted.
  EXPECT_EQ(m.commit_full_block(y, 0, t2), 42u);
  EXPECT_FALSE(m.is_cached(y));
  EXPECT_EQ(m.stats().hash_collisions, 1u);
  // Same chain hash and tokens, crafted parent (x's own hash): still a different block.
  EXPECT_EQ(m.commit_full_block(z, 42, t1), 42u);
  EXPECT_FALSE(m.is_cached(z));
  EXPECT_EQ(m.stats().hash_collisions, 2u);
  EXPECT_EQ(m.stats().cached_blocks, 1);
  m.release(*blocks);

  // t2 looks up x's entry: a wrong match would return x.
  EXPECT_TRUE(m.match_prefix(t2, 1).empty());
  // [t1, t1]: the second lookup (parent 42, key 42) finds x again, whose parent is 0, not 42.
  Tokens twice = t1;
  twice.insert(twice.end(), t1.begin(), t1.end());
  const Blocks hit = m.match_prefix(twice, 2);
  EXPECT_EQ(hit, Blocks{x});
  EXPECT_EQ(m.ref_count(x), 1);
  m.release(hit);
}

TEST(KvBlockManagerTest, CraftedCollisionOfAWeakHashIsCaughtByTheTokenCompare) {
  KvBlockManager m(8, 4, true);
  m.set_chain_hash_for_testing(&sum_hash);
  const Tokens t1 = {1, 2, 3, 4};
  const Tokens t2 = {2, 2, 2, 4};  // the same sum
  const Blocks b1 = run_prompt(m, t1);
  m.release(b1);
  ASSERT_EQ(sum_hash(0, t1), sum_hash(0, t2));
  EXPECT_TRUE(m.match_prefix(t2, 1).empty());
  EXPECT_EQ(m.match_prefix(t1, 1), b1);
  m.release(b1);
  // After a cached first block p (hash 1), the block {2, 2, 2, 3} hashes to 1 + 9, t1's chain hash:
  // the lookup lands on t1's block and the compare rejects it.
  const Tokens p = {0, 0, 0, 1};
  const Blocks bp = run_prompt(m, p);
  m.release(bp);
  EXPECT_EQ(sum_hash(sum_hash(0, p), Tokens{2, 2, 2, 3}), sum_hash(0, t1));
  const Blocks hit = m.match_prefix(Tokens{0, 0, 0, 1, 2, 2, 2, 3}, 2);
  EXPECT_EQ(hit, bp);
  m.release(hit);
  EXPECT_EQ(m.stats().prefix_hits_tokens, 8u);
  EXPECT_EQ(m.stats().hash_collisions, 0u);
}

TEST(KvBlockManagerTest, EvictsTheLeastRecentlyReleasedCachedBlockFirst) {
  KvBlockManager m(6, 2, true);
  // Four one-block prompts, each cached in its own block.
  std::vector<Tokens> prompts = {{10, 11}, {20, 21}, {30, 31}, {40, 41}};
  Blocks held;
  for (const Tokens& p : prompts) {
    const Blocks b = m.match_prefix(p, 1);
    ASSERT_TRUE(b.empty());
    auto fresh = m.allocate(1);
    ASSERT_TRUE(fresh.has_value());
    m.commit_full_block((*fresh)[0], 0, p);
    held.push_back((*fresh)[0]);
  }
  EXPECT_EQ(m.stats().cached_blocks, 4);
  // Released in the order 2, 0, 3, 1.
  for (const int idx : {2, 0, 3, 1}) m.release(Blocks{held[static_cast<size_t>(idx)]});
  EXPECT_EQ(m.free_blocks(), 6);

  // Matching prompt 2 takes its block off the list; released again, it is the most recent.
  const Blocks again = m.match_prefix(prompts[2], 1);
  EXPECT_EQ(again, Blocks{held[2]});
  EXPECT_EQ(m.free_blocks(), 5);
  m.release(again);  // LRU order now: 0, 3, 1, 2

  // The two never-used blocks go first, without evicting anything.
  auto fresh = m.allocate(2);
  ASSERT_TRUE(fresh.has_value());
  for (const int32_t b : *fresh) EXPECT_EQ(std::count(held.begin(), held.end(), b), 0);
  EXPECT_EQ(m.stats().evictions, 0u);
  EXPECT_EQ(m.stats().cached_blocks, 4);

  // Then cached blocks, least recently released first.
  auto evicted = m.allocate(1);
  ASSERT_TRUE(evicted.has_value());
  EXPECT_EQ(*evicted, Blocks{held[0]});
  EXPECT_EQ(m.stats().evictions, 1u);
  EXPECT_EQ(m.stats().cached_blocks, 3);
  EXPECT_FALSE(m.is_cached(held[0]));
  EXPECT_EQ(m.ref_count(held[0]), 1);
  EXPECT_TRUE(m.match_prefix(prompts[0], 1).empty());

  auto evicted2 = m.allocate(2);
  ASSERT_TRUE(evicted2.has_value());
  EXPECT_EQ(*evicted2, (Blocks{held[3], held[1]}));
  EXPECT_EQ(m.stats().evictions, 3u);
  EXPECT_TRUE(m.match_prefix(prompts[3], 1).empty());
  EXPECT_TRUE(m.match_prefix(prompts[1], 1).empty());
  // The most recently released one is still there.
  EXPECT_EQ(m.match_prefix(prompts[2], 1), Blocks{held[2]});
  EXPECT_EQ(m.free_blocks(), 0);
  EXPECT_FALSE(m.allocate(1).has_value());

  // An evicted block, once released, is uncached and goes back to the never-used pool.
  m.release(*evicted);
  EXPECT_EQ(m.free_blocks(), 1);
  EXPECT_EQ(m.stats().cached_blocks, 1);
}

TEST(KvBlockManagerTest, DuplicateCommitKeepsTheFirstBlock) {
  KvBlockManager m(4, 2, true);
  const Tokens p = {3, 4};
  // Two sequences computed the same block before either was cached.
  auto a = m.allocate(1);
  auto b = m.allocate(1);
  ASSERT_TRUE(a && b);
  const uint64_t ha = m.commit_full_block((*a)[0], 0, p);
  const uint64_t hb = m.commit_full_block((*b)[0], 0, p);
  EXPECT_EQ(ha, hb);
  EXPECT_EQ(ha, KvBlockManager::chain_hash(0, p));
  EXPECT_TRUE(m.is_cached((*a)[0]));
  EXPECT_FALSE(m.is_cached((*b)[0]));
  EXPECT_EQ(m.stats().hash_collisions, 0u);
  // Committing a cached block again changes nothing.
  EXPECT_EQ(m.commit_full_block((*a)[0], 0, p), ha);
  EXPECT_EQ(m.stats().cached_blocks, 1);

  m.release(*b);  // uncached: back to the pool
  m.release(*a);  // cached: on the LRU list
  EXPECT_EQ(m.free_blocks(), 4);
  EXPECT_EQ(m.match_prefix(p, 1), *a);
  auto rest = m.allocate(3);  // the three uncached blocks, no eviction
  ASSERT_TRUE(rest.has_value());
  EXPECT_EQ(m.stats().evictions, 0u);
}

TEST(KvBlockManagerTest, ResetPrefixCacheForgetsCachedBlocksAndKeepsHeldOnes) {
  KvBlockManager m(8, 2, true);
  const Tokens held_prompt = {1, 2, 3, 4};
  const Tokens freed_prompt = {5, 6, 7, 8};
  const Blocks held = run_prompt(m, held_prompt);
  const Blocks freed = run_prompt(m, freed_prompt);
  m.release(reversed(freed));
  EXPECT_EQ(m.stats().cached_blocks, 4);
  EXPECT_EQ(m.free_blocks(), 6);

  m.reset_prefix_cache();
  const KvBlockStats s = m.stats();
  EXPECT_EQ(s.cached_blocks, 0);
  EXPECT_EQ(s.free_blocks, 6);
  EXPECT_EQ(s.used_blocks, 2);
  for (const int32_t b : held) {
    EXPECT_EQ(m.ref_count(b), 1);
    EXPECT_FALSE(m.is_cached(b));
  }
  EXPECT_TRUE(m.match_prefix(freed_prompt, 2).empty());
  EXPECT_TRUE(m.match_prefix(held_prompt, 2).empty());

  // Held blocks, released, are not cached; the whole cache is allocatable without evictions.
  m.release(reversed(held));
  EXPECT_EQ(m.free_blocks(), 8);
  EXPECT_TRUE(m.match_prefix(held_prompt, 2).empty());
  auto all = m.allocate(8);
  ASSERT_TRUE(all.has_value());
  EXPECT_EQ(m.stats().evictions, 0u);
  m.release(*all);

  // The cache works again after a reset.
  const Blocks again = run_prompt(m, held_prompt);
  m.release(reversed(again));
  EXPECT_EQ(m.match_prefix(held_prompt, 2), again);
}

TEST(KvBlockManagerTest, StatsCountQueriesHitsAndUsage) {
  KvBlockManager m(10, 4, true);
  const Tokens prompt = range_tokens(0, 14);   // three full blocks and two tokens
  const Blocks first = run_prompt(m, prompt);  // queries 14, hits 0
  KvBlockStats s = m.stats();
  EXPECT_EQ(s.num_blocks, 10);
  EXPECT_EQ(s.prefix_queries_tokens, 14u);
  EXPECT_EQ(s.prefix_hits_tokens, 0u);
  EXPECT_EQ(s.used_blocks, 4);
  EXPECT_EQ(s.free_blocks, 6);
  EXPECT_EQ(s.cached_blocks, 3);
  EXPECT_DOUBLE_EQ(m.usage(), 0.4);

  const Blocks second = run_prompt(m, prompt);  // shares three blocks, one new: queries 28, hits 12
  s = m.stats();
  EXPECT_EQ(s.prefix_queries_tokens, 28u);
  EXPECT_EQ(s.prefix_hits_tokens, 12u);
  EXPECT_EQ(s.used_blocks, 5);
  EXPECT_DOUBLE_EQ(m.usage(), 0.5);
  EXPECT_EQ(m.ref_count(first[0]), 2);

  m.release(reversed(first));
  m.release(reversed(second));
  s = m.stats();
  EXPECT_EQ(s.used_blocks, 0);
  EXPECT_EQ(s.free_blocks, 10);
  EXPECT_EQ(s.cached_blocks, 3);  // free but still cached
  EXPECT_DOUBLE_EQ(m.usage(), 0.0);
  EXPECT_EQ(s.evictions, 0u);
}

TEST(KvBlockManagerTest, WithoutPrefixCachingNothingIsCachedOrMatched) {
  KvBlockManager m(4, 2, false);
  const Tokens p = {1, 2, 3, 4};
  auto blocks = m.allocate(2);
  ASSERT_TRUE(blocks.has_value());
  const uint64_t h0 = m.commit_full_block((*blocks)[0], 0, slice(p, 0, 2));
  EXPECT_EQ(h0, KvBlockManager::chain_hash(0, slice(p, 0, 2)));
  EXPECT_EQ(m.commit_full_block((*blocks)[1], h0, slice(p, 2, 2)),
            KvBlockManager::chain_hash(h0, slice(p, 2, 2)));
  EXPECT_FALSE(m.is_cached((*blocks)[0]));
  m.release(*blocks);
  EXPECT_TRUE(m.match_prefix(p, 2).empty());
  const KvBlockStats s = m.stats();
  EXPECT_EQ(s.cached_blocks, 0);
  EXPECT_EQ(s.free_blocks, 4);
  EXPECT_EQ(s.prefix_queries_tokens, 0u);  // no prefix cache, no prefix cache stats (as vLLM)
  EXPECT_EQ(s.prefix_hits_tokens, 0u);
}

TEST(KvBlockManagerTest, ChainHashDependsOnParentOrderAndEveryToken) {
  const Tokens t = {1, 2, 3, 4, 5};
  const uint64_t h = KvBlockManager::chain_hash(0, t);
  EXPECT_EQ(h, KvBlockManager::chain_hash(0, t));
  EXPECT_NE(h, 0u);
  EXPECT_NE(h, KvBlockManager::chain_hash(1, t));
  EXPECT_NE(h, KvBlockManager::chain_hash(0, Tokens{2, 1, 3, 4, 5}));
  EXPECT_NE(h, KvBlockManager::chain_hash(0, Tokens{1, 2, 3, 4}));
  EXPECT_NE(KvBlockManager::chain_hash(0, Tokens{0}), KvBlockManager::chain_hash(0, Tokens{0, 0}));
  std::set<uint64_t> seen;
  for (size_t i = 0; i < t.size(); ++i) {
    Tokens u = t;
    u[i] ^= 1 << 30;
    seen.insert(KvBlockManager::chain_hash(0, u));
  }
  seen.insert(h);
  EXPECT_EQ(seen.size(), t.size() + 1);
  // No collisions among many small blocks.
  std::set<uint64_t> hashes;
  for (int32_t a = 0; a < 100; ++a) {
    for (int32_t b = 0; b < 100; ++b) hashes.insert(KvBlockManager::chain_hash(0, Tokens{a, b}));
  }
  EXPECT_EQ(hashes.size(), 10000u);
}

TEST(KvBlockManagerTest, BadArgumentsAreSafeNoOps) {
  KvBlockManager m(4, 2, true);
  auto held = m.allocate(1);
  ASSERT_TRUE(held.has_value());
  const int32_t free_block = 3;
  ASSERT_EQ(m.ref_count(free_block), 0);
  EXPECT_DEBUG_DEATH(m.release(Blocks{free_block}), "release of a free KV block");
  EXPECT_DEBUG_DEATH(EXPECT_FALSE(m.allocate(-1).has_value()), "");
  EXPECT_DEBUG_DEATH(m.release(Blocks{4}), "");
  EXPECT_DEBUG_DEATH(m.retain(Blocks{-1}), "");
  EXPECT_DEBUG_DEATH(m.retain(Blocks{free_block}), "");  // never handed out
  EXPECT_DEBUG_DEATH(m.commit_full_block((*held)[0], 0, Tokens{1, 2, 3}), "");
  EXPECT_DEBUG_DEATH(m.commit_full_block(free_block, 0, Tokens{1, 2}), "");
  EXPECT_DEBUG_DEATH(EXPECT_TRUE(m.match_prefix(Tokens{1, 2}, -1).empty()), "");
  // Whatever the build, nothing changed (in debug builds the statements died in a child).
  EXPECT_EQ(m.free_blocks(), 3);
  EXPECT_EQ(m.ref_count((*held)[0]), 1);
  EXPECT_EQ(m.ref_count(free_block), 0);
  EXPECT_EQ(m.stats().cached_blocks, 0);
#ifdef NDEBUG
  EXPECT_EQ(m.stats().bad_releases, 1u);
#endif
}

// ---- Randomized run against a reference model ----------------------------------------------

// What the manager should do, written the slow and obvious way: sets, a list, linear scans.
class ReferenceModel {
 public:
  ReferenceModel(int64_t n, int64_t bs, bool caching, KvBlockManager::ChainHashFn hash)
      : n_(n), bs_(bs), caching_(caching), hash_(hash), ref_(static_cast<size_t>(n), 0) {
    for (int32_t b = 0; b < n; ++b) pool_.insert(b);
  }

  struct Entry {
    uint64_t parent;
    Tokens tokens;
    uint64_t key;
  };

  uint64_t key(uint64_t parent, const Tokens& tokens) const {
    const uint64_t h = hash_(parent, tokens);
    return h == 0 ? 1 : h;
  }

  // Checks an allocation against the rules and applies it.
  void allocate(int64_t n, const std::optional<Blocks>& got) {
    const auto free = static_cast<int64_t>(pool_.size() + lru_.size());
    if (n > free) {
      EXPECT_FALSE(got.has_value()) << "n=" << n << " free=" << free;
      return;
    }
    ASSERT_TRUE(got.has_value());
    ASSERT_EQ(static_cast<int64_t>(got->size()), n);
    const int64_t from_pool = std::min<int64_t>(n, static_cast<int64_t>(pool_.size()));
    std::set<int32_t> expected_evicted;
    auto it = lru_.begin();
    for (int64_t i = from_pool; i < n; ++i) expected_evicted.insert(*it++);
    std::set<int32_t> evicted;
    int64_t pooled = 0;
    for (const int32_t b : *got) {
      if (pool_.erase(b) == 1) {
        ++pooled;
      } else {
        evicted.insert(b);
      }
      ref_[static_cast<size_t>(b)] = 1;
    }
    EXPECT_EQ(pooled, from_pool);
    EXPECT_EQ(evicted, expected_evicted);
    for (const int32_t b : evicted) {
      lru_.remove(b);
      registry_.erase(b);
      ++evictions_;
    }
  }

  Blocks expected_match(const Tokens& tokens, int64_t max_blocks) const {
    Blocks out;
    if (!caching_) return out;
    uint64_t parent = 0;
    const int64_t limit = std::min<int64_t>(max_blocks, static_cast<int64_t>(tokens.size()) / bs_);
    for (int64_t k = 0; k < limit; ++k) {
      const Tokens t = slice(tokens, k * bs_, bs_);
      int32_t found = -1;
      for (const auto& [b, e] : registry_) {
        if (e.parent == parent && e.tokens == t) found = b;
      }
      if (found < 0) break;
      out.push_back(found);
      parent = registry_.at(found).key;
    }
    return out;
  }

  void match(const Tokens& tokens, const Blocks& got) {
    if (!caching_) {
      EXPECT_TRUE(got.empty());
      return;
    }
    queries_ += tokens.size();
    hits_ += got.size() * static_cast<uint64_t>(bs_);
    EXPECT_EQ(std::set<int32_t>(got.begin(), got.end()).size(), got.size()) << "a block twice";
    for (size_t k = 0; k < got.size(); ++k) {
      // The invariant the callers rely on: a matched block holds exactly the queried tokens.
      ASSERT_EQ(registry_.count(got[k]), 1u);
      EXPECT_EQ(registry_.at(got[k]).tokens, slice(tokens, static_cast<int64_t>(k) * bs_, bs_));
      take(got[k]);
    }
  }

  void commit(int32_t block, uint64_t parent, const Tokens& tokens, uint64_t got_key) {
    const uint64_t k = key(parent, tokens);
    EXPECT_EQ(got_key, k);
    if (!caching_ || registry_.count(block) == 1) return;
    for (const auto& [b, e] : registry_) {
      if (e.parent == parent && e.tokens == tokens) return;  // an equal block is kept
    }
    for (const auto& [b, e] : registry_) {
      if (e.key == k) {
        ++collisions_;
        return;
      }
    }
    registry_[block] = Entry{parent, tokens, k};
  }

  void retain(const Blocks& blocks) {
    for (const int32_t b : blocks) take(b);
  }

  void release(const Blocks& blocks) {
    for (const int32_t b : blocks) {
      int32_t& r = ref_[static_cast<size_t>(b)];
      if (r == 0) {
        ++bad_releases_;
        continue;
      }
      if (--r > 0) continue;
      if (registry_.count(b) == 1) {
        lru_.push_back(b);
      } else {
        pool_.insert(b);
      }
    }
  }

  void reset() {
    for (const int32_t b : lru_) pool_.insert(b);
    lru_.clear();
    registry_.clear();
  }

  void check(const KvBlockManager& m) const {
    const KvBlockStats s = m.stats();
    EXPECT_EQ(s.num_blocks, n_);
    EXPECT_EQ(s.free_blocks + s.used_blocks, n_);
    EXPECT_EQ(s.free_blocks, static_cast<int64_t>(pool_.size() + lru_.size()));
    EXPECT_EQ(m.free_blocks(), s.free_blocks);
    EXPECT_DOUBLE_EQ(m.usage(), static_cast<double>(s.used_blocks) / static_cast<double>(n_));
    EXPECT_EQ(s.cached_blocks, static_cast<int64_t>(registry_.size()));
    EXPECT_EQ(s.prefix_queries_tokens, queries_);
    EXPECT_EQ(s.prefix_hits_tokens, hits_);
    EXPECT_EQ(s.evictions, evictions_);
    EXPECT_EQ(s.bad_releases, bad_releases_);
    EXPECT_EQ(s.hash_collisions, collisions_);
    int64_t used = 0;
    for (int32_t b = 0; b < n_; ++b) {
      const int32_t r = m.ref_count(b);
      ASSERT_GE(r, 0);
      ASSERT_EQ(r, ref_[static_cast<size_t>(b)]) << "block " << b;
      ASSERT_EQ(m.is_cached(b), registry_.count(b) == 1) << "block " << b;
      if (r > 0) ++used;
    }
    EXPECT_EQ(used, s.used_blocks);
  }

  int32_t ref(int32_t b) const { return ref_[static_cast<size_t>(b)]; }
  bool caching() const { return caching_; }

 private:
  void take(int32_t b) {
    int32_t& r = ref_[static_cast<size_t>(b)];
    if (r == 0) lru_.remove(b);
    ++r;
  }

  int64_t n_;
  int64_t bs_;
  bool caching_;
  KvBlockManager::ChainHashFn hash_;
  std::vector<int32_t> ref_;
  std::set<int32_t> pool_;
  std::list<int32_t> lru_;  // front: least recently released
  std::map<int32_t, Entry> registry_;
  uint64_t queries_ = 0, hits_ = 0, evictions_ = 0, bad_releases_ = 0, collisions_ = 0;
};

struct Sequence {
  Tokens tokens;
  Blocks blocks;                 // ceil(tokens / block_size) blocks
  std::vector<uint64_t> hashes;  // chain hash of each full block
};

// Drives the manager as a scheduler would (prompts with shared prefixes, decode steps, forks,
// finishes, raw allocations, resets) and checks it against the model after every operation.
// Its final stats go to *out (void, for ASSERT_*).
void stress(uint32_t seed, bool caching, KvBlockManager::ChainHashFn hash, int ops,
            KvBlockStats* out) {
  constexpr int64_t kBlocks = 40;
  constexpr int64_t kBs = 4;
  KvBlockManager m(kBlocks, kBs, caching);
  m.set_chain_hash_for_testing(hash);
  ReferenceModel model(kBlocks, kBs, caching, hash);
  std::mt19937 rng(seed);
  auto uniform = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  // A tiny vocabulary and a few shared stems make equal blocks, shared prefixes and divergence.
  std::vector<Tokens> stems;
  for (int i = 0; i < 4; ++i) {
    Tokens s;
    for (int j = 0; j < 16; ++j) s.push_back(static_cast<int32_t>(uniform(0, 2)));
    stems.push_back(s);
  }
  std::vector<Sequence> seqs;
  std::vector<Blocks> raw;  // holders of blocks that are never committed

  auto commit_block = [&](Sequence& s, size_t k) {
    const uint64_t parent = k == 0 ? 0 : s.hashes[k - 1];
    const Tokens t = slice(s.tokens, static_cast<int64_t>(k) * kBs, kBs);
    const uint64_t h = m.commit_full_block(s.blocks[k], parent, t);
    model.commit(s.blocks[k], parent, t, h);
    s.hashes.push_back(h);
  };
  auto release = [&](const Blocks& b) {
    m.release(b);
    model.release(b);
  };
  auto allocate = [&](int64_t n) {
    auto got = m.allocate(n);
    model.allocate(n, got);
    return got;
  };

  for (int op = 0; op < ops; ++op) {
    SCOPED_TRACE(testing::Message() << "op " << op);
    const int64_t kind = uniform(0, 99);
    if (kind < 25) {
      // A new prompt: a stem's prefix plus a random tail.
      Sequence s;
      const Tokens& stem = stems[static_cast<size_t>(uniform(0, 3))];
      s.tokens.assign(stem.begin(), stem.begin() + uniform(0, 16));
      for (int64_t i = uniform(s.tokens.empty() ? 1 : 0, 9); i > 0; --i) {
        s.tokens.push_back(static_cast<int32_t>(uniform(0, 2)));
      }
      const auto size = static_cast<int64_t>(s.tokens.size());
      const int64_t max_blocks = uniform(0, 3) == 0 ? uniform(0, 5) : (size - 1) / kBs;
      const Blocks expected = model.expected_match(s.tokens, max_blocks);
      s.blocks = m.match_prefix(s.tokens, max_blocks);
      ASSERT_EQ(s.blocks, expected);
      model.match(s.tokens, s.blocks);
      for (size_t k = 0; k < s.blocks.size(); ++k) {
        s.hashes.push_back(model.key(k == 0 ? 0 : s.hashes[k - 1],
                                     slice(s.tokens, static_cast<int64_t>(k) * kBs, kBs)));
      }
      const int64_t needed = (size + kBs - 1) / kBs - static_cast<int64_t>(s.blocks.size());
      auto fresh = allocate(needed);
      if (!fresh) {
        release(reversed(s.blocks));
      } else {
        s.blocks.insert(s.blocks.end(), fresh->begin(), fresh->end());
        for (size_t k = s.hashes.size(); k < static_cast<size_t>(size / kBs); ++k) {
          commit_block(s, k);
        }
        seqs.push_back(std::move(s));
      }
    } else if (kind < 50 && !seqs.empty()) {
      // Decode steps: append tokens, a new block when the last is full, commit full blocks.
      Sequence& s = seqs[static_cast<size_t>(uniform(0, static_cast<int64_t>(seqs.size()) - 1))];
      for (int64_t i = uniform(1, kBs + 1); i > 0; --i) {
        if (s.tokens.size() % kBs == 0) {
          auto fresh = allocate(1);
          if (!fresh) break;
          s.blocks.push_back((*fresh)[0]);
        }
        s.tokens.push_back(static_cast<int32_t>(uniform(0, 2)));
        if (s.tokens.size() % kBs == 0) commit_block(s, s.tokens.size() / kBs - 1);
      }
    } else if (kind < 60 && !seqs.empty()) {
      // Fork: share the full blocks, copy the partial tail into a fresh block.
      const Sequence& parent =
          seqs[static_cast<size_t>(uniform(0, static_cast<int64_t>(seqs.size()) - 1))];
      Sequence child = parent;
      const size_t full = parent.tokens.size() / kBs;
      child.blocks.resize(full);
      m.retain(child.blocks);
      model.retain(child.blocks);
      bool ok = true;
      if (child.tokens.size() % kBs != 0) {
        auto fresh = allocate(1);
        if (fresh) {
          child.blocks.push_back((*fresh)[0]);
        } else {
          release(child.blocks);
          ok = false;
        }
      }
      if (ok) seqs.push_back(std::move(child));
    } else if (kind < 80 && !seqs.empty()) {
      // Finish (tail first, as the scheduler does; sometimes head first).
      const auto i = static_cast<size_t>(uniform(0, static_cast<int64_t>(seqs.size()) - 1));
      release(uniform(0, 3) == 0 ? seqs[i].blocks : reversed(seqs[i].blocks));
      seqs.erase(seqs.begin() + static_cast<ptrdiff_t>(i));
    } else if (kind < 88) {
      auto got = allocate(uniform(0, 6));
      if (got) raw.push_back(*got);
    } else if (kind < 95 && !raw.empty()) {
      const auto i = static_cast<size_t>(uniform(0, static_cast<int64_t>(raw.size()) - 1));
      release(raw[i]);
      raw.erase(raw.begin() + static_cast<ptrdiff_t>(i));
    } else if (kind < 97) {
      m.reset_prefix_cache();
      model.reset();
    } else {
#ifdef NDEBUG
      // Release of a free block: ignored and counted (it asserts in debug builds).
      const auto b = static_cast<int32_t>(uniform(0, kBlocks - 1));
      if (model.ref(b) == 0) release(Blocks{b});
#endif
    }
    model.check(m);
    // Every holder's view adds up to the reference counts.
    std::vector<int32_t> holders(kBlocks, 0);
    for (const Sequence& s : seqs) {
      ASSERT_EQ(s.blocks.size(), (s.tokens.size() + kBs - 1) / kBs);
      for (const int32_t b : s.blocks) ++holders[static_cast<size_t>(b)];
    }
    for (const Blocks& r : raw) {
      for (const int32_t b : r) ++holders[static_cast<size_t>(b)];
    }
    for (int32_t b = 0; b < kBlocks; ++b) {
      ASSERT_EQ(m.ref_count(b), holders[static_cast<size_t>(b)]) << "block " << b;
    }
    if (testing::Test::HasFatalFailure() || testing::Test::HasNonfatalFailure()) {
      *out = m.stats();
      return;
    }
  }
  for (const Sequence& s : seqs) release(reversed(s.blocks));
  for (const Blocks& r : raw) release(r);
  model.check(m);
  EXPECT_EQ(m.free_blocks(), kBlocks);
  *out = m.stats();
}

// The run went through the interesting paths (so the checks above had something to check).
void expect_exercised(const KvBlockStats& s) {
  EXPECT_GT(s.prefix_hits_tokens, 0u);
  EXPECT_LT(s.prefix_hits_tokens, s.prefix_queries_tokens);
  EXPECT_GT(s.evictions, 0u);
#ifdef NDEBUG
  EXPECT_GT(s.bad_releases, 0u);
#endif
}

TEST(KvBlockManagerTest, RandomizedAgainstReferenceModel) {
  for (uint32_t seed = 1; seed <= 3; ++seed) {
    SCOPED_TRACE(testing::Message() << "seed " << seed);
    KvBlockStats s;
    stress(seed, true, &KvBlockManager::chain_hash, 4000, &s);
    expect_exercised(s);
    EXPECT_EQ(s.hash_collisions, 0u);
  }
  SCOPED_TRACE("prefix caching off");
  KvBlockStats off;
  stress(7, false, &KvBlockManager::chain_hash, 2000, &off);
  EXPECT_EQ(off.evictions, 0u);
  EXPECT_EQ(off.prefix_queries_tokens, 0u);
}

TEST(KvBlockManagerTest, RandomizedAgainstReferenceModelWithAWeakHash) {
  // Sum-of-tokens chain hashes collide all the time: the table must still never match wrongly.
  KvBlockStats s;
  stress(11, true, &sum_hash, 4000, &s);
  expect_exercised(s);
  EXPECT_GT(s.hash_collisions, 0u);
}

}  // namespace
}  // namespace moemesh
