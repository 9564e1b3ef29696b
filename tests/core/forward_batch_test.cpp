// Model::forward_batch: one decode step over several sequences gives, row by row, exactly what
// forward() gives each sequence alone.
#include <gtest/gtest.h>

#include <vector>

#include "core/model.h"
#include "tests/core/expert_shard_helpers.h"

namespace moemesh {
namespace {

using test::fixture;

class ForwardBatch : public ::testing::TestWithParam<const char*> {};

TEST_P(ForwardBatch, EachRowEqualsTheSequenceAlone) {
  auto model = Model::load(fixture(GetParam()));
  ASSERT_TRUE(model) << model.error().message();
  Model& m = **model;
  const int64_t vocab = m.config().vocab_size;
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3}, {7}, {9, 8, 7, 6, 5}};
  std::vector<KVCache> batched, alone;
  std::vector<float> logits;
  for (const auto& p : prompts) {
    batched.push_back(m.new_cache(16));
    alone.push_back(m.new_cache(16));
    ASSERT_TRUE(m.forward(batched.back(), p, Logits::Last, logits));
    ASSERT_TRUE(m.forward(alone.back(), p, Logits::Last, logits));
  }
  std::vector<int32_t> next = {11, 12, 13};
  for (int step = 0; step < 3; ++step) {
    std::vector<KVCache*> caches;
    for (KVCache& c : batched) caches.push_back(&c);
    std::vector<float> rows;
    ASSERT_TRUE(m.forward_batch(caches, next, rows));
    ASSERT_EQ(rows.size(), static_cast<std::size_t>(3 * vocab));
    for (std::size_t b = 0; b < prompts.size(); ++b) {
      std::vector<float> one;
      ASSERT_TRUE(m.forward(alone[b], std::span<const int32_t>(&next[b], 1), Logits::Last, one));
      const std::vector<float> row(rows.begin() + static_cast<int64_t>(b) * vocab,
                                   rows.begin() + static_cast<int64_t>(b + 1) * vocab);
      EXPECT_EQ(row, one) << "sequence " << b << " step " << step;
      EXPECT_EQ(batched[b].length(), alone[b].length());
      next[b] = test::argmax(one.data(), vocab);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ForwardBatch,
                         ::testing::Values("qwen2moe-tiny", "mixtral-bf16", "olmoe-bf16-clip",
                                           "deepseek-v3-bf16", "deepseek-v2-tiny", "glm4moe-tiny",
                                           "glm4moe-bf16", "dbrx-tiny", "dbrx-bf16-clip"));

TEST(ForwardBatchErrors, BadBatchesChangeNoCache) {
  auto model = Model::load(fixture("qwen3moe-tiny"));
  ASSERT_TRUE(model) << model.error().message();
  Model& m = **model;
  KVCache a = m.new_cache(4), b = m.new_cache(1);
  std::vector<float> logits;
  ASSERT_TRUE(m.forward(b, std::vector<int32_t>{1}, Logits::Last, logits));  // b is full
  std::vector<KVCache*> twice = {&a, &a};
  Status s = m.forward_batch(twice, std::vector<int32_t>{1, 2}, logits);
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("same cache twice"), std::string::npos);
  std::vector<KVCache*> one = {&a};
  s = m.forward_batch(one, std::vector<int32_t>{1, 2}, logits);
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("one token per sequence"), std::string::npos);
  std::vector<KVCache*> full = {&a, &b};
  s = m.forward_batch(full, std::vector<int32_t>{1, 2}, logits);
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("capacity"), std::string::npos);
  EXPECT_EQ(a.length(), 0);
  EXPECT_EQ(b.length(), 1);
}

}  // namespace
}  // namespace moemesh
