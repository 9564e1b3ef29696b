// A model's config.json as a typed value. Supported architectures (config.json "model_type"):
// mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3 (kimi_k2 is read as
// deepseek_v3, whose layout it uses), glm4_moe (GLM-4.5, GLM-4.5-Air) and dbrx. Fields that
// config.json leaves out take the default of the corresponding Hugging Face transformers config
// class, as transformers itself would.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"

namespace moemesh {

enum class Arch { Mixtral, Qwen2Moe, Qwen3Moe, Olmoe, DeepseekV2, DeepseekV3, Glm4Moe, Dbrx };

// How queries and keys are normalised before RoPE, if at all.
enum class QkNorm {
  None,
  PerHead,  // RMSNorm over each head's head_dim features (qwen3_moe)
  Full,     // RMSNorm over the whole projection, all heads at once (olmoe)
};

// Multi-head latent attention (deepseek_v2, deepseek_v3). Queries come from q_proj, or from the
// low-rank q_a_proj -> q_a_layernorm -> q_b_proj when q_lora_rank > 0. Keys and values share one
// compressed latent per token: kv_a_proj_with_mqa gives kv_lora_rank latent features (normalised
// by kv_a_layernorm) and qk_rope_head_dim rotary key features shared by every head; kv_b_proj
// expands the latent into each head's qk_nope_head_dim key and v_head_dim value features.
struct MlaConfig {
  int64_t q_lora_rank = 0;  // 0: plain q_proj ("q_lora_rank": null)
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  // The rotary features are pairs (2i, 2i + 1) rather than halves (i, i + d/2): always for
  // deepseek_v2, "rope_interleave" (default true) for deepseek_v3.
  bool rope_interleave = true;
  bool bias = false;  // "attention_bias": biases on q_a_proj, kv_a_proj_with_mqa and o_proj
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  // Values cached per token per layer: the normalised latent, then the rotated rotary key.
  int64_t cache_row() const { return kv_lora_rank + qk_rope_head_dim; }
};

// YaRN rotary scaling ("rope_type": "yarn"), with transformers' semantics: the inverse
// frequencies blend interpolation (divided by factor) and extrapolation over the correction range
// of beta_fast / beta_slow; cos and sin are multiplied by attention_factor; MLA's softmax scale is
// multiplied by mscale(factor, mscale_all_dim)^2 when mscale_all_dim is non-zero.
struct YarnRope {
  double factor = 1.0;
  int64_t original_max_position_embeddings = 0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 0.0;            // 0: not given
  double mscale_all_dim = 0.0;    // 0: not given
  double attention_factor = 1.0;  // resolved as transformers resolves it
  bool truncate = true;
};

// How a MoE layer picks its experts.
enum class RouterScoring {
  Softmax,  // probabilities over all experts
  Sigmoid,  // an independent sigmoid per expert (deepseek_v3)
};

struct ModelConfig {
  Arch arch = Arch::Mixtral;
  std::string model_type;  // as written in config.json

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  float rms_norm_eps = 1e-6f;  // the epsilon of every norm (LayerNorm's with layer_norm)
  // The norms are LayerNorm without bias ((x - mean) / sqrt(var + eps) * weight; dbrx) rather
  // than RMSNorm.
  bool layer_norm = false;
  double rope_theta = 10000.0;
  // Features of each head that rotate: the first rotary_dim of head_dim ("rotate_half" pairs i and
  // i + rotary_dim / 2), the rest pass through. head_dim, except with a partial_rotary_factor
  // (glm4_moe: int(head_dim * factor)).
  int64_t rotary_dim = 0;
  std::optional<YarnRope> yarn;  // rotary scaling (deepseek families only)
  bool tie_word_embeddings = false;

  // Attention details.
  bool qkv_bias = false;
  bool o_bias = false;
  QkNorm qk_norm = QkNorm::None;
  std::optional<float> clip_qkv;      // clamp q, k, v to [-c, c] (olmoe)
  std::vector<int64_t> layer_window;  // per layer: sliding window length, 0 = full attention
  // Multi-head latent attention (deepseek families). head_dim is then qk_rope_head_dim and
  // num_kv_heads is num_heads, as transformers sets them; the KV cache holds MlaConfig::cache_row()
  // values per token per layer.
  std::optional<MlaConfig> mla;

  // Feed-forward. A layer is either sparse (routed experts) or dense (one SwiGLU MLP).
  std::vector<bool> layer_is_moe;  // per layer
  int64_t intermediate_size = 0;   // dense MLP width
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t moe_intermediate_size = 0;            // routed expert width
  bool norm_topk_prob = false;                  // renormalise the top-k router probabilities
  int64_t shared_expert_intermediate_size = 0;  // 0: no shared expert
  bool shared_expert_gate = false;  // sigmoid(Linear(hidden, 1)) scales the shared expert
  // The general router (kernels::grouped_topk; deepseek families): when false the router is a
  // softmax top-k (kernels::softmax_topk) and the fields below keep their defaults.
  bool grouped_router = false;
  RouterScoring scoring = RouterScoring::Softmax;
  int64_t n_group = 1;                 // experts form n_group equal groups ...
  int64_t topk_group = 1;              // ... of which the topk_group best compete
  bool group_top2_sum = false;         // a group ranks by its two best scores (else its best)
  bool score_correction_bias = false;  // e_score_correction_bias added for choosing only
  float routed_scaling_factor = 1.0f;  // multiplies the routed experts' weights
  // dbrx's moe_normalize_expert_weights: the softmax top-k weights are divided by their p-norm
  // (torch.norm(p)); nullopt leaves them as they are.
  std::optional<double> expert_weights_norm_p;

  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;

  int64_t num_moe_layers() const;
  // Values of the KV cache per token per layer: MlaConfig::cache_row() with MLA, else keys and
  // values of every kv head (2 * num_kv_heads * head_dim).
  int64_t kv_values_per_token_layer() const;
};

std::string_view arch_name(Arch a);

// Parses config.json text; `source` names the file in error messages.
Expected<ModelConfig> parse_model_config(std::string_view json_text, const std::string& source);

// Reads DIR/config.json (and the eos_token_id of DIR/generation_config.json when present).
Expected<ModelConfig> load_model_config(const std::filesystem::path& dir);

}  // namespace moemesh
