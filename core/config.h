// A model's config.json as a typed value. Supported architectures (config.json "model_type"):
// mixtral, qwen2_moe, qwen3_moe and olmoe. Fields that config.json leaves out take the default of
// the corresponding Hugging Face transformers config class, as transformers itself would.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"

namespace moemesh {

enum class Arch { Mixtral, Qwen2Moe, Qwen3Moe, Olmoe };

// How queries and keys are normalised before RoPE, if at all.
enum class QkNorm {
  None,
  PerHead,  // RMSNorm over each head's head_dim features (qwen3_moe)
  Full,     // RMSNorm over the whole projection, all heads at once (olmoe)
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
  float rms_norm_eps = 1e-6f;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;

  // Attention details.
  bool qkv_bias = false;
  bool o_bias = false;
  QkNorm qk_norm = QkNorm::None;
  std::optional<float> clip_qkv;      // clamp q, k, v to [-c, c] (olmoe)
  std::vector<int64_t> layer_window;  // per layer: sliding window length, 0 = full attention

  // Feed-forward. A layer is either sparse (routed experts) or dense (one SwiGLU MLP).
  std::vector<bool> layer_is_moe;  // per layer
  int64_t intermediate_size = 0;   // dense MLP width
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t moe_intermediate_size = 0;            // routed expert width
  bool norm_topk_prob = false;                  // renormalise the top-k router probabilities
  int64_t shared_expert_intermediate_size = 0;  // 0: no shared expert
  bool shared_expert_gate = false;  // sigmoid(Linear(hidden, 1)) scales the shared expert

  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;

  int64_t num_moe_layers() const;
};

std::string_view arch_name(Arch a);

// Parses config.json text; `source` names the file in error messages.
Expected<ModelConfig> parse_model_config(std::string_view json_text, const std::string& source);

// Reads DIR/config.json (and the eos_token_id of DIR/generation_config.json when present).
Expected<ModelConfig> load_model_config(const std::filesystem::path& dir);

}  // namespace moemesh
