// The paged KV cache through the Model API: prefix caching gives the same logits as computing
// everything, forks continue like their source, caches grow and clear, a full pool is an error
// and not a crash, mixed chunks in one step equal separate passes, and the bf16 and fp8 value
// dtypes stay within stated bounds of float32 on the fixtures.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/model.h"
#include "tests/core/expert_shard_helpers.h"

namespace moemesh {
namespace {

using test::fixture;
using test::fixture_prompt;

std::unique_ptr<Model> load(const char* name, const std::string& dtype = "f32", bool prefix = false,
                            int64_t max_tokens = 0) {
  auto m = Model::load(fixture(name));
  EXPECT_TRUE(m) << m.error().message();
  auto model = std::move(*m);
  EXPECT_TRUE(model->configure_kv_cache(dtype, 4, max_tokens, 0, prefix));
  return model;
}

std::vector<int32_t> long_prompt(const std::string& name, std::size_t n) {
  std::vector<int32_t> p = fixture_prompt(name);
  std::vector<int32_t> out;
  for (std::size_t i = 0; out.size() < n; ++i)
    out.push_back((p[i % p.size()] + static_cast<int32_t>(i / p.size())) % 50);
  return out;
}

double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return a.size() == b.size() ? std::sqrt(num / den) : INFINITY;
}

TEST(KvCachePrefix, CachedPrefixGivesIdenticalLogits) {
  for (const char* name : {"qwen2moe-tiny", "olmoe-bf16-clip"}) {
    auto cached = load(name, "f32", /*prefix=*/true);
    auto fresh = load(name, "f32", /*prefix=*/false);
    const std::vector<int32_t> a = long_prompt(name, 22);
    std::vector<int32_t> b(a.begin(), a.begin() + 17);  // shares 4 full blocks of 4 with a
    b.push_back(7);
    b.push_back(9);
    std::vector<float> la, lb, ref;
    KVCache ca = cached->new_cache(32);
    ASSERT_TRUE(cached->forward(ca, a, Logits::Last, la));

    int64_t hit = 0;
    KVCache cb = cached->new_cache_from_prefix(b, &hit);
    EXPECT_EQ(hit, 16) << name;
    EXPECT_EQ(cb.length(), 16);
    ASSERT_TRUE(cached->reserve(cb, static_cast<int64_t>(b.size())));
    ASSERT_TRUE(cached->forward(cb, std::span<const int32_t>(b).subspan(16), Logits::All, lb));
    KVCache cr = fresh->new_cache(32);
    ASSERT_TRUE(fresh->forward(cr, b, Logits::All, ref));
    // The rows of b's last three positions: computed from cached blocks, and from scratch.
    const auto V = static_cast<std::size_t>(fresh->config().vocab_size);
    const std::vector<float> tail(ref.end() - static_cast<std::ptrdiff_t>(3 * V), ref.end());
    EXPECT_EQ(lb, tail) << name;
    const KvCacheStats s = cached->kv_stats();
    EXPECT_GE(s.prefix_hits_tokens, 16u);
    EXPECT_GE(s.prefix_queries_tokens, b.size());
  }
}

TEST(KvCachePrefix, AWholePromptHitLeavesTheLastTokenToCompute) {
  auto m = load("qwen3moe-tiny", "f32", true);
  const std::vector<int32_t> p = long_prompt("qwen3moe-tiny", 16);  // exactly 4 blocks
  KVCache c = m->new_cache(16);
  std::vector<float> logits;
  ASSERT_TRUE(m->forward(c, p, Logits::Last, logits));
  int64_t hit = 0;
  KVCache again = m->new_cache_from_prefix(p, &hit);
  EXPECT_EQ(hit, 12);  // 3 blocks: the 4th holds the last token, whose logits are needed
}

TEST(KvCacheFork, AForkContinuesLikeItsSource) {
  auto m = load("mixtral-tiny");
  const std::vector<int32_t> p = long_prompt("mixtral-tiny", 10);  // 2 full blocks + 2 tokens
  KVCache a = m->new_cache(16);
  std::vector<float> la, lb;
  ASSERT_TRUE(m->forward(a, p, Logits::Last, la));
  Expected<KVCache> b = m->fork(a);
  ASSERT_TRUE(b) << b.error().message();
  EXPECT_EQ(b->length(), a.length());
  EXPECT_EQ(b->capacity(), a.capacity());
  const std::vector<int32_t> next = {3};
  ASSERT_TRUE(m->forward(a, next, Logits::Last, la));
  ASSERT_TRUE(m->forward(*b, next, Logits::Last, lb));
  EXPECT_EQ(la, lb);
  // Diverging after the fork leaves the other untouched.
  ASSERT_TRUE(m->forward(a, std::vector<int32_t>{5}, Logits::Last, la));
  ASSERT_TRUE(m->forward(*b, std::vector<int32_t>{5}, Logits::Last, lb));
  EXPECT_EQ(la, lb);
}

TEST(KvCachePool, GrowClearAndAFullPool) {
  auto m = load("qwen3moe-tiny", "f32", false, /*max_tokens=*/12);  // 3 blocks of 4
  EXPECT_EQ(m->kv_stats().num_blocks, 3);
  KVCache a = m->new_cache(8);
  EXPECT_EQ(a.capacity(), 8);
  KVCache b = m->new_cache(8);  // 1 block left: refused
  EXPECT_EQ(b.capacity(), 0);
  std::vector<float> logits;
  const Status s = m->forward(b, std::vector<int32_t>{1}, Logits::Last, logits);
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("pool"), std::string::npos) << s.error().message();
  EXPECT_TRUE(m->reserve(a, 12));
  EXPECT_EQ(a.capacity(), 12);
  EXPECT_FALSE(m->reserve(a, 16));  // nothing left; nothing changes
  EXPECT_EQ(a.capacity(), 12);
  ASSERT_TRUE(m->forward(a, std::vector<int32_t>{1, 2, 3}, Logits::Last, logits));
  a.clear();
  EXPECT_EQ(a.length(), 0);
  EXPECT_EQ(a.capacity(), 12);
  { KVCache gone = std::move(a); }
  EXPECT_EQ(m->kv_stats().free_blocks, 3);
  EXPECT_DOUBLE_EQ(m->kv_stats().usage, 0.0);
}

TEST(KvCacheStep, MixedChunksEqualSeparatePasses) {
  auto m = load("olmoe-tiny");
  const std::vector<int32_t> p1 = long_prompt("olmoe-tiny", 9), p2 = long_prompt("olmoe-tiny", 5);
  KVCache a = m->new_cache(32), b = m->new_cache(32), c = m->new_cache(32), d = m->new_cache(32);
  std::vector<float> la, lb, step;
  ASSERT_TRUE(m->forward(a, p1, Logits::Last, la));  // a: decoding; b: prefilling
  ASSERT_TRUE(m->forward(c, p1, Logits::Last, la));
  const std::vector<int32_t> tok = {4};
  std::vector<Model::Chunk> chunks = {{&a, tok, true}, {&b, p2, true}};
  ASSERT_TRUE(m->forward_step(chunks, step));
  const auto V = static_cast<std::size_t>(m->config().vocab_size);
  ASSERT_EQ(step.size(), 2 * V);
  ASSERT_TRUE(m->forward(c, tok, Logits::Last, la));
  ASSERT_TRUE(m->forward(d, p2, Logits::Last, lb));
  EXPECT_EQ(std::vector<float>(step.begin(), step.begin() + V), la);
  EXPECT_EQ(std::vector<float>(step.begin() + V, step.end()), lb);
  // A chunk that wants no logits gives no row.
  chunks = {{&a, tok, false}, {&b, tok, true}};
  ASSERT_TRUE(m->forward_step(chunks, step));
  EXPECT_EQ(step.size(), V);
  // The same cache twice is refused.
  chunks = {{&a, tok, true}, {&a, tok, true}};
  EXPECT_FALSE(m->forward_step(chunks, step));
}

// bf16 and fp8 values against float32 ones: logits over a 40-token prompt on each fixture.
TEST(KvCacheDtype, Bf16AndFp8StayCloseToFloat32) {
  for (const char* name : {"qwen2moe-bf16", "mixtral-tiny", "olmoe-bf16-clip", "qwen3moe-tiny"}) {
    const std::vector<int32_t> p = long_prompt(name, 40);
    std::vector<float> ref, bf16, fp8;
    for (auto [dtype, out] : {std::pair{"f32", &ref}, {"bf16", &bf16}, {"fp8", &fp8}}) {
      auto m = load(name, dtype);
      KVCache c = m->new_cache(48);
      ASSERT_TRUE(m->forward(c, p, Logits::All, *out)) << dtype;
    }
    const double e_bf16 = rel_error(bf16, ref), e_fp8 = rel_error(fp8, ref);
    // e4m3 keeps 3 mantissa bits (a rounding error of up to 2^-4 per value); on these tiny random
    // models the logits move 5-9% (relative to their norm) with fp8 values, under 1% with bf16.
    EXPECT_LT(e_bf16, 1e-2) << name;
    EXPECT_LT(e_fp8, 0.15) << name;
    EXPECT_LT(rel_error(fp8, bf16), 0.15) << name;
    RecordProperty(std::string(name) + "_bf16_rel_error", std::to_string(e_bf16));
    RecordProperty(std::string(name) + "_fp8_rel_error", std::to_string(e_fp8));
  }
}

TEST(KvCacheConfig, BadSettingsAreRefused) {
  auto m = Model::load(fixture("qwen3moe-tiny"));
  ASSERT_TRUE(m);
  Status s = (*m)->configure_kv_cache("int4", 16, 0, 0, false);
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("int4"), std::string::npos);
  EXPECT_FALSE((*m)->configure_kv_cache("bf16", 0, 0, 0, false));
  KVCache held = (*m)->new_cache(4);
  s = (*m)->configure_kv_cache("bf16", 16, 0, 0, false);
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("hold blocks"), std::string::npos);
}

}  // namespace
}  // namespace moemesh
