// ExpertShard: which experts it binds and holds, the errors of load() and add(), and run()
// against the model's own local experts.
#include "core/expert_shard.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "core/model.h"
#include "tests/core/expert_shard_helpers.h"

namespace moemesh {
namespace {

using test::Contains;
using test::fixture;
using test::ScopedTempDir;

std::unique_ptr<ExpertShard> load_ok(const std::filesystem::path& dir,
                                     const std::vector<ExpertRef>& experts) {
  Expected<std::unique_ptr<ExpertShard>> s = ExpertShard::load(dir, experts, {.threads = 2});
  EXPECT_TRUE(s.ok()) << s.error().message();
  return s.ok() ? std::move(*s) : nullptr;
}

std::string load_error(const std::filesystem::path& dir, const std::vector<ExpertRef>& experts) {
  Expected<std::unique_ptr<ExpertShard>> s = ExpertShard::load(dir, experts, {.threads = 2});
  EXPECT_FALSE(s.ok());
  return s.ok() ? "" : s.error().message();
}

// qwen2moe-tiny: 3 layers (layer 1 dense), 6 experts of width 16 over hidden 48, F32.
constexpr int64_t kQwenExpertBytes = 3 * 16 * 48 * 4;

TEST(ExpertShardLoad, HoldsOnlyTheListedExperts) {
  std::unique_ptr<ExpertShard> shard =
      load_ok(fixture("qwen2moe-tiny"), {{2, 5}, {0, 1}, {0, 1}, {2, 0}});
  ASSERT_NE(shard, nullptr);
  EXPECT_EQ(shard->config().num_experts, 6);
  EXPECT_EQ(shard->experts(), (std::vector<ExpertRef>{{0, 1}, {2, 0}, {2, 5}}));
  EXPECT_TRUE(shard->holds(0, 1));
  EXPECT_TRUE(shard->holds(2, 5));
  EXPECT_FALSE(shard->holds(0, 0));
  EXPECT_FALSE(shard->holds(1, 1));
  EXPECT_FALSE(shard->holds(2, 1));
  EXPECT_EQ(shard->weight_bytes(), 3 * kQwenExpertBytes);

  std::unique_ptr<ExpertShard> empty = load_ok(fixture("qwen2moe-tiny"), {});
  ASSERT_NE(empty, nullptr);
  EXPECT_TRUE(empty->experts().empty());
  EXPECT_EQ(empty->weight_bytes(), 0);

  // BF16 weights count two bytes per element (mixtral-bf16: hidden 32, intermediate 20).
  std::unique_ptr<ExpertShard> bf16 = load_ok(fixture("mixtral-bf16"), {{1, 4}});
  ASSERT_NE(bf16, nullptr);
  EXPECT_EQ(bf16->weight_bytes(), 3 * 20 * 32 * 2);
}

TEST(ExpertShardLoad, ErrorsNameTheProblem) {
  const std::filesystem::path dir = fixture("qwen2moe-tiny");
  std::string m = load_error(dir, {{0, 0}, {1, 0}});
  EXPECT_TRUE(Contains(m, "layer 1 is a dense layer"));
  EXPECT_TRUE(Contains(m, (dir / "config.json").string()));
  EXPECT_TRUE(Contains(m, "[0, 2]"));

  m = load_error(dir, {{0, 6}});
  EXPECT_TRUE(Contains(m, "expert 6 of layer 0 is out of range"));
  EXPECT_TRUE(Contains(m, "6 experts per MoE layer (ids 0 to 5)"));
  EXPECT_TRUE(Contains(load_error(dir, {{2, -1}}), "expert -1 of layer 2 is out of range"));

  m = load_error(dir, {{3, 0}});
  EXPECT_TRUE(Contains(m, "layer 3 is out of range"));
  EXPECT_TRUE(Contains(m, "num_hidden_layers=3"));
  EXPECT_TRUE(Contains(load_error(dir, {{-1, 0}}), "layer -1 is out of range"));

  ScopedTempDir tmp;
  m = load_error(tmp / "no-such-model", {{0, 0}});
  EXPECT_TRUE(Contains(m, (tmp / "no-such-model").string()));
  EXPECT_TRUE(Contains(m, "does not exist"));
  test::write_file(tmp / "config.json", test::read_file(dir / "config.json"));
  EXPECT_TRUE(Contains(load_error(tmp.path(), {{0, 0}}), "safetensors"));
}

// Only the listed experts' tensors are looked up: a checkpoint missing one expert's tensor serves
// every other expert, and names the tensor when asked for that one.
TEST(ExpertShardLoad, ChecksTheTensorsOfTheListedExpertsOnly) {
  const std::string missing = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
  ScopedTempDir dir;
  test::rewrite_checkpoint(fixture("mixtral-tiny"), dir.path(),
                           [&](const std::string& n) { return n != missing; });
  std::unique_ptr<ExpertShard> shard = load_ok(dir.path(), {{0, 3}, {1, 2}, {1, 4}});
  ASSERT_NE(shard, nullptr);

  std::string m = load_error(dir.path(), {{0, 3}, {1, 3}});
  EXPECT_TRUE(Contains(m, "\"" + missing + "\""));
  EXPECT_TRUE(Contains(m, dir.path().string()));

  // add() is all or nothing: a failure adds none of the experts.
  const std::vector<ExpertRef> more = {{0, 5}, {1, 3}};
  Status s = shard->add(more);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(Contains(s.error().message(), "\"" + missing + "\""));
  EXPECT_FALSE(shard->holds(0, 5));
  EXPECT_EQ(shard->experts().size(), 3u);

  // A transposed down projection: the shape found and the shape the config implies.
  const std::string down = "model.layers.0.block_sparse_moe.experts.6.w2.weight";
  ScopedTempDir transposed;
  test::rewrite_checkpoint(
      fixture("mixtral-tiny"), transposed.path(), [](const std::string&) { return true; }, false,
      [&](test::SafetensorsWriter& w) {
        w.set_header_shape(down, {24, 64});
      });
  m = load_error(transposed.path(), {{0, 6}});
  EXPECT_TRUE(Contains(m, "\"model.layers.0.block_sparse_moe.experts.6.w2.weight\""));
  EXPECT_TRUE(Contains(m, "[24, 64]"));
  EXPECT_TRUE(Contains(m, "[64, 24]"));
}

TEST(ExpertShardLoad, AddAndReleaseAtRunTime) {
  std::unique_ptr<ExpertShard> shard = load_ok(fixture("qwen2moe-tiny"), {{0, 0}});
  ASSERT_NE(shard, nullptr);
  const int64_t H = shard->config().hidden_size;
  std::vector<float> x(static_cast<std::size_t>(2 * H), 0.25f), y(x.size());

  const std::vector<ExpertRef> add = {{2, 4}, {0, 3}, {0, 0}};
  ASSERT_TRUE(shard->add(add).ok());
  EXPECT_EQ(shard->experts(), (std::vector<ExpertRef>{{0, 0}, {0, 3}, {2, 4}}));
  EXPECT_EQ(shard->weight_bytes(), 3 * kQwenExpertBytes);
  EXPECT_TRUE(shard->run(2, 4, x.data(), 2, y.data()).ok());

  // Bad refs fail add() as they fail load(), adding nothing.
  const std::vector<ExpertRef> bad = {{2, 1}, {1, 0}};
  Status s = shard->add(bad);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(Contains(s.error().message(), "layer 1 is a dense layer"));
  EXPECT_FALSE(shard->holds(2, 1));

  const std::vector<ExpertRef> drop = {{0, 0}, {2, 4}, {2, 2}};
  shard->release(drop);
  EXPECT_EQ(shard->experts(), (std::vector<ExpertRef>{{0, 3}}));
  EXPECT_EQ(shard->weight_bytes(), kQwenExpertBytes);
  s = shard->run(2, 4, x.data(), 2, y.data());
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(Contains(s.error().message(), "expert 4 of layer 2 is not held"));

  // And back again.
  const std::vector<ExpertRef> again = {{2, 4}};
  ASSERT_TRUE(shard->add(again).ok());
  EXPECT_TRUE(shard->holds(2, 4));
  EXPECT_TRUE(shard->run(0, 3, x.data(), 0, y.data()).ok());
  EXPECT_FALSE(shard->run(0, 3, x.data(), -1, y.data()).ok());
}

// run(layer, e, x, m) equals the local backend with every token routed to e at weight 1 (out
// starts at zero, and 0 + 1 * y == y), bit for bit: the same weights and kernel.
void expect_run_matches_local(const std::filesystem::path& dir) {
  Expected<std::unique_ptr<Model>> model = Model::load(dir, {.threads = 2});
  ASSERT_TRUE(model.ok()) << model.error().message();
  const ModelConfig& c = (*model)->config();
  const std::vector<ExpertRef> all = [&] {
    std::vector<ExpertRef> v = test::experts_with_parity(c, 0),
                           odd = test::experts_with_parity(c, 1);
    v.insert(v.end(), odd.begin(), odd.end());
    return v;
  }();
  std::unique_ptr<ExpertShard> shard = load_ok(dir, all);
  ASSERT_NE(shard, nullptr);
  const int64_t H = c.hidden_size, m = 3;
  std::vector<float> x(static_cast<std::size_t>(m * H));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * static_cast<float>(i % 97) - 0.4f;
  const std::vector<float> ones(m, 1.0f);
  for (const ExpertRef& r : all) {
    std::vector<float> y(x.size()), local(x.size(), 0.0f);
    ASSERT_TRUE(shard->run(r.layer, r.expert, x.data(), m, y.data()).ok());
    const std::vector<int32_t> ids(m, r.expert);
    ASSERT_TRUE((*model)
                    ->local_experts()
                    .compute(r.layer, x.data(), m, ids.data(), ones.data(), 1, local.data())
                    .ok());
    ASSERT_EQ(y, local) << dir << " layer " << r.layer << " expert " << r.expert;
  }
}

TEST(ExpertShardRun, MatchesTheLocalExperts) {
  for (const char* name :
       {"mixtral-tiny", "mixtral-bf16", "qwen2moe-bf16", "olmoe-bf16-clip", "deepseek-v3-tiny",
        "deepseek-v2-tiny", "glm4moe-tiny", "glm4moe-bf16", "dbrx-tiny", "dbrx-bf16-clip"})
    expect_run_matches_local(fixture(name));
}

// Fused gate_up_proj / down_proj checkpoints bind to the same experts as per-expert ones.
TEST(ExpertShardRun, FusedCheckpointsBindTheSameExperts) {
  ScopedTempDir fused;
  test::rewrite_checkpoint(
      fixture("qwen2moe-bf16"), fused.path(), [](const std::string&) { return true; }, true);
  Expected<std::shared_ptr<const Checkpoint>> ckpt = Checkpoint::open(fused.path());
  ASSERT_TRUE(ckpt.ok());
  EXPECT_TRUE((*ckpt)->contains("model.layers.1.mlp.experts.gate_up_proj"));
  EXPECT_FALSE((*ckpt)->contains("model.layers.1.mlp.experts.0.up_proj.weight"));
  expect_run_matches_local(fused.path());

  std::unique_ptr<ExpertShard> per_expert = load_ok(fixture("qwen2moe-bf16"), {{1, 7}});
  std::unique_ptr<ExpertShard> from_fused = load_ok(fused.path(), {{1, 7}});
  ASSERT_TRUE(per_expert && from_fused);
  EXPECT_EQ(from_fused->weight_bytes(), per_expert->weight_bytes());
  const int64_t H = per_expert->config().hidden_size;
  std::vector<float> x(static_cast<std::size_t>(2 * H), -0.3f), a(x.size()), b(x.size());
  for (std::size_t i = 0; i < x.size(); i += 3) x[i] = 0.7f;
  ASSERT_TRUE(per_expert->run(1, 7, x.data(), 2, a.data()).ok());
  ASSERT_TRUE(from_fused->run(1, 7, x.data(), 2, b.data()).ok());
  EXPECT_EQ(a, b);

  // The whole model reads the fused layout too, to the same logits.
  Expected<std::unique_ptr<Model>> model_a = Model::load(fixture("qwen2moe-bf16"), {.threads = 2});
  Expected<std::unique_ptr<Model>> model_b = Model::load(fused.path(), {.threads = 2});
  ASSERT_TRUE(model_a.ok() && model_b.ok());
  const std::vector<int32_t> prompt = test::fixture_prompt("qwen2moe-bf16");
  KVCache ca = (*model_a)->new_cache(16), cb = (*model_b)->new_cache(16);
  std::vector<float> la, lb;
  ASSERT_TRUE((*model_a)->forward(ca, prompt, Logits::All, la).ok());
  ASSERT_TRUE((*model_b)->forward(cb, prompt, Logits::All, lb).ok());
  EXPECT_EQ(la, lb);

  // A missing fused tensor is named.
  ScopedTempDir bad;
  test::rewrite_checkpoint(fused.path(), bad.path(), [](const std::string& n) {
    return n != "model.layers.1.mlp.experts.down_proj";
  });
  const std::string m = load_error(bad.path(), {{1, 0}});
  EXPECT_TRUE(Contains(m, "\"model.layers.1.mlp.experts.down_proj\""));
}

}  // namespace
}  // namespace moemesh
