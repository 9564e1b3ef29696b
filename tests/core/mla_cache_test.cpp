// Multi-head latent attention (deepseek fixtures) through the paged KV cache: the cache holds the
// compressed latent and rotary key, not per-head keys and values; chunked prefill through
// forward_step and token-by-token decode give the logits of one forward over the whole sequence;
// prefix caching and fork reuse cached latent rows exactly; bf16 and fp8 latents stay close.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/config.h"
#include "core/detail/kv_store.h"
#include "core/model.h"
#include "tests/core/expert_shard_helpers.h"

namespace moemesh {
namespace {

using test::fixture;

std::unique_ptr<Model> load(const char* name, const std::string& dtype = "f32", bool prefix = false,
                            int64_t block_size = 4) {
  auto m = Model::load(fixture(name));
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

// DeepSeek-V3's own config.json shape (61 layers, 128 heads, kv_lora_rank 512, rope 64, nope 128,
// v 128): the CPU cache sizes a token by its latent row, 61 * 576 values, where expanded keys and
// values would take 61 * 128 * (192 + 128).
TEST(MlaCacheSize, DeepseekV3ShapedConfigCachesTheLatentOnly) {
  const char* json = R"({"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
    "v_head_dim": 128, "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8,
    "topk_group": 4, "moe_intermediate_size": 2048, "intermediate_size": 18432,
    "first_k_dense_replace": 3, "max_position_embeddings": 163840,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}})";
  Expected<ModelConfig> c = parse_model_config(json, "deepseek-v3/config.json");
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ(c->kv_values_per_token_layer(), 576);
  for (auto [dtype, bytes] : {std::pair{"bf16", 2}, {"f32", 4}, {"fp8", 1}}) {
    Expected<detail::KvStoreOptions> o =
        detail::kv_store_options(dtype, kernels::DType::BF16, 16, 0, 0, false);
    ASSERT_TRUE(o);
    const detail::KvStore store(*c, *o);
    const int64_t per_token = store.block_bytes() / store.block_size();
    const int64_t fp8_scales = std::string(dtype) == "fp8" ? 61 * 4 : 0;
    EXPECT_EQ(per_token, 61 * 576 * bytes + fp8_scales) << dtype;
    const int64_t expanded = int64_t{61} * 128 * (192 + 128) * bytes;
    RecordProperty(std::string(dtype) + "_latent_bytes_per_token", std::to_string(per_token));
    RecordProperty(std::string(dtype) + "_expanded_bytes_per_token", std::to_string(expanded));
  }
}

class MlaCache : public ::testing::TestWithParam<const char*> {};

TEST_P(MlaCache, HoldsTheLatentNotExpandedKeysAndValues) {
  auto m = load(GetParam(), "f32", false, 16);
  const ModelConfig& c = m->config();
  ASSERT_TRUE(c.mla.has_value());
  const int64_t latent = c.num_layers * (c.mla->kv_lora_rank + c.mla->qk_rope_head_dim) * 4;
  const int64_t expanded =
      c.num_layers * c.num_heads * (c.mla->qk_head_dim() + c.mla->v_head_dim) * 4;
  // Blocks are padded to 64 bytes: at most 64 / 16 bytes per token more than the latent rows.
  EXPECT_GE(m->kv_bytes_per_token(), latent);
  EXPECT_LE(m->kv_bytes_per_token(), latent + 4);
  EXPECT_LT(m->kv_bytes_per_token() * 3, expanded);
  RecordProperty("kv_bytes_per_token", std::to_string(m->kv_bytes_per_token()));
  RecordProperty("expanded_kv_bytes_per_token", std::to_string(expanded));
}

// Regression guard for the scheduler's path: a prompt cut into chunks (with other sequences in
// the same steps), then decoded token by token, gives every row of one whole forward.
TEST_P(MlaCache, ChunkedPrefillAndDecodeEqualOneForward) {
  auto m = load(GetParam());
  const auto V = static_cast<std::size_t>(m->config().vocab_size);
  const std::vector<int32_t> seq = sequence(GetParam(), 23);
  KVCache whole = m->new_cache(32);
  std::vector<float> ref;
  ASSERT_TRUE(m->forward(whole, seq, Logits::All, ref));

  KVCache a = m->new_cache(32), other = m->new_cache(32);
  const std::span<const int32_t> s(seq);
  std::vector<float> step;
  std::vector<float> got;
  // Prefill positions 0..13 in chunks of 5, 6 and 3, beside another sequence's chunks.
  int64_t pos = 0;
  for (int64_t len : {5, 6, 3}) {
    std::vector<Model::Chunk> chunks = {{&other, s.subspan(0, 2), false},
                                        {&a, s.subspan(pos, len), true}};
    ASSERT_TRUE(m->forward_step(chunks, step));
    ASSERT_EQ(step.size(), V);
    pos += len;
    got.insert(got.end(), step.begin(), step.end());
    EXPECT_LE(max_diff(step.data(), &ref[(pos - 1) * V], V), 1e-5f) << "chunk ending at " << pos;
  }
  // Decode the rest one token at a time, two sequences per step.
  for (; pos < static_cast<int64_t>(seq.size()); ++pos) {
    std::vector<Model::Chunk> chunks = {{&a, s.subspan(pos, 1), true},
                                        {&other, s.subspan(pos, 1), true}};
    ASSERT_TRUE(m->forward_step(chunks, step));
    ASSERT_EQ(step.size(), 2 * V);
    EXPECT_LE(max_diff(step.data(), &ref[pos * V], V), 1e-5f) << "position " << pos;
  }
  EXPECT_EQ(a.length(), static_cast<int64_t>(seq.size()));
}

TEST_P(MlaCache, PrefixCachingAndForkReuseLatentRowsExactly) {
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
  ASSERT_TRUE(cached->forward(cb, std::vector<int32_t>{9}, Logits::Last, lb));
  KVCache check = fresh->new_cache(32);
  std::vector<int32_t> forked = b;
  forked.insert(forked.end(), {3, 9});
  ASSERT_TRUE(fresh->forward(check, forked, Logits::Last, ref));
  EXPECT_LE(max_diff(lf.data(), ref.data(), V), 1e-5f);
  EXPECT_NE(lb, lf);
}

double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return a.size() == b.size() ? std::sqrt(num / den) : INFINITY;
}

TEST_P(MlaCache, Bf16AndFp8LatentsStayCloseToFloat32) {
  const std::vector<int32_t> p = sequence(GetParam(), 40);
  std::vector<float> ref, bf16, fp8;
  for (auto [dtype, out] : {std::pair{"f32", &ref}, {"bf16", &bf16}, {"fp8", &fp8}}) {
    auto m = load(GetParam(), dtype);
    KVCache c = m->new_cache(48);
    ASSERT_TRUE(m->forward(c, p, Logits::All, *out)) << dtype;
  }
  const double e_bf16 = rel_error(bf16, ref), e_fp8 = rel_error(fp8, ref);
  // The bounds of the other families (kv_cache_test.cpp): one fp8 scale per latent row here.
  EXPECT_LT(e_bf16, 1e-2);
  EXPECT_LT(e_fp8, 0.15);
  RecordProperty("bf16_rel_error", std::to_string(e_bf16));
  RecordProperty("fp8_rel_error", std::to_string(e_fp8));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, MlaCache,
                         ::testing::Values("deepseek-v3-tiny", "deepseek-v3-bf16",
                                           "deepseek-v2-tiny", "deepseek-v2-bf16"),
                         [](const auto& p) {
                           std::string n = p.param;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

}  // namespace
}  // namespace moemesh
