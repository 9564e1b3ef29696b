// glm4_moe (partial rotary embeddings, dense first layers, grouped sigmoid routing) and dbrx
// (LayerNorm, fused Wqkv and experts, p-norm routing) through the paged KV cache: chunked prefill
// through forward_step and token-by-token decode give the logits of one forward over the whole
// sequence; prefix caching and fork reuse cached rows exactly; bf16 and fp8 caches stay close; a
// dbrx expert shard holds only the slices of its experts; the GPU backend refuses both cleanly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/config.h"
#include "core/expert_shard.h"
#include "core/model.h"
#include "tests/core/expert_shard_helpers.h"

namespace moemesh {
namespace {

using test::fixture;

std::unique_ptr<Model> load(const char* name, const std::string& dtype = "f32", bool prefix = false,
                            int64_t block_size = 4) {
  auto m = Model::load(fixture(name), {.threads = 2});
  EXPECT_TRUE(m) << m.error().message();
  auto model = std::move(*m);
  EXPECT_TRUE(model->configure_kv_cache(dtype, block_size, 0, 0, prefix));
  return model;
}

std::vector<int32_t> sequence(const std::string& name, std::size_t n) {
  std::vector<int32_t> p = test::fixture_prompt(name);
  std::vector<int32_t> out;
  for (std::size_t i = 0; out.size() < n; ++i)
    out.push_back((p[i % p.size()] + static_cast<int32_t>(3 * (i / p.size()))) % 97);
  return out;
}

float max_diff(const float* a, const float* b, std::size_t n) {
  float d = 0;
  for (std::size_t i = 0; i < n; ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return a.size() == b.size() ? std::sqrt(num / den) : INFINITY;
}

class FamilyCache : public ::testing::TestWithParam<const char*> {};

// The scheduler's path: a prompt cut into chunks (with another sequence in the same steps), then
// decoded token by token, gives every row of one whole forward.
TEST_P(FamilyCache, ChunkedPrefillAndDecodeEqualOneForward) {
  auto m = load(GetParam());
  const auto V = static_cast<std::size_t>(m->config().vocab_size);
  const std::vector<int32_t> seq = sequence(GetParam(), 23);
  KVCache whole = m->new_cache(32);
  std::vector<float> ref;
  ASSERT_TRUE(m->forward(whole, seq, Logits::All, ref));

  KVCache a = m->new_cache(32), other = m->new_cache(32);
  const std::span<const int32_t> s(seq);
  std::vector<float> step;
  int64_t pos = 0;
  for (int64_t len : {5, 6, 3}) {
    std::vector<Model::Chunk> chunks = {{&other, s.subspan(0, 2), false},
                                        {&a, s.subspan(pos, len), true}};
    ASSERT_TRUE(m->forward_step(chunks, step));
    ASSERT_EQ(step.size(), V);
    pos += len;
    EXPECT_LE(max_diff(step.data(), &ref[(pos - 1) * V], V), 1e-5f) << "chunk ending at " << pos;
  }
  for (; pos < static_cast<int64_t>(seq.size()); ++pos) {
    std::vector<Model::Chunk> chunks = {{&a, s.subspan(pos, 1), true},
                                        {&other, s.subspan(pos, 1), true}};
    ASSERT_TRUE(m->forward_step(chunks, step));
    ASSERT_EQ(step.size(), 2 * V);
    EXPECT_LE(max_diff(step.data(), &ref[pos * V], V), 1e-5f) << "position " << pos;
  }
  EXPECT_EQ(a.length(), static_cast<int64_t>(seq.size()));
}

TEST_P(FamilyCache, PrefixCachingAndForkReuseCachedRowsExactly) {
  auto cached = load(GetParam(), "f32", /*prefix=*/true);
  auto fresh = load(GetParam());
  const std::vector<int32_t> a = sequence(GetParam(), 21);
  std::vector<int32_t> b(a.begin(), a.begin() + 13);  // shares 3 full blocks of 4 with a
  b.push_back(5);
  b.push_back(8);
  std::vector<float> la, lb, ref;
  KVCache ca = cached->new_cache(32);
  ASSERT_TRUE(cached->forward(ca, a, Logits::Last, la));
  int64_t hit = 0;
  KVCache cb = cached->new_cache_from_prefix(b, &hit);
  EXPECT_EQ(hit, 12);
  ASSERT_TRUE(cached->reserve(cb, static_cast<int64_t>(b.size()) + 4));
  ASSERT_TRUE(cached->forward(cb, std::span<const int32_t>(b).subspan(12), Logits::All, lb));
  KVCache cr = fresh->new_cache(32);
  ASSERT_TRUE(fresh->forward(cr, b, Logits::All, ref));
  const auto V = static_cast<std::size_t>(fresh->config().vocab_size);
  EXPECT_EQ(lb, std::vector<float>(ref.end() - static_cast<std::ptrdiff_t>(3 * V), ref.end()));

  // A fork of the partly filled cache continues exactly like its source, and apart from it.
  Expected<KVCache> fork = cached->fork(cb);
  ASSERT_TRUE(fork) << fork.error().message();
  std::vector<float> lf;
  ASSERT_TRUE(cached->forward(cb, std::vector<int32_t>{3}, Logits::Last, lb));
  ASSERT_TRUE(cached->forward(*fork, std::vector<int32_t>{3}, Logits::Last, lf));
  EXPECT_EQ(lb, lf);
  ASSERT_TRUE(cached->forward(cb, std::vector<int32_t>{4}, Logits::Last, lb));
  ASSERT_TRUE(cached->forward(*fork, std::vector<int32_t>{9}, Logits::Last, lf));
  KVCache check = fresh->new_cache(32);
  std::vector<int32_t> forked = b;
  forked.insert(forked.end(), {3, 9});
  ASSERT_TRUE(fresh->forward(check, forked, Logits::Last, ref));
  EXPECT_LE(max_diff(lf.data(), ref.data(), V), 1e-5f);
  EXPECT_NE(lb, lf);
}

TEST_P(FamilyCache, Bf16AndFp8CachesStayCloseToFloat32) {
  const std::vector<int32_t> p = sequence(GetParam(), 40);
  std::vector<float> ref, bf16, fp8;
  for (auto [dtype, out] : {std::pair{"f32", &ref}, {"bf16", &bf16}, {"fp8", &fp8}}) {
    auto m = load(GetParam(), dtype);
    KVCache c = m->new_cache(48);
    ASSERT_TRUE(m->forward(c, p, Logits::All, *out)) << dtype;
  }
  const double e_bf16 = rel_error(bf16, ref), e_fp8 = rel_error(fp8, ref);
  // bf16: the bound of the other families (kv_cache_test.cpp). fp8 (e4m3, one scale per token and
  // kv head) measured glm4moe-tiny 0.126, glm4moe-bf16 0.106, dbrx-tiny 0.162, dbrx-bf16-clip
  // 0.030: dbrx-tiny's keys and values are never clipped (clip_qkv 8), nor normalised, and
  // spread wider in a row than fp8's 3 mantissa bits resolve. 0.2 still fails a wrong scale or
  // row (errors of order 1).
  EXPECT_LT(e_bf16, 1e-2);
  EXPECT_LT(e_fp8, 0.2);
  RecordProperty("bf16_rel_error", std::to_string(e_bf16));
  RecordProperty("fp8_rel_error", std::to_string(e_fp8));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, FamilyCache,
                         ::testing::Values("glm4moe-tiny", "glm4moe-bf16", "dbrx-tiny",
                                           "dbrx-bf16-clip"),
                         [](const auto& param_info) {
                           std::string n = param_info.param;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

// An expert worker's dbrx shard binds the rows of its experts in the fused w1 / v1 / w2 tensors,
// not the tensors: its weights are three [ffn_hidden_size, d_model] matrices per expert.
TEST(DbrxExpertShard, HoldsOnlyTheSlicesOfItsExperts) {
  for (const char* name : {"dbrx-tiny", "dbrx-bf16-clip"}) {
    Expected<ModelConfig> c = load_model_config(fixture(name));
    ASSERT_TRUE(c) << c.error().message();
    const std::vector<ExpertRef> mine = {{0, 1}, {1, 0}, {1, 3}};
    Expected<std::unique_ptr<ExpertShard>> shard =
        ExpertShard::load(fixture(name), mine, {.threads = 2});
    ASSERT_TRUE(shard) << shard.error().message();
    const int64_t bytes = std::string(name) == "dbrx-tiny" ? 4 : 2;
    EXPECT_EQ((*shard)->weight_bytes(), 3 * 3 * c->moe_intermediate_size * c->hidden_size * bytes)
        << name;
    EXPECT_TRUE((*shard)->holds(1, 3));
    EXPECT_FALSE((*shard)->holds(1, 1));
    (*shard)->release(std::vector<ExpertRef>{{1, 3}});
    EXPECT_FALSE((*shard)->holds(1, 3));
    EXPECT_EQ((*shard)->weight_bytes(), 2 * 3 * c->moe_intermediate_size * c->hidden_size * bytes);
  }
}

}  // namespace
}  // namespace moemesh
