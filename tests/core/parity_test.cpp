// Reference parity: every stored fixture (tests/fixtures/models/*, made by tools/make_fixtures.py
// with Hugging Face transformers) must give transformers' logits within 1e-3 and its greedy tokens
// exactly, through both the prefill path and the token-by-token decode path.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/core.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;
constexpr float kTolerance = 1e-3f;

fs::path fixtures_dir() {
  return fs::path(MOEMESH_SOURCE_DIR) / "tests/fixtures/models";
}

std::vector<std::string> fixture_names() {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(fixtures_dir()))
    if (fs::exists(e.path() / "reference.json")) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

struct Reference {
  std::vector<int32_t> prompt;
  std::vector<int32_t> output;
  NpyArray logits;  // [prompt + 15, vocab]: logits over prompt + output[:15]
};

Reference load_reference(const fs::path& dir) {
  std::ifstream in(dir / "reference.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  Reference r;
  r.prompt = j.at("prompt_ids").get<std::vector<int32_t>>();
  r.output = j.at("output_ids").get<std::vector<int32_t>>();
  Expected<NpyArray> logits = read_npy_f32(dir / "reference_logits.npy");
  EXPECT_TRUE(logits.ok()) << (logits ? "" : logits.error().message());
  if (logits) r.logits = std::move(*logits);
  return r;
}

// Largest |a - b| over one row.
float max_diff(const float* a, const float* b, int64_t n) {
  float d = 0;
  for (int64_t i = 0; i < n; ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

class Parity : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = fixtures_dir() / GetParam();
    ref_ = load_reference(dir_);
    Expected<std::unique_ptr<Model>> m = Model::load(dir_);
    ASSERT_TRUE(m.ok()) << m.error().message();
    model_ = std::move(*m);
    vocab_ = model_->config().vocab_size;
    ASSERT_EQ(ref_.output.size(), 16u);
    ASSERT_EQ(ref_.logits.shape,
              (std::vector<int64_t>{static_cast<int64_t>(ref_.prompt.size() + 15), vocab_}));
  }
  const float* ref_row(std::size_t i) const { return ref_.logits.data.data() + i * vocab_; }

  fs::path dir_;
  Reference ref_;
  std::unique_ptr<Model> model_;
  int64_t vocab_ = 0;
};

TEST_P(Parity, PrefillLogitsMatchTransformers) {
  std::vector<int32_t> seq = ref_.prompt;
  seq.insert(seq.end(), ref_.output.begin(), ref_.output.end() - 1);
  KVCache cache = model_->new_cache(static_cast<int64_t>(seq.size()));
  std::vector<float> logits;
  ASSERT_TRUE(model_->forward(cache, seq, Logits::All, logits).ok());
  ASSERT_EQ(logits.size(), seq.size() * vocab_);
  float worst = 0;
  for (std::size_t i = 0; i < seq.size(); ++i)
    worst = std::max(worst, max_diff(&logits[i * vocab_], ref_row(i), vocab_));
  EXPECT_LE(worst, kTolerance) << "max abs logit difference over " << seq.size() << " positions";
  RecordProperty("max_abs_diff_prefill", std::to_string(worst));
}

TEST_P(Parity, DecodeLogitsMatchTransformers) {
  // Prefill the prompt, then feed the reference continuation one token at a time.
  KVCache cache = model_->new_cache(static_cast<int64_t>(ref_.prompt.size() + 15));
  std::vector<float> logits;
  ASSERT_TRUE(model_->forward(cache, ref_.prompt, Logits::Last, logits).ok());
  float worst = max_diff(logits.data(), ref_row(ref_.prompt.size() - 1), vocab_);
  for (std::size_t i = 0; i < 15; ++i) {
    ASSERT_TRUE(
        model_->forward(cache, std::span<const int32_t>(&ref_.output[i], 1), Logits::Last, logits)
            .ok());
    worst = std::max(worst, max_diff(logits.data(), ref_row(ref_.prompt.size() + i), vocab_));
  }
  EXPECT_EQ(cache.length(), static_cast<int64_t>(ref_.prompt.size() + 15));
  EXPECT_LE(worst, kTolerance);
  RecordProperty("max_abs_diff_decode", std::to_string(worst));
}

TEST_P(Parity, GreedyTokensMatchTransformers) {
  SamplingParams params;
  params.max_tokens = 16;
  params.ignore_eos = true;
  params.temperature = 0.0f;
  Expected<GenerateResult> r = generate(*model_, ref_.prompt, params, /*want_prompt_logits=*/true);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->output_ids, ref_.output);
  EXPECT_EQ(r->finish_reason, "length");
  ASSERT_EQ(r->prompt_logits.size(), ref_.prompt.size() * vocab_);
  for (std::size_t i = 0; i < ref_.prompt.size(); ++i)
    EXPECT_LE(max_diff(&r->prompt_logits[i * vocab_], ref_row(i), vocab_), kTolerance)
        << "position " << i;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Parity, ::testing::ValuesIn(fixture_names()),
                         [](const auto& param_info) {
                           std::string n = param_info.param;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

TEST(ParityFixtures, CoverEveryFamilyAndFormat) {
  // The fixture set itself: each architecture, a sharded checkpoint and a BF16 one.
  std::set<std::string> archs;
  bool sharded = false, bf16 = false;
  for (const std::string& name : fixture_names()) {
    Expected<ModelConfig> c = load_model_config(fixtures_dir() / name);
    ASSERT_TRUE(c.ok()) << c.error().message();
    archs.insert(std::string(arch_name(c->arch)));
    sharded = sharded || fs::exists(fixtures_dir() / name / "model.safetensors.index.json");
    Expected<std::shared_ptr<const Checkpoint>> ck = Checkpoint::open(fixtures_dir() / name);
    ASSERT_TRUE(ck.ok());
    const char* embed = (*ck)->contains("transformer.wte.weight")
                            ? "transformer.wte.weight"  // dbrx
                            : "model.embed_tokens.weight";
    Expected<TensorView> t = (*ck)->tensor(embed);
    ASSERT_TRUE(t.ok()) << name << ": " << t.error().message();
    bf16 = bf16 || t->dtype == kernels::DType::BF16;
  }
  EXPECT_EQ(archs, (std::set<std::string>{"dbrx", "deepseek_v2", "deepseek_v3", "glm4_moe",
                                          "mixtral", "olmoe", "qwen2_moe", "qwen3_moe"}));
  EXPECT_TRUE(sharded);
  EXPECT_TRUE(bf16);
}

}  // namespace
}  // namespace moemesh
