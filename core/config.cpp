#include "core/config.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace moemesh {
namespace {

using nlohmann::json;

// Reads typed fields of one JSON object, remembering the first problem it meets, so that a
// parser can read every field and report one clear error at the end.
class FieldReader {
 public:
  FieldReader(const json& obj, std::string source) : obj_(obj), source_(std::move(source)) {}

  bool has(const char* key) const { return obj_.contains(key) && !obj_.at(key).is_null(); }

  int64_t integer(const char* key, int64_t fallback) {
    if (!has(key)) return fallback;
    const json& v = obj_.at(key);
    if (!v.is_number_integer() ||
        (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))) {
      fail(key, "an integer", v);
      return fallback;
    }
    return v.get<int64_t>();
  }

  double number(const char* key, double fallback) {
    if (!has(key)) return fallback;
    const json& v = obj_.at(key);
    if (!v.is_number()) {
      fail(key, "a number", v);
      return fallback;
    }
    return v.get<double>();
  }

  bool boolean(const char* key, bool fallback) {
    if (!has(key)) return fallback;
    const json& v = obj_.at(key);
    if (!v.is_boolean()) {
      fail(key, "true or false", v);
      return fallback;
    }
    return v.get<bool>();
  }

  std::string string(const char* key, const std::string& fallback) {
    if (!has(key)) return fallback;
    const json& v = obj_.at(key);
    if (!v.is_string()) {
      fail(key, "a string", v);
      return fallback;
    }
    return v.get<std::string>();
  }

  // An integer or a list of integers (eos_token_id); absent gives an empty list.
  std::vector<int64_t> integers(const char* key) {
    std::vector<int64_t> out;
    if (!has(key)) return out;
    const json& v = obj_.at(key);
    if (v.is_number_integer()) return {v.get<int64_t>()};
    if (!v.is_array()) {
      fail(key, "an integer or a list of integers", v);
      return out;
    }
    for (const json& e : v) {
      if (!e.is_number_integer()) {
        fail(key, "a list of integers", v);
        return {};
      }
      out.push_back(e.get<int64_t>());
    }
    return out;
  }

  void positive(const char* key, int64_t value) {
    if (value <= 0)
      error(fmt::format("field \"{}\" must be a positive integer, found {}", key, value));
  }

  void at_most(const char* key, int64_t value, int64_t limit) {
    if (value > limit)
      error(fmt::format("field \"{}\" is {}, beyond the largest value moemesh accepts ({})", key,
                        value, limit));
  }

  void error(const std::string& what) {
    if (!error_) error_ = fmt::format("{}: {}", source_, what);
  }

  const std::optional<std::string>& first_error() const { return error_; }

 private:
  void fail(const char* key, const char* expected, const json& found) {
    error(fmt::format("field \"{}\" must be {}, found {}", key, expected, found.dump()));
  }

  const json& obj_;
  std::string source_;
  std::optional<std::string> error_;
};

struct ArchDefaults {
  Arch arch;
  int64_t vocab, hidden, intermediate, layers, heads, kv_heads, max_pos;
  double eps, theta;
  int64_t experts, top_k, moe_inter, shared_inter;
  bool norm_topk;
  int64_t eos;  // default eos_token_id, -1 for none
};

// The defaults of transformers' MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig and OlmoeConfig.
const ArchDefaults* defaults_for(const std::string& model_type) {
  static const ArchDefaults kMixtral{.arch = Arch::Mixtral,
                                     .vocab = 32000,
                                     .hidden = 4096,
                                     .intermediate = 14336,
                                     .layers = 32,
                                     .heads = 32,
                                     .kv_heads = 8,
                                     .max_pos = 4096 * 32,
                                     .eps = 1e-5,
                                     .theta = 1e6,
                                     .experts = 8,
                                     .top_k = 2,
                                     .moe_inter = 14336,
                                     .shared_inter = 0,
                                     .norm_topk = true,
                                     .eos = 2};
  static const ArchDefaults kQwen2Moe{.arch = Arch::Qwen2Moe,
                                      .vocab = 151936,
                                      .hidden = 2048,
                                      .intermediate = 5632,
                                      .layers = 24,
                                      .heads = 16,
                                      .kv_heads = 16,
                                      .max_pos = 32768,
                                      .eps = 1e-6,
                                      .theta = 10000.0,
                                      .experts = 60,
                                      .top_k = 4,
                                      .moe_inter = 1408,
                                      .shared_inter = 5632,
                                      .norm_topk = false,
                                      .eos = -1};
  static const ArchDefaults kQwen3Moe{.arch = Arch::Qwen3Moe,
                                      .vocab = 151936,
                                      .hidden = 2048,
                                      .intermediate = 6144,
                                      .layers = 24,
                                      .heads = 32,
                                      .kv_heads = 4,
                                      .max_pos = 32768,
                                      .eps = 1e-6,
                                      .theta = 10000.0,
                                      .experts = 128,
                                      .top_k = 8,
                                      .moe_inter = 768,
                                      .shared_inter = 0,
                                      .norm_topk = false,
                                      .eos = -1};
  static const ArchDefaults kOlmoe{.arch = Arch::Olmoe,
                                   .vocab = 50304,
                                   .hidden = 2048,
                                   .intermediate = 2048,
                                   .layers = 16,
                                   .heads = 16,
                                   .kv_heads = 16,
                                   .max_pos = 4096,
                                   .eps = 1e-5,
                                   .theta = 10000.0,
                                   .experts = 64,
                                   .top_k = 8,
                                   .moe_inter = 2048,
                                   .shared_inter = 0,
                                   .norm_topk = false,
                                   .eos = 50279};
  // DeepseekV2Config and DeepseekV3Config. top_k -1: DeepseekV2Config has no default, so
  // "num_experts_per_tok" is required; shared_inter is n_shared_experts (times
  // moe_intermediate_size, read in read_deepseek).
  static const ArchDefaults kDeepseekV2{.arch = Arch::DeepseekV2,
                                        .vocab = 102400,
                                        .hidden = 4096,
                                        .intermediate = 11008,
                                        .layers = 32,
                                        .heads = 32,
                                        .kv_heads = 32,
                                        .max_pos = 2048,
                                        .eps = 1e-6,
                                        .theta = 10000.0,
                                        .experts = 64,
                                        .top_k = -1,
                                        .moe_inter = 1407,
                                        .shared_inter = 2,
                                        .norm_topk = false,
                                        .eos = 2};
  static const ArchDefaults kDeepseekV3{.arch = Arch::DeepseekV3,
                                        .vocab = 129280,
                                        .hidden = 7168,
                                        .intermediate = 18432,
                                        .layers = 61,
                                        .heads = 128,
                                        .kv_heads = 128,
                                        .max_pos = 4096,
                                        .eps = 1e-6,
                                        .theta = 10000.0,
                                        .experts = 256,
                                        .top_k = 8,
                                        .moe_inter = 2048,
                                        .shared_inter = 1,
                                        .norm_topk = true,
                                        .eos = 1};
  // Glm4MoeConfig. shared_inter is n_shared_experts (times moe_intermediate_size).
  static const ArchDefaults kGlm4Moe{.arch = Arch::Glm4Moe,
                                     .vocab = 151552,
                                     .hidden = 4096,
                                     .intermediate = 10944,
                                     .layers = 46,
                                     .heads = 96,
                                     .kv_heads = 8,
                                     .max_pos = 131072,
                                     .eps = 1e-5,
                                     .theta = 10000.0,
                                     .experts = 128,
                                     .top_k = 8,
                                     .moe_inter = 1408,
                                     .shared_inter = 1,
                                     .norm_topk = true,
                                     .eos = -1};
  // DbrxConfig with its DbrxAttentionConfig and DbrxFFNConfig (read by read_dbrx); eps is
  // nn.LayerNorm's default, which DBRX does not configure.
  static const ArchDefaults kDbrx{.arch = Arch::Dbrx,
                                  .vocab = 32000,
                                  .hidden = 2048,
                                  .intermediate = 3584,
                                  .layers = 24,
                                  .heads = 16,
                                  .kv_heads = 1,
                                  .max_pos = 2048,
                                  .eps = 1e-5,
                                  .theta = 10000.0,
                                  .experts = 4,
                                  .top_k = 1,
                                  .moe_inter = 3584,
                                  .shared_inter = 0,
                                  .norm_topk = false,
                                  .eos = -1};
  if (model_type == "glm4_moe") return &kGlm4Moe;
  if (model_type == "dbrx") return &kDbrx;
  if (model_type == "deepseek_v2") return &kDeepseekV2;
  if (model_type == "deepseek_v3" || model_type == "kimi_k2") return &kDeepseekV3;
  if (model_type == "mixtral") return &kMixtral;
  if (model_type == "qwen2_moe") return &kQwen2Moe;
  if (model_type == "qwen3_moe") return &kQwen3Moe;
  if (model_type == "olmoe") return &kOlmoe;
  return nullptr;
}

bool is_deepseek(Arch a) {
  return a == Arch::DeepseekV2 || a == Arch::DeepseekV3;
}

// transformers' YaRN mscale: 0.1 * mscale * ln(scale) + 1 for scale > 1, else 1.
double yarn_mscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

// The "yarn" rope parameters of object `rp` (found under `key`), resolved as transformers'
// _compute_yarn_parameters and standardize_rope_params resolve them.
YarnRope read_yarn(const json& root, const json& rp, const char* key, FieldReader& r,
                   const ModelConfig& c) {
  FieldReader sub(rp, "");
  YarnRope y;
  // A top-level "original_max_position_embeddings" takes priority over the rope dict's.
  FieldReader top(root, "");
  y.original_max_position_embeddings =
      top.has("original_max_position_embeddings")
          ? top.integer("original_max_position_embeddings", 0)
          : sub.integer("original_max_position_embeddings", c.max_position_embeddings);
  if (y.original_max_position_embeddings <= 0)
    r.error(fmt::format("field \"{}.original_max_position_embeddings\" must be a positive integer",
                        key));
  y.factor =
      sub.has("factor")
          ? sub.number("factor", 1.0)
          : static_cast<double>(c.max_position_embeddings) /
                static_cast<double>(std::max<int64_t>(1, y.original_max_position_embeddings));
  if (!(y.factor > 0))
    r.error(fmt::format("field \"{}.factor\" must be a positive number, found {}", key, y.factor));
  y.mscale = sub.number("mscale", 0.0);
  y.mscale_all_dim = sub.number("mscale_all_dim", 0.0);
  // `or 32` / `or 1` in transformers: 0 means the default too.
  y.beta_fast = sub.number("beta_fast", 0.0);
  if (y.beta_fast == 0.0) y.beta_fast = 32.0;
  y.beta_slow = sub.number("beta_slow", 0.0);
  if (y.beta_slow == 0.0) y.beta_slow = 1.0;
  y.truncate = sub.boolean("truncate", true);
  if (sub.has("attention_factor")) {
    y.attention_factor = sub.number("attention_factor", 1.0);
  } else if (y.mscale != 0.0 && y.mscale_all_dim != 0.0) {
    y.attention_factor = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim);
  } else {
    y.attention_factor = yarn_mscale(y.factor, 1.0);
  }
  if (sub.first_error()) r.error(fmt::format("field \"{}\"{}", key, *sub.first_error()));
  if (top.first_error()) r.error(*top.first_error());
  return y;
}

// RoPE parameters live in "rope_theta" + "rope_scaling" (transformers 4) or in
// "rope_parameters" (transformers 5). Only the default rope type is supported, and YaRN for the
// deepseek families.
void read_rope(const json& root, FieldReader& r, ModelConfig& c, double default_theta) {
  c.rope_theta = r.number("rope_theta", default_theta);
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    if (!root.contains(key) || root.at(key).is_null()) continue;
    const json& rp = root.at(key);
    if (!rp.is_object()) {
      r.error(fmt::format("field \"{}\" must be an object, found {}", key, rp.dump()));
      return;
    }
    FieldReader sub(rp, "");
    std::string type = sub.string("rope_type", sub.string("type", "default"));
    if (type == "yarn" && is_deepseek(c.arch)) {
      c.yarn = read_yarn(root, rp, key, r, c);
    } else if (type != "default") {
      r.error(fmt::format(
          "field \"{}\" asks for rope_type \"{}\"; moemesh supports only the default rotary "
          "embedding for {}{} (remove the scaling or use a model without it)",
          key, type, c.model_type, is_deepseek(c.arch) ? " and \"yarn\"" : ""));
    }
    if (sub.has("rope_theta")) c.rope_theta = sub.number("rope_theta", c.rope_theta);
    // glm4_moe reads its partial_rotary_factor in read_glm4_moe.
    if (c.arch != Arch::Glm4Moe && sub.has("partial_rotary_factor") &&
        sub.number("partial_rotary_factor", 1.0) != 1.0)
      r.error(fmt::format("field \"{}.partial_rotary_factor\" is not supported", key));
    if (sub.first_error()) r.error(fmt::format("field \"{}\"{}", key, *sub.first_error()));
  }
}

// Multi-head latent attention, dense / sparse layers, shared experts and the router of
// deepseek_v2 and deepseek_v3 (transformers' DeepseekV2Config / DeepseekV3Config).
void read_deepseek(const json& root, FieldReader& r, ModelConfig& c, const ArchDefaults& d) {
  const bool v3 = c.arch == Arch::DeepseekV3;
  MlaConfig m;
  // "q_lora_rank": null selects the plain q_proj; absent takes the default 1536.
  const bool q_null = root.contains("q_lora_rank") && root.at("q_lora_rank").is_null();
  m.q_lora_rank = q_null ? 0 : r.integer("q_lora_rank", 1536);
  if (!q_null) r.positive("q_lora_rank", m.q_lora_rank);
  m.kv_lora_rank = r.integer("kv_lora_rank", 512);
  m.qk_nope_head_dim = r.integer("qk_nope_head_dim", 128);
  m.qk_rope_head_dim = r.integer("qk_rope_head_dim", 64);
  m.v_head_dim = r.integer("v_head_dim", 128);
  m.rope_interleave = v3 ? r.boolean("rope_interleave", true) : true;
  m.bias = r.boolean("attention_bias", false);
  r.positive("kv_lora_rank", m.kv_lora_rank);
  r.positive("qk_rope_head_dim", m.qk_rope_head_dim);
  r.positive("v_head_dim", m.v_head_dim);
  if (m.qk_nope_head_dim < 0) r.error("field \"qk_nope_head_dim\" must not be negative");
  for (const auto& [key, v] : {std::pair{"q_lora_rank", m.q_lora_rank},
                               {"kv_lora_rank", m.kv_lora_rank},
                               {"qk_nope_head_dim", m.qk_nope_head_dim},
                               {"qk_rope_head_dim", m.qk_rope_head_dim},
                               {"v_head_dim", m.v_head_dim}})
    r.at_most(key, v, 1 << 16);
  if (m.qk_rope_head_dim % 2 != 0)
    r.error(fmt::format("field \"qk_rope_head_dim\" is {}; it must be even for rotary embeddings",
                        m.qk_rope_head_dim));
  if (r.has("num_key_value_heads") && c.num_kv_heads != c.num_heads)
    r.error(fmt::format(
        "field \"num_key_value_heads\" is {}, but multi-head latent attention needs it equal "
        "to num_attention_heads ({})",
        c.num_kv_heads, c.num_heads));
  if (!v3 && c.hidden_size % c.num_heads != 0)  // DeepseekV2Config's own check
    r.error(fmt::format("hidden_size {} is not a multiple of num_attention_heads {}", c.hidden_size,
                        c.num_heads));
  c.num_kv_heads = c.num_heads;
  c.head_dim = m.qk_rope_head_dim;  // as transformers sets it
  c.mla = m;

  if (root.contains("mlp_bias") && r.boolean("mlp_bias", false))
    r.error("field \"mlp_bias\" is true; moemesh supports deepseek MLPs without biases only");

  // Experts: "n_routed_experts", or its alias (num_experts for v2, num_local_experts for v3).
  const char* alias = v3 ? "num_local_experts" : "num_experts";
  c.num_experts = r.has("n_routed_experts") ? r.integer("n_routed_experts", d.experts)
                                            : r.integer(alias, d.experts);
  c.moe_intermediate_size = r.integer("moe_intermediate_size", d.moe_inter);
  if (!r.has("num_experts_per_tok") && d.top_k < 0)
    r.error(fmt::format("field \"num_experts_per_tok\" is required for {}", c.model_type));
  c.top_k = r.integer("num_experts_per_tok", d.top_k);
  // DeepseekV2's router never renormalises (transformers ignores "norm_topk_prob" there).
  c.norm_topk_prob = v3 ? r.boolean("norm_topk_prob", d.norm_topk) : false;
  const int64_t n_shared = r.integer("n_shared_experts", d.shared_inter);
  if (n_shared < 0) r.error("field \"n_shared_experts\" must not be negative");
  c.shared_expert_intermediate_size = std::max<int64_t>(n_shared, 0) * c.moe_intermediate_size;
  c.shared_expert_gate = false;
  r.at_most("n_shared_experts", n_shared, 1 << 10);

  // Dense layers first, then MoE layers (transformers ignores moe_layer_freq; only 1 is valid).
  const int64_t first_dense = r.integer("first_k_dense_replace", v3 ? 3 : 0);
  if (first_dense < 0) r.error("field \"first_k_dense_replace\" must not be negative");
  const int64_t freq = r.integer("moe_layer_freq", 1);
  if (freq != 1)
    r.error(fmt::format(
        "field \"moe_layer_freq\" is {}; moemesh (like transformers) supports only 1: every layer "
        "from first_k_dense_replace on is a MoE layer",
        freq));
  c.layer_is_moe.assign(static_cast<std::size_t>(c.num_layers), true);
  for (int64_t l = 0; l < c.num_layers && l < first_dense; ++l) c.layer_is_moe[l] = false;
  if (c.num_layers > c.num_moe_layers()) r.positive("intermediate_size", c.intermediate_size);

  // Router.
  c.grouped_router = true;
  c.routed_scaling_factor = static_cast<float>(r.number("routed_scaling_factor", v3 ? 2.5 : 1.0));
  const std::string scoring = r.string("scoring_func", v3 ? "sigmoid" : "softmax");
  if (scoring != (v3 ? "sigmoid" : "softmax"))
    r.error(fmt::format("field \"scoring_func\" is \"{}\"; {} scores its experts with \"{}\"",
                        scoring, c.model_type, v3 ? "sigmoid" : "softmax"));
  c.scoring = v3 ? RouterScoring::Sigmoid : RouterScoring::Softmax;
  const std::string method = r.string("topk_method", v3 ? "noaux_tc" : "greedy");
  bool grouped = false;
  if (v3) {
    if (method != "noaux_tc")
      r.error(fmt::format(
          "field \"topk_method\" is \"{}\"; {} supports only \"noaux_tc\" (group-limited "
          "sigmoid routing with e_score_correction_bias)",
          method, c.model_type));
    grouped = true;
    c.score_correction_bias = true;
    c.group_top2_sum = true;
  } else if (method == "group_limited_greedy") {
    grouped = true;
    if (!r.has("n_group") || !r.has("topk_group"))
      r.error(
          "topk_method \"group_limited_greedy\" needs the fields \"n_group\" and "
          "\"topk_group\"");
  } else if (method != "greedy") {
    r.error(
        fmt::format("field \"topk_method\" is \"{}\"; deepseek_v2 supports \"greedy\" and "
                    "\"group_limited_greedy\"",
                    method));
  }
  if (grouped) {
    c.n_group = r.integer("n_group", v3 ? 8 : 1);
    c.topk_group = r.integer("topk_group", v3 ? 4 : 1);
    r.positive("n_group", c.n_group);
    r.positive("topk_group", c.topk_group);
    if (c.n_group > 0 && c.num_experts % c.n_group != 0)
      r.error(fmt::format("n_routed_experts {} is not a multiple of field \"n_group\" {}",
                          c.num_experts, c.n_group));
    else if (v3 && c.n_group > 0 && c.num_experts / c.n_group < 2)
      r.error(fmt::format(
          "field \"n_group\" is {}: each of the groups of n_routed_experts {} needs at least 2 "
          "experts (a group ranks by its two best)",
          c.n_group, c.num_experts));
    if (c.topk_group > c.n_group)
      r.error(fmt::format("field \"topk_group\" {} exceeds n_group {}", c.topk_group, c.n_group));
    else if (c.n_group > 0 && c.top_k > c.topk_group * (c.num_experts / c.n_group))
      r.error(fmt::format(
          "num_experts_per_tok {} exceeds the experts of the topk_group {} groups chosen ({} each)",
          c.top_k, c.topk_group, c.num_experts / c.n_group));
  }
}

// Sliding-window attention, as transformers 5 applies it per family:
//   mixtral    every layer, when "sliding_window" is set;
//   qwen3_moe  every layer, when "use_sliding_window" (window "sliding_window", default 4096);
//   qwen2_moe  the layers "layer_types" marks "sliding_attention"; without "layer_types", the
//              even layers below "max_window_layers", when "use_sliding_window";
//   olmoe      never.
void read_sliding_windows(const json& root, FieldReader& r, ModelConfig& c) {
  c.layer_window.assign(static_cast<std::size_t>(c.num_layers), 0);
  int64_t window = 0;
  if (c.arch == Arch::Mixtral) {
    window = r.integer("sliding_window", 0);
    for (auto& w : c.layer_window) w = window;
  } else if (c.arch == Arch::Qwen2Moe || c.arch == Arch::Qwen3Moe) {
    const bool use = r.boolean("use_sliding_window", false);
    window = use ? r.integer("sliding_window", 4096) : 0;
    if (c.arch == Arch::Qwen3Moe) {
      for (auto& w : c.layer_window) w = window;
    } else if (root.contains("layer_types") && !root.at("layer_types").is_null()) {
      const json& lt = root.at("layer_types");
      if (!lt.is_array() || static_cast<int64_t>(lt.size()) != c.num_layers) {
        r.error(fmt::format("field \"layer_types\" must be a list of {} entries, one per layer",
                            c.num_layers));
        return;
      }
      for (std::size_t l = 0; l < lt.size(); ++l) {
        const std::string t = lt[l].is_string() ? lt[l].get<std::string>() : "";
        if (t == "sliding_attention") {
          c.layer_window[l] = window;
        } else if (t != "full_attention") {
          r.error(
              fmt::format("field \"layer_types\"[{}] is {}; expected \"full_attention\" or "
                          "\"sliding_attention\"",
                          l, lt[l].dump()));
        }
      }
    } else if (use) {
      const int64_t below = r.integer("max_window_layers", 28);
      for (int64_t l = 0; l < c.num_layers; l += 2)
        if (l < below) c.layer_window[l] = window;
    }
  }
  if (window < 0)
    r.error(fmt::format("field \"sliding_window\" must not be negative, found {}", window));
}

// GLM-4.5's MoE layers and attention (transformers' Glm4MoeConfig): grouped sigmoid routing with
// e_score_correction_bias as deepseek_v3 routes, shared experts, dense first layers, per-head
// q/k RMSNorm when "use_qk_norm", q/k/v biases with "attention_bias", and RoPE on the first
// int(head_dim * partial_rotary_factor) features of each head. The MTP layers
// ("num_nextn_predict_layers") are not part of the causal LM: their tensors are ignored.
void read_glm4_moe(const json& root, FieldReader& r, ModelConfig& c, const ArchDefaults& d) {
  // partial_rotary_factor: in the rope dict (transformers 5), at the top (GLM's own configs), or
  // Glm4MoeConfig's default 0.5.
  double factor = r.number("partial_rotary_factor", 0.5);
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    if (!root.contains(key) || !root.at(key).is_object()) continue;
    FieldReader sub(root.at(key), "");
    if (sub.has("partial_rotary_factor")) factor = sub.number("partial_rotary_factor", factor);
    if (sub.first_error())
      r.error(fmt::format("field \"{}.partial_rotary_factor\"{}", key, *sub.first_error()));
  }
  if (!(factor > 0.0 && factor <= 1.0))
    r.error(
        fmt::format("field \"partial_rotary_factor\" is {}; expected a number in (0, 1]", factor));
  c.rotary_dim = static_cast<int64_t>(static_cast<double>(c.head_dim) * factor);  // Python's int()
  if (c.rotary_dim <= 0 || c.rotary_dim % 2 != 0)
    r.error(fmt::format(
        "partial_rotary_factor {} of head_dim {} rotates {} features; moemesh needs a positive "
        "even number",
        factor, c.head_dim, c.rotary_dim));

  c.qkv_bias = r.boolean("attention_bias", false);  // o_proj never has a bias
  c.qk_norm = r.boolean("use_qk_norm", false) ? QkNorm::PerHead : QkNorm::None;

  c.num_experts = r.has("n_routed_experts") ? r.integer("n_routed_experts", d.experts)
                                            : r.integer("num_local_experts", d.experts);
  c.moe_intermediate_size = r.integer("moe_intermediate_size", d.moe_inter);
  c.top_k = r.integer("num_experts_per_tok", d.top_k);
  c.norm_topk_prob = r.boolean("norm_topk_prob", d.norm_topk);
  const int64_t n_shared = r.integer("n_shared_experts", d.shared_inter);
  if (n_shared < 0) r.error("field \"n_shared_experts\" must not be negative");
  r.at_most("n_shared_experts", n_shared, 1 << 10);
  c.shared_expert_intermediate_size = std::max<int64_t>(n_shared, 0) * c.moe_intermediate_size;

  const int64_t first_dense = r.integer("first_k_dense_replace", 1);
  if (first_dense < 0) r.error("field \"first_k_dense_replace\" must not be negative");
  c.layer_is_moe.assign(static_cast<std::size_t>(c.num_layers), true);
  for (int64_t l = 0; l < c.num_layers && l < first_dense; ++l) c.layer_is_moe[l] = false;
  if (c.num_layers > c.num_moe_layers()) r.positive("intermediate_size", c.intermediate_size);

  // Glm4MoeTopkRouter: always group-limited (a group ranks by its two best biased scores).
  c.grouped_router = true;
  c.scoring = RouterScoring::Sigmoid;
  c.score_correction_bias = true;
  c.group_top2_sum = true;
  c.routed_scaling_factor = static_cast<float>(r.number("routed_scaling_factor", 1.0));
  c.n_group = r.integer("n_group", 1);
  c.topk_group = r.integer("topk_group", 1);
  r.positive("n_group", c.n_group);
  r.positive("topk_group", c.topk_group);
  if (r.first_error() || c.num_experts <= 0) return;
  if (c.num_experts % c.n_group != 0)
    r.error(fmt::format("n_routed_experts {} is not a multiple of field \"n_group\" {}",
                        c.num_experts, c.n_group));
  else if (c.num_experts / c.n_group < 2)
    r.error(fmt::format(
        "field \"n_group\" is {}: each of the groups of n_routed_experts {} needs at least 2 "
        "experts (a group ranks by its two best)",
        c.n_group, c.num_experts));
  else if (c.topk_group > c.n_group)
    r.error(fmt::format("field \"topk_group\" {} exceeds n_group {}", c.topk_group, c.n_group));
  else if (c.top_k > c.topk_group * (c.num_experts / c.n_group))
    r.error(fmt::format(
        "num_experts_per_tok {} exceeds the experts of the topk_group {} groups chosen ({} each)",
        c.top_k, c.topk_group, c.num_experts / c.n_group));
}

// bos_token_id, and eos_token_id (or the family's default).
void read_token_ids(const json& root, FieldReader& r, ModelConfig& c, const ArchDefaults& d) {
  if (r.has("bos_token_id")) c.bos_token_id = r.integer("bos_token_id", 0);
  if (root.contains("eos_token_id")) {
    c.eos_token_ids = r.integers("eos_token_id");
  } else if (d.eos >= 0) {
    c.eos_token_ids = {d.eos};
  }
}

// One of dbrx's nested configs ("attn_config", "ffn_config"): an object, or absent / null for
// all its defaults. Errors name the field as "attn_config.kv_n_heads".
const json& sub_config(const json& root, const char* key, FieldReader& r) {
  static const json kEmpty = json::object();
  if (!root.contains(key) || root.at(key).is_null()) return kEmpty;
  if (!root.at(key).is_object()) {
    r.error(fmt::format("field \"{}\" must be an object, found {}", key, root.at(key).dump()));
    return kEmpty;
  }
  return root.at(key);
}

// DBRX (transformers' DbrxConfig, DbrxAttentionConfig, DbrxFFNConfig): LayerNorm without bias,
// a fused Wqkv clamped to clip_qkv, every layer sparse with fused expert tensors, softmax top-k
// weights divided by their moe_normalize_expert_weights-norm, no shared experts. The model's sizes
// are "d_model", "n_heads", "n_layers", "max_seq_len" (or the names DbrxConfig maps to them).
Expected<ModelConfig> read_dbrx(const json& root, FieldReader& r, ModelConfig c,
                                const ArchDefaults& d) {
  const auto size = [&](const char* name, const char* alias, int64_t fallback) {
    return r.has(name) || !r.has(alias) ? r.integer(name, fallback) : r.integer(alias, fallback);
  };
  c.vocab_size = r.integer("vocab_size", d.vocab);
  c.hidden_size = size("d_model", "hidden_size", d.hidden);
  c.num_layers = size("n_layers", "num_hidden_layers", d.layers);
  c.num_heads = size("n_heads", "num_attention_heads", d.heads);
  c.max_position_embeddings = size("max_seq_len", "max_position_embeddings", d.max_pos);
  c.rms_norm_eps = static_cast<float>(d.eps);
  c.layer_norm = true;
  c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  if (c.tie_word_embeddings)
    r.error("field \"tie_word_embeddings\" is true; DBRX models never tie their embeddings");
  for (const auto& [key, v] : {std::pair{"vocab_size", c.vocab_size},
                               {"d_model", c.hidden_size},
                               {"n_layers", c.num_layers},
                               {"n_heads", c.num_heads},
                               {"max_seq_len", c.max_position_embeddings}})
    r.positive(key, v);
  r.at_most("vocab_size", c.vocab_size, INT32_MAX);
  r.at_most("d_model", c.hidden_size, 1 << 20);
  r.at_most("n_layers", c.num_layers, 1 << 12);
  r.at_most("n_heads", c.num_heads, 1 << 14);
  r.at_most("max_seq_len", c.max_position_embeddings, int64_t{1} << 32);
  if (r.first_error()) return Error(*r.first_error());

  // Attention: head_dim is d_model / n_heads; Wqkv gives d_model query, then kv_n_heads * head_dim
  // key and value features.
  const json& attn = sub_config(root, "attn_config", r);
  FieldReader a(attn, "");
  c.num_kv_heads = a.integer("kv_n_heads", d.kv_heads);
  if (a.has("clip_qkv")) c.clip_qkv = static_cast<float>(a.number("clip_qkv", 0));
  if (c.clip_qkv && !(*c.clip_qkv > 0))
    r.error(fmt::format("field \"attn_config.clip_qkv\" must be a positive number, found {}",
                        *c.clip_qkv));
  // The rotary base: transformers 5 reads the top-level rope parameters; checkpoints written for
  // transformers 4 (DBRX's own) keep it in attn_config.rope_theta, which is used when the top
  // level has none.
  read_rope(root, r, c, a.number("rope_theta", d.theta));
  if (!(c.rope_theta > 0)) r.error("field \"attn_config.rope_theta\" must be a positive number");
  if (a.first_error()) r.error(fmt::format("field \"attn_config\"{}", *a.first_error()));
  if (c.hidden_size % c.num_heads != 0)
    r.error(fmt::format("d_model {} is not a multiple of n_heads {}", c.hidden_size, c.num_heads));
  c.head_dim = c.hidden_size / c.num_heads;
  c.rotary_dim = c.head_dim;
  r.positive("attn_config.kv_n_heads", c.num_kv_heads);
  r.at_most("attn_config.kv_n_heads", c.num_kv_heads, 1 << 14);
  if (c.head_dim % 2 != 0)
    r.error(fmt::format("head_dim {} (d_model / n_heads) must be even for rotary embeddings",
                        c.head_dim));
  if (c.num_kv_heads > 0 && c.num_heads % c.num_kv_heads != 0)
    r.error(fmt::format("n_heads {} is not a multiple of attn_config.kv_n_heads {}", c.num_heads,
                        c.num_kv_heads));

  // Experts.
  const json& ffn = sub_config(root, "ffn_config", r);
  FieldReader f(ffn, "");
  c.moe_intermediate_size = f.integer("ffn_hidden_size", d.moe_inter);
  c.intermediate_size = c.moe_intermediate_size;
  c.num_experts = f.integer("moe_num_experts", d.experts);
  c.top_k = f.integer("moe_top_k", d.top_k);
  // moe_normalize_expert_weights: absent takes the default 1 (a sum), null turns it off.
  const bool norm_null = ffn.contains("moe_normalize_expert_weights") &&
                         ffn.at("moe_normalize_expert_weights").is_null();
  if (!norm_null) {
    c.expert_weights_norm_p = f.number("moe_normalize_expert_weights", 1.0);
    if (!(*c.expert_weights_norm_p > 0))
      r.error(fmt::format(
          "field \"ffn_config.moe_normalize_expert_weights\" is {}; moemesh supports a positive "
          "p (or null)",
          *c.expert_weights_norm_p));
  }
  if (ffn.contains("ffn_act_fn") && !ffn.at("ffn_act_fn").is_null()) {
    const json& act = ffn.at("ffn_act_fn");
    const std::string name = act.is_object() && act.contains("name") && act.at("name").is_string()
                                 ? act.at("name").get<std::string>()
                                 : "";
    if (name != "silu")
      r.error(fmt::format(
          "field \"ffn_config.ffn_act_fn\" is {}; moemesh supports {{\"name\": \"silu\"}} only",
          act.dump()));
  }
  if (f.first_error()) r.error(fmt::format("field \"ffn_config\"{}", *f.first_error()));
  r.positive("ffn_config.ffn_hidden_size", c.moe_intermediate_size);
  r.positive("ffn_config.moe_num_experts", c.num_experts);
  r.positive("ffn_config.moe_top_k", c.top_k);
  r.at_most("ffn_config.ffn_hidden_size", c.moe_intermediate_size, 1 << 22);
  r.at_most("ffn_config.moe_num_experts", c.num_experts, 1 << 16);
  if (c.top_k > c.num_experts)
    r.error(fmt::format("ffn_config.moe_top_k {} exceeds ffn_config.moe_num_experts {}", c.top_k,
                        c.num_experts));
  c.layer_is_moe.assign(static_cast<std::size_t>(c.num_layers), true);
  c.layer_window.assign(static_cast<std::size_t>(c.num_layers), 0);
  read_token_ids(root, r, c, d);
  if (r.first_error()) return Error(*r.first_error());
  return c;
}

}  // namespace

int64_t ModelConfig::kv_values_per_token_layer() const {
  return mla ? mla->cache_row() : 2 * num_kv_heads * head_dim;
}

int64_t ModelConfig::num_moe_layers() const {
  int64_t n = 0;
  for (bool m : layer_is_moe) n += m ? 1 : 0;
  return n;
}

std::string_view arch_name(Arch a) {
  switch (a) {
    case Arch::Mixtral:
      return "mixtral";
    case Arch::Qwen2Moe:
      return "qwen2_moe";
    case Arch::Qwen3Moe:
      return "qwen3_moe";
    case Arch::Olmoe:
      return "olmoe";
    case Arch::DeepseekV2:
      return "deepseek_v2";
    case Arch::DeepseekV3:
      return "deepseek_v3";
    case Arch::Glm4Moe:
      return "glm4_moe";
    case Arch::Dbrx:
      return "dbrx";
  }
  return "?";
}

Expected<ModelConfig> parse_model_config(std::string_view json_text, const std::string& source) {
  json root = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded())
    return Error(fmt::format("{}: not valid JSON; a model's config.json is a JSON object", source));
  if (!root.is_object())
    return Error(fmt::format("{}: expected a JSON object, found {}", source, root.type_name()));

  FieldReader r(root, source);
  ModelConfig c;
  c.model_type = r.string("model_type", "");
  if (c.model_type.empty())
    return Error(
        fmt::format("{}: no \"model_type\"; expected one of mixtral, qwen2_moe, "
                    "qwen3_moe, olmoe, deepseek_v2, deepseek_v3, kimi_k2, glm4_moe, dbrx",
                    source));
  const ArchDefaults* d = defaults_for(c.model_type);
  if (d == nullptr)
    return Error(
        fmt::format("{}: unknown architecture model_type \"{}\"; moemesh supports "
                    "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3 "
                    "(kimi_k2), glm4_moe and dbrx",
                    source, c.model_type));
  c.arch = d->arch;
  if (c.arch == Arch::Dbrx) return read_dbrx(root, r, std::move(c), *d);

  c.vocab_size = r.integer("vocab_size", d->vocab);
  c.hidden_size = r.integer("hidden_size", d->hidden);
  c.intermediate_size = r.integer("intermediate_size", d->intermediate);
  c.num_layers = r.integer("num_hidden_layers", d->layers);
  c.num_heads = r.integer("num_attention_heads", d->heads);
  c.num_kv_heads =
      r.integer("num_key_value_heads",
                c.arch == Arch::Olmoe || is_deepseek(c.arch) ? c.num_heads : d->kv_heads);
  c.max_position_embeddings = r.integer("max_position_embeddings", d->max_pos);
  c.rms_norm_eps = static_cast<float>(r.number("rms_norm_eps", d->eps));
  c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  read_rope(root, r, c, d->theta);

  const std::string act = r.string("hidden_act", "silu");
  if (act != "silu")
    r.error(fmt::format("field \"hidden_act\" is \"{}\"; these architectures use \"silu\"", act));

  r.positive("vocab_size", c.vocab_size);
  r.positive("hidden_size", c.hidden_size);
  r.positive("num_hidden_layers", c.num_layers);
  r.positive("num_attention_heads", c.num_heads);
  r.positive("num_key_value_heads", c.num_kv_heads);
  r.positive("max_position_embeddings", c.max_position_embeddings);
  // Upper bounds far above any real model keep a corrupt config from asking for absurd memory.
  r.at_most("vocab_size", c.vocab_size, INT32_MAX);  // token ids are 32-bit
  r.at_most("hidden_size", c.hidden_size, 1 << 20);
  r.at_most("intermediate_size", c.intermediate_size, 1 << 22);
  r.at_most("num_hidden_layers", c.num_layers, 1 << 12);
  r.at_most("num_attention_heads", c.num_heads, 1 << 14);
  r.at_most("num_key_value_heads", c.num_kv_heads, 1 << 14);
  r.at_most("max_position_embeddings", c.max_position_embeddings, int64_t{1} << 32);
  if (r.first_error()) return Error(*r.first_error());

  if (is_deepseek(c.arch)) {
    read_deepseek(root, r, c, *d);
    if (r.first_error()) return Error(*r.first_error());
  } else {
    // head_dim may be given explicitly (qwen3_moe, mixtral); otherwise hidden / heads.
    c.head_dim = r.integer("head_dim", 0);
    if (c.head_dim == 0) {
      if (c.hidden_size % c.num_heads != 0)
        r.error(
            fmt::format("hidden_size {} is not divisible by num_attention_heads {} and no "
                        "head_dim is given",
                        c.hidden_size, c.num_heads));
      c.head_dim = c.hidden_size / c.num_heads;
    }
    r.positive("head_dim", c.head_dim);
    r.at_most("head_dim", c.head_dim, 1 << 14);
    if (c.head_dim % 2 != 0)
      r.error(fmt::format("head_dim {} must be even for rotary embeddings", c.head_dim));
    if (c.num_heads % c.num_kv_heads != 0)
      r.error(fmt::format("num_attention_heads {} is not a multiple of num_key_value_heads {}",
                          c.num_heads, c.num_kv_heads));
  }
  c.rotary_dim = c.head_dim;  // the rotary width (qk_rope_head_dim with MLA)
  const bool own_moe = is_deepseek(c.arch) || c.arch == Arch::Glm4Moe;
  if (c.arch == Arch::Glm4Moe) {
    read_glm4_moe(root, r, c, *d);
    if (r.first_error()) return Error(*r.first_error());
  }

  // Experts and routing. transformers accepts "num_experts" and "num_local_experts" for the first
  // four; read_deepseek and read_glm4_moe read their families' fields.
  if (!own_moe)
    c.num_experts = r.has("num_experts") ? r.integer("num_experts", d->experts)
                                         : r.integer("num_local_experts", d->experts);
  switch (c.arch) {
    case Arch::Mixtral:
      c.moe_intermediate_size = c.intermediate_size;
      c.norm_topk_prob = true;  // Mixtral always renormalises its top-k weights
      break;
    case Arch::Olmoe:
      c.moe_intermediate_size = c.intermediate_size;
      c.norm_topk_prob = r.boolean("norm_topk_prob", d->norm_topk);
      break;
    case Arch::Qwen2Moe:
    case Arch::Qwen3Moe:
      c.moe_intermediate_size = r.integer("moe_intermediate_size", d->moe_inter);
      c.norm_topk_prob = r.boolean("norm_topk_prob", d->norm_topk);
      break;
    case Arch::DeepseekV2:
    case Arch::DeepseekV3:
    case Arch::Glm4Moe:
    case Arch::Dbrx:
      break;
  }
  if (!own_moe) c.top_k = r.integer("num_experts_per_tok", d->top_k);
  r.positive("num_experts", c.num_experts);
  r.positive("num_experts_per_tok", c.top_k);
  r.positive("moe_intermediate_size", c.moe_intermediate_size);
  r.at_most("num_experts", c.num_experts, 1 << 16);
  r.at_most("moe_intermediate_size", c.moe_intermediate_size, 1 << 22);
  if (r.first_error()) return Error(*r.first_error());
  if (c.top_k > c.num_experts)
    r.error(fmt::format("num_experts_per_tok {} exceeds the number of experts {}", c.top_k,
                        c.num_experts));

  // Which layers are sparse (read_deepseek and read_glm4_moe decided for their families).
  if (!own_moe) c.layer_is_moe.assign(static_cast<std::size_t>(c.num_layers), true);
  if (c.arch == Arch::Qwen2Moe || c.arch == Arch::Qwen3Moe) {
    const int64_t step = r.integer("decoder_sparse_step", 1);
    std::vector<int64_t> dense_layers = r.integers("mlp_only_layers");
    for (int64_t l = 0; l < c.num_layers; ++l) {
      bool sparse = step > 0 && (l + 1) % step == 0;
      for (int64_t dl : dense_layers) sparse = sparse && dl != l;
      c.layer_is_moe[l] = sparse;
    }
    if (c.num_layers > c.num_moe_layers()) r.positive("intermediate_size", c.intermediate_size);
  }

  // Shared expert (qwen2_moe).
  if (c.arch == Arch::Qwen2Moe) {
    c.shared_expert_intermediate_size =
        r.integer("shared_expert_intermediate_size", d->shared_inter);
    c.shared_expert_gate = c.shared_expert_intermediate_size > 0;
    r.at_most("shared_expert_intermediate_size", c.shared_expert_intermediate_size, 1 << 22);
    if (c.shared_expert_intermediate_size < 0)
      r.error("field \"shared_expert_intermediate_size\" must not be negative");
  }

  // Attention variants.
  switch (c.arch) {
    case Arch::Mixtral:
      break;
    case Arch::Qwen2Moe:
      c.qkv_bias = r.boolean("qkv_bias", true);
      break;
    case Arch::Qwen3Moe:
      c.qkv_bias = c.o_bias = r.boolean("attention_bias", false);
      c.qk_norm = QkNorm::PerHead;
      break;
    case Arch::Olmoe:
      c.qkv_bias = c.o_bias = r.boolean("attention_bias", false);
      c.qk_norm = QkNorm::Full;
      if (r.has("clip_qkv")) c.clip_qkv = static_cast<float>(r.number("clip_qkv", 0));
      break;
    case Arch::DeepseekV2:
    case Arch::DeepseekV3:
      break;  // multi-head latent attention (read_deepseek)
    case Arch::Glm4Moe:
    case Arch::Dbrx:
      break;  // read_glm4_moe, read_dbrx
  }

  read_sliding_windows(root, r, c);
  read_token_ids(root, r, c, *d);

  if (r.first_error()) return Error(*r.first_error());
  return c;
}

Expected<ModelConfig> load_model_config(const std::filesystem::path& dir) {
  const std::filesystem::path path = dir / "config.json";
  std::ifstream in(path);
  if (!in) {
    if (!std::filesystem::exists(dir))
      return Error(fmt::format("model directory {} does not exist", dir.string()));
    return Error(
        fmt::format("{} is missing or unreadable; a model directory needs the config.json "
                    "of a Hugging Face checkpoint",
                    path.string()));
  }
  std::stringstream text;
  text << in.rdbuf();
  Expected<ModelConfig> config = parse_model_config(text.str(), path.string());
  if (!config) return config;

  // generation_config.json may name more end-of-sequence tokens than config.json does.
  const std::filesystem::path gen_path = dir / "generation_config.json";
  std::ifstream gen_in(gen_path);
  if (gen_in) {
    std::stringstream gen_text;
    gen_text << gen_in.rdbuf();
    json gen = json::parse(gen_text.str(), nullptr, false);
    if (gen.is_object()) {
      FieldReader g(gen, gen_path.string());
      for (int64_t id : g.integers("eos_token_id")) {
        bool known = false;
        for (int64_t e : config->eos_token_ids) known = known || e == id;
        if (!known) config->eos_token_ids.push_back(id);
      }
      if (g.first_error()) return Error(*g.first_error());
    }
  }
  return config;
}

}  // namespace moemesh
