// generate() on the stored olmoe-tiny fixture: greedy against transformers' tokens, seeded
// sampling, stop tokens and logprobs against transformers' logits.
#include "core/generate.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/npy.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;

class Generate : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const fs::path dir = fs::path(MOEMESH_SOURCE_DIR) / "tests/fixtures/models/olmoe-tiny";
    Expected<std::unique_ptr<Model>> m = Model::load(dir);
    ASSERT_TRUE(m.ok()) << m.error().message();
    model_ = std::move(*m).release();
    std::ifstream in(dir / "reference.json");
    const nlohmann::json j = nlohmann::json::parse(in);
    prompt_ = j.at("prompt_ids").get<std::vector<int32_t>>();
    reference_ = j.at("output_ids").get<std::vector<int32_t>>();
    Expected<NpyArray> logits = read_npy_f32(dir / "reference_logits.npy");
    ASSERT_TRUE(logits.ok()) << logits.error().message();
    reference_logits_ = std::move(*logits);
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }

  static SamplingParams greedy(int64_t max_tokens) {
    SamplingParams p;
    p.temperature = 0;
    p.max_tokens = max_tokens;
    p.ignore_eos = true;
    return p;
  }
  static GenerateResult run(const SamplingParams& p, bool want_prompt_logits = false) {
    Expected<GenerateResult> r = generate(*model_, prompt_, p, want_prompt_logits);
    EXPECT_TRUE(r.ok()) << r.error().message();
    return r.ok() ? std::move(*r) : GenerateResult{};
  }

  static Model* model_;
  static std::vector<int32_t> prompt_;
  static std::vector<int32_t> reference_;  // transformers' greedy tokens, no EOS stop
  static NpyArray reference_logits_;       // [prompt + 15, vocab] over prompt + reference[:15]
};

Model* Generate::model_ = nullptr;
std::vector<int32_t> Generate::prompt_;
std::vector<int32_t> Generate::reference_;
NpyArray Generate::reference_logits_;

TEST_F(Generate, GreedyMatchesTransformers) {
  const GenerateResult r = run(greedy(16));
  EXPECT_EQ(r.output_ids, reference_);
  EXPECT_EQ(r.finish_reason, "length");
  EXPECT_TRUE(r.logprobs.empty());
}

TEST_F(Generate, SeededSamplingIsReproducible) {
  SamplingParams p = greedy(16);
  p.temperature = 1.5f;
  p.seed = 5;
  const GenerateResult a = run(p);
  const GenerateResult b = run(p);
  ASSERT_EQ(a.output_ids.size(), 16u);
  EXPECT_EQ(a.output_ids, b.output_ids);
  EXPECT_EQ(a.seed, 5u);
  // Other seeds give other tokens (all three equal to seed 5's would be a broken generator).
  int differ = 0;
  for (uint64_t seed : {6u, 7u, 8u}) {
    p.seed = seed;
    differ += run(p).output_ids != a.output_ids;
  }
  EXPECT_GT(differ, 0);
  // Sampling at 1.5 is not greedy.
  EXPECT_NE(a.output_ids, reference_);
}

TEST_F(Generate, WithoutASeedTheDrawnSeedReproducesTheTokens) {
  SamplingParams p = greedy(12);
  p.temperature = 1.5f;
  const GenerateResult a = run(p);
  p.seed = a.seed;
  EXPECT_EQ(run(p).output_ids, a.output_ids);
}

TEST_F(Generate, MaxTokensZeroGivesNoTokens) {
  const GenerateResult r = run(greedy(0), /*want_prompt_logits=*/true);
  EXPECT_TRUE(r.output_ids.empty());
  EXPECT_EQ(r.finish_reason, "length");
  EXPECT_EQ(r.prompt_logits.size(), prompt_.size() * model_->config().vocab_size);
}

TEST_F(Generate, AStopTokenIdEndsGeneration) {
  SamplingParams p = greedy(16);
  p.stop_token_ids = {reference_[3]};  // first at index 3
  ASSERT_EQ(std::find(reference_.begin(), reference_.end(), reference_[3]) - reference_.begin(), 3);
  const GenerateResult r = run(p);
  EXPECT_EQ(r.output_ids, std::vector<int32_t>(reference_.begin(), reference_.begin() + 4));
  EXPECT_EQ(r.finish_reason, "stop");
}

TEST_F(Generate, EosEndsGenerationUnlessIgnored) {
  // The model's own EOS (255) never comes greedily; bias it in at the start.
  SamplingParams p = greedy(16);
  p.ignore_eos = false;
  p.logit_bias = {{255, 100.0f}};
  GenerateResult r = run(p);
  EXPECT_EQ(r.output_ids, std::vector<int32_t>{255});
  EXPECT_EQ(r.finish_reason, "stop");
  p.ignore_eos = true;
  r = run(p);
  EXPECT_EQ(r.output_ids, std::vector<int32_t>(16, 255));
  EXPECT_EQ(r.finish_reason, "length");
}

TEST_F(Generate, MinTokensDelaysAStopToken) {
  SamplingParams p = greedy(16);
  p.stop_token_ids = {reference_[0]};  // would stop at once
  p.min_tokens = 3;
  const GenerateResult r = run(p);
  ASSERT_GE(r.output_ids.size(), 4u);
  for (int i = 0; i < 3; ++i) EXPECT_NE(r.output_ids[i], reference_[0]) << "token " << i;
  if (r.finish_reason == "stop") {
    EXPECT_EQ(r.output_ids.back(), reference_[0]);
  }
}

TEST_F(Generate, LogprobsAreTransformersLogSoftmax) {
  SamplingParams p = greedy(16);
  p.logprobs = 3;
  const GenerateResult r = run(p);
  ASSERT_EQ(r.output_ids, reference_);
  ASSERT_EQ(r.logprobs.size(), 16u);
  const int64_t V = model_->config().vocab_size;
  for (std::size_t i = 0; i < 15; ++i) {
    // transformers' logits predicting output token i.
    const float* row = reference_logits_.data.data() + (prompt_.size() - 1 + i) * V;
    const double mx = *std::max_element(row, row + V);
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(row[v] - mx);
    const double lse = mx + std::log(sum);
    const SampledToken& t = r.logprobs[i];
    EXPECT_EQ(t.id, reference_[i]);
    EXPECT_NEAR(t.logprob, row[t.id] - lse, 2e-3) << "token " << i;
    ASSERT_EQ(t.top.size(), 3u);
    EXPECT_EQ(t.top[0].id, t.id);  // greedy: the sampled token is the most likely
    for (const TokenLogprob& e : t.top) EXPECT_NEAR(e.logprob, row[e.id] - lse, 2e-3);
    EXPECT_GE(t.top[0].logprob, t.top[1].logprob);
    EXPECT_GE(t.top[1].logprob, t.top[2].logprob);
  }
}

TEST_F(Generate, InvalidParamsAreAClearError) {
  SamplingParams p = greedy(4);
  p.top_p = 0;
  Expected<GenerateResult> r = generate(*model_, prompt_, p, false);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message(), "top_p must be in (0, 1], got 0");
  p = greedy(4);
  p.logit_bias = {{256, 1.0f}};  // the vocabulary is 256
  r = generate(*model_, prompt_, p, false);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("logit_bias: token id 256 is out of range"),
            std::string::npos);
}

TEST_F(Generate, ContextLengthIsChecked) {
  Expected<GenerateResult> r = generate(*model_, prompt_, greedy(1000), false);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("maximum context length"), std::string::npos);
}

}  // namespace
}  // namespace moemesh
