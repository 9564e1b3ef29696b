// A model loaded without its routed experts (an attention worker) and driven through an
// asynchronous ExpertBackend over ExpertShards must give the full model's logits and greedy
// tokens; without a backend, or when the backend fails, forward() fails cleanly and leaves the
// KV cache as it was.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/model.h"
#include "tests/core/expert_shard_helpers.h"

namespace moemesh {
namespace {

using test::Contains;
using test::fixture;
using test::ScopedTempDir;
using test::ShardBackend;

constexpr float kTolerance = 1e-4f;
constexpr int kDecodeSteps = 4;

std::unique_ptr<Model> load_model(const std::filesystem::path& dir, bool routed_experts) {
  Expected<std::unique_ptr<Model>> m =
      Model::load(dir, {.threads = 2, .routed_experts = routed_experts});
  EXPECT_TRUE(m.ok()) << m.error().message();
  return m.ok() ? std::move(*m) : nullptr;
}

std::unique_ptr<ExpertShard> load_shard(const std::filesystem::path& dir, int parity) {
  Expected<ModelConfig> config = load_model_config(dir);
  EXPECT_TRUE(config.ok()) << config.error().message();
  if (!config) return nullptr;
  const std::vector<ExpertRef> experts = test::experts_with_parity(*config, parity);
  Expected<std::unique_ptr<ExpertShard>> s = ExpertShard::load(dir, experts, {.threads = 2});
  EXPECT_TRUE(s.ok()) << s.error().message();
  return s.ok() ? std::move(*s) : nullptr;
}

// The prompt, then kDecodeSteps greedy tokens: logits of every step, and the tokens chosen.
struct Trace {
  std::vector<std::vector<float>> logits;
  std::vector<int32_t> tokens;
};

Trace greedy_run(Model& model, const std::vector<int32_t>& prompt) {
  Trace run;
  const int64_t V = model.config().vocab_size;
  KVCache cache = model.new_cache(static_cast<int64_t>(prompt.size()) + kDecodeSteps);
  std::vector<float> logits;
  Status s = model.forward(cache, prompt, Logits::All, logits);
  EXPECT_TRUE(s.ok()) << s.error().message();
  if (!s) return run;
  for (int step = 0; step < kDecodeSteps; ++step) {
    run.logits.push_back(logits);
    const int32_t next = test::argmax(logits.data() + logits.size() - V, V);
    run.tokens.push_back(next);
    s = model.forward(cache, std::vector<int32_t>{next}, Logits::Last, logits);
    EXPECT_TRUE(s.ok()) << s.error().message();
    if (!s) return run;
  }
  run.logits.push_back(logits);
  return run;
}

void expect_same_run(const Trace& full, const Trace& split) {
  EXPECT_EQ(split.tokens, full.tokens);
  ASSERT_EQ(split.logits.size(), full.logits.size());
  for (std::size_t i = 0; i < full.logits.size(); ++i)
    EXPECT_LE(test::max_abs_diff(full.logits[i], split.logits[i]), kTolerance) << "step " << i;
}

std::string param_name(const ::testing::TestParamInfo<std::string>& p) {
  std::string name = p.param;
  for (char& ch : name)
    if (ch == '-') ch = '_';
  return name;
}

// One fixture, split into an attention-only model and two shards (even and odd expert ids).
class SplitModel : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = fixture(GetParam());
    if (GetParam() == "qwen3moe-tiny-fused") {  // the fused layout, written from qwen3moe-tiny
      fused_ = std::make_unique<ScopedTempDir>();
      test::rewrite_checkpoint(
          fixture("qwen3moe-tiny"), fused_->path(), [](const std::string&) { return true; }, true);
      dir_ = fused_->path();
    }
    full_ = load_model(dir_, true);
    attention_ = load_model(dir_, false);
    even_ = load_shard(dir_, 0);
    odd_ = load_shard(dir_, 1);
    ASSERT_TRUE(full_ && attention_ && even_ && odd_);
    backend_ = std::make_unique<ShardBackend>(std::vector<ExpertShard*>{even_.get(), odd_.get()});
  }
  std::vector<int32_t> prompt() const {
    return test::fixture_prompt(GetParam() == "qwen3moe-tiny-fused" ? "qwen3moe-tiny" : GetParam());
  }

  std::filesystem::path dir_;
  std::unique_ptr<ScopedTempDir> fused_;
  std::unique_ptr<Model> full_, attention_;
  std::unique_ptr<ExpertShard> even_, odd_;
  std::unique_ptr<ShardBackend> backend_;
};

TEST_P(SplitModel, ShardsGiveTheFullModelsLogitsAndTokens) {
  EXPECT_TRUE(full_->has_routed_experts());
  EXPECT_FALSE(attention_->has_routed_experts());
  EXPECT_EQ(attention_->moe_layers(), full_->moe_layers());
  attention_->set_expert_backend(backend_.get());
  const Trace full = greedy_run(*full_, prompt());
  const Trace split = greedy_run(*attention_, prompt());
  expect_same_run(full, split);
  EXPECT_EQ(backend_->computes,
            static_cast<int>(attention_->moe_layers().size()) * (1 + kDecodeSteps));
  EXPECT_FALSE(backend_->out_touched) << "the model wrote `out` between start() and finish()";
}

TEST_P(SplitModel, ForwardWithoutABackendFailsClearly) {
  KVCache cache = attention_->new_cache(16);
  std::vector<float> logits = {42.0f};
  Status s = attention_->forward(cache, prompt(), Logits::All, logits);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(Contains(s.error().message(), "loaded without its routed experts"));
  EXPECT_TRUE(Contains(s.error().message(), "set an expert backend"));
  EXPECT_EQ(cache.length(), 0);
  EXPECT_EQ(logits, std::vector<float>{42.0f});

  // local_experts() is that failing backend; nullptr restores it after a real one.
  std::vector<float> x(static_cast<std::size_t>(attention_->config().hidden_size), 1.0f), out(x);
  const int32_t id = 0;
  const float w = 1.0f;
  const int64_t l = attention_->moe_layers().front();
  Status c = attention_->local_experts().compute(l, x.data(), 1, &id, &w, 1, out.data());
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(Contains(c.error().message(), "loaded without its routed experts"));
  attention_->set_expert_backend(backend_.get());
  EXPECT_TRUE(attention_->forward(cache, prompt(), Logits::Last, logits).ok());
  attention_->set_expert_backend(nullptr);
  EXPECT_FALSE(attention_->forward(cache, std::vector<int32_t>{1}, Logits::Last, logits).ok());
  EXPECT_EQ(cache.length(), static_cast<int64_t>(prompt().size()));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, SplitModel,
                         ::testing::Values("mixtral-tiny", "mixtral-bf16", "qwen2moe-tiny",
                                           "qwen2moe-bf16", "qwen3moe-bf16-step2", "olmoe-tiny",
                                           "qwen3moe-tiny-fused", "deepseek-v3-tiny",
                                           "deepseek-v2-bf16", "glm4moe-tiny", "glm4moe-bf16",
                                           "dbrx-tiny", "dbrx-bf16-clip"),
                         param_name);

// Delegates to a ShardBackend, failing start() or finish() at one layer when armed, and logging
// the calls it sees.
class FlakyBackend : public ExpertBackend {
 public:
  explicit FlakyBackend(ExpertBackend& inner) : inner_(inner) {}
  Status compute(int64_t layer, const float* x, int64_t n, const int32_t* ids, const float* weights,
                 int64_t top_k, float* out) override {
    return inner_.compute(layer, x, n, ids, weights, top_k, out);
  }
  Status start(int64_t layer, const float* x, int64_t n, const int32_t* ids, const float* weights,
               int64_t top_k, float* out) override {
    events.push_back("start " + std::to_string(layer));
    layer_ = layer;
    if (fail_start_at == layer)
      return Error("expert worker 2 refused layer " + std::to_string(layer));
    return inner_.start(layer, x, n, ids, weights, top_k, out);
  }
  Status finish() override {
    events.push_back("finish " + std::to_string(layer_));
    Status s = inner_.finish();  // always collect the work in flight
    if (fail_finish_at == layer_)
      return Error("expert worker 1 timed out at layer " + std::to_string(layer_));
    return s;
  }

  int64_t fail_start_at = -1;
  int64_t fail_finish_at = -1;
  std::vector<std::string> events;

 private:
  ExpertBackend& inner_;
  int64_t layer_ = -1;
};

class FailingBackend : public SplitModel {};

// (qwen2moe-tiny: MoE layers 0 and 2 around a dense layer 1, with a shared expert.)
TEST_P(FailingBackend, AFailedForwardLeavesTheCacheAndARetryIsExact) {
  FlakyBackend flaky(*backend_);
  attention_->set_expert_backend(&flaky);
  const std::vector<int32_t> p = prompt();
  const int64_t last_moe = attention_->moe_layers().back();

  // A clean prompt + one decode step.
  KVCache clean = attention_->new_cache(16);
  std::vector<float> clean_prefill, clean_step;
  ASSERT_TRUE(attention_->forward(clean, p, Logits::All, clean_prefill).ok());
  ASSERT_TRUE(attention_->forward(clean, std::vector<int32_t>{7}, Logits::Last, clean_step).ok());

  // The prompt fails at the last MoE layer's finish(), then is retried.
  KVCache cache = attention_->new_cache(16);
  std::vector<float> logits;
  flaky.fail_finish_at = last_moe;
  Status s = attention_->forward(cache, p, Logits::All, logits);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().message(), "expert worker 1 timed out at layer " + std::to_string(last_moe));
  EXPECT_EQ(cache.length(), 0);
  EXPECT_TRUE(logits.empty());
  flaky.fail_finish_at = -1;
  ASSERT_TRUE(attention_->forward(cache, p, Logits::All, logits).ok());
  EXPECT_EQ(logits, clean_prefill);

  // A decode step fails at start(), then at finish(); the retry matches the clean run bit for bit.
  const std::vector<float> before = logits;
  flaky.fail_start_at = last_moe;
  s = attention_->forward(cache, std::vector<int32_t>{7}, Logits::Last, logits);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().message(), "expert worker 2 refused layer " + std::to_string(last_moe));
  EXPECT_EQ(cache.length(), static_cast<int64_t>(p.size()));
  EXPECT_EQ(logits, before);
  flaky.fail_start_at = -1;
  flaky.fail_finish_at = attention_->moe_layers().front();
  EXPECT_FALSE(attention_->forward(cache, std::vector<int32_t>{7}, Logits::Last, logits).ok());
  EXPECT_EQ(cache.length(), static_cast<int64_t>(p.size()));
  flaky.fail_finish_at = -1;
  ASSERT_TRUE(attention_->forward(cache, std::vector<int32_t>{7}, Logits::Last, logits).ok());
  EXPECT_EQ(logits, clean_step);
  EXPECT_EQ(cache.length(), static_cast<int64_t>(p.size()) + 1);
  EXPECT_FALSE(backend_->out_touched);
}

// start() comes before finish() for every MoE layer, once each, in layer order; dense layers
// call neither; and a start() that fails gets no finish().
TEST_P(FailingBackend, StartThenFinishOncePerMoeLayerInOrder) {
  FlakyBackend flaky(*backend_);
  attention_->set_expert_backend(&flaky);
  KVCache cache = attention_->new_cache(16);
  std::vector<float> logits;
  ASSERT_TRUE(attention_->forward(cache, prompt(), Logits::Last, logits).ok());
  std::vector<std::string> expected;
  for (int64_t l : attention_->moe_layers()) {
    expected.push_back("start " + std::to_string(l));
    expected.push_back("finish " + std::to_string(l));
  }
  EXPECT_EQ(flaky.events, expected);

  flaky.events.clear();
  flaky.fail_start_at = attention_->moe_layers().front();
  EXPECT_FALSE(attention_->forward(cache, std::vector<int32_t>{3}, Logits::Last, logits).ok());
  EXPECT_EQ(flaky.events, std::vector<std::string>{expected.front()});
}

INSTANTIATE_TEST_SUITE_P(Fixtures, FailingBackend,
                         ::testing::Values("qwen2moe-tiny", "qwen3moe-bf16-step2"), param_name);

TEST(ModelLayers, MoeLayersFollowTheConfig) {
  std::unique_ptr<Model> model = load_model(fixture("qwen2moe-tiny"), false);  // mlp_only [1]
  ASSERT_NE(model, nullptr);
  EXPECT_EQ(model->moe_layers(), (std::vector<int64_t>{0, 2}));
  EXPECT_TRUE(model->is_moe_layer(0));
  EXPECT_FALSE(model->is_moe_layer(1));
  EXPECT_FALSE(model->is_moe_layer(-1));
  EXPECT_FALSE(model->is_moe_layer(3));
  std::unique_ptr<Model> step2 = load_model(fixture("qwen3moe-bf16-step2"), true);
  ASSERT_NE(step2, nullptr);
  EXPECT_EQ(step2->moe_layers(), (std::vector<int64_t>{1, 3}));
}

// The default start()/finish() of a backend that only implements compute() are the synchronous
// path: the same logits as the local experts, bit for bit; finish() without start() fails.
class ComputeOnly : public ExpertBackend {
 public:
  explicit ComputeOnly(ExpertBackend& inner) : inner_(inner) {}
  Status compute(int64_t layer, const float* x, int64_t n, const int32_t* ids, const float* weights,
                 int64_t top_k, float* out) override {
    ++calls;
    return inner_.compute(layer, x, n, ids, weights, top_k, out);
  }
  int calls = 0;

 private:
  ExpertBackend& inner_;
};

TEST(ExpertBackendDefaults, StartAndFinishCallCompute) {
  std::unique_ptr<Model> model = load_model(fixture("qwen2moe-tiny"), true);
  ASSERT_NE(model, nullptr);
  const std::vector<int32_t> p = test::fixture_prompt("qwen2moe-tiny");
  KVCache cache = model->new_cache(16);
  std::vector<float> expected, logits;
  ASSERT_TRUE(model->forward(cache, p, Logits::All, expected).ok());
  ComputeOnly wrapper(model->local_experts());
  model->set_expert_backend(&wrapper);
  cache.clear();
  ASSERT_TRUE(model->forward(cache, p, Logits::All, logits).ok());
  EXPECT_EQ(logits, expected);
  EXPECT_EQ(wrapper.calls, 2);
  Status s = wrapper.finish();
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(Contains(s.error().message(), "no start() pending"));
}

// The attention worker's checkpoint may hold no routed experts at all, and an expert worker's
// nothing but its experts: the two halves still make the whole model.
TEST(SplitCheckpoint, AttentionAndExpertHalvesLoadApart) {
  const std::filesystem::path src = fixture("qwen2moe-tiny");
  ScopedTempDir attention_dir, experts_dir;
  test::rewrite_checkpoint(src, attention_dir.path(),
                           [](const std::string& n) { return !test::is_routed_expert_tensor(n); });
  test::rewrite_checkpoint(src, experts_dir.path(), test::is_routed_expert_tensor);

  Expected<std::unique_ptr<Model>> whole = Model::load(attention_dir.path());
  ASSERT_FALSE(whole.ok());
  EXPECT_TRUE(Contains(whole.error().message(), "model.layers.0.mlp.experts.0.gate_proj.weight"));

  std::unique_ptr<Model> attention = load_model(attention_dir.path(), false);
  std::unique_ptr<ExpertShard> even = load_shard(experts_dir.path(), 0);
  std::unique_ptr<ExpertShard> odd = load_shard(experts_dir.path(), 1);
  std::unique_ptr<Model> full = load_model(src, true);
  ASSERT_TRUE(attention && even && odd && full);
  ShardBackend backend({even.get(), odd.get()});
  attention->set_expert_backend(&backend);
  expect_same_run(greedy_run(*full, test::fixture_prompt("qwen2moe-tiny")),
                  greedy_run(*attention, test::fixture_prompt("qwen2moe-tiny")));

  // The shared expert is not a routed expert: without it, the attention half does not load.
  ScopedTempDir no_shared;
  test::rewrite_checkpoint(src, no_shared.path(), [](const std::string& n) {
    return n.find("model.layers.2.mlp.shared_expert.up_proj") == std::string::npos;
  });
  Expected<std::unique_ptr<Model>> m =
      Model::load(no_shared.path(), {.threads = 2, .routed_experts = false});
  ASSERT_FALSE(m.ok());
  EXPECT_TRUE(Contains(m.error().message(), "model.layers.2.mlp.shared_expert.up_proj.weight"));
}

}  // namespace
}  // namespace moemesh
