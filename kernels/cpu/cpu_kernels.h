// moemesh CPU kernels: the contract of the kernel family.
//
// Every op takes raw pointers, sizes and (where it parallelises) a ThreadPool, and nothing of
// moemesh outside this folder. Activations are float32, row-major and contiguous unless a stride
// is given. Weight matrices stay in their checkpoint dtype (F32, F16 or BF16) and are read through
// a WeightView; all arithmetic accumulates in float32. Ops never allocate on the caller's behalf
// except for small per-thread scratch; sizes are the caller's responsibility (they are checked
// once, where a model is loaded, not on every call).
//
// Each op is defined in its own .cpp file and has a reference test in tests/kernels/.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "kernels/cpu/thread_pool.h"

namespace moemesh::kernels {

// ---- Element types -----------------------------------------------------------------------------

enum class DType : uint8_t { F32, F16, BF16 };

std::size_t dtype_size(DType t);
const char* dtype_name(DType t);

float bf16_to_f32(uint16_t bits);
float f16_to_f32(uint16_t bits);
// Round to nearest even, as torch does when it casts float32 to bfloat16.
uint16_t f32_to_bf16(float v);
uint16_t f32_to_f16(float v);

// Converts n elements of type `t` at `src` to float32.
void to_f32(const void* src, DType t, int64_t n, float* dst);

// A read-only row-major matrix [rows, cols] in its storage dtype (e.g. an nn.Linear weight
// [out_features, in_features], or an embedding table [vocab, hidden]).
struct WeightView {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0;
  int64_t cols = 0;

  bool empty() const { return data == nullptr; }
  // Row r as a pointer into `data` (of the storage dtype).
  const void* row(int64_t r) const {
    return static_cast<const char*>(data) + r * cols * static_cast<int64_t>(dtype_size(dtype));
  }
};

// ---- Ops -------------------------------------------------------------------------------------

// y[t, r] = sum_c x[t, c] * w[r, c] (+ bias[r]) for t < n_tokens; x is [n_tokens, w.cols],
// y is [n_tokens, w.rows]; bias (float32, w.rows) may be null. Parallel over rows of w.
void linear(const float* x, int64_t n_tokens, const WeightView& w, const float* bias, float* y,
            ThreadPool* pool);

// out[t, :] = w.row(ids[t]) as float32: an embedding lookup. ids must be < w.rows.
void embedding(const WeightView& w, const int32_t* ids, int64_t n_tokens, float* out);

// y[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * weight, for n rows of `dim`. In-place safe.
void rmsnorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* y);

// Inverse frequencies of rotary embeddings, as Hugging Face computes them for the default rope
// type: inv_freq[i] = 1 / theta^(2i / rotary_dim), i < rotary_dim / 2.
void rope_inv_freq(double theta, int64_t rotary_dim, float* inv_freq);

// Rotates, in place, the first rotary_dim features of each of n_heads heads of n_tokens tokens
// (the "rotate_half" convention: feature i pairs with i + rotary_dim / 2). Token t sits at
// positions[t]; its heads start at x + t * token_stride, head_dim floats apart.
void rope(float* x, int64_t n_tokens, int64_t token_stride, int64_t n_heads, int64_t head_dim,
          int64_t rotary_dim, const int32_t* positions, const float* inv_freq);

// Causal grouped-query attention of n_q new tokens against a key/value cache.
//   q:   [n_q, n_heads * head_dim]; query t sits at position past + t.
//   k,v: [past + n_q, n_kv_heads * head_dim] (the cache, new tokens already appended).
//   out: [n_q, n_heads * head_dim].
// Query head h reads kv head h / (n_heads / n_kv_heads). scores are scaled by `scale`; when
// window > 0 a query at position p sees keys at positions > p - window only. Softmax in float32.
void attention(const float* q, int64_t n_q, const float* k, const float* v, int64_t past,
               int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale, int64_t window,
               float* out, ThreadPool* pool);

// Router of a sparse MoE layer: softmax over n_experts logits in float32, then the top_k largest
// probabilities (ties go to the lower expert id), optionally renormalised to sum to one.
// ids and weights are [n_tokens, top_k], in decreasing order of weight.
void softmax_topk(const float* logits, int64_t n_tokens, int64_t n_experts, int64_t top_k,
                  bool renormalize, int32_t* ids, float* weights);

// The general router (DeepSeek-V2 group_limited_greedy, DeepSeek-V3 noaux_tc): scores are the
// softmax (or, with `sigmoid`, the elementwise sigmoid) of the logits in float32; bias (n_experts
// floats, may be null: e_score_correction_bias) is added to the scores for choosing only. The
// experts form n_groups equal groups; a group ranks by the max of its biased scores (or, with
// group_top2_sum, the sum of its two largest), and only the experts of the topk_groups best groups
// (ties to the lower group id) compete. ids receives the top_k competing experts by biased score
// (ties to the lower id) in decreasing order, weights their unbiased scores, divided by the sum of
// those top_k scores when renormalize, then multiplied by scaling. NaN ranks as -inf. Should the
// chosen groups hold fewer than top_k experts, the rest are the best of the other groups. With
// n_groups == 1, softmax, no bias and scaling 1 this is softmax_topk.
void grouped_topk(const float* logits, const float* bias, int64_t n_tokens, int64_t n_experts,
                  int64_t top_k, bool sigmoid, bool renormalize, float scaling, int64_t n_groups,
                  int64_t topk_groups, bool group_top2_sum, int32_t* ids, float* weights);

// out[i] = silu(gate[i]) * up[i] for i < n, silu(x) = x / (1 + exp(-x)). In-place safe.
void swiglu(const float* gate, const float* up, int64_t n, float* out);

// A SwiGLU feed-forward block (an expert, a shared expert or a dense MLP):
//   out = down(silu(gate(x)) * up(x)), x [n_tokens, hidden], out [n_tokens, hidden].
// gate and up are [inter, hidden]; down is [hidden, inter]. scratch holds 2 * n_tokens * inter
// floats.
struct FfnWeights {
  WeightView gate;
  WeightView up;
  WeightView down;
};
void swiglu_ffn(const float* x, int64_t n_tokens, const FfnWeights& w, float* scratch, float* out,
                ThreadPool* pool);

}  // namespace moemesh::kernels
