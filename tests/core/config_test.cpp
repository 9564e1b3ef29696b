#include "core/config.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "tests/core/test_checkpoint_writer.h"

namespace moemesh {
namespace {

using nlohmann::json;
using test::Contains;

// The smallest config.json of each architecture that parses, with tiny sizes.
json minimal(const std::string& model_type) {
  return {{"model_type", model_type}, {"vocab_size", 32},         {"hidden_size", 16},
          {"intermediate_size", 8},   {"num_hidden_layers", 4},   {"num_attention_heads", 4},
          {"num_key_value_heads", 2}, {"num_experts_per_tok", 2}, {"max_position_embeddings", 64}};
}

// vocab, hidden, layers, heads, kv heads, head_dim.
std::vector<int64_t> sizes(const ModelConfig& m) {
  return {m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim};
}

ModelConfig parse_ok(const json& j) {
  Expected<ModelConfig> c = parse_model_config(j.dump(), "cfg.json");
  EXPECT_TRUE(c.ok()) << (c.ok() ? "" : c.error().message());
  return c.ok() ? *c : ModelConfig{};
}

// minimal(model_type) with `patch` applied (RFC 7386: a null value removes the key).
json with(const std::string& model_type, const json& patch) {
  json j = minimal(model_type);
  j.merge_patch(patch);
  return j;
}

const std::string kSource = "some/dir/config.json";

// Parses `j`, expects an error, and returns its message.
std::string parse_error(const json& j) {
  Expected<ModelConfig> c = parse_model_config(j.dump(), kSource);
  EXPECT_FALSE(c.ok()) << "parsed " << j.dump();
  return c.ok() ? "" : c.error().message();
}

// Expects parsing `j` to fail with a message naming the source and each of `needles`.
void expect_error(const json& j, std::initializer_list<std::string> needles) {
  const std::string m = parse_error(j);
  EXPECT_TRUE(Contains(m, kSource)) << j.dump();
  for (const std::string& needle : needles) EXPECT_TRUE(Contains(m, needle)) << j.dump();
}

TEST(ParseModelConfig, Mixtral) {
  json j = minimal("mixtral");
  j["num_local_experts"] = 4;
  j["norm_topk_prob"] = false;  // Mixtral ignores it: it always renormalises
  j["rope_theta"] = 1e6;
  j["sliding_window"] = nullptr;
  j["tie_word_embeddings"] = true;
  j["rms_norm_eps"] = 1e-5;
  ModelConfig c = parse_ok(j);
  EXPECT_EQ(c.arch, Arch::Mixtral);
  EXPECT_EQ(c.model_type, "mixtral");
  EXPECT_EQ(arch_name(c.arch), "mixtral");
  EXPECT_EQ(sizes(c), (std::vector<int64_t>{32, 16, 4, 4, 2, 4}));
  EXPECT_EQ(c.max_position_embeddings, 64);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-5f);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.num_experts, 4);
  EXPECT_EQ(c.top_k, 2);
  EXPECT_EQ(c.moe_intermediate_size, 8);  // Mixtral's experts are intermediate_size wide
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.shared_expert_intermediate_size, 0);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_EQ(c.qk_norm, QkNorm::None);
  EXPECT_FALSE(c.clip_qkv.has_value());
  EXPECT_EQ(c.num_moe_layers(), 4);
  EXPECT_EQ(c.layer_window, std::vector<int64_t>(4, 0));
  EXPECT_FALSE(c.bos_token_id.has_value());
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});  // MixtralConfig's default eos_token_id
}

TEST(ParseModelConfig, MixtralDefaultsAndSlidingWindow) {
  json j = {{"model_type", "mixtral"}, {"sliding_window", 4096}};
  ModelConfig c = parse_ok(j);
  // transformers' MixtralConfig defaults.
  EXPECT_EQ(sizes(c), (std::vector<int64_t>{32000, 4096, 32, 32, 8, 128}));
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.top_k, 2);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.layer_window, std::vector<int64_t>(32, 4096));
}

TEST(ParseModelConfig, Qwen2Moe) {
  json j = minimal("qwen2_moe");
  j["num_experts"] = 6;
  j["moe_intermediate_size"] = 4;
  j["shared_expert_intermediate_size"] = 12;
  ModelConfig c = parse_ok(j);
  EXPECT_EQ(c.arch, Arch::Qwen2Moe);
  EXPECT_EQ(c.num_experts, 6);
  EXPECT_EQ(c.moe_intermediate_size, 4);
  EXPECT_EQ(c.intermediate_size, 8);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_EQ(c.qk_norm, QkNorm::None);
  EXPECT_EQ(c.shared_expert_intermediate_size, 12);
  EXPECT_TRUE(c.shared_expert_gate);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);

  j["shared_expert_intermediate_size"] = 0;
  j["norm_topk_prob"] = true;
  c = parse_ok(j);
  EXPECT_EQ(c.shared_expert_intermediate_size, 0);
  EXPECT_FALSE(c.shared_expert_gate);
  EXPECT_TRUE(c.norm_topk_prob);
}

TEST(ParseModelConfig, Qwen3Moe) {
  json j = minimal("qwen3_moe");
  j["num_experts"] = 8;
  j["moe_intermediate_size"] = 4;
  j["head_dim"] = 6;  // explicit, not hidden_size / num_attention_heads
  j["norm_topk_prob"] = true;
  ModelConfig c = parse_ok(j);
  EXPECT_EQ(c.arch, Arch::Qwen3Moe);
  EXPECT_EQ(c.head_dim, 6);
  EXPECT_EQ(c.qk_norm, QkNorm::PerHead);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.shared_expert_intermediate_size, 0);

  j["attention_bias"] = true;
  c = parse_ok(j);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_TRUE(c.o_bias);
}

TEST(ParseModelConfig, Olmoe) {
  json j = minimal("olmoe");
  j.erase("num_key_value_heads");
  j["num_experts"] = 8;
  j["clip_qkv"] = 8.5;
  ModelConfig c = parse_ok(j);
  EXPECT_EQ(c.arch, Arch::Olmoe);
  EXPECT_EQ(c.num_kv_heads, 4);  // defaults to num_attention_heads
  EXPECT_EQ(c.qk_norm, QkNorm::Full);
  ASSERT_TRUE(c.clip_qkv.has_value());
  EXPECT_FLOAT_EQ(*c.clip_qkv, 8.5f);
  EXPECT_EQ(c.moe_intermediate_size, 8);  // OLMoE's experts are intermediate_size wide
  EXPECT_EQ(c.layer_is_moe, std::vector<bool>(4, true));

  j.erase("clip_qkv");
  j["num_attention_heads"] = 8;
  c = parse_ok(j);
  EXPECT_FALSE(c.clip_qkv.has_value());
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 2);
}

TEST(ParseModelConfig, SparseStepAndMlpOnlyLayers) {
  json j = minimal("qwen2_moe");
  j["num_experts"] = 4;
  j["decoder_sparse_step"] = 2;
  ModelConfig c = parse_ok(j);
  EXPECT_EQ(c.layer_is_moe, (std::vector<bool>{false, true, false, true}));
  EXPECT_EQ(c.num_moe_layers(), 2);

  j["decoder_sparse_step"] = 1;
  j["mlp_only_layers"] = {0, 2};
  c = parse_ok(j);
  EXPECT_EQ(c.layer_is_moe, (std::vector<bool>{false, true, false, true}));

  j["mlp_only_layers"] = {3};
  j["model_type"] = "qwen3_moe";
  c = parse_ok(j);
  EXPECT_EQ(c.layer_is_moe, (std::vector<bool>{true, true, true, false}));

  // Dense layers need a dense width.
  j["intermediate_size"] = 0;
  expect_error(j, {"intermediate_size"});
}

TEST(ParseModelConfig, RopeTheta) {
  json j = minimal("mixtral");
  j["rope_theta"] = 500000.0;
  EXPECT_DOUBLE_EQ(parse_ok(j).rope_theta, 500000.0);

  // transformers 5 keeps it in rope_parameters.
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 250000.0}};
  EXPECT_DOUBLE_EQ(parse_ok(j).rope_theta, 250000.0);

  // An explicit null scaling is no scaling.
  j.erase("rope_parameters");
  j["rope_scaling"] = nullptr;
  j["rope_theta"] = 1234.0;
  EXPECT_DOUBLE_EQ(parse_ok(j).rope_theta, 1234.0);
}

TEST(ParseModelConfig, Qwen2LayerTypesGiveSlidingWindows) {
  json j = minimal("qwen2_moe");
  j["use_sliding_window"] = true;
  j["sliding_window"] = 16;
  j["layer_types"] = {"full_attention", "sliding_attention", "sliding_attention", "full_attention"};
  EXPECT_EQ(parse_ok(j).layer_window, (std::vector<int64_t>{0, 16, 16, 0}));

  j["layer_types"] = {"full_attention", "sliding_attention"};
  expect_error(j, {"layer_types"});
  j["layer_types"] = {"full_attention", "chunked_attention", "full_attention", "full_attention"};
  expect_error(j, {"chunked_attention"});
  j["layer_types"] = "sliding_attention";
  expect_error(j, {"layer_types"});

  // Without layer_types (transformers 5): the even layers below max_window_layers.
  j.erase("layer_types");
  j["max_window_layers"] = 3;
  EXPECT_EQ(parse_ok(j).layer_window, (std::vector<int64_t>{16, 0, 16, 0}));
  j["max_window_layers"] = 1;
  EXPECT_EQ(parse_ok(j).layer_window, (std::vector<int64_t>{16, 0, 0, 0}));
  // No window given: transformers' default of 4096.
  j.erase("sliding_window");
  EXPECT_EQ(parse_ok(j).layer_window, (std::vector<int64_t>{4096, 0, 0, 0}));
  j["use_sliding_window"] = false;
  EXPECT_EQ(parse_ok(j).layer_window, (std::vector<int64_t>{0, 0, 0, 0}));
}

TEST(ParseModelConfig, Qwen3SlidingWindowCoversEveryLayer) {
  json j = minimal("qwen3_moe");
  j["sliding_window"] = 16;
  j["max_window_layers"] = 2;  // transformers ignores it for qwen3_moe
  EXPECT_EQ(parse_ok(j).layer_window, (std::vector<int64_t>{0, 0, 0, 0}));
  j["use_sliding_window"] = true;
  EXPECT_EQ(parse_ok(j).layer_window, (std::vector<int64_t>{16, 16, 16, 16}));
  j["sliding_window"] = -3;
  expect_error(j, {"sliding_window"});
}

TEST(ParseModelConfig, EosTokenIdIntOrList) {
  json j = minimal("mixtral");
  j["bos_token_id"] = 1;
  j["eos_token_id"] = 2;
  ModelConfig c = parse_ok(j);
  ASSERT_TRUE(c.bos_token_id.has_value());
  EXPECT_EQ(*c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2}));

  j["eos_token_id"] = {7, 3};
  EXPECT_EQ(parse_ok(j).eos_token_ids, (std::vector<int64_t>{7, 3}));

  // An explicit null means no end-of-sequence token; qwen configs have no default.
  j["eos_token_id"] = nullptr;
  EXPECT_TRUE(parse_ok(j).eos_token_ids.empty());
  EXPECT_TRUE(parse_ok(minimal("qwen3_moe")).eos_token_ids.empty());

  j["eos_token_id"] = {7, "x"};
  expect_error(j, {"eos_token_id"});
}

TEST(ParseModelConfig, ErrorsNameSourceAndField) {
  for (const char* text : {"{\"model_type\": ", "[1, 2]", ""}) {
    Expected<ModelConfig> c = parse_model_config(text, kSource);
    ASSERT_FALSE(c.ok()) << text;
    EXPECT_TRUE(Contains(c.error().message(), kSource));
    EXPECT_TRUE(Contains(c.error().message(), "JSON")) << text;
  }
  expect_error(with("mixtral", {{"model_type", nullptr}}), {"\"model_type\""});
  expect_error(with("mixtral", {{"model_type", 7}}), {"\"model_type\""});
  expect_error(minimal("llama"), {"\"llama\"", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"});
  expect_error(with("mixtral", {{"hidden_size", "16"}}), {"\"hidden_size\"", "\"16\""});
  expect_error(with("mixtral", {{"tie_word_embeddings", 1}}), {"\"tie_word_embeddings\""});
  expect_error(with("mixtral", {{"rope_theta", "big"}}), {"\"rope_theta\""});
  expect_error(with("mixtral", {{"num_hidden_layers", 0}}), {"num_hidden_layers"});
  expect_error(with("olmoe", {{"clip_qkv", "8"}}), {"\"clip_qkv\""});
  expect_error(with("qwen2_moe", {{"mlp_only_layers", "0"}}), {"\"mlp_only_layers\""});
  expect_error(with("mixtral", {{"hidden_act", "gelu"}}), {"hidden_act", "gelu"});
}

TEST(ParseModelConfig, InconsistentShapesAreErrors) {
  parse_ok(with("mixtral", {{"hidden_size", 12}, {"num_attention_heads", 2}}));  // head_dim 6
  expect_error(with("mixtral", {{"hidden_size", 6}, {"num_attention_heads", 2}}), {"head_dim 3"});
  expect_error(with("qwen3_moe", {{"head_dim", 5}}), {"head_dim 5"});
  expect_error(with("mixtral", {{"num_key_value_heads", 3}}), {"num_key_value_heads 3"});
  expect_error(with("mixtral", {{"num_local_experts", 2}, {"num_experts_per_tok", 3}}),
               {"num_experts_per_tok 3"});
  expect_error(with("qwen2_moe", {{"hidden_size", 15}}), {"hidden_size 15"});
}

TEST(ParseModelConfig, UnsupportedRopeType) {
  expect_error(with("qwen3_moe", {{"rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}}}),
               {"rope_scaling", "yarn"});
  expect_error(
      with("qwen3_moe", {{"rope_parameters", {{"rope_type", "yarn"}, {"rope_theta", 1e4}}}}),
      {"rope_parameters", "yarn"});
  // transformers 4 spelled it "type".
  expect_error(with("mixtral", {{"rope_scaling", {{"type", "linear"}, {"factor", 2.0}}}}),
               {"rope_scaling", "linear"});
  expect_error(with("mixtral", {{"rope_scaling", "yarn"}}), {"rope_scaling"});
  expect_error(with("mixtral", {{"rope_parameters", {{"rope_theta", "x"}}}}),
               {"rope_parameters", "rope_theta"});
}

TEST(LoadModelConfig, ReadsDirectoryAndGenerationConfig) {
  test::ScopedTempDir dir;
  json j = minimal("mixtral");
  j["eos_token_id"] = 2;
  test::write_file(dir / "config.json", j.dump());
  Expected<ModelConfig> c = load_model_config(dir.path());
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{2}));

  // generation_config.json adds the ids config.json lacks, without duplicates.
  test::write_file(dir / "generation_config.json", R"({"eos_token_id": [2, 5, 9]})");
  c = load_model_config(dir.path());
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{2, 5, 9}));

  test::write_file(dir / "generation_config.json", R"({"eos_token_id": "2"})");
  c = load_model_config(dir.path());
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(Contains(c.error().message(), "generation_config.json"));
  EXPECT_TRUE(Contains(c.error().message(), "eos_token_id"));
}

TEST(LoadModelConfig, Errors) {
  test::ScopedTempDir dir;
  const std::filesystem::path missing = dir / "no-such-model";
  Expected<ModelConfig> c = load_model_config(missing);
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(Contains(c.error().message(), missing.string()));

  c = load_model_config(dir.path());  // exists, but has no config.json
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(Contains(c.error().message(), (dir / "config.json").string()));

  // Parse errors name the file.
  json j = minimal("mixtral");
  j["num_attention_heads"] = 3.5;
  test::write_file(dir / "config.json", j.dump());
  c = load_model_config(dir.path());
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(Contains(c.error().message(), (dir / "config.json").string()));
  EXPECT_TRUE(Contains(c.error().message(), "num_attention_heads"));
}

// Regression: a negative max_window_layers once made the parser write before layer_window's
// storage; it now means that no layer slides, as in transformers.
TEST(ParseModelConfig, NegativeMaxWindowLayersSlidesNoLayer) {
  json j = minimal("qwen2_moe");
  j["use_sliding_window"] = true;
  j["sliding_window"] = 8;
  j["max_window_layers"] = -5;
  EXPECT_EQ(parse_ok(j).layer_window, std::vector<int64_t>(4, 0));
}

// Regression: a huge num_hidden_layers once threw std::bad_alloc out of the parser.
TEST(ParseModelConfig, HugeLayerCountIsAnError) {
  json j = minimal("mixtral");
  j["num_hidden_layers"] = int64_t{1} << 62;
  try {
    expect_error(j, {"num_hidden_layers"});
  } catch (const std::exception& e) {
    ADD_FAILURE() << "parse_model_config threw " << e.what();
  }
}

}  // namespace
}  // namespace moemesh
