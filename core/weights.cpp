#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "core/detail/weights.h"

namespace moemesh::detail {
namespace {

using kernels::WeightView;

// Looks tensors up with shape checks, remembering the first error.
class Binder {
 public:
  explicit Binder(const Checkpoint& ckpt) : ckpt_(ckpt) {}

  WeightView matrix(const std::string& name, int64_t rows, int64_t cols, const std::string& why) {
    Expected<TensorView> t = ckpt_.tensor(name, {rows, cols}, why);
    if (!t) return fail(t.error()), WeightView{};
    Expected<WeightView> w = checkpoint_matrix(ckpt_, *t);  // FP8: with its block scales
    if (!w) return fail(w.error()), WeightView{};
    return *w;
  }

  std::vector<float> vector(const std::string& name, int64_t n, const std::string& why) {
    Expected<TensorView> t = ckpt_.tensor(name, {n}, why);
    if (!t) return fail(t.error()), std::vector<float>{};
    return t->to_f32();
  }

  // A 3-D tensor [experts, rows, cols] (fused expert weights), as one view per expert.
  std::vector<WeightView> stacked(const std::string& name, int64_t experts, int64_t rows,
                                  int64_t cols, const std::string& why) {
    Expected<TensorView> t = ckpt_.tensor(name, {experts, rows, cols}, why);
    if (!t) return fail(t.error()), std::vector<WeightView>{};
    if (t->dtype == kernels::DType::F8E4M3)
      return fail(Error(fmt::format(
                 "tensor \"{}\" in {} is F8_E4M3: FP8 experts are read one tensor per expert and "
                 "projection (with their weight_scale_inv), not fused",
                 name, t->file))),
             std::vector<WeightView>{};
    std::vector<WeightView> out;
    const auto* base = static_cast<const char*>(t->data);
    const int64_t bytes = rows * cols * static_cast<int64_t>(kernels::dtype_size(t->dtype));
    for (int64_t e = 0; e < experts; ++e) out.push_back({base + e * bytes, t->dtype, rows, cols});
    return out;
  }

  bool has(const std::string& name) const { return ckpt_.contains(name); }
  void fail(const Error& e) {
    if (!error_) error_ = e;
  }
  const std::optional<Error>& error() const { return error_; }

 private:
  const Checkpoint& ckpt_;
  std::optional<Error> error_;
};

// Names of a SwiGLU block's projections in each family's checkpoints.
struct FfnNames {
  const char* gate;
  const char* up;
  const char* down;
};
constexpr FfnNames kMixtralExpert{"w1", "w3", "w2"};
constexpr FfnNames kProjNames{"gate_proj", "up_proj", "down_proj"};

kernels::FfnWeights bind_ffn(Binder& b, const std::string& prefix, const FfnNames& n,
                             int64_t hidden, int64_t inter, const std::string& why) {
  kernels::FfnWeights w;
  w.gate = b.matrix(prefix + n.gate + ".weight", inter, hidden, why);
  w.up = b.matrix(prefix + n.up + ".weight", inter, hidden, why);
  w.down = b.matrix(prefix + n.down + ".weight", hidden, inter, why);
  return w;
}

// Where the tensors of MoE layer `l` live, and how its experts' projections are named.
std::string moe_prefix(const ModelConfig& c, int64_t l) {
  return fmt::format("model.layers.{}.{}", l,
                     c.arch == Arch::Mixtral ? "block_sparse_moe." : "mlp.");
}
const FfnNames& expert_names(const ModelConfig& c) {
  return c.arch == Arch::Mixtral ? kMixtralExpert : kProjNames;
}

// Routed experts `ids` of MoE layer `l`, per-expert or fused (see bind_experts in weights.h).
std::vector<kernels::FfnWeights> bind_experts(Binder& b, const ModelConfig& c, int64_t l,
                                              std::span<const int32_t> ids) {
  std::vector<kernels::FfnWeights> experts;
  if (ids.empty()) return experts;
  const int64_t E = c.num_experts;
  const int64_t H = c.hidden_size;
  const int64_t I = c.moe_intermediate_size;
  const std::string why = fmt::format(
      "hidden_size={}, moe_intermediate_size={}, num_experts={} "
      "in config.json",
      H, I, E);
  const std::string prefix = moe_prefix(c, l);
  const FfnNames& n = expert_names(c);
  const std::string fused = prefix + "experts.gate_up_proj";
  if (!b.has(fmt::format("{}experts.{}.{}.weight", prefix, ids[0], n.gate)) && b.has(fused)) {
    std::vector<WeightView> gate_up = b.stacked(fused, E, 2 * I, H, why);
    std::vector<WeightView> down = b.stacked(prefix + "experts.down_proj", E, H, I, why);
    if (b.error()) return experts;
    for (int32_t e : ids) {
      WeightView gate = gate_up[e];
      gate.rows = I;
      WeightView up = gate;
      up.data = gate.row(I);
      experts.push_back({gate, up, down[e]});
    }
    return experts;
  }
  for (int32_t e : ids)
    experts.push_back(bind_ffn(b, fmt::format("{}experts.{}.", prefix, e), n, H, I, why));
  return experts;
}

// Multi-head latent attention's projections and norms (config.mla) under prefix `a`.
void bind_mla(Binder& b, const ModelConfig& c, const std::string& a, AttentionWeights& w) {
  const MlaConfig& m = *c.mla;
  const int64_t H = c.hidden_size;
  const int64_t heads = c.num_heads;
  const std::string why = fmt::format(
      "hidden_size={}, num_attention_heads={}, q_lora_rank={}, kv_lora_rank={}, "
      "qk_nope_head_dim={}, qk_rope_head_dim={}, v_head_dim={} in config.json",
      H, heads, m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim,
      m.v_head_dim);
  if (m.q_lora_rank == 0) {
    w.q = b.matrix(a + "q_proj.weight", heads * m.qk_head_dim(), H, why);
  } else {
    w.q_a = b.matrix(a + "q_a_proj.weight", m.q_lora_rank, H, why);
    w.q_a_norm = b.vector(a + "q_a_layernorm.weight", m.q_lora_rank, why);
    w.q_b = b.matrix(a + "q_b_proj.weight", heads * m.qk_head_dim(), m.q_lora_rank, why);
    if (m.bias) w.q_a_bias = b.vector(a + "q_a_proj.bias", m.q_lora_rank, why);
  }
  w.kv_a = b.matrix(a + "kv_a_proj_with_mqa.weight", m.cache_row(), H, why);
  if (m.bias) w.kv_a_bias = b.vector(a + "kv_a_proj_with_mqa.bias", m.cache_row(), why);
  w.kv_a_norm = b.vector(a + "kv_a_layernorm.weight", m.kv_lora_rank, why);
  w.kv_b = b.matrix(a + "kv_b_proj.weight", heads * (m.qk_nope_head_dim + m.v_head_dim),
                    m.kv_lora_rank, why);
  w.o = b.matrix(a + "o_proj.weight", H, heads * m.v_head_dim, why);
  if (m.bias) w.o_bias = b.vector(a + "o_proj.bias", H, why);
}

}  // namespace

Expected<std::vector<kernels::FfnWeights>> bind_experts(const ModelConfig& c,
                                                        const Checkpoint& ckpt, int64_t layer,
                                                        std::span<const int32_t> ids,
                                                        std::vector<CopiedStore>* copies) {
  if (c.arch == Arch::Dbrx) return bind_dbrx_experts(c, ckpt, layer, ids, copies);
  Binder b(ckpt);
  std::vector<kernels::FfnWeights> experts = bind_experts(b, c, layer, ids);
  if (b.error()) return *b.error();
  return experts;
}

int64_t ffn_bytes(const kernels::FfnWeights& w) {
  int64_t bytes = 0;
  for (const WeightView* v : {&w.gate, &w.up, &w.down}) {
    bytes += v->rows * v->cols * static_cast<int64_t>(kernels::dtype_size(v->dtype));
    if (v->dtype == kernels::DType::I8) bytes += v->rows * static_cast<int64_t>(sizeof(float));
    if (v->dtype == kernels::DType::F8E4M3)
      bytes += kernels::fp8_blocks(v->rows) * kernels::fp8_blocks(v->cols) *
               static_cast<int64_t>(sizeof(float));
  }
  return bytes;
}

Expected<ModelWeights> bind_weights(const ModelConfig& c, std::shared_ptr<const Checkpoint> ckpt,
                                    bool routed_experts) {
  if (c.arch == Arch::Dbrx) return bind_dbrx_weights(c, std::move(ckpt), routed_experts);
  Binder b(*ckpt);
  ModelWeights w;
  w.checkpoint = ckpt;
  const int64_t H = c.hidden_size;
  const int64_t V = c.vocab_size;
  const int64_t q_dim = c.num_heads * c.head_dim;
  const int64_t kv_dim = c.num_kv_heads * c.head_dim;
  const std::string model_why = fmt::format("vocab_size={}, hidden_size={} in config.json", V, H);
  const std::string attn_why = fmt::format(
      "hidden_size={}, num_attention_heads={}, num_key_value_heads={}, head_dim={} in "
      "config.json",
      H, c.num_heads, c.num_kv_heads, c.head_dim);

  w.embed = b.matrix("model.embed_tokens.weight", V, H, model_why);
  w.final_norm = b.vector("model.norm.weight", H, model_why);
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed;
  } else {
    w.lm_head = b.matrix("lm_head.weight", V, H, model_why + " (tie_word_embeddings is false)");
  }

  std::vector<int32_t> all_experts(static_cast<std::size_t>(c.num_experts));
  for (int64_t e = 0; e < c.num_experts; ++e) all_experts[e] = static_cast<int32_t>(e);
  for (int64_t l = 0; l < c.num_layers && !b.error(); ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    LayerWeights L;
    L.input_norm = b.vector(p + "input_layernorm.weight", H, model_why);
    L.post_attention_norm = b.vector(p + "post_attention_layernorm.weight", H, model_why);

    const std::string a = p + "self_attn.";
    if (c.mla) {
      bind_mla(b, c, a, L.attn);
      L.attn.kv_b = dequantize_f32(L.attn.kv_b, w.quantized);  // read by rows: FP8 -> float32
    } else {
      L.attn.q = b.matrix(a + "q_proj.weight", q_dim, H, attn_why);
      L.attn.k = b.matrix(a + "k_proj.weight", kv_dim, H, attn_why);
      L.attn.v = b.matrix(a + "v_proj.weight", kv_dim, H, attn_why);
      L.attn.o = b.matrix(a + "o_proj.weight", H, q_dim, attn_why);
      if (c.qkv_bias) {
        L.attn.q_bias = b.vector(a + "q_proj.bias", q_dim, attn_why);
        L.attn.k_bias = b.vector(a + "k_proj.bias", kv_dim, attn_why);
        L.attn.v_bias = b.vector(a + "v_proj.bias", kv_dim, attn_why);
      }
      if (c.o_bias) L.attn.o_bias = b.vector(a + "o_proj.bias", H, attn_why);
      if (c.qk_norm == QkNorm::PerHead) {
        L.attn.q_norm = b.vector(a + "q_norm.weight", c.head_dim, attn_why);
        L.attn.k_norm = b.vector(a + "k_norm.weight", c.head_dim, attn_why);
      } else if (c.qk_norm == QkNorm::Full) {
        L.attn.q_norm = b.vector(a + "q_norm.weight", q_dim, attn_why);
        L.attn.k_norm = b.vector(a + "k_norm.weight", kv_dim, attn_why);
      }
    }

    L.moe = c.layer_is_moe[l];
    if (L.moe) {
      const std::string m = moe_prefix(c, l);
      const std::string why =
          fmt::format("hidden_size={}, num_experts={} in config.json", H, c.num_experts);
      L.router = b.matrix(m + "gate.weight", c.num_experts, H, why);
      if (c.score_correction_bias)
        L.router_bias = b.vector(m + "gate.e_score_correction_bias", c.num_experts, why);
      if (routed_experts) L.experts = bind_experts(b, c, l, all_experts);
      if (c.shared_expert_intermediate_size > 0) {
        L.has_shared_expert = true;
        const std::string swhy = fmt::format(
            "hidden_size={}, shared_expert_intermediate_size={} in "
            "config.json",
            H, c.shared_expert_intermediate_size);
        const bool plural = c.mla || c.arch == Arch::Glm4Moe;
        L.shared_expert = bind_ffn(b, m + (plural ? "shared_experts." : "shared_expert."),
                                   kProjNames, H, c.shared_expert_intermediate_size, swhy);
        if (c.shared_expert_gate)
          L.shared_expert_gate = b.matrix(m + "shared_expert_gate.weight", 1, H, swhy);
      }
    } else {
      const std::string why = fmt::format(
          "hidden_size={}, intermediate_size={} in config.json (layer "
          "{} is dense)",
          H, c.intermediate_size, l);
      L.mlp = bind_ffn(b, p + "mlp.", kProjNames, H, c.intermediate_size, why);
    }
    w.layers.push_back(std::move(L));
  }
  if (b.error()) return *b.error();
  return w;
}

int64_t QuantizedStore::bytes() const {
  int64_t n = 0;
  for (const auto& m : matrices)
    n += static_cast<int64_t>(m->values.size() + m->codes.size() +
                              (m->scale.size() + m->dense.size()) * sizeof(float));
  return n;
}

int64_t QuantizedStore::packed_bytes() const {
  int64_t n = 0;
  for (const auto& m : matrices) n += m->packed.bytes();
  return n;
}

Status parse_quantization(const std::string& name, Quantization* out) {
  if (name == "none") {
    *out = Quantization::None;
  } else if (name == "int8") {
    *out = Quantization::Int8;
  } else if (name == "fp8") {
    *out = Quantization::Fp8;
  } else {
    return Error(fmt::format("quantization '{}' is not one of none, int8, fp8", name));
  }
  return {};
}

const char* quantization_name(Quantization q) {
  return q == Quantization::Int8 ? "int8" : q == Quantization::Fp8 ? "fp8" : "none";
}

WeightView quantize_int8(const WeightView& w, QuantizedStore& store, kernels::ThreadPool* pool) {
  // Already quantized (an FP8 checkpoint's matrices included): kept as they are.
  if (w.empty() || w.dtype == kernels::DType::I8 || w.dtype == kernels::DType::F8E4M3) return w;
  auto m = std::make_unique<QuantizedStore::Matrix>();
  m->values.resize(static_cast<std::size_t>(w.rows * w.cols));
  m->scale.resize(static_cast<std::size_t>(w.rows));
  const int64_t cols = w.cols;
  kernels::parallel_for(pool, w.rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<std::size_t>(cols));
    for (int64_t r = begin; r < end; ++r) {
      kernels::to_f32(w.row(r), w.dtype, cols, row.data());
      float max_abs = 0.0f;
      for (float v : row) max_abs = std::max(max_abs, std::fabs(v));
      float scale = max_abs / 127.0f;
      if (!(scale > 0.0f) || !std::isfinite(scale)) scale = 1.0f;  // all zero (or non-finite)
      m->scale[r] = scale;
      int8_t* q = m->values.data() + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        // nearbyint rounds half to even in the default rounding mode.
        const float v = std::clamp(std::nearbyint(row[c] / scale), -127.0f, 127.0f);
        q[c] = std::isnan(v) ? int8_t{0} : static_cast<int8_t>(v);
      }
    }
  });
  WeightView out{m->values.data(), kernels::DType::I8, w.rows, w.cols, m->scale.data()};
  store.matrices.push_back(std::move(m));
  return out;
}

void quantize_int8(kernels::FfnWeights& w, QuantizedStore& store, kernels::ThreadPool* pool) {
  w.gate = quantize_int8(w.gate, store, pool);
  w.up = quantize_int8(w.up, store, pool);
  w.down = quantize_int8(w.down, store, pool);
}

void for_each_quantized_matrix(ModelWeights& w, const std::function<void(WeightView&)>& fn) {
  auto ffn = [&](kernels::FfnWeights& f) {
    for (WeightView* v : {&f.gate, &f.up, &f.down}) fn(*v);
  };
  for (LayerWeights& L : w.layers) {
    // kv_b (multi-head latent attention) stays as it is: the forward pass reads its rows.
    for (WeightView* v :
         {&L.attn.q, &L.attn.k, &L.attn.v, &L.attn.o, &L.attn.q_a, &L.attn.q_b, &L.attn.kv_a})
      fn(*v);
    if (L.moe) {
      for (kernels::FfnWeights& e : L.experts) ffn(e);
      if (L.has_shared_expert) ffn(L.shared_expert);
    } else {
      ffn(L.mlp);
    }
  }
}

void quantize_int8(ModelWeights& w, kernels::ThreadPool* pool) {
  for_each_quantized_matrix(w, [&](WeightView& v) { v = quantize_int8(v, w.quantized, pool); });
}

namespace {

void pack_one(WeightView& v, QuantizedStore& store, kernels::ThreadPool* pool) {
  if (v.empty() || v.packed != nullptr) return;
  if (v.dtype != kernels::DType::BF16 && v.dtype != kernels::DType::I8 &&
      v.dtype != kernels::DType::F8E4M3)
    return;
  auto m = std::make_unique<QuantizedStore::Matrix>();
  m->packed = kernels::pack_amx(v, pool);
  v.packed = m->packed.data();
  store.matrices.push_back(std::move(m));
}

}  // namespace

void pack_for_amx(ModelWeights& w, kernels::ThreadPool* pool) {
  if (kernels::active_isa() < kernels::Isa::Avx512Bf16) return;
  for_each_quantized_matrix(w, [&](WeightView& v) { pack_one(v, w.quantized, pool); });
  for (LayerWeights& L : w.layers)
    if (L.moe) pack_one(L.router, w.quantized, pool);
  pack_one(w.lm_head, w.quantized, pool);
}

void pack_for_amx(kernels::FfnWeights& w, QuantizedStore& store, kernels::ThreadPool* pool) {
  if (kernels::active_isa() < kernels::Isa::Avx512Bf16) return;
  for (WeightView* v : {&w.gate, &w.up, &w.down}) pack_one(*v, store, pool);
}

void weight_to_bf16(const kernels::WeightView& w, uint16_t* out) {
  const int64_t n = w.rows * w.cols;
  if (w.dtype == kernels::DType::BF16) {
    std::memcpy(out, w.data, static_cast<std::size_t>(n) * 2);
    return;
  }
  std::vector<float> row(static_cast<std::size_t>(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    kernels::dequantize_rows(w, r, r + 1, row.data());
    for (int64_t c = 0; c < w.cols; ++c) out[r * w.cols + c] = kernels::f32_to_bf16(row[c]);
  }
}

}  // namespace moemesh::detail
