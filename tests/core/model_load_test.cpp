#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "core/model.h"
#include "kernels/cpu/cpu_kernels.h"
#include "tests/core/test_checkpoint_writer.h"

namespace moemesh {
namespace {

using test::Contains;
using test::SafetensorsWriter;
using test::ScopedTempDir;

constexpr int64_t kVocab = 32, kHidden = 16, kHeads = 2, kKvHeads = 1, kHeadDim = 8;
constexpr int64_t kLayers = 2, kExperts = 4, kTopK = 2, kInter = 8;

nlohmann::json tiny_config() {
  return {{"model_type", "mixtral"},
          {"vocab_size", kVocab},
          {"hidden_size", kHidden},
          {"intermediate_size", kInter},
          {"num_hidden_layers", kLayers},
          {"num_attention_heads", kHeads},
          {"num_key_value_heads", kKvHeads},
          {"num_local_experts", kExperts},
          {"num_experts_per_tok", kTopK},
          {"max_position_embeddings", 64},
          {"rms_norm_eps", 1e-5},
          {"rope_theta", 10000.0},
          {"tie_word_embeddings", false},
          {"eos_token_id", 2}};
}

// Random weights of a tiny Mixtral: F32, except the experts' down projections in BF16.
SafetensorsWriter tiny_weights(uint32_t seed = 1) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uni(-0.5f, 0.5f);
  auto random = [&](int64_t n, float scale, float offset = 0.0f) {
    std::vector<float> v(static_cast<std::size_t>(n));
    for (float& e : v) e = offset + scale * uni(rng);
    return v;
  };
  SafetensorsWriter w;
  w.f32("model.embed_tokens.weight", {kVocab, kHidden}, random(kVocab * kHidden, 2.0f));
  w.f32("model.norm.weight", {kHidden}, random(kHidden, 0.2f, 1.0f));
  w.f32("lm_head.weight", {kVocab, kHidden}, random(kVocab * kHidden, 1.0f));
  for (int64_t l = 0; l < kLayers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    w.f32(p + "input_layernorm.weight", {kHidden}, random(kHidden, 0.2f, 1.0f));
    w.f32(p + "post_attention_layernorm.weight", {kHidden}, random(kHidden, 0.2f, 1.0f));
    const int64_t q = kHeads * kHeadDim, kv = kKvHeads * kHeadDim;
    w.f32(p + "self_attn.q_proj.weight", {q, kHidden}, random(q * kHidden, 1.0f));
    w.f32(p + "self_attn.k_proj.weight", {kv, kHidden}, random(kv * kHidden, 1.0f));
    w.f32(p + "self_attn.v_proj.weight", {kv, kHidden}, random(kv * kHidden, 1.0f));
    w.f32(p + "self_attn.o_proj.weight", {kHidden, q}, random(kHidden * q, 0.5f));
    const std::string m = p + "block_sparse_moe.";
    w.f32(m + "gate.weight", {kExperts, kHidden}, random(kExperts * kHidden, 2.0f));
    for (int64_t e = 0; e < kExperts; ++e) {
      const std::string x = m + "experts." + std::to_string(e) + ".";
      w.f32(x + "w1.weight", {kInter, kHidden}, random(kInter * kHidden, 1.0f));
      w.f32(x + "w3.weight", {kInter, kHidden}, random(kInter * kHidden, 1.0f));
      std::vector<uint16_t> down;
      for (float f : random(kHidden * kInter, 1.0f)) down.push_back(kernels::f32_to_bf16(f));
      w.bf16_bits(x + "w2.weight", {kHidden, kInter}, down);
    }
  }
  return w;
}

void write_model(const ScopedTempDir& dir, const SafetensorsWriter& w,
                 const nlohmann::json& config = tiny_config()) {
  test::write_file(dir / "config.json", config.dump(2));
  w.write(dir / "model.safetensors");
}

std::unique_ptr<Model> load_ok(const ScopedTempDir& dir) {
  Expected<std::unique_ptr<Model>> m = Model::load(dir.path(), {.threads = 2});
  EXPECT_TRUE(m.ok()) << m.error().message();
  return m.ok() ? std::move(*m) : nullptr;
}

std::string load_error(const ScopedTempDir& dir) {
  Expected<std::unique_ptr<Model>> m = Model::load(dir.path(), {.threads = 2});
  EXPECT_FALSE(m.ok());
  return m.ok() ? "" : m.error().message();
}

const std::vector<int32_t> kPrompt = {1, 7, 31, 0, 12, 5};

class TinyModel : public ::testing::Test {
 protected:
  void SetUp() override {
    write_model(dir_, tiny_weights());
    model_ = load_ok(dir_);
    ASSERT_NE(model_, nullptr);
  }
  ScopedTempDir dir_;
  std::unique_ptr<Model> model_;
};

TEST_F(TinyModel, LoadsConfig) {
  const ModelConfig& c = model_->config();
  EXPECT_EQ(c.arch, Arch::Mixtral);
  EXPECT_EQ(c.vocab_size, kVocab);
  EXPECT_EQ(c.head_dim, kHeadDim);
  EXPECT_EQ(c.num_moe_layers(), kLayers);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});
}

TEST_F(TinyModel, ForwardGivesFiniteLogitsOfTheRightSize) {
  KVCache cache = model_->new_cache(16);
  EXPECT_EQ(cache.capacity(), 16);
  std::vector<float> all;
  ASSERT_TRUE(model_->forward(cache, kPrompt, Logits::All, all).ok());
  EXPECT_EQ(cache.length(), static_cast<int64_t>(kPrompt.size()));
  ASSERT_EQ(all.size(), kPrompt.size() * kVocab);
  for (float v : all) ASSERT_TRUE(std::isfinite(v));
  // Different positions see different contexts, so their logits differ.
  EXPECT_NE(std::vector<float>(all.begin(), all.begin() + kVocab),
            std::vector<float>(all.begin() + kVocab, all.begin() + 2 * kVocab));

  cache.clear();
  EXPECT_EQ(cache.length(), 0);
  std::vector<float> last;
  ASSERT_TRUE(model_->forward(cache, kPrompt, Logits::Last, last).ok());
  ASSERT_EQ(last.size(), static_cast<std::size_t>(kVocab));
  for (int64_t v = 0; v < kVocab; ++v)
    EXPECT_NEAR(last[v], all[(kPrompt.size() - 1) * kVocab + v], 1e-5) << v;

  std::vector<float> none = {1.0f};
  ASSERT_TRUE(model_->forward(cache, std::vector<int32_t>{3}, Logits::None, none).ok());
  EXPECT_TRUE(none.empty());
  EXPECT_EQ(cache.length(), static_cast<int64_t>(kPrompt.size()) + 1);
}

TEST_F(TinyModel, DecodeMatchesPrefill) {
  KVCache full = model_->new_cache(16);
  std::vector<float> expected;
  ASSERT_TRUE(model_->forward(full, kPrompt, Logits::All, expected).ok());

  // A prefill of the first two tokens, then one token at a time.
  KVCache cache = model_->new_cache(16);
  std::vector<float> logits;
  ASSERT_TRUE(model_->forward(cache, std::span(kPrompt).first(2), Logits::Last, logits).ok());
  for (std::size_t t = 2; t < kPrompt.size(); ++t) {
    ASSERT_TRUE(
        model_->forward(cache, std::span(kPrompt).subspan(t, 1), Logits::Last, logits).ok());
    ASSERT_EQ(logits.size(), static_cast<std::size_t>(kVocab));
    for (int64_t v = 0; v < kVocab; ++v)
      ASSERT_NEAR(logits[v], expected[t * kVocab + v], 1e-5) << "position " << t << " token " << v;
  }
  EXPECT_EQ(cache.length(), full.length());
}

TEST_F(TinyModel, BadTokenOrFullCacheChangesNothing) {
  KVCache cache = model_->new_cache(8);
  std::vector<float> logits;
  ASSERT_TRUE(model_->forward(cache, std::span(kPrompt).first(3), Logits::Last, logits).ok());
  const std::vector<float> before = logits;

  for (int32_t bad : {static_cast<int32_t>(kVocab), -1}) {
    Status s = model_->forward(cache, std::vector<int32_t>{4, bad}, Logits::Last, logits);
    ASSERT_FALSE(s.ok());
    EXPECT_TRUE(Contains(s.error().message(), std::to_string(bad)));
    EXPECT_EQ(cache.length(), 3);
  }
  Status s = model_->forward(cache, std::vector<int32_t>(6, 1), Logits::Last, logits);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(Contains(s.error().message(), "capacity"));
  EXPECT_EQ(cache.length(), 3);
  EXPECT_FALSE(model_->forward(cache, std::vector<int32_t>{}, Logits::Last, logits).ok());

  // The cache still continues the sequence correctly.
  ASSERT_TRUE(model_->forward(cache, std::span(kPrompt).subspan(3), Logits::Last, logits).ok());
  KVCache fresh = model_->new_cache(8);
  std::vector<float> expected;
  ASSERT_TRUE(model_->forward(fresh, kPrompt, Logits::Last, expected).ok());
  for (int64_t v = 0; v < kVocab; ++v) EXPECT_NEAR(logits[v], expected[v], 1e-5);
  EXPECT_NE(logits, before);
  EXPECT_EQ(cache.length(), 6);
}

// Records the calls it sees and delegates to another backend.
class RecordingBackend : public ExpertBackend {
 public:
  struct Call {
    int64_t layer;
    int64_t n;
    std::vector<int32_t> ids;
    std::vector<float> weights;
  };
  explicit RecordingBackend(ExpertBackend& inner) : inner_(inner) {}
  Status compute(int64_t layer, const float* x, int64_t n, const int32_t* ids, const float* weights,
                 int64_t top_k, float* out) override {
    calls.push_back({layer, n, std::vector<int32_t>(ids, ids + n * top_k),
                     std::vector<float>(weights, weights + n * top_k)});
    top_ks.push_back(top_k);
    return inner_.compute(layer, x, n, ids, weights, top_k, out);
  }
  std::vector<Call> calls;
  std::vector<int64_t> top_ks;

 private:
  ExpertBackend& inner_;
};

class FailingBackend : public ExpertBackend {
 public:
  Status compute(int64_t layer, const float*, int64_t, const int32_t*, const float*, int64_t,
                 float*) override {
    return Error("expert shard 3 unreachable at layer " + std::to_string(layer));
  }
};

TEST_F(TinyModel, ExpertBackendSeam) {
  KVCache cache = model_->new_cache(16);
  std::vector<float> expected;
  ASSERT_TRUE(model_->forward(cache, kPrompt, Logits::All, expected).ok());

  RecordingBackend recorder(model_->local_experts());
  model_->set_expert_backend(&recorder);
  cache.clear();
  std::vector<float> logits;
  ASSERT_TRUE(model_->forward(cache, kPrompt, Logits::All, logits).ok());
  EXPECT_EQ(logits, expected);  // the same computation, bit for bit

  ASSERT_EQ(recorder.calls.size(), static_cast<std::size_t>(kLayers));
  for (int64_t l = 0; l < kLayers; ++l) {
    const RecordingBackend::Call& call = recorder.calls[l];
    EXPECT_EQ(call.layer, l);
    EXPECT_EQ(call.n, static_cast<int64_t>(kPrompt.size()));
    EXPECT_EQ(recorder.top_ks[l], kTopK);
    ASSERT_EQ(call.ids.size(), kPrompt.size() * kTopK);
    for (std::size_t t = 0; t < kPrompt.size(); ++t) {
      const int32_t a = call.ids[t * kTopK], b = call.ids[t * kTopK + 1];
      EXPECT_TRUE(a >= 0 && a < kExperts && b >= 0 && b < kExperts && a != b) << a << " " << b;
      // Mixtral renormalises the top-k weights, largest first.
      EXPECT_NEAR(call.weights[t * kTopK] + call.weights[t * kTopK + 1], 1.0f, 1e-6);
      EXPECT_GE(call.weights[t * kTopK], call.weights[t * kTopK + 1]);
    }
  }

  // One decode step: one token per layer.
  recorder.calls.clear();
  ASSERT_TRUE(model_->forward(cache, std::vector<int32_t>{9}, Logits::Last, logits).ok());
  ASSERT_EQ(recorder.calls.size(), static_cast<std::size_t>(kLayers));
  EXPECT_EQ(recorder.calls[1].n, 1);
  EXPECT_EQ(recorder.calls[1].layer, 1);

  FailingBackend failing;
  model_->set_expert_backend(&failing);
  const int64_t length = cache.length();
  Status s = model_->forward(cache, std::vector<int32_t>{4}, Logits::Last, logits);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().message(), "expert shard 3 unreachable at layer 0");
  EXPECT_EQ(cache.length(), length);

  // nullptr restores the local experts.
  model_->set_expert_backend(nullptr);
  cache.clear();
  ASSERT_TRUE(model_->forward(cache, kPrompt, Logits::All, logits).ok());
  EXPECT_EQ(logits, expected);
}

TEST(ModelLoad, TiedEmbeddingsNeedNoLmHead) {
  ScopedTempDir dir;
  SafetensorsWriter w = tiny_weights();
  w.remove("lm_head.weight");
  nlohmann::json config = tiny_config();
  config["tie_word_embeddings"] = true;
  write_model(dir, w, config);
  std::unique_ptr<Model> model = load_ok(dir);
  ASSERT_NE(model, nullptr);
  KVCache cache = model->new_cache(4);
  std::vector<float> logits;
  ASSERT_TRUE(model->forward(cache, std::vector<int32_t>{3, 4}, Logits::Last, logits).ok());
  EXPECT_EQ(logits.size(), static_cast<std::size_t>(kVocab));
}

TEST(ModelLoad, MissingLmHead) {
  ScopedTempDir dir;
  SafetensorsWriter w = tiny_weights();
  w.remove("lm_head.weight");
  write_model(dir, w);
  EXPECT_TRUE(Contains(load_error(dir), "\"lm_head.weight\""));
}

TEST(ModelLoad, MissingExpertTensor) {
  ScopedTempDir dir;
  for (const std::string name : {"model.layers.1.block_sparse_moe.experts.2.w3.weight",
                                 "model.layers.0.block_sparse_moe.experts.0.w1.weight",
                                 "model.layers.1.block_sparse_moe.gate.weight"}) {
    SafetensorsWriter w = tiny_weights();
    ASSERT_TRUE(w.has(name));
    w.remove(name);
    write_model(dir, w);
    const std::string m = load_error(dir);
    EXPECT_TRUE(Contains(m, "\"" + name + "\""));
    EXPECT_TRUE(Contains(m, dir.path().string()));
  }
}

TEST(ModelLoad, WrongShape) {
  ScopedTempDir dir;
  SafetensorsWriter w = tiny_weights();
  const std::string q = "model.layers.1.self_attn.q_proj.weight";
  w.f32(q, {kHidden + 1, kHidden}, std::vector<float>((kHidden + 1) * kHidden, 0.1f));
  write_model(dir, w);
  const std::string m = load_error(dir);
  EXPECT_TRUE(Contains(m, "\"" + q + "\""));
  EXPECT_TRUE(Contains(m, (dir / "model.safetensors").string()));
  EXPECT_TRUE(Contains(m, "[17, 16]"));
  EXPECT_TRUE(Contains(m, "[16, 16]"));
  EXPECT_TRUE(Contains(m, "num_attention_heads=2"));

  // A down projection stored transposed.
  w = tiny_weights();
  const std::string down = "model.layers.0.block_sparse_moe.experts.3.w2.weight";
  w.set_header_shape(down, {kInter, kHidden});
  write_model(dir, w);
  const std::string m2 = load_error(dir);
  EXPECT_TRUE(Contains(m2, "\"" + down + "\""));
  EXPECT_TRUE(Contains(m2, "[8, 16]"));
  EXPECT_TRUE(Contains(m2, "[16, 8]"));
}

TEST(ModelLoad, UnsupportedDtypeAndBadConfig) {
  ScopedTempDir dir;
  SafetensorsWriter w = tiny_weights();
  w.set_dtype("model.norm.weight", "I32");  // same element size, so the header is consistent
  write_model(dir, w);
  std::string m = load_error(dir);
  EXPECT_TRUE(Contains(m, "\"model.norm.weight\""));
  EXPECT_TRUE(Contains(m, "I32"));

  nlohmann::json config = tiny_config();
  config["num_experts_per_tok"] = 5;
  write_model(dir, tiny_weights(), config);
  m = load_error(dir);
  EXPECT_TRUE(Contains(m, (dir / "config.json").string()));
  EXPECT_TRUE(Contains(m, "num_experts_per_tok"));

  ScopedTempDir empty;
  test::write_file(empty / "config.json", tiny_config().dump());
  EXPECT_TRUE(Contains(load_error(empty), "safetensors"));

  Expected<std::unique_ptr<Model>> missing = Model::load(empty / "no-such-model");
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(Contains(missing.error().message(), (empty / "no-such-model").string()));
}

// Regression: forward() once checked only the cache's row width, so the cache of a 1-layer model
// with the same kv width passed and layer 1 wrote past its buffers.
TEST(ModelLoad, CacheOfAnotherModelIsRejected) {
  ScopedTempDir one_layer, two_layers;
  nlohmann::json config = tiny_config();
  config["num_hidden_layers"] = 1;
  write_model(one_layer, tiny_weights(), config);
  write_model(two_layers, tiny_weights());
  std::unique_ptr<Model> small = load_ok(one_layer), model = load_ok(two_layers);
  ASSERT_TRUE(small && model);
  KVCache cache = small->new_cache(4);
  std::vector<float> logits;
  EXPECT_FALSE(model->forward(cache, std::vector<int32_t>{1, 2}, Logits::Last, logits).ok());
}

}  // namespace
}  // namespace moemesh
