// Multi-head latent attention (deepseek_v2, deepseek_v3) on the CPU, and the rotary tables of every
// family (with YaRN scaling where the config asks for it).
//
// The KV cache holds, per token and layer, one row: the normalised latent c (kv_lora_rank values)
// and the rotated rotary key k_pe (qk_rope_head_dim values), shared by every head. kv_b_proj's
// rows for head h split into W_uk[h] [qk_nope_head_dim, kv_lora_rank] and W_uv[h] [v_head_dim,
// kv_lora_rank]; head h's key is [W_uk[h] c ; k_pe] and its value W_uv[h] c. The attention
// absorbs both products instead of expanding any cached token:
//   q_h . k_h          = (W_uk[h]^T q_nope_h) . c + q_pe_h . k_pe
//   sum_s p_s v_h(s)   = W_uv[h] (sum_s p_s c_s)
// so it runs as multi-query attention with one kv head, [c ; k_pe] as keys and as values, against
// queries [W_uk[h]^T q_nope_h ; q_pe_h]; the first kv_lora_rank features of each head's output
// are then multiplied by W_uv[h]. Only float32 sums, in an order that does not depend on the other
// tokens of the call.
#include <algorithm>
#include <cmath>
#include <numbers>
#include <vector>

#include "core/detail/model_impl.h"

namespace moemesh {
namespace {

// The epsilon of q_a_layernorm and kv_a_layernorm: transformers builds them with the RMSNorm
// default, not config.rms_norm_eps.
constexpr float kLatentNormEps = 1e-6f;

// transformers' YaRN mscale: 0.1 * mscale * ln(scale) + 1 for scale > 1, else 1.
double yarn_mscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

// _compute_yarn_parameters' inverse frequencies over `dim` rotary features, in float32 as torch
// computes them.
void yarn_inv_freq(const YarnRope& y, double theta, int64_t dim, float* inv_freq) {
  const auto find_dim = [&](double rotations) {
    return (static_cast<double>(dim) *
            std::log(static_cast<double>(y.original_max_position_embeddings) /
                     (rotations * 2 * std::numbers::pi))) /
           (2 * std::log(theta));
  };
  double low = find_dim(y.beta_fast);
  double high = find_dim(y.beta_slow);
  if (y.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // transformers' guard against a zero-width ramp
  const auto flow = static_cast<float>(low);
  const auto span = static_cast<float>(high - low);
  const auto factor = static_cast<float>(y.factor);
  for (int64_t i = 0; i < dim / 2; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(dim);
    const auto pos_freq = static_cast<float>(std::pow(theta, static_cast<double>(exponent)));
    const float extrapolation = 1.0f / pos_freq;
    const float interpolation = 1.0f / (factor * pos_freq);
    const float ramp = std::clamp((static_cast<float>(i) - flow) / span, 0.0f, 1.0f);
    const float extrapolation_factor = 1.0f - ramp;
    inv_freq[i] =
        interpolation * (1.0f - extrapolation_factor) + extrapolation * extrapolation_factor;
  }
}

// Reorders, in place, the `dim` features at x (pairs (2i, 2i + 1)) into halves (evens, then
// odds): rotating the halves afterwards is transformers' interleaved rotation, in the layout its
// outputs take (deepseek_v3) or a permutation of it that leaves every dot product unchanged
// (deepseek_v2, whose complex rotation keeps the pairs).
void deinterleave(float* x, int64_t dim, std::vector<float>& tmp) {
  const int64_t half = dim / 2;
  tmp.resize(static_cast<std::size_t>(dim));
  for (int64_t i = 0; i < half; ++i) {
    tmp[i] = x[2 * i];
    tmp[half + i] = x[2 * i + 1];
  }
  std::copy(tmp.begin(), tmp.end(), x);
}

}  // namespace

void Model::Impl::init_rope() {
  const ModelConfig& c = config;
  // rotary_dim is the rotary width: head_dim (qk_rope_head_dim with MLA), or less with a partial
  // rotary factor.
  inv_freq.assign(static_cast<std::size_t>(c.rotary_dim / 2), 0.0f);
  if (c.yarn) {
    yarn_inv_freq(*c.yarn, c.rope_theta, c.rotary_dim, inv_freq.data());
    rope_scale = static_cast<float>(c.yarn->attention_factor);
  } else {
    kernels::rope_inv_freq(c.rope_theta, c.rotary_dim, inv_freq.data());
    rope_scale = 1.0f;
  }
  if (c.mla) {
    double scale = std::pow(static_cast<double>(c.mla->qk_head_dim()), -0.5);
    if (c.yarn && c.yarn->mscale_all_dim != 0.0) {
      const double m = yarn_mscale(c.yarn->factor, c.yarn->mscale_all_dim);
      scale = scale * m * m;
    }
    mla_softmax_scale = static_cast<float>(scale);
  }
}

void Model::Impl::mla_attention_block(int64_t l, std::span<const Segment> segments, int64_t n,
                                      const float* x_norm, float* out) {
  const ModelConfig& c = config;
  const MlaConfig& m = *c.mla;
  const detail::AttentionWeights& w = weights.layers[l].attn;
  const int64_t heads = c.num_heads;
  const int64_t nope = m.qk_nope_head_dim;
  const int64_t rope_dim = m.qk_rope_head_dim;
  const int64_t qk = m.qk_head_dim();
  const int64_t rank = m.kv_lora_rank;
  const int64_t vd = m.v_head_dim;
  const int64_t row = m.cache_row();      // rank + rope_dim
  const int64_t kv_b_stride = nope + vd;  // kv_b_proj rows per head
  kernels::ThreadPool* p = pool.get();
  auto bias = [](const std::vector<float>& b) { return b.empty() ? nullptr : b.data(); };

  // Queries [n, heads, qk] and the latent rows [n, row] of the new tokens.
  std::vector<float> q(static_cast<std::size_t>(n * heads * qk));
  if (m.q_lora_rank == 0) {
    kernels::linear(x_norm, n, w.q, nullptr, q.data(), p);
  } else {
    std::vector<float> qa(static_cast<std::size_t>(n * m.q_lora_rank));
    kernels::linear(x_norm, n, w.q_a, bias(w.q_a_bias), qa.data(), p);
    kernels::rmsnorm(qa.data(), w.q_a_norm.data(), n, m.q_lora_rank, kLatentNormEps, qa.data());
    kernels::linear(qa.data(), n, w.q_b, nullptr, q.data(), p);
  }
  std::vector<float> ckv(static_cast<std::size_t>(n * row));
  kernels::linear(x_norm, n, w.kv_a, bias(w.kv_a_bias), ckv.data(), p);
  for (int64_t t = 0; t < n; ++t)
    kernels::rmsnorm(ckv.data() + t * row, w.kv_a_norm.data(), 1, rank, kLatentNormEps,
                     ckv.data() + t * row);

  // Rotary features: q's last rope_dim of each head, the latent row's last rope_dim.
  std::vector<int32_t> positions(static_cast<std::size_t>(n));
  for (const Segment& seg : segments)
    for (int64_t t = 0; t < seg.n; ++t)
      positions[seg.begin + t] = static_cast<int32_t>(seg.cache->length_ + t);
  if (m.rope_interleave) {
    std::vector<float> tmp;
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t h = 0; h < heads; ++h)
        deinterleave(&q[(t * heads + h) * qk + nope], rope_dim, tmp);
      deinterleave(&ckv[t * row + rank], rope_dim, tmp);
    }
  }
  kernels::rope(q.data() + nope, n, heads * qk, heads, qk, rope_dim, positions.data(),
                inv_freq.data());
  kernels::rope(ckv.data() + rank, n, row, 1, row, rope_dim, positions.data(), inv_freq.data());
  if (rope_scale != 1.0f) {
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < rope_dim; ++i) q[(t * heads + h) * qk + nope + i] *= rope_scale;
      for (int64_t i = 0; i < rope_dim; ++i) ckv[t * row + rank + i] *= rope_scale;
    }
  }

  // Absorbed queries [n, heads, row]: W_uk[h]^T q_nope_h, then q_pe_h.
  std::vector<float> qa(static_cast<std::size_t>(n * heads * row), 0.0f);
  kernels::parallel_for(p, heads, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> wrow(static_cast<std::size_t>(rank));
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t i = 0; i < nope; ++i) {
        kernels::to_f32(w.kv_b.row(h * kv_b_stride + i), w.kv_b.dtype, rank, wrow.data());
        for (int64_t t = 0; t < n; ++t) {
          const float qi = q[(t * heads + h) * qk + i];
          float* dst = &qa[(t * heads + h) * row];
          for (int64_t r = 0; r < rank; ++r) dst[r] += qi * wrow[r];
        }
      }
      for (int64_t t = 0; t < n; ++t)
        std::copy_n(&q[(t * heads + h) * qk + nope], rope_dim, &qa[(t * heads + h) * row + rank]);
    }
  });

  // Cache the new rows and attend: one kv head, keys and values both the cached rows.
  std::vector<float> lat(static_cast<std::size_t>(n * heads * row));
  const kernels::PagedKv view = kv->layer_view(l);
  for (const Segment& seg : segments) {
    const KVCache& cache = *seg.cache;
    const int32_t* table = cache.blocks_.data();
    const float* rows = ckv.data() + seg.begin * row;
    kernels::paged_kv_write(rows, rows, seg.n, table, cache.length_, view);
    kernels::paged_attention(qa.data() + seg.begin * heads * row, seg.n, view, table, cache.length_,
                             heads, mla_softmax_scale, 0, lat.data() + seg.begin * heads * row, p);
  }

  // Values: head h's output is W_uv[h] times the first `rank` features of its attention output.
  std::vector<float> attn(static_cast<std::size_t>(n * heads * vd));
  kernels::parallel_for(p, heads, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> x(static_cast<std::size_t>(n * rank));
    std::vector<float> y(static_cast<std::size_t>(n * vd));
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t t = 0; t < n; ++t) std::copy_n(&lat[(t * heads + h) * row], rank, &x[t * rank]);
      kernels::WeightView uv = w.kv_b;
      uv.data = w.kv_b.row(h * kv_b_stride + nope);
      uv.rows = vd;
      kernels::linear(x.data(), n, uv, nullptr, y.data(), nullptr);
      for (int64_t t = 0; t < n; ++t) std::copy_n(&y[t * vd], vd, &attn[(t * heads + h) * vd]);
    }
  });
  kernels::linear(attn.data(), n, w.o, bias(w.o_bias), out, p);
}

}  // namespace moemesh
