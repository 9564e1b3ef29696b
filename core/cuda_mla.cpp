// Multi-head latent attention (deepseek_v2, deepseek_v3, kimi_k2) on the GPU: what
// model_mla.cpp computes on the CPU, in kernels/cuda ops on the rank's stream.
//
// The KV cache holds one row per token and layer, the normalised latent c then the rotated rotary
// key (MlaConfig::cache_row(), bf16, or FP8 codes with one scale: CudaOptions::kv_fp8). Attention
// absorbs kv_b_proj instead of expanding cached tokens: per head h, the query [W_uk[h]^T q_nope ;
// q_pe] attends as multi-query attention over the cached rows (keys and values both), and W_uv[h]
// multiplies the first kv_lora_rank features of its output. Both per-head products are one strided
// batched GEMM each, reading kv_b_proj as uploaded (W_uk[h] as its transpose). Under tensor
// parallelism a rank holds its heads of q / q_b, kv_b and o, and all of q_a and kv_a: every rank
// caches the same latent rows.
//
// A sequence's chunk of many new tokens (prefill; ModelOptions::mla_expanded_min_tokens) attends in
// the expanded form instead: the sequence's cached rows are gathered, each head's keys
// [k_nope ; k_pe] and values expanded from them (strided batched GEMMs), and the main attention
// kernel runs over those with the chunk's queries: per key and head a dot product of qk_head_dim
// (192 for DeepSeek-V3) instead of kv_lora_rank + rope (576), at the cost of expanding the
// sequence's keys once per layer. Chunks whose expansion would exceed 1 GiB stay absorbed.
//
// The rotary rows of q (or q_b) and kv_a are de-interleaved at upload where the model pairs
// features (2i, 2i + 1) (rope_interleave), and multiplied by the YaRN attention factor when it is
// not 1: both are linear in those outputs, so permuting and scaling the rows that produce them
// gives what the CPU gets by permuting and scaling the outputs.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "core/detail/cuda_forward_impl.h"

namespace moemesh::detail {
namespace {

// The epsilon of q_a_layernorm and kv_a_layernorm (model_mla.cpp's kLatentNormEps).
constexpr float kLatentNormEps = 1e-6f;

// The feature that de-interleaving puts at rotary position j of `rope` (model_mla.cpp's
// deinterleave: evens, then odds), or j itself when the features are not interleaved.
int64_t rotary_source(int64_t j, int64_t rope, bool interleaved) {
  const int64_t half = rope / 2;
  return !interleaved ? j : j < half ? 2 * j : 2 * (j - half) + 1;
}

// The dimensions of one rank's latent attention.
struct Dims {
  int64_t heads, nope, rope, qk, lora, vd, row;
};
Dims dims_of(const ModelConfig& c) {
  const MlaConfig& a = *c.mla;
  return {c.num_heads,    a.qk_nope_head_dim, a.qk_rope_head_dim, a.qk_head_dim(),
          a.kv_lora_rank, a.v_head_dim,       a.cache_row()};
}

// All of w as bf16 rows, where in every `period` rows the rope rows from `first` are reordered as
// model_mla.cpp's deinterleave reorders features (evens, then odds) when `interleaved`, and
// multiplied by `scale`.
std::vector<uint16_t> rotary_rows_bf16(const kernels::WeightView& w, int64_t period, int64_t first,
                                       int64_t rope, bool interleaved, float scale) {
  std::vector<uint16_t> all = shard_bf16(w, Split::Rows, 0, 1);
  const int64_t cols = w.cols;
  std::vector<uint16_t> block(static_cast<std::size_t>(rope * cols));
  for (int64_t g = 0; g < w.rows / period; ++g) {
    uint16_t* rows = all.data() + (g * period + first) * cols;
    std::copy_n(rows, rope * cols, block.begin());
    for (int64_t j = 0; j < rope; ++j) {
      const int64_t from = rotary_source(j, rope, interleaved);
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
  for (int64_t g = 0; g * period < static_cast<int64_t>(v.size()); ++g) {
    float* x = v.data() + g * period + first;
    const std::vector<float> block(x, x + rope);
    for (int64_t j = 0; j < rope; ++j) x[j] = scale * block[rotary_source(j, rope, interleaved)];
  }
  return v;
}

// The FP8 counterpart of rotary_rows_bf16 for rows [first_row, first_row + count) of the
// reordered w, or nothing when the codes cannot stay FP8: a scale other than 1 (codes share their
// block's scale with rows that are not scaled), a reordering that moves rows across 128-row
// blocks, or a share that does not take whole blocks.
std::optional<Fp8Matrix> rotary_rows_fp8(const kernels::WeightView& w, int64_t period,
                                         int64_t first, int64_t rope, bool interleaved, float scale,
                                         int64_t first_row, int64_t count) {
  if (scale != 1.0f || !dense_fp8_rows(w, first_row, count)) return std::nullopt;
  for (int64_t g = 0; g < w.rows / period; ++g) {
    const int64_t r0 = g * period + first;
    if (r0 / kernels::kFp8Block != (r0 + rope - 1) / kernels::kFp8Block) return std::nullopt;
  }
  Fp8Matrix all = rows_fp8(w, 0, w.rows);
  const int64_t cols = w.cols;
  std::vector<uint8_t> block(static_cast<std::size_t>(rope * cols));
  for (int64_t g = 0; g < w.rows / period; ++g) {
    uint8_t* rows = all.codes.data() + (g * period + first) * cols;
    std::copy_n(rows, rope * cols, block.begin());
    for (int64_t j = 0; j < rope; ++j)
      std::copy_n(block.begin() + rotary_source(j, rope, interleaved) * cols, cols,
                  rows + j * cols);
  }
  const kernels::WeightView reordered{all.codes.data(), kernels::DType::F8E4M3, w.rows, w.cols,
                                      all.scales.data()};
  return rows_fp8(reordered, first_row, count);
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
  Dense& dq = a.q_lora_rank ? D.q_b : D.q;
  if (auto fp8 = rotary_rows_fp8(qw, qk, a.qk_nope_head_dim, rope, il, scale, rank * heads * qk,
                                 heads * qk)) {
    if (Status s = upload_dense_fp8(dq, *fp8); !s) return s;
  } else {
    const std::vector<uint16_t> q_all =
        rotary_rows_bf16(qw, qk, a.qk_nope_head_dim, rope, il, scale);
    const auto first = q_all.begin() + rank * heads * qk * qw.cols;
    if (Status s = upload_dense_bf16(dq, std::vector<uint16_t>(first, first + heads * qk * qw.cols),
                                     heads * qk, qw.cols);
        !s)
      return s;
  }
  if (a.q_lora_rank) {
    if (Status s = upload_dense(D.q_a, L.attn.q_a, Split::Rows, 0, 1); !s) return s;
    if (Status s = upload_f32(D.q_a_bias, L.attn.q_a_bias); !s) return s;
    if (Status s = upload_f32(D.q_a_norm, L.attn.q_a_norm); !s) return s;
  }
  const int64_t row = a.cache_row();
  const kernels::WeightView& kv_a = L.attn.kv_a;
  if (auto fp8 = rotary_rows_fp8(kv_a, row, a.kv_lora_rank, rope, il, scale, 0, kv_a.rows)) {
    if (Status s = upload_dense_fp8(D.kv_a, *fp8); !s) return s;
  } else if (Status s = upload_dense_bf16(
                 D.kv_a, rotary_rows_bf16(kv_a, row, a.kv_lora_rank, rope, il, scale), kv_a.rows,
                 kv_a.cols);
             !s) {
    return s;
  }
  if (Status s = upload_f32(D.kv_a_bias,
                            rotary_vector(L.attn.kv_a_bias, row, a.kv_lora_rank, rope, il, scale));
      !s)
    return s;
  if (Status s = upload_f32(D.kv_a_norm, L.attn.kv_a_norm); !s) return s;
  if (!mla_identity.data()) {
    // The rope x rope identity that copies the rotary key into every head (mla_expanded).
    std::vector<uint16_t> eye(static_cast<std::size_t>(rope * rope), 0);
    for (int64_t i = 0; i < rope; ++i) eye[static_cast<std::size_t>(i * rope + i)] = 0x3F80;  // 1
    if (Status s = upload_bf16(mla_identity, eye); !s) return s;
  }
  return upload_matrix(D.kv_b, L.attn.kv_b, Split::Rows);
}

bool CudaForward::Impl::mla_expands(const Segment& s) const {
  const int64_t min = options.mla_expanded_min_tokens;
  if (min <= 0 || s.n < min) return false;
  const MlaConfig& a = *c.mla;
  const int64_t hd = std::max(a.qk_head_dim(), a.v_head_dim);
  const int64_t len = s.past + s.n;
  // The main attention kernel's head widths; keys and values (f32 and bf16) within 1 GiB.
  return hd % 2 == 0 && hd <= 256 && len * c.num_heads * hd * 12 <= (int64_t{1} << 30);
}

Status CudaForward::Impl::mla_expanded(int64_t l, const Segment& s, const Step& step,
                                       const cu::PagedKv& cache) {
  const Layer& D = layers[l];
  const auto [heads, nope, rope, qk, lora, vd, row] = dims_of(c);
  const int64_t hd = std::max(qk, vd);
  const int64_t len = s.past + s.n;
  const int64_t bs = options.block_size;
  const std::size_t f = sizeof(float);
  const auto kv_elems = static_cast<std::size_t>(len * heads * hd);
  for (auto [buf, bytes] : {std::pair{&mla_slots, static_cast<std::size_t>(len) * 4},
                            {&mla_rows, static_cast<std::size_t>(len * row) * 2},
                            {&mla_k, kv_elems * f},
                            {&mla_v, kv_elems * f},
                            {&mla_k16, kv_elems * 2},
                            {&mla_v16, kv_elems * 2},
                            {&mla_q, static_cast<std::size_t>(s.n * heads * hd) * f},
                            {&mla_out, static_cast<std::size_t>(s.n * heads * hd) * f},
                            {&mla_zeros, static_cast<std::size_t>(s.n) * 4}})
    if (Status st = ensure(*buf, bytes); !st) return st;

  // The sequence's cached rows, positions 0 .. len - 1 in order, as bf16: [len, row].
  mla_slots_host.resize(static_cast<std::size_t>(len));
  for (int64_t j = 0; j < len; ++j)
    mla_slots_host[static_cast<std::size_t>(j)] =
        static_cast<int32_t>(s.blocks[j / bs] * bs + j % bs);
  cu::copy(mla_slots.data(), mla_slots_host.data(), static_cast<std::size_t>(len) * 4, stream);
  uint16_t* cached = mla_rows.as<uint16_t>();
  cu::paged_kv_read_bf16(cache, false, mla_slots.as<int32_t>(), len, cached, stream);

  // Keys [len, heads, hd]: k_nope = W_uk[h] c, then k_pe (the same for every head, copied by an
  // identity product); values [len, heads, hd]: W_uv[h] c. Zero past qk and vd.
  if (hd > qk) cu::fill_bytes(mla_k.data(), 0, kv_elems * f, stream);
  if (hd > vd) cu::fill_bytes(mla_v.data(), 0, kv_elems * f, stream);
  cu::Blas::StridedBatch b;
  b.x = cached;
  b.ldx = row;
  b.x_stride = 0;
  b.w = D.kv_b.as<uint16_t>();
  b.ldw = lora;
  b.w_stride = (nope + vd) * lora;
  b.y = mla_k.as<float>();
  b.ldy = heads * hd;
  b.y_stride = hd;
  if (Status st = from(blas->gemm_strided_batched(b, len, nope, lora, heads)); !st) return st;
  cu::Blas::StridedBatch pe = b;
  pe.x = cached + lora;
  pe.w = mla_identity.as<uint16_t>();
  pe.ldw = rope;
  pe.w_stride = 0;
  pe.y = mla_k.as<float>() + nope;
  if (Status st = from(blas->gemm_strided_batched(pe, len, rope, rope, heads)); !st) return st;
  cu::Blas::StridedBatch val = b;
  val.w = D.kv_b.as<uint16_t>() + nope * lora;
  val.y = mla_v.as<float>();
  if (Status st = from(blas->gemm_strided_batched(val, len, vd, lora, heads)); !st) return st;
  cu::f32_to_bf16(mla_k.as<float>(), static_cast<int64_t>(kv_elems), mla_k16.as<uint16_t>(),
                  stream);
  cu::f32_to_bf16(mla_v.as<float>(), static_cast<int64_t>(kv_elems), mla_v16.as<uint16_t>(),
                  stream);

  // The chunk's queries [n, heads, hd] (rotated already; zero past qk).
  const float* qs = q.as<float>() + s.begin * heads * qk;
  if (hd > qk) {
    cu::fill_bytes(mla_q.data(), 0, static_cast<std::size_t>(s.n * heads * hd) * f, stream);
    cu::copy_rows(mla_q.data(), hd * f, qs, qk * f, qk * f, s.n * heads, stream);
    qs = mla_q.as<float>();
  }

  // Attention over the expanded keys, as one block of len positions; the chunk's output rows.
  cu::PagedKv ex;
  ex.k = mla_k16.as<uint16_t>();
  ex.v = mla_v16.as<uint16_t>();
  ex.block_size = len;
  ex.n_kv_heads = heads;
  ex.head_dim = hd;
  cu::fill_bytes(mla_zeros.data(), 0, static_cast<std::size_t>(s.n) * 4, stream);
  cu::AttentionBatch batch;
  batch.seq = mla_zeros.as<int32_t>();  // every query of sequence 0 ...
  batch.pos = step.pos + s.begin;
  batch.block_tables = mla_zeros.as<int32_t>();  // ... whose one block is block 0
  batch.max_blocks = 1;
  batch.max_pos = len - 1;
  cu::paged_attention(qs, s.n, ex, batch, heads, options.mla_softmax_scale, 0, mla_out.as<float>(),
                      stream);
  cu::copy_rows(attn.as<float>() + s.begin * heads * vd, vd * f, mla_out.as<float>(), hd * f,
                vd * f, s.n * heads, stream);
  return {};
}

Status CudaForward::Impl::mla_attention(int64_t l, int64_t n, const Step& step, float* out) {
  const Layer& D = layers[l];
  const MlaConfig& a = *c.mla;
  const auto [heads, nope, rope, qk, lora, vd, row] = dims_of(c);
  const std::size_t f = sizeof(float);
  const uint16_t* xin = xn.as<uint16_t>();

  // Queries [n, heads, qk].
  float* qs = q.as<float>();
  if (a.q_lora_rank == 0) {
    if (Status s = linear(D.q, xin, qs, n); !s) return s;
  } else {
    float* qa = mla_qa.as<float>();
    if (Status s = linear(D.q_a, xin, qa, n); !s) return s;
    if (D.q_a_bias.data()) cu::add_bias(qa, D.q_a_bias.as<float>(), n, a.q_lora_rank, stream);
    cu::rmsnorm(qa, nullptr, D.q_a_norm.as<float>(), n, a.q_lora_rank, kLatentNormEps, nullptr,
                mla_qa_bf16.as<uint16_t>(), stream);
    if (Status s = linear(D.q_b, mla_qa_bf16.as<uint16_t>(), qs, n); !s) return s;
  }
  // The new tokens' cache rows [n, row]: the latent, normalised, then the rotary key.
  float* ckv = mla_ckv.as<float>();
  float* latent = mla_latent.as<float>();
  if (Status s = linear(D.kv_a, xin, ckv, n); !s) return s;
  if (D.kv_a_bias.data()) cu::add_bias(ckv, D.kv_a_bias.as<float>(), n, row, stream);
  cu::copy_rows(latent, lora * f, ckv, row * f, lora * f, n, stream);
  cu::rmsnorm(latent, nullptr, D.kv_a_norm.as<float>(), n, lora, kLatentNormEps, latent, nullptr,
              stream);
  cu::copy_rows(ckv, row * f, latent, lora * f, lora * f, n, stream);
  cu::rope(qs + nope, n, heads * qk, heads, qk, rope, step.pos, inv_freq.as<float>(), stream);
  cu::rope(ckv + lora, n, row, 1, row, rope, step.pos, inv_freq.as<float>(), stream);

  // Cache the rows: one kv head whose rows are keys and values.
  const cu::PagedKv cache = layer_cache(l);
  cu::paged_kv_write(ckv, ckv, n, step.slot, cache, stream);

  // The absorbed form for the tokens [begin, end) into their rows of attn [n, heads * vd].
  float* q_abs = mla_q_abs.as<float>();
  float* lat = mla_lat.as<float>();
  uint16_t* tmp = mla_bf16.as<uint16_t>();
  auto absorbed = [&](int64_t begin, int64_t end) -> Status {
    const int64_t m = end - begin;
    // Queries [m, heads, row]: W_uk[h]^T q_nope (kv_b's rows h * (nope + vd) .. + nope, read as
    // [k = nope, n = kv_lora_rank]), then q_pe.
    cu::f32_to_bf16(qs + begin * heads * qk, m * heads * qk, tmp, stream);
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
    if (Status s = from(blas->gemm_strided_batched(uk, m, lora, nope, heads)); !s) return s;
    cu::copy_rows(q_abs + lora, row * f, qs + begin * heads * qk + nope, qk * f, rope * f,
                  m * heads, stream);
    cu::AttentionBatch part = step.batch;
    part.seq += begin;
    part.pos += begin;
    cu::paged_attention(q_abs, m, cache, part, heads, options.mla_softmax_scale, 0, lat, stream);
    // Values [m, heads, vd]: W_uv[h] (kv_b's next vd rows, [vd, lora]) times the first
    // kv_lora_rank features of head h's output.
    cu::f32_to_bf16(lat, m * heads * row, tmp, stream);
    cu::Blas::StridedBatch uv;
    uv.x = tmp;
    uv.ldx = heads * row;
    uv.x_stride = row;
    uv.w = D.kv_b.as<uint16_t>() + nope * lora;
    uv.ldw = lora;
    uv.w_stride = (nope + vd) * lora;
    uv.y = attn.as<float>() + begin * heads * vd;
    uv.ldy = heads * vd;
    uv.y_stride = vd;
    return from(blas->gemm_strided_batched(uv, m, vd, lora, heads));
  };
  // Expanded chunks on their own; runs of consecutive absorbed ones together (every token at once
  // when nothing expands, as in decode).
  const std::span<const Segment> segs = step.segments;
  for (std::size_t i = 0; i < segs.size();) {
    if (mla_expands(segs[i])) {
      if (Status s = mla_expanded(l, segs[i], step, cache); !s) return s;
      ++i;
      continue;
    }
    const int64_t begin = segs[i].begin;
    int64_t end = begin + segs[i].n;
    for (++i; i < segs.size() && !mla_expands(segs[i]) && segs[i].begin == end; ++i)
      end += segs[i].n;
    if (Status s = absorbed(begin, end); !s) return s;
  }
  // Then o.
  cu::f32_to_bf16(attn.as<float>(), n * heads * vd, attn_bf16.as<uint16_t>(), stream);
  return linear(D.o, attn_bf16.as<uint16_t>(), out, n);
}

}  // namespace moemesh::detail
