// Internal: the weights of a model, bound to a checkpoint and checked against its config.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/config.h"
#include "kernels/cpu/cpu_kernels.h"

namespace moemesh::detail {

struct AttentionWeights {
  kernels::WeightView q, k, v, o;
  std::vector<float> q_bias, k_bias, v_bias, o_bias;  // empty when the config has none
  std::vector<float> q_norm, k_norm;                  // empty unless config.qk_norm != None
  // Multi-head latent attention (config.mla; k and v stay empty). q is q_proj when q_lora_rank is
  // 0, else q_a -> q_a_norm -> q_b. kv_a is kv_a_proj_with_mqa [kv_lora_rank + rope, hidden],
  // kv_b is kv_b_proj [heads * (nope + v_head_dim), kv_lora_rank]; o (and o_bias) as above.
  kernels::WeightView q_a, q_b, kv_a, kv_b;
  std::vector<float> q_a_norm, kv_a_norm;
  std::vector<float> q_a_bias, kv_a_bias;  // empty without attention_bias
};

struct LayerWeights {
  std::vector<float> input_norm;
  std::vector<float> post_attention_norm;
  AttentionWeights attn;
  bool moe = false;
  // Sparse layers.
  kernels::WeightView router;                // [num_experts, hidden]
  std::vector<float> router_bias;            // e_score_correction_bias; empty when unused
  std::vector<kernels::FfnWeights> experts;  // routed experts; empty when not bound
  bool has_shared_expert = false;
  kernels::FfnWeights shared_expert;
  kernels::WeightView shared_expert_gate;  // [1, hidden]
  // Dense layers.
  kernels::FfnWeights mlp;
};

// Quantized copies of weight matrices (quantize_int8, quantize_fp8; float32 copies of FP8
// matrices that the forward pass reads row by row, dequantize_f32; AMX tile layouts of BF16 and
// I8 matrices, pack_for_amx), owned for the views that point
// into them. The matrices are allocated one by one, so the views stay valid as more are added and
// as the store moves.
struct QuantizedStore {
  struct Matrix {
    std::vector<int8_t> values;     // I8: [rows, cols]
    std::vector<uint8_t> codes;     // F8E4M3: [rows, cols]
    std::vector<float> scale;       // I8: [rows]; F8E4M3: [ceil(rows / 128), ceil(cols / 128)]
    std::vector<float> dense;       // F32: [rows, cols]
    kernels::PackedWeights packed;  // the AMX tile layout (kernels::pack_amx)
  };
  std::vector<std::unique_ptr<Matrix>> matrices;
  int64_t bytes() const;         // of the values, codes, scales and float32 copies
  int64_t packed_bytes() const;  // of the AMX tile layouts
};

// Weight matrices copied out of a checkpoint into the layout the kernels read, where the
// checkpoint stores them otherwise (dbrx's expert w2 is [inter, hidden] per expert, the down
// projection [hidden, inter]), in the checkpoint's dtype. Owned for the views that point into
// them; buffers are allocated one by one, so the views stay valid as the store grows and moves.
struct CopiedStore {
  std::vector<std::unique_ptr<std::vector<std::byte>>> buffers;
  int64_t bytes() const;
};

struct ModelWeights {
  std::shared_ptr<const Checkpoint> checkpoint;  // owns the mappings the views point into
  QuantizedStore quantized;   // owns the I8 / F8E4M3 views' data made at load (--quantization)
  CopiedStore copies;         // owns views the checkpoint has no layout for
  kernels::WeightView embed;  // [vocab, hidden]
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;
  kernels::WeightView lm_head;  // [vocab, hidden]; the embedding when tied
};

// Finds and checks every tensor `config` requires. Errors name the tensor, its file, the shape
// found and the shape the config implies. With routed_experts false the routed experts are neither
// looked up nor bound (LayerWeights::experts stays empty); everything else is.
Expected<ModelWeights> bind_weights(const ModelConfig& config,
                                    std::shared_ptr<const Checkpoint> checkpoint,
                                    bool routed_experts = true);

// Binds routed experts `ids` of MoE layer `layer` (an index over all layers), one FfnWeights per
// id in the order given. Reads either one tensor per expert and projection (as Hugging Face
// checkpoints ship them) or fused gate_up_proj [E, 2 * inter, hidden] and down_proj
// [E, hidden, inter] tensors (gate in the first half), or dbrx's fused w1 / v1 / w2
// [E * inter, hidden] (sliced per expert; w2 transposed into a copy). The caller checks that the
// layer is MoE and the ids are in range; errors name the tensor as bind_weights does. `copies`
// receives one store per id, owning what that expert's views point into besides the checkpoint
// (dbrx); it may be null only for families that copy nothing.
Expected<std::vector<kernels::FfnWeights>> bind_experts(const ModelConfig& config,
                                                        const Checkpoint& checkpoint, int64_t layer,
                                                        std::span<const int32_t> ids,
                                                        std::vector<CopiedStore>* copies = nullptr);

// bind_weights and bind_experts for dbrx, whose tensors are named and laid out differently
// (weights_dbrx.cpp).
Expected<ModelWeights> bind_dbrx_weights(const ModelConfig& config,
                                         std::shared_ptr<const Checkpoint> checkpoint,
                                         bool routed_experts);
Expected<std::vector<kernels::FfnWeights>> bind_dbrx_experts(const ModelConfig& config,
                                                             const Checkpoint& checkpoint,
                                                             int64_t layer,
                                                             std::span<const int32_t> ids,
                                                             std::vector<CopiedStore>* copies);

// The bytes of an FFN's three weight matrices in their dtype (int8, fp8: with the scales).
int64_t ffn_bytes(const kernels::FfnWeights& w);

// Weight quantization at load: "none" (the checkpoint dtypes), "int8" (weight-only, a float32
// scale per output row) or "fp8" (weight-only FP8 E4M3, a float32 scale per 128x128 block, the
// layout of FP8 checkpoints). Fails on any other value, naming it.
enum class Quantization { None, Int8, Fp8 };
Status parse_quantization(const std::string& name, Quantization* out);
const char* quantization_name(Quantization q);

// An int8 copy of `w`, per output row: scale = max|row| / 127 (1 when the row is all zero), value =
// round-to-nearest-even(w / scale) clamped to [-127, 127]. The data is added to `store`; the view
// returned points into it. Rows are quantized in parallel on `pool` (may be null).
kernels::WeightView quantize_int8(const kernels::WeightView& w, QuantizedStore& store,
                                  kernels::ThreadPool* pool);
void quantize_int8(kernels::FfnWeights& w, QuantizedStore& store, kernels::ThreadPool* pool);
// Quantizes, in place, every matrix the forward pass multiplies tokens by except the routers,
// the shared-expert gate and the embeddings / LM head: the attention projections (but MLA's
// kv_b_proj, whose rows the latent attention reads directly), dense MLPs, shared experts and
// bound routed experts.
void quantize_int8(ModelWeights& w, kernels::ThreadPool* pool);
// On Isa::Avx512Bf16 and Isa::Amx (kernels::active_isa()), gives every BF16, I8 or F8E4M3 matrix
// that linear() reads
// (those of for_each_quantized_matrix, the routers and the LM head; an expert's three) a copy in
// the AMX tile layout (F8E4M3: as bf16), owned by `store` / w.quantized; otherwise, and for other
// dtypes, does nothing. Costs a second copy of those matrices in memory (twice an FP8 matrix's
// bytes; the mapped checkpoint pages stay reclaimable).
void pack_for_amx(ModelWeights& w, kernels::ThreadPool* pool);
void pack_for_amx(kernels::FfnWeights& w, QuantizedStore& store, kernels::ThreadPool* pool);
// Calls fn on each of those matrices (the ones quantize_int8 and quantize_fp8 quantize).
void for_each_quantized_matrix(ModelWeights& w,
                               const std::function<void(kernels::WeightView&)>& fn);

// FP8 (core/fp8_weights.cpp). An FP8 copy of `w` in the layout of FP8 checkpoints
// (kernels::quantize_fp8_e4m3: per 128x128 block, scale = max|block| / 448, round to nearest
// even, saturating). Already quantized views (I8, F8E4M3) and empty ones come back as they are.
// The data is added to `store`; row blocks are quantized in parallel on `pool` (may be null).
kernels::WeightView quantize_fp8(const kernels::WeightView& w, QuantizedStore& store,
                                 kernels::ThreadPool* pool);
void quantize_fp8(kernels::FfnWeights& w, QuantizedStore& store, kernels::ThreadPool* pool);
// Quantizes, in place, the matrices quantize_int8 quantizes (routers, the shared-expert gate,
// embeddings, LM head and MLA's kv_b_proj stay as they are).
void quantize_fp8(ModelWeights& w, kernels::ThreadPool* pool);

// The view of checkpoint tensor `t` (already found and shape-checked) as a weight matrix. A
// tensor with a companion "<name>_scale_inv" (FP8 checkpoints: F8_E4M3 weights, F32 scales
// [ceil(rows / 128), ceil(cols / 128)]) becomes an F8E4M3 view with those block scales; errors
// name the tensor when the pair does not fit (an F8_E4M3 weight without scales, scales of another
// shape or dtype, or scales next to a weight that is not F8_E4M3).
Expected<kernels::WeightView> checkpoint_matrix(const Checkpoint& checkpoint, const TensorView& t);

// A float32 copy of an F8E4M3 view (dequantized: code * block scale), for matrices the forward
// pass reads row by row rather than through linear() (MLA's kv_b_proj). Other views come back as
// they are.
kernels::WeightView dequantize_f32(const kernels::WeightView& w, QuantizedStore& store);

// w's rows * cols values as bf16 bits at `out` (copied as they are when w is bf16, else rounded to
// nearest even; I8 and F8E4M3 with their scales applied): what the GPU backend uploads.
void weight_to_bf16(const kernels::WeightView& w, uint16_t* out);

}  // namespace moemesh::detail
