// Multi-head latent attention (deepseek_v2, deepseek_v3, kimi_k2) on the GPU: what
// model_mla.cpp computes on the CPU, in kernels/cuda ops on the rank's stream.
//
// The KV cache holds one row per token and layer, the normalised latent c then the rotated rotary
// key (MlaConfig::cache_row(), bf16). Attention absorbs kv_b_proj instead of expanding cached
// tokens: per head h, the query [W_uk[h]^T q_nope ; q_pe] attends as multi-query attention over
// the cached rows (keys and values both), and W_uv[h] multiplies the first kv_lora_rank features
// of its output. Both per-head products are one strided batched GEMM each, reading kv_b_proj as
// uploaded (W_uk[h] as its transpose). Under tensor parallelism a rank holds its heads of q / q_b,
// kv_b and o, and all of q_a and kv_a: every rank caches the same latent rows.
//
// The rotary rows of q (or q_b) and kv_a are de-interleaved at upload where the model pairs
// features (2i, 2i + 1) (rope_interleave), and multiplied by the YaRN attention factor when it is
// not 1: both are linear in those outputs, so permuting and scaling the rows that produce them
// gives what the CPU gets by permuting and scaling the outputs.
#include <fmt/format.h>

#include <cmath>
#include <vector>

#include "core/detail/cuda_forward_impl.h"

namespace moemesh::detail {
namespace {

// The epsilon of q_a_layernorm and kv_a_layernorm (model_mla.cpp's kLatentNormEps).
constexpr float kLatentNormEps = 1e-6f;

// All of w as bf16 rows, where in every `period` rows the rope rows from `first` are reordered as
// model_mla.cpp's deinterleave reorders features (evens, then odds) when `interleaved`, and
// multiplied by `scale`.
std::vector<uint16_t> rotary_rows_bf16(const kernels::WeightView& w, int64_t period, int64_t first,
                                       int64_t rope, bool interleaved, float scale) {
  std::vector<uint16_t> all = shard_bf16(w, Split::Rows, 0, 1);
  const int64_t cols = w.cols;
  const int64_t half = rope / 2;
  std::vector<uint16_t> block(static_cast<std::size_t>(rope * cols));
  for (int64_t g = 0; g < w.rows / period; ++g) {
    uint16_t* rows = all.data() + (g * period + first) * cols;
    std::copy_n(rows, rope * cols, block.begin());
    for (int64_t j = 0; j < rope; ++j) {
      const int64_t from = !interleaved ? j : j < half ? 2 * j : 2 * (j - half) + 1;
      uint16_t* dst = rows + j * cols;
      std::copy_n(block.begin() + from * cols, cols, dst);
      if (scale != 1.0f)
        for (int64_t i = 0; i < cols; ++i)
          dst[i] = kernels::f32_to_bf16(kernels::bf16_to_f32(dst[i]) * scale);
    }
  }
  return all;
}

// The same reordering and scaling of a bias over those rows (empty stays empty).
std::vector<float> rotary_vector(std::vector<float> v, int64_t period, int64_t first, int64_t rope,
                                 bool interleaved, float scale) {
  const int64_t half = rope / 2;
  for (int64_t g = 0; g * period < static_cast<int64_t>(v.size()); ++g) {
    float* x = v.data() + g * period + first;
    const std::vector<float> block(x, x + rope);
    for (int64_t j = 0; j < rope; ++j)
      x[j] = scale * block[!interleaved ? j : j < half ? 2 * j : 2 * (j - half) + 1];
  }
  return v;
}

}  // namespace

Status CudaForward::Impl::load_mla(Layer& D, const LayerWeights& L) {
  const MlaConfig& a = *c.mla;
  const int64_t heads = c.num_heads;  // this rank's
  const int64_t qk = a.qk_head_dim();
  const int64_t rope = a.qk_rope_head_dim;
  const float scale = options.rope_scale;
  const bool il = a.rope_interleave;

  // q_proj or q_b_proj: this rank's heads, rows [rank * heads * qk, (rank + 1) * heads * qk).
  const kernels::WeightView& qw = a.q_lora_rank ? L.attn.q_b : L.attn.q;
  const std::vector<uint16_t> q_all = rotary_rows_bf16(qw, qk, a.qk_nope_head_dim, rope, il, scale);
  const auto first = q_all.begin() + rank * heads * qk * qw.cols;
  if (Status s = upload_bf16(a.q_lora_rank ? D.q_b : D.q,
                             std::vector<uint16_t>(first, first + heads * qk * qw.cols));
      !s)
    return s;
  if (a.q_lora_rank) {
    if (Status s = upload_whole(D.q_a, L.attn.q_a); !s) return s;
    if (Status s = upload_f32(D.q_a_bias, L.attn.q_a_bias); !s) return s;
    if (Status s = upload_f32(D.q_a_norm, L.attn.q_a_norm); !s) return s;
  }
  const int64_t row = a.cache_row();
  if (Status s =
          upload_bf16(D.kv_a, rotary_rows_bf16(L.attn.kv_a, row, a.kv_lora_rank, rope, il, scale));
      !s)
    return s;
  if (Status s = upload_f32(D.kv_a_bias,
                            rotary_vector(L.attn.kv_a_bias, row, a.kv_lora_rank, rope, il, scale));
      !s)
    return s;
  if (Status s = upload_f32(D.kv_a_norm, L.attn.kv_a_norm); !s) return s;
  return upload_matrix(D.kv_b, L.attn.kv_b, Split::Rows);
}

Status CudaForward::Impl::mla_attention(int64_t l, int64_t n, const Step& step, float* out) {
  const Layer& D = layers[l];
  const MlaConfig& a = *c.mla;
  const int64_t H = c.hidden_size;
  const int64_t heads = c.num_heads;
  const int64_t nope = a.qk_nope_head_dim;
  const int64_t rope = a.qk_rope_head_dim;
  const int64_t qk = a.qk_head_dim();
  const int64_t lora = a.kv_lora_rank;
  const int64_t vd = a.v_head_dim;
  const int64_t row = a.cache_row();
  const std::size_t f = sizeof(float);
  const uint16_t* xin = xn.as<uint16_t>();

  // Queries [n, heads, qk].
  float* qs = q.as<float>();
  if (a.q_lora_rank == 0) {
    if (Status s = from(blas->gemm(xin, D.q.as<uint16_t>(), qs, n, heads * qk, H)); !s) return s;
  } else {
    float* qa = mla_qa.as<float>();
    if (Status s = from(blas->gemm(xin, D.q_a.as<uint16_t>(), qa, n, a.q_lora_rank, H)); !s)
      return s;
    if (D.q_a_bias.data()) cu::add_bias(qa, D.q_a_bias.as<float>(), n, a.q_lora_rank, stream);
    cu::rmsnorm(qa, nullptr, D.q_a_norm.as<float>(), n, a.q_lora_rank, kLatentNormEps, nullptr,
                mla_qa_bf16.as<uint16_t>(), stream);
    if (Status s = from(blas->gemm(mla_qa_bf16.as<uint16_t>(), D.q_b.as<uint16_t>(), qs, n,
                                   heads * qk, a.q_lora_rank));
        !s)
      return s;
  }
  // The new tokens' cache rows [n, row]: the latent, normalised, then the rotary key.
  float* ckv = mla_ckv.as<float>();
  float* latent = mla_latent.as<float>();
  if (Status s = from(blas->gemm(xin, D.kv_a.as<uint16_t>(), ckv, n, row, H)); !s) return s;
  if (D.kv_a_bias.data()) cu::add_bias(ckv, D.kv_a_bias.as<float>(), n, row, stream);
  cu::copy_rows(latent, lora * f, ckv, row * f, lora * f, n, stream);
  cu::rmsnorm(latent, nullptr, D.kv_a_norm.as<float>(), n, lora, kLatentNormEps, latent, nullptr,
              stream);
  cu::copy_rows(ckv, row * f, latent, lora * f, lora * f, n, stream);
  cu::rope(qs + nope, n, heads * qk, heads, qk, rope, step.pos, inv_freq.as<float>(), stream);
  cu::rope(ckv + lora, n, row, 1, row, rope, step.pos, inv_freq.as<float>(), stream);

  // Absorbed queries [n, heads, row]: W_uk[h]^T q_nope (kv_b's rows h * (nope + vd) .. + nope,
  // read as [k = nope, n = kv_lora_rank]), then q_pe.
  float* q_abs = mla_q_abs.as<float>();
  uint16_t* tmp = mla_bf16.as<uint16_t>();
  cu::f32_to_bf16(qs, n * heads * qk, tmp, stream);
  cu::Blas::StridedBatch uk;
  uk.x = tmp;
  uk.ldx = heads * qk;
  uk.x_stride = qk;
  uk.w = D.kv_b.as<uint16_t>();
  uk.ldw = lora;
  uk.w_stride = (nope + vd) * lora;
  uk.w_k_major = true;
  uk.y = q_abs;
  uk.ldy = heads * row;
  uk.y_stride = row;
  if (Status s = from(blas->gemm_strided_batched(uk, n, lora, nope, heads)); !s) return s;
  cu::copy_rows(q_abs + lora, row * f, qs + nope, qk * f, rope * f, n * heads, stream);

  // Cache the rows and attend: one kv head whose rows are keys and values.
  cu::PagedKv cache;
  cache.k = cache.v = kv.as<uint16_t>() + l * num_blocks * options.block_size * row;
  cache.block_size = options.block_size;
  cache.n_kv_heads = 1;
  cache.head_dim = row;
  cu::paged_kv_write(ckv, ckv, n, step.slot, cache, stream);
  const float scale = options.mla_softmax_scale > 0.0f ? options.mla_softmax_scale
                                                       : 1.0f / std::sqrt(static_cast<float>(qk));
  float* lat = mla_lat.as<float>();
  cu::paged_attention(q_abs, n, cache, step.batch, heads, scale, 0, lat, stream);

  // Values [n, heads, vd]: W_uv[h] (kv_b's next vd rows, [vd, lora]) times the first kv_lora_rank
  // features of head h's output; then o.
  cu::f32_to_bf16(lat, n * heads * row, tmp, stream);
  cu::Blas::StridedBatch uv;
  uv.x = tmp;
  uv.ldx = heads * row;
  uv.x_stride = row;
  uv.w = D.kv_b.as<uint16_t>() + nope * lora;
  uv.ldw = lora;
  uv.w_stride = (nope + vd) * lora;
  uv.y = attn.as<float>();
  uv.ldy = heads * vd;
  uv.y_stride = vd;
  if (Status s = from(blas->gemm_strided_batched(uv, n, vd, lora, heads)); !s) return s;
  cu::f32_to_bf16(attn.as<float>(), n * heads * vd, attn_bf16.as<uint16_t>(), stream);
  return from(blas->gemm(attn_bf16.as<uint16_t>(), D.o.as<uint16_t>(), out, n, H, heads * vd));
}

}  // namespace moemesh::detail
