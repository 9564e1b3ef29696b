// config.json of the deepseek families (deepseek_v2, deepseek_v3 and kimi_k2): multi-head latent
// attention, YaRN, the dense / sparse layer split and the router, with transformers' defaults.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <string>

#include "core/config.h"
#include "tests/core/test_checkpoint_writer.h"

namespace moemesh {
namespace {

using nlohmann::json;
using test::Contains;

const std::string kSource = "some/dir/config.json";

// A tiny deepseek config.json with `patch` applied (RFC 7386: a null value removes the key).
json deepseek(const std::string& model_type, const json& patch = json::object()) {
  json j = {
      {"model_type", model_type}, {"vocab_size", 64},           {"hidden_size", 32},
      {"intermediate_size", 40},  {"moe_intermediate_size", 8}, {"num_hidden_layers", 4},
      {"num_attention_heads", 4}, {"kv_lora_rank", 16},         {"q_lora_rank", 24},
      {"qk_nope_head_dim", 8},    {"qk_rope_head_dim", 4},      {"v_head_dim", 6},
      {"n_routed_experts", 8},    {"num_experts_per_tok", 2},   {"max_position_embeddings", 128}};
  if (model_type != "deepseek_v2") {
    j["n_group"] = 4;
    j["topk_group"] = 2;
  }
  j.merge_patch(patch);
  return j;
}

ModelConfig parse_ok(const json& j) {
  Expected<ModelConfig> c = parse_model_config(j.dump(), kSource);
  EXPECT_TRUE(c.ok()) << (c.ok() ? "" : c.error().message());
  return c.ok() ? *c : ModelConfig{};
}

void expect_error(const json& j, std::initializer_list<std::string> needles) {
  Expected<ModelConfig> c = parse_model_config(j.dump(), kSource);
  ASSERT_FALSE(c.ok()) << "parsed " << j.dump();
  const std::string m = c.error().message();
  EXPECT_TRUE(Contains(m, kSource)) << m;
  for (const std::string& needle : needles) EXPECT_TRUE(Contains(m, needle)) << m;
}

TEST(ParseDeepseekConfig, V3LatentAttentionAndRouter) {
  const ModelConfig c = parse_ok(deepseek("deepseek_v3"));
  EXPECT_EQ(c.arch, Arch::DeepseekV3);
  EXPECT_EQ(arch_name(c.arch), "deepseek_v3");
  ASSERT_TRUE(c.mla.has_value());
  EXPECT_EQ(c.mla->q_lora_rank, 24);
  EXPECT_EQ(c.mla->kv_lora_rank, 16);
  EXPECT_EQ(c.mla->qk_head_dim(), 12);
  EXPECT_EQ(c.mla->v_head_dim, 6);
  EXPECT_TRUE(c.mla->rope_interleave);
  EXPECT_FALSE(c.mla->bias);
  EXPECT_EQ(c.head_dim, 4);  // the rotary width, as transformers sets it
  EXPECT_EQ(c.num_kv_heads, 4);
  // The KV cache holds the latent and the rotary key: 20 values per token per layer.
  EXPECT_EQ(c.kv_values_per_token_layer(), 20);
  // Defaults of DeepseekV3Config: first 3 layers dense, one shared expert, sigmoid routing.
  EXPECT_EQ(c.layer_is_moe, (std::vector<bool>{false, false, false, true}));
  EXPECT_EQ(c.shared_expert_intermediate_size, 8);
  EXPECT_FALSE(c.shared_expert_gate);
  EXPECT_TRUE(c.grouped_router);
  EXPECT_EQ(c.scoring, RouterScoring::Sigmoid);
  EXPECT_TRUE(c.score_correction_bias);
  EXPECT_TRUE(c.group_top2_sum);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_FLOAT_EQ(c.routed_scaling_factor, 2.5f);
  EXPECT_EQ(c.n_group, 4);
  EXPECT_EQ(c.topk_group, 2);
  EXPECT_FALSE(c.yarn.has_value());
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{1}));
}

TEST(ParseDeepseekConfig, KimiK2ReadsAsV3) {
  const ModelConfig c = parse_ok(deepseek("kimi_k2", {{"first_k_dense_replace", 1}}));
  EXPECT_EQ(c.arch, Arch::DeepseekV3);
  EXPECT_EQ(c.model_type, "kimi_k2");
  EXPECT_EQ(c.layer_is_moe, (std::vector<bool>{false, true, true, true}));
}

TEST(ParseDeepseekConfig, V2Defaults) {
  json j = deepseek("deepseek_v2", {{"norm_topk_prob", true}, {"num_key_value_heads", 4}});
  j["q_lora_rank"] = nullptr;  // (a null in a merge patch would remove the key instead)
  const ModelConfig c = parse_ok(j);
  EXPECT_EQ(c.arch, Arch::DeepseekV2);
  ASSERT_TRUE(c.mla.has_value());
  EXPECT_EQ(c.mla->q_lora_rank, 0);  // null: plain q_proj
  EXPECT_TRUE(c.mla->rope_interleave);
  EXPECT_EQ(c.layer_is_moe, std::vector<bool>(4, true));  // first_k_dense_replace 0
  EXPECT_EQ(c.shared_expert_intermediate_size, 16);       // n_shared_experts 2
  EXPECT_EQ(c.scoring, RouterScoring::Softmax);
  EXPECT_FALSE(c.score_correction_bias);
  EXPECT_FALSE(c.norm_topk_prob);  // DeepseekV2's router never renormalises
  EXPECT_EQ(c.n_group, 1);         // greedy
  EXPECT_FLOAT_EQ(c.routed_scaling_factor, 1.0f);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2}));

  const ModelConfig g = parse_ok(deepseek(
      "deepseek_v2", {{"topk_method", "group_limited_greedy"}, {"n_group", 2}, {"topk_group", 1}}));
  EXPECT_EQ(g.n_group, 2);
  EXPECT_EQ(g.topk_group, 1);
  EXPECT_FALSE(g.group_top2_sum);  // a group ranks by its best expert
}

TEST(ParseDeepseekConfig, YarnAsTransformersResolvesIt) {
  const ModelConfig c =
      parse_ok(deepseek("deepseek_v3", {{"rope_scaling",
                                         {{"type", "yarn"},
                                          {"factor", 40},
                                          {"original_max_position_embeddings", 4096},
                                          {"mscale", 1.0},
                                          {"mscale_all_dim", 1.0},
                                          {"beta_fast", 32},
                                          {"beta_slow", 1}}}}));
  ASSERT_TRUE(c.yarn.has_value());
  EXPECT_DOUBLE_EQ(c.yarn->factor, 40.0);
  EXPECT_EQ(c.yarn->original_max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(c.yarn->attention_factor, 1.0);  // mscale / mscale_all_dim cancel
  EXPECT_TRUE(c.yarn->truncate);

  // No mscale: attention_factor = 0.1 ln(factor) + 1; no factor: max / original positions.
  const ModelConfig d = parse_ok(deepseek(
      "deepseek_v2",
      {{"rope_parameters",
        {{"rope_type", "yarn"}, {"rope_theta", 5e4}, {"original_max_position_embeddings", 32}}}}));
  ASSERT_TRUE(d.yarn.has_value());
  EXPECT_DOUBLE_EQ(d.yarn->factor, 4.0);
  EXPECT_NEAR(d.yarn->attention_factor, 0.1 * std::log(4.0) + 1.0, 1e-12);
  EXPECT_DOUBLE_EQ(d.rope_theta, 5e4);
  EXPECT_DOUBLE_EQ(d.yarn->beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(d.yarn->beta_slow, 1.0);
}

TEST(ParseDeepseekConfig, UnsupportedValuesNameTheField) {
  expect_error(deepseek("deepseek_v3", {{"topk_method", "greedy"}}), {"topk_method", "greedy"});
  expect_error(deepseek("deepseek_v2", {{"topk_method", "noaux_tc"}}), {"topk_method", "noaux_tc"});
  expect_error(deepseek("deepseek_v2", {{"topk_method", "group_limited_greedy"}}),
               {"n_group", "topk_group"});
  expect_error(deepseek("deepseek_v3", {{"scoring_func", "softmax"}}), {"scoring_func"});
  expect_error(deepseek("deepseek_v2", {{"scoring_func", "sigmoid"}}), {"scoring_func"});
  expect_error(deepseek("deepseek_v3", {{"n_group", 3}}), {"n_group"});
  expect_error(deepseek("deepseek_v3", {{"n_group", 8}, {"topk_group", 4}}), {"n_group"});
  expect_error(deepseek("deepseek_v3", {{"topk_group", 5}}), {"topk_group"});
  expect_error(deepseek("deepseek_v3", {{"topk_group", 1}, {"num_experts_per_tok", 3}}),
               {"num_experts_per_tok 3"});
  expect_error(deepseek("deepseek_v3", {{"moe_layer_freq", 2}}), {"moe_layer_freq"});
  expect_error(deepseek("deepseek_v3", {{"num_key_value_heads", 2}}), {"num_key_value_heads"});
  expect_error(deepseek("deepseek_v2", {{"num_experts_per_tok", nullptr}}),
               {"num_experts_per_tok"});
  expect_error(deepseek("deepseek_v3", {{"qk_rope_head_dim", 5}}), {"qk_rope_head_dim"});
  expect_error(deepseek("deepseek_v3", {{"kv_lora_rank", 0}}), {"kv_lora_rank"});
  expect_error(deepseek("deepseek_v2", {{"mlp_bias", true}}), {"mlp_bias"});
  expect_error(deepseek("deepseek_v2", {{"hidden_size", 30}}), {"hidden_size 30"});
  parse_ok(deepseek("deepseek_v3", {{"hidden_size", 30}}));  // V3 has no such rule
  expect_error(deepseek("deepseek_v3", {{"rope_scaling", {{"rope_type", "linear"}}}}),
               {"rope_scaling", "linear"});
  expect_error(deepseek("deepseek_v3", {{"rope_scaling", {{"rope_type", "yarn"}, {"factor", -1}}}}),
               {"factor"});
}

}  // namespace
}  // namespace moemesh
