// config.json of any supported family -> the planner's weight inventory (plan.h).
#include <fmt/format.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/plan.h"

namespace moemesh::plan {
namespace {

using nlohmann::json;

// Typed fields of one JSON object (config.json, or an object nested in it such as DBRX's
// "ffn_config"); remembers the first problem so that the parser reports one clear error.
class Fields {
 public:
  Fields(const json& obj, std::string source, std::string prefix, std::optional<std::string>* error)
      : obj_(obj), source_(std::move(source)), prefix_(std::move(prefix)), error_(error) {}

  bool has(const char* key) const {
    return obj_.is_object() && obj_.contains(key) && !obj_.at(key).is_null();
  }

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

  std::vector<int64_t> integers(const char* key) {
    std::vector<int64_t> out;
    if (!has(key)) return out;
    const json& v = obj_.at(key);
    if (!v.is_array()) {
      fail(key, "a list of integers", v);
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

  // A positive integer no larger than `limit` (fields that size tensors).
  int64_t positive(const char* key, int64_t fallback, int64_t limit = int64_t{1} << 24) {
    const int64_t v = integer(key, fallback);
    if (v <= 0 || v > limit)
      error(fmt::format("field \"{}{}\" must be an integer in [1, {}], found {}", prefix_, key,
                        limit, v));
    // In range even after an error: the caller goes on computing (a step of 0 would divide by 0).
    return std::clamp<int64_t>(v, 1, limit);
  }

  // A non-negative integer no larger than `limit`.
  int64_t non_negative(const char* key, int64_t fallback, int64_t limit = int64_t{1} << 24) {
    const int64_t v = integer(key, fallback);
    if (v < 0 || v > limit)
      error(fmt::format("field \"{}{}\" must be an integer in [0, {}], found {}", prefix_, key,
                        limit, v));
    return std::clamp<int64_t>(v, 0, limit);
  }

  void error(const std::string& what) {
    if (!*error_) *error_ = fmt::format("{}: {}", source_, what);
  }

 private:
  void fail(const char* key, const char* expected, const json& found) {
    error(fmt::format("field \"{}{}\" must be {}, found {}", prefix_, key, expected, found.dump()));
  }

  const json& obj_;
  std::string source_;
  std::string prefix_;
  std::optional<std::string>* error_;
};

// The defaults of the transformers config class of each family (0: none / derived).
struct Defaults {
  const char* family;
  int64_t vocab, hidden, intermediate, layers, heads, kv_heads, max_pos;
  int64_t experts, top_k, moe_inter, shared;  // shared: width (qwen2_moe) or count (deepseek)
  int64_t first_dense;
};

// model_type -> defaults. kimi_k2 uses the DeepSeek-V3 layout.
const std::vector<std::pair<std::string, Defaults>>& families() {
  static const std::vector<std::pair<std::string, Defaults>> kFamilies = {
      {"mixtral", {"mixtral", 32000, 4096, 14336, 32, 32, 8, 131072, 8, 2, 0, 0, 0}},
      {"qwen2_moe", {"qwen2_moe", 151936, 2048, 5632, 24, 16, 16, 32768, 60, 4, 1408, 5632, 0}},
      {"qwen3_moe", {"qwen3_moe", 151936, 2048, 6144, 24, 32, 4, 32768, 128, 8, 768, 0, 0}},
      {"olmoe", {"olmoe", 50304, 2048, 2048, 16, 16, 16, 4096, 64, 8, 2048, 0, 0}},
      {"deepseek", {"deepseek", 102400, 4096, 11008, 30, 32, 0, 2048, 0, 0, 1407, 0, 0}},
      {"deepseek_v2", {"deepseek_v2", 102400, 4096, 11008, 32, 32, 32, 2048, 64, 0, 1407, 2, 0}},
      {"deepseek_v3", {"deepseek_v3", 129280, 7168, 18432, 61, 128, 128, 4096, 256, 8, 2048, 1, 3}},
      {"kimi_k2", {"deepseek_v3", 129280, 7168, 18432, 61, 128, 128, 4096, 256, 8, 2048, 1, 3}},
      {"glm4_moe", {"glm4_moe", 151552, 4096, 10944, 46, 96, 8, 131072, 128, 8, 1408, 1, 1}},
      {"dbrx", {"dbrx", 32000, 2048, 0, 24, 16, 1, 2048, 4, 1, 3584, 0, 0}},
      {"llama", {"llama", 32000, 4096, 11008, 32, 32, 0, 2048, 0, 0, 0, 0, 0}},
      {"mistral", {"mistral", 32000, 4096, 14336, 32, 32, 8, 131072, 0, 0, 0, 0, 0}},
      {"qwen2", {"qwen2", 151936, 4096, 22016, 32, 32, 32, 32768, 0, 0, 0, 0, 0}},
  };
  return kFamilies;
}

TensorGroup matrix(std::string name, Part part, int64_t rows, int64_t cols, int64_t count = 1) {
  return TensorGroup{std::move(name), part, rows, cols, count, true};
}
TensorGroup vec(std::string name, Part part, int64_t n, int64_t count = 1) {
  return TensorGroup{std::move(name), part, n, 1, count, false};
}

// A SwiGLU MLP: gate and up [width, hidden], down [hidden, width].
void add_mlp(std::vector<TensorGroup>& out, const std::string& prefix, Part part, int64_t hidden,
             int64_t width, int64_t count = 1) {
  out.push_back(matrix(prefix + "gate_proj.weight", part, width, hidden, count));
  out.push_back(matrix(prefix + "up_proj.weight", part, width, hidden, count));
  out.push_back(matrix(prefix + "down_proj.weight", part, hidden, width, count));
}

struct Parsed {
  PlanModel m;
  // Attention details.
  bool qkv_bias = false;
  bool o_bias = false;
  enum class QkNorm { None, PerHead, Full } qk_norm = QkNorm::None;
  bool router_bias = false;     // e_score_correction_bias
  bool shared_gate = false;     // qwen2_moe's shared_expert_gate
  std::vector<bool> layer_moe;  // per layer
};

std::vector<TensorGroup> attention_tensors(const Parsed& p) {
  const PlanModel& m = p.m;
  const int64_t h = m.hidden_size;
  std::vector<TensorGroup> t;
  if (m.mla) {
    const int64_t qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim;
    if (m.q_lora_rank > 0) {
      t.push_back(matrix("self_attn.q_a_proj.weight", Part::Attention, m.q_lora_rank, h));
      if (p.qkv_bias) t.push_back(vec("self_attn.q_a_proj.bias", Part::Attention, m.q_lora_rank));
      t.push_back(vec("self_attn.q_a_layernorm.weight", Part::Norm, m.q_lora_rank));
      t.push_back(matrix("self_attn.q_b_proj.weight", Part::Attention, m.num_heads * qk_head,
                         m.q_lora_rank));
    } else {
      t.push_back(matrix("self_attn.q_proj.weight", Part::Attention, m.num_heads * qk_head, h));
    }
    t.push_back(matrix("self_attn.kv_a_proj_with_mqa.weight", Part::Attention,
                       m.kv_lora_rank + m.qk_rope_head_dim, h));
    if (p.qkv_bias)
      t.push_back(vec("self_attn.kv_a_proj_with_mqa.bias", Part::Attention,
                      m.kv_lora_rank + m.qk_rope_head_dim));
    t.push_back(vec("self_attn.kv_a_layernorm.weight", Part::Norm, m.kv_lora_rank));
    t.push_back(matrix("self_attn.kv_b_proj.weight", Part::Attention,
                       m.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank));
    t.push_back(matrix("self_attn.o_proj.weight", Part::Attention, h, m.num_heads * m.v_head_dim));
    if (p.o_bias) t.push_back(vec("self_attn.o_proj.bias", Part::Attention, h));
    return t;
  }
  const int64_t q = m.num_heads * m.head_dim;
  const int64_t kv = m.num_kv_heads * m.head_dim;
  if (m.family == "dbrx") {
    t.push_back(matrix("attn.Wqkv.weight", Part::Attention, q + 2 * kv, h));
    t.push_back(matrix("attn.out_proj.weight", Part::Attention, h, q));
    return t;
  }
  t.push_back(matrix("self_attn.q_proj.weight", Part::Attention, q, h));
  t.push_back(matrix("self_attn.k_proj.weight", Part::Attention, kv, h));
  t.push_back(matrix("self_attn.v_proj.weight", Part::Attention, kv, h));
  t.push_back(matrix("self_attn.o_proj.weight", Part::Attention, h, q));
  if (p.qkv_bias) {
    t.push_back(vec("self_attn.q_proj.bias", Part::Attention, q));
    t.push_back(vec("self_attn.k_proj.bias", Part::Attention, kv));
    t.push_back(vec("self_attn.v_proj.bias", Part::Attention, kv));
  }
  if (p.o_bias) t.push_back(vec("self_attn.o_proj.bias", Part::Attention, h));
  if (p.qk_norm == Parsed::QkNorm::PerHead) {
    t.push_back(vec("self_attn.q_norm.weight", Part::Norm, m.head_dim));
    t.push_back(vec("self_attn.k_norm.weight", Part::Norm, m.head_dim));
  } else if (p.qk_norm == Parsed::QkNorm::Full) {
    t.push_back(vec("self_attn.q_norm.weight", Part::Norm, q));
    t.push_back(vec("self_attn.k_norm.weight", Part::Norm, kv));
  }
  return t;
}

LayerInventory decoder_layer(const Parsed& p, bool moe) {
  const PlanModel& m = p.m;
  const int64_t h = m.hidden_size;
  LayerInventory layer;
  layer.moe = moe;
  auto& t = layer.tensors;
  t.push_back(vec("input_layernorm.weight", Part::Norm, h));
  for (TensorGroup& a : attention_tensors(p)) t.push_back(std::move(a));
  t.push_back(vec("post_attention_layernorm.weight", Part::Norm, h));
  if (!moe) {
    add_mlp(t, "mlp.", Part::DenseMlp, h, m.intermediate_size);
    return layer;
  }
  t.push_back(matrix("mlp.gate.weight", Part::Router, m.num_experts, h));
  t.back().quantizable = false;
  if (p.router_bias)
    t.push_back(vec("mlp.gate.e_score_correction_bias", Part::Router, m.num_experts));
  add_mlp(t, "mlp.experts.*.", Part::RoutedExperts, h, m.moe_intermediate_size, m.num_experts);
  if (m.shared_intermediate_size > 0) {
    const std::string prefix =
        m.family == "qwen2_moe" ? "mlp.shared_expert." : "mlp.shared_experts.";
    add_mlp(t, prefix, Part::SharedExperts, h, m.shared_intermediate_size);
  }
  if (p.shared_gate) {
    t.push_back(matrix("mlp.shared_expert_gate.weight", Part::SharedExperts, 1, h));
    t.back().quantizable = false;
  }
  return layer;
}

// Reads every field into `p`; returns the first error.
std::optional<std::string> read_fields(const json& root, const Defaults& d, Parsed& p,
                                       const std::string& source) {
  std::optional<std::string> err;
  Fields r(root, source, "", &err);
  PlanModel& m = p.m;
  const std::string& f = m.family;
  const bool dbrx = f == "dbrx";
  const bool deepseek_like =
      f == "deepseek" || f == "deepseek_v2" || f == "deepseek_v3" || f == "glm4_moe";

  if (dbrx) {
    static const json kEmpty = json::object();
    const json& attn = root.contains("attn_config") && root["attn_config"].is_object()
                           ? root["attn_config"]
                           : kEmpty;
    const json& ffn =
        root.contains("ffn_config") && root["ffn_config"].is_object() ? root["ffn_config"] : kEmpty;
    if (root.contains("attn_config") && !root["attn_config"].is_object())
      r.error("field \"attn_config\" must be an object");
    if (root.contains("ffn_config") && !root["ffn_config"].is_object())
      r.error("field \"ffn_config\" must be an object");
    Fields a(attn, source, "attn_config.", &err);
    Fields ff(ffn, source, "ffn_config.", &err);
    m.vocab_size = r.positive("vocab_size", d.vocab, int64_t{1} << 26);
    m.hidden_size = r.positive("d_model", d.hidden);
    m.num_layers = r.positive("n_layers", d.layers, 4096);
    m.num_heads = r.positive("n_heads", d.heads, 4096);
    m.num_kv_heads = a.positive("kv_n_heads", d.kv_heads, 4096);
    m.max_position_embeddings = r.positive("max_seq_len", d.max_pos, int64_t{1} << 30);
    m.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
    m.num_experts = ff.positive("moe_num_experts", d.experts, 1 << 16);
    m.top_k = ff.positive("moe_top_k", d.top_k, 1 << 16);
    m.moe_intermediate_size = ff.positive("ffn_hidden_size", d.moe_inter);
    if (!err && m.hidden_size % m.num_heads != 0)
      r.error(
          fmt::format("d_model {} is not a multiple of n_heads {}", m.hidden_size, m.num_heads));
    if (!err) m.head_dim = m.hidden_size / m.num_heads;
    p.layer_moe.assign(static_cast<size_t>(m.num_layers), true);
    return err;
  }

  m.vocab_size = r.positive("vocab_size", d.vocab, int64_t{1} << 26);
  m.hidden_size = r.positive("hidden_size", d.hidden);
  m.intermediate_size = r.positive("intermediate_size", d.intermediate);
  m.num_layers = r.positive("num_hidden_layers", d.layers, 4096);
  m.num_heads = r.positive("num_attention_heads", d.heads, 4096);
  m.num_kv_heads = r.positive("num_key_value_heads", d.kv_heads ? d.kv_heads : m.num_heads, 4096);
  m.max_position_embeddings = r.positive("max_position_embeddings", d.max_pos, int64_t{1} << 30);
  m.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  if (err) return err;

  // head_dim: explicit where the family allows it, else hidden / heads (as transformers 5 does for
  // every family here; GLM-4.5's config.json says 128 explicitly).
  const int64_t derived = m.hidden_size % m.num_heads == 0 ? m.hidden_size / m.num_heads : 0;
  m.head_dim = r.positive("head_dim", derived, 1 << 14);
  if (m.num_heads % m.num_kv_heads != 0)
    r.error(fmt::format("num_attention_heads {} is not a multiple of num_key_value_heads {}",
                        m.num_heads, m.num_kv_heads));

  // Attention biases and q/k norms.
  if (f == "qwen2_moe" || f == "qwen2") {
    p.qkv_bias = r.boolean("qkv_bias", true);
  } else if (f == "glm4_moe") {
    p.qkv_bias = r.boolean("attention_bias", false);
    if (r.boolean("use_qk_norm", false)) p.qk_norm = Parsed::QkNorm::PerHead;
  } else if (f != "mixtral" && f != "mistral") {
    p.qkv_bias = p.o_bias = r.boolean("attention_bias", false);
  }
  if (f == "qwen3_moe") p.qk_norm = Parsed::QkNorm::PerHead;
  if (f == "olmoe") p.qk_norm = Parsed::QkNorm::Full;

  // MLA.
  if (f == "deepseek_v2" || f == "deepseek_v3") {
    m.mla = true;
    // "q_lora_rank": null (DeepSeek-V2-Lite) means queries are projected directly.
    const bool q_lora_null = root.contains("q_lora_rank") && root["q_lora_rank"].is_null();
    m.q_lora_rank = q_lora_null ? 0 : r.non_negative("q_lora_rank", 1536);
    m.kv_lora_rank = r.positive("kv_lora_rank", 512);
    m.qk_nope_head_dim = r.non_negative("qk_nope_head_dim", 128);
    m.qk_rope_head_dim = r.positive("qk_rope_head_dim", 64);
    m.v_head_dim = r.positive("v_head_dim", 128);
    m.head_dim = m.qk_nope_head_dim + m.qk_rope_head_dim;
  }

  // Experts.
  if (d.experts == 0 && d.moe_inter == 0) {  // dense families
    p.layer_moe.assign(static_cast<size_t>(m.num_layers), false);
    return err;
  }
  if (f == "mixtral" || f == "olmoe" || f == "qwen2_moe" || f == "qwen3_moe") {
    // transformers accepts both names for these four.
    m.num_experts = r.has("num_experts") ? r.non_negative("num_experts", d.experts, 1 << 16)
                                         : r.non_negative("num_local_experts", d.experts, 1 << 16);
  } else {
    m.num_experts = r.non_negative("n_routed_experts", d.experts, 1 << 16);
  }
  if (f == "deepseek_v2" && !r.has("num_experts_per_tok") && m.num_experts > 0)
    r.error(
        "field \"num_experts_per_tok\" is required for deepseek_v2 (DeepseekV2Config has no "
        "default)");
  m.top_k = r.non_negative("num_experts_per_tok", d.top_k, 1 << 16);
  if (f == "mixtral" || f == "olmoe")
    m.moe_intermediate_size = m.intermediate_size;
  else
    m.moe_intermediate_size = r.positive("moe_intermediate_size", d.moe_inter);
  if (m.num_experts > 0 && (m.top_k < 1 || m.top_k > m.num_experts))
    r.error(
        fmt::format("field \"num_experts_per_tok\" is {}; expected 1 to the number of experts "
                    "({})",
                    m.top_k, m.num_experts));

  if (f == "qwen2_moe") {
    m.shared_intermediate_size = r.non_negative("shared_expert_intermediate_size", d.shared);
    p.shared_gate = m.shared_intermediate_size > 0;
  } else if (deepseek_like) {
    m.shared_intermediate_size =
        r.non_negative("n_shared_experts", d.shared, 1024) * m.moe_intermediate_size;
  }
  if (f == "deepseek_v3" || f == "glm4_moe")
    p.router_bias = true;
  else if (f == "deepseek_v2")
    p.router_bias = r.string("topk_method", "greedy") == "noaux_tc";

  // Which layers are sparse.
  p.layer_moe.assign(static_cast<size_t>(m.num_layers), false);
  if (f == "qwen2_moe" || f == "qwen3_moe") {
    const int64_t step = r.positive("decoder_sparse_step", 1, 4096);
    const std::vector<int64_t> only = r.integers("mlp_only_layers");
    const std::set<int64_t> dense(only.begin(), only.end());
    for (int64_t i = 0; i < m.num_layers; ++i)
      p.layer_moe[i] = m.num_experts > 0 && !dense.count(i) && (i + 1) % step == 0;
  } else if (deepseek_like) {
    const int64_t first = r.non_negative("first_k_dense_replace", d.first_dense, 4096);
    const int64_t freq = r.positive("moe_layer_freq", 1, 4096);
    for (int64_t i = 0; i < m.num_layers; ++i)
      p.layer_moe[i] = m.num_experts > 0 && i >= first && i % freq == 0;
    if (f == "deepseek_v3" || f == "glm4_moe")
      m.mtp_layers = r.non_negative("num_nextn_predict_layers", 0, 64);
  } else {
    std::fill(p.layer_moe.begin(), p.layer_moe.end(), m.num_experts > 0);
  }
  return err;
}

}  // namespace

std::string_view part_name(Part p) {
  switch (p) {
    case Part::Embedding:
      return "embedding";
    case Part::LmHead:
      return "lm_head";
    case Part::Attention:
      return "attention";
    case Part::Norm:
      return "norms";
    case Part::Router:
      return "router";
    case Part::RoutedExperts:
      return "routed_experts";
    case Part::SharedExperts:
      return "shared_experts";
    case Part::DenseMlp:
      return "dense_mlp";
  }
  return "?";
}

std::string supported_model_types() {
  std::string out;
  for (const auto& [name, d] : families()) out += (out.empty() ? "" : ", ") + name;
  return out;
}

Expected<PlanModel> parse_plan_model(std::string_view json_text, const std::string& source) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {
    return Error(fmt::format("{}: not valid JSON: {}", source, e.what()));
  }
  if (!root.is_object()) return Error(fmt::format("{}: expected a JSON object", source));
  if (!root.contains("model_type") || !root["model_type"].is_string())
    return Error(fmt::format("{}: field \"model_type\" is missing or not a string; supported: {}",
                             source, supported_model_types()));
  Parsed p;
  p.m.model_type = root["model_type"].get<std::string>();
  p.m.source = source;
  const auto& fams = families();
  const auto it = std::find_if(fams.begin(), fams.end(),
                               [&](const auto& e) { return e.first == p.m.model_type; });
  if (it == fams.end())
    return Error(fmt::format("{}: model_type \"{}\" is not supported; supported: {}", source,
                             p.m.model_type, supported_model_types()));
  const Defaults& d = it->second;
  p.m.family = d.family;
  if (std::optional<std::string> err = read_fields(root, d, p, source)) return Error(*err);

  PlanModel& m = p.m;
  const int64_t h = m.hidden_size;
  m.globals.push_back(matrix("embed_tokens.weight", Part::Embedding, m.vocab_size, h));
  m.globals.back().quantizable = false;
  m.globals.push_back(vec("norm.weight", Part::Norm, h));
  if (!m.tie_word_embeddings) {
    m.globals.push_back(matrix("lm_head.weight", Part::LmHead, m.vocab_size, h));
    m.globals.back().quantizable = false;
  }
  for (int64_t i = 0; i < m.num_layers; ++i) {
    m.layers.push_back(decoder_layer(p, p.layer_moe[i]));
    ++(p.layer_moe[i] ? m.num_moe_layers : m.num_dense_layers);
  }
  if (m.mtp_layers > 0) {
    // Each MTP layer: enorm, hnorm, eh_proj [hidden, 2 * hidden], one decoder layer like the last
    // one, and shared_head.norm. Its embedding and output head are the model's.
    const int64_t n = m.mtp_layers;
    m.mtp_tensors.push_back(vec("enorm.weight", Part::Norm, h, n));
    m.mtp_tensors.push_back(vec("hnorm.weight", Part::Norm, h, n));
    m.mtp_tensors.push_back(matrix("eh_proj.weight", Part::Attention, h, 2 * h, n));
    for (TensorGroup t : decoder_layer(p, p.layer_moe.back()).tensors) {
      t.count *= n;
      m.mtp_tensors.push_back(std::move(t));
    }
    m.mtp_tensors.push_back(vec("shared_head.norm.weight", Part::Norm, h, n));
  }
  return m;
}

Expected<PlanModel> load_plan_model(const std::filesystem::path& config_file) {
  std::ifstream in(config_file, std::ios::binary);
  if (!in) return Error(fmt::format("{}: cannot be read", config_file.string()));
  std::stringstream text;
  text << in.rdbuf();
  return parse_plan_model(text.str(), config_file.string());
}

ParamCounts count_params(const PlanModel& m) {
  ParamCounts c;
  auto add = [&c](const TensorGroup& t, int64_t params) {
    switch (t.part) {
      case Part::Embedding:
        c.embedding += params;
        break;
      case Part::LmHead:
        c.lm_head += params;
        break;
      case Part::Attention:
        c.attention += params;
        break;
      case Part::Norm:
        c.norms += params;
        break;
      case Part::Router:
        c.router += params;
        break;
      case Part::RoutedExperts:
        c.routed_experts += params;
        break;
      case Part::SharedExperts:
        c.shared_experts += params;
        break;
      case Part::DenseMlp:
        c.dense_mlp += params;
        break;
    }
  };
  int64_t routed_active = 0;
  for (const TensorGroup& t : m.globals) add(t, t.params());
  for (const LayerInventory& l : m.layers)
    for (const TensorGroup& t : l.tensors) {
      add(t, t.params());
      if (t.part == Part::RoutedExperts) routed_active += t.rows * t.cols * m.top_k;
    }
  c.total = c.embedding + c.lm_head + c.attention + c.norms + c.router + c.routed_experts +
            c.shared_experts + c.dense_mlp;
  c.active = c.total - c.routed_experts + routed_active;
  c.active_non_embedding = c.active - c.embedding - c.lm_head;
  for (const TensorGroup& t : m.mtp_tensors) c.mtp += t.params();
  c.mtp_checkpoint_extra = m.mtp_layers * 2 * m.vocab_size * m.hidden_size;
  return c;
}

}  // namespace moemesh::plan
