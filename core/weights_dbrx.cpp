// DBRX's weights (transformers' DbrxForCausalLM): transformer.wte, transformer.blocks.N with
// norm_attn_norm.{norm_1, attn.Wqkv, attn.out_proj, norm_2} and ffn.{router.layer,
// experts.mlp.{w1, v1, w2}}, transformer.norm_f and lm_head. Wqkv is sliced into the query, key
// and value projections; each expert's rows of the fused w1 (gate) and v1 (up) are views, and its
// rows of w2, stored [ffn_hidden_size, d_model] where the down projection is
// [d_model, ffn_hidden_size], are a transposed copy (CopiedStore). Nothing else is copied.
#include <fmt/format.h>

#include <cstring>

#include "core/detail/weights.h"

namespace moemesh::detail {
namespace {

using kernels::WeightView;

// Looks tensors up with shape checks, remembering the first error.
class DbrxBinder {
 public:
  explicit DbrxBinder(const Checkpoint& ckpt) : ckpt_(ckpt) {}

  WeightView matrix(const std::string& name, int64_t rows, int64_t cols, const std::string& why) {
    Expected<TensorView> t = ckpt_.tensor(name, {rows, cols}, why);
    if (!t) return fail(t.error()), WeightView{};
    return t->matrix();
  }

  std::vector<float> vector(const std::string& name, int64_t n, const std::string& why) {
    Expected<TensorView> t = ckpt_.tensor(name, {n}, why);
    if (!t) return fail(t.error()), std::vector<float>{};
    return t->to_f32();
  }

  void fail(const Error& e) {
    if (!error_) error_ = e;
  }
  const std::optional<Error>& error() const { return error_; }

 private:
  const Checkpoint& ckpt_;
  std::optional<Error> error_;
};

std::string block(int64_t l) {
  return fmt::format("transformer.blocks.{}.", l);
}

// Rows [begin, begin + rows) of m, as a view.
WeightView rows_of(const WeightView& m, int64_t begin, int64_t rows) {
  WeightView v = m;
  v.data = m.row(begin);
  v.rows = rows;
  return v;
}

// Rows [begin, begin + rows) of m transposed ([m.cols, rows]), copied into `store`.
WeightView transposed(const WeightView& m, int64_t begin, int64_t rows, CopiedStore& store) {
  const auto es = static_cast<int64_t>(kernels::dtype_size(m.dtype));
  auto buf = std::make_unique<std::vector<std::byte>>(static_cast<std::size_t>(rows * m.cols * es));
  std::byte* out = buf->data();
  for (int64_t r = 0; r < rows; ++r) {
    const auto* in = static_cast<const std::byte*>(m.row(begin + r));
    for (int64_t c = 0; c < m.cols; ++c)
      std::memcpy(out + (c * rows + r) * es, in + c * es, static_cast<std::size_t>(es));
  }
  WeightView v{buf->data(), m.dtype, m.cols, rows};
  store.buffers.push_back(std::move(buf));
  return v;
}

std::vector<kernels::FfnWeights> bind_layer_experts(DbrxBinder& b, const ModelConfig& c,
                                                    int64_t layer, std::span<const int32_t> ids,
                                                    std::vector<CopiedStore>& copies) {
  std::vector<kernels::FfnWeights> experts;
  if (ids.empty()) return experts;
  const int64_t E = c.num_experts;
  const int64_t H = c.hidden_size;
  const int64_t I = c.moe_intermediate_size;
  const std::string why = fmt::format(
      "d_model={}, ffn_config.ffn_hidden_size={}, ffn_config.moe_num_experts={} in config.json "
      "(expert e owns rows e * ffn_hidden_size ...)",
      H, I, E);
  const std::string p = block(layer) + "ffn.experts.mlp.";
  const WeightView w1 = b.matrix(p + "w1", E * I, H, why);
  const WeightView v1 = b.matrix(p + "v1", E * I, H, why);
  const WeightView w2 = b.matrix(p + "w2", E * I, H, why);
  if (b.error()) return experts;
  copies.resize(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const int64_t first = static_cast<int64_t>(ids[i]) * I;
    experts.push_back(
        {rows_of(w1, first, I), rows_of(v1, first, I), transposed(w2, first, I, copies[i])});
  }
  return experts;
}

}  // namespace

int64_t CopiedStore::bytes() const {
  int64_t n = 0;
  for (const auto& b : buffers) n += static_cast<int64_t>(b->size());
  return n;
}

Expected<std::vector<kernels::FfnWeights>> bind_dbrx_experts(const ModelConfig& c,
                                                             const Checkpoint& ckpt, int64_t layer,
                                                             std::span<const int32_t> ids,
                                                             std::vector<CopiedStore>* copies) {
  if (copies == nullptr)
    return Error("binding dbrx experts needs a store for their transposed w2 (an internal error)");
  DbrxBinder b(ckpt);
  std::vector<kernels::FfnWeights> experts = bind_layer_experts(b, c, layer, ids, *copies);
  if (b.error()) return *b.error();
  return experts;
}

Expected<ModelWeights> bind_dbrx_weights(const ModelConfig& c,
                                         std::shared_ptr<const Checkpoint> ckpt,
                                         bool routed_experts) {
  DbrxBinder b(*ckpt);
  ModelWeights w;
  w.checkpoint = ckpt;
  const int64_t H = c.hidden_size;
  const int64_t V = c.vocab_size;
  const int64_t kv_dim = c.num_kv_heads * c.head_dim;
  const std::string model_why = fmt::format("vocab_size={}, d_model={} in config.json", V, H);
  const std::string attn_why = fmt::format(
      "d_model={}, n_heads={}, attn_config.kv_n_heads={} in config.json (Wqkv holds d_model query "
      "rows, then kv_n_heads * d_model / n_heads key and value rows each)",
      H, c.num_heads, c.num_kv_heads);

  w.embed = b.matrix("transformer.wte.weight", V, H, model_why);
  w.final_norm = b.vector("transformer.norm_f.weight", H, model_why);
  w.lm_head = b.matrix("lm_head.weight", V, H, model_why);

  std::vector<int32_t> all_experts(static_cast<std::size_t>(c.num_experts));
  for (int64_t e = 0; e < c.num_experts; ++e) all_experts[e] = static_cast<int32_t>(e);
  for (int64_t l = 0; l < c.num_layers && !b.error(); ++l) {
    const std::string p = block(l);
    const std::string a = p + "norm_attn_norm.";
    LayerWeights L;
    L.input_norm = b.vector(a + "norm_1.weight", H, model_why);
    L.post_attention_norm = b.vector(a + "norm_2.weight", H, model_why);
    const WeightView qkv = b.matrix(a + "attn.Wqkv.weight", H + 2 * kv_dim, H, attn_why);
    if (!qkv.empty()) {
      L.attn.q = rows_of(qkv, 0, H);
      L.attn.k = rows_of(qkv, H, kv_dim);
      L.attn.v = rows_of(qkv, H + kv_dim, kv_dim);
    }
    L.attn.o = b.matrix(a + "attn.out_proj.weight", H, H, attn_why);

    L.moe = true;
    L.router = b.matrix(
        p + "ffn.router.layer.weight", c.num_experts, H,
        fmt::format("d_model={}, ffn_config.moe_num_experts={} in config.json", H, c.num_experts));
    if (routed_experts) {
      std::vector<CopiedStore> copies;
      L.experts = bind_layer_experts(b, c, l, all_experts, copies);
      for (CopiedStore& s : copies)
        for (auto& buf : s.buffers) w.copies.buffers.push_back(std::move(buf));
    }
    w.layers.push_back(std::move(L));
  }
  if (b.error()) return *b.error();
  return w;
}

}  // namespace moemesh::detail
