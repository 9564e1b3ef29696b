// config.json of glm4_moe (GLM-4.5, GLM-4.5-Air) and dbrx, with transformers' defaults: GLM's
// partial rotary factor, dense first layers, grouped sigmoid router and shared experts; DBRX's
// nested attn_config / ffn_config, LayerNorm and p-norm routing.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "core/config.h"
#include "tests/core/test_checkpoint_writer.h"

namespace moemesh {
namespace {

using nlohmann::json;
using test::Contains;

const std::string kSource = "some/dir/config.json";

ModelConfig parse_ok(const json& j) {
  Expected<ModelConfig> c = parse_model_config(j.dump(), kSource);
  EXPECT_TRUE(c.ok()) << (c.ok() ? "" : c.error().message());
  return c.ok() ? *c : ModelConfig{};
}

std::string parse_error(const json& j) {
  Expected<ModelConfig> c = parse_model_config(j.dump(), kSource);
  EXPECT_FALSE(c.ok());
  return c.ok() ? "" : c.error().message();
}

// GLM-4.5-Air's config.json as the hub ships it (transformers 4 layout: the rotary factor at the
// top level, the MTP layer counted apart from num_hidden_layers).
json glm45_air() {
  return json::parse(R"({
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": true,
    "eos_token_id": [151329, 151336, 151338], "first_k_dense_replace": 1, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 10944,
    "max_position_embeddings": 131072, "moe_intermediate_size": 1408, "n_group": 1,
    "n_routed_experts": 128, "n_shared_experts": 1, "norm_topk_prob": true,
    "num_attention_heads": 96, "num_experts_per_tok": 8, "num_hidden_layers": 46,
    "num_key_value_heads": 8, "num_nextn_predict_layers": 1, "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 1000000,
    "routed_scaling_factor": 1.0, "tie_word_embeddings": false, "topk_group": 1,
    "use_qk_norm": false, "vocab_size": 151552})");
}

TEST(ParseGlm4MoeConfig, Glm45AirAsTransformersReadsIt) {
  const ModelConfig c = parse_ok(glm45_air());
  EXPECT_EQ(c.arch, Arch::Glm4Moe);
  EXPECT_EQ(arch_name(c.arch), "glm4_moe");
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.rotary_dim, 64);  // int(128 * 0.5): the first 64 features of each head rotate
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_EQ(c.qk_norm, QkNorm::None);
  EXPECT_EQ(c.num_layers, 46);  // the MTP layer (model.layers.46) is not part of the causal LM
  EXPECT_FALSE(c.layer_is_moe[0]);
  EXPECT_TRUE(c.layer_is_moe[1]);
  EXPECT_EQ(c.num_moe_layers(), 45);
  EXPECT_EQ(c.num_experts, 128);
  EXPECT_EQ(c.top_k, 8);
  EXPECT_EQ(c.moe_intermediate_size, 1408);
  EXPECT_EQ(c.shared_expert_intermediate_size, 1408);
  EXPECT_FALSE(c.shared_expert_gate);
  EXPECT_TRUE(c.grouped_router);
  EXPECT_EQ(c.scoring, RouterScoring::Sigmoid);
  EXPECT_TRUE(c.score_correction_bias);
  EXPECT_TRUE(c.group_top2_sum);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_FALSE(c.layer_norm);
  EXPECT_FALSE(c.mla);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{151329, 151336, 151338}));
  EXPECT_EQ(c.kv_values_per_token_layer(), 2 * 8 * 128);
}

TEST(ParseGlm4MoeConfig, DefaultsAndTheRopeDictOfTransformers5) {
  json j = {{"model_type", "glm4_moe"},
            {"hidden_size", 64},
            {"num_attention_heads", 4},
            {"num_key_value_heads", 2},
            {"n_routed_experts", 8},
            {"num_experts_per_tok", 2},
            {"num_hidden_layers", 3},
            {"n_group", 4},
            {"topk_group", 2},
            {"use_qk_norm", true},
            {"rope_parameters",
             {{"rope_type", "default"}, {"rope_theta", 5e5}, {"partial_rotary_factor", 0.75}}}};
  ModelConfig c = parse_ok(j);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.rotary_dim, 12);
  EXPECT_EQ(c.rope_theta, 5e5);
  EXPECT_EQ(c.qk_norm, QkNorm::PerHead);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.n_group, 4);
  EXPECT_EQ(c.topk_group, 2);
  EXPECT_EQ(c.routed_scaling_factor, 1.0f);
  EXPECT_EQ(c.rms_norm_eps, 1e-5f);
  EXPECT_EQ(c.num_moe_layers(), 2);  // first_k_dense_replace defaults to 1
  j.erase("rope_parameters");
  c = parse_ok(j);
  EXPECT_EQ(c.rotary_dim, 8);  // Glm4MoeConfig's default factor 0.5
  EXPECT_EQ(c.rope_theta, 10000.0);
}

TEST(ParseGlm4MoeConfig, BadValuesNameTheField) {
  json j = glm45_air();
  j["n_group"] = 3;
  EXPECT_TRUE(Contains(parse_error(j), "n_group")) << parse_error(j);
  j = glm45_air();
  j["n_group"] = 128;  // groups of one expert cannot rank by their two best
  EXPECT_TRUE(Contains(parse_error(j), "at least 2")) << parse_error(j);
  j = glm45_air();
  j["partial_rotary_factor"] = 0.3;  // int(128 * 0.3) = int(38.4) = 38
  EXPECT_EQ(parse_ok(j).rotary_dim, 38);
  j["head_dim"] = 10;
  j["partial_rotary_factor"] = 0.5;  // 5 rotating features: odd
  EXPECT_TRUE(Contains(parse_error(j), "partial_rotary_factor")) << parse_error(j);
  j = glm45_air();
  j["partial_rotary_factor"] = 1.5;
  EXPECT_TRUE(Contains(parse_error(j), "partial_rotary_factor")) << parse_error(j);
  j = glm45_air();
  j["first_k_dense_replace"] = -1;
  EXPECT_TRUE(Contains(parse_error(j), "first_k_dense_replace")) << parse_error(j);
}

// DBRX's config.json as the hub ships it (transformers 4: rope_theta inside attn_config).
json dbrx_instruct() {
  return json::parse(R"({
    "architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "d_model": 6144,
    "n_heads": 48, "n_layers": 40, "max_seq_len": 32768, "vocab_size": 100352,
    "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "model_type": "", "rope_theta": 500000},
    "ffn_config": {"ffn_hidden_size": 10752, "model_type": "", "moe_jitter_eps": 0.01,
                   "moe_loss_weight": 0.05, "moe_num_experts": 16, "moe_top_k": 4,
                   "ffn_act_fn": {"name": "silu"}},
    "initializer_range": 0.02, "output_router_logits": false, "resid_pdrop": 0.0,
    "emb_pdrop": 0.0, "tie_word_embeddings": false, "use_cache": true})");
}

TEST(ParseDbrxConfig, DbrxInstructAsItShips) {
  const ModelConfig c = parse_ok(dbrx_instruct());
  EXPECT_EQ(c.arch, Arch::Dbrx);
  EXPECT_EQ(arch_name(c.arch), "dbrx");
  EXPECT_EQ(c.hidden_size, 6144);
  EXPECT_EQ(c.num_heads, 48);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.rotary_dim, 128);
  EXPECT_EQ(c.num_layers, 40);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_EQ(c.vocab_size, 100352);
  EXPECT_EQ(c.rope_theta, 500000.0);  // attn_config.rope_theta when the top level has none
  ASSERT_TRUE(c.clip_qkv.has_value());
  EXPECT_EQ(*c.clip_qkv, 8.0f);
  EXPECT_TRUE(c.layer_norm);
  EXPECT_EQ(c.rms_norm_eps, 1e-5f);
  EXPECT_EQ(c.num_experts, 16);
  EXPECT_EQ(c.top_k, 4);
  EXPECT_EQ(c.moe_intermediate_size, 10752);
  ASSERT_TRUE(c.expert_weights_norm_p.has_value());
  EXPECT_EQ(*c.expert_weights_norm_p, 1.0);  // DbrxFFNConfig's default
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_FALSE(c.grouped_router);
  EXPECT_EQ(c.shared_expert_intermediate_size, 0);
  EXPECT_EQ(c.num_moe_layers(), 40);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.qk_norm, QkNorm::None);
}

TEST(ParseDbrxConfig, TopLevelRopeParametersWinAndNullTurnsNormalisationOff) {
  json j = dbrx_instruct();
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 12345.0}};
  j["ffn_config"]["moe_normalize_expert_weights"] = nullptr;
  j["attn_config"].erase("clip_qkv");
  const ModelConfig c = parse_ok(j);
  EXPECT_EQ(c.rope_theta, 12345.0);  // what transformers 5 uses
  EXPECT_FALSE(c.expert_weights_norm_p.has_value());
  EXPECT_FALSE(c.clip_qkv.has_value());
}

TEST(ParseDbrxConfig, BadValuesNameTheField) {
  json j = dbrx_instruct();
  j["attn_config"]["kv_n_heads"] = 5;
  EXPECT_TRUE(Contains(parse_error(j), "kv_n_heads")) << parse_error(j);
  j = dbrx_instruct();
  j["ffn_config"]["moe_top_k"] = 17;
  EXPECT_TRUE(Contains(parse_error(j), "moe_top_k")) << parse_error(j);
  j = dbrx_instruct();
  j["ffn_config"]["ffn_act_fn"] = {{"name", "gelu"}};
  EXPECT_TRUE(Contains(parse_error(j), "ffn_act_fn")) << parse_error(j);
  j = dbrx_instruct();
  j["ffn_config"] = 3;
  EXPECT_TRUE(Contains(parse_error(j), "ffn_config")) << parse_error(j);
  j = dbrx_instruct();
  j["attn_config"]["kv_n_heads"] = "eight";
  EXPECT_TRUE(Contains(parse_error(j), "attn_config")) << parse_error(j);
  EXPECT_TRUE(Contains(parse_error(j), "kv_n_heads")) << parse_error(j);
  j = dbrx_instruct();
  j["tie_word_embeddings"] = true;
  EXPECT_TRUE(Contains(parse_error(j), "tie_word_embeddings")) << parse_error(j);
  j = dbrx_instruct();
  j["n_heads"] = 0;
  EXPECT_TRUE(Contains(parse_error(j), "n_heads")) << parse_error(j);
}

}  // namespace
}  // namespace moemesh
