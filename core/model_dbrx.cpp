// DBRX's numerics beside the shared forward pass: LayerNorm without bias on the attention and FFN
// inputs and before the LM head, and router weights divided by their p-norm
// (moe_normalize_expert_weights). Its fused Wqkv and fused experts are bound in weights_dbrx.cpp;
// everything else (GQA attention with clip_qkv, softmax top-k, the expert backend) is shared.
#include <cmath>

#include "core/detail/model_impl.h"

namespace moemesh {

void Model::Impl::norm(const float* x, const float* weight, int64_t n, float* y) const {
  const ModelConfig& c = config;
  const int64_t H = c.hidden_size;
  if (!c.layer_norm) return kernels::rmsnorm(x, weight, n, H, c.rms_norm_eps, y);
  // nn.LayerNorm(bias=False): (x - mean) / sqrt(var + eps) * weight, the biased variance. The
  // sums run in double, so the result is float32-exact up to the final rounding.
  for (int64_t t = 0; t < n; ++t) {
    const float* xr = x + t * H;
    float* yr = y + t * H;
    double sum = 0;
    for (int64_t i = 0; i < H; ++i) sum += xr[i];
    const double mean = sum / static_cast<double>(H);
    double sq = 0;
    for (int64_t i = 0; i < H; ++i) sq += (xr[i] - mean) * (xr[i] - mean);
    const double inv =
        1.0 / std::sqrt(sq / static_cast<double>(H) + static_cast<double>(c.rms_norm_eps));
    for (int64_t i = 0; i < H; ++i) yr[i] = weight[i] * static_cast<float>((xr[i] - mean) * inv);
  }
}

void divide_by_p_norm(float* weights, int64_t n, int64_t k, double p) {
  for (int64_t t = 0; t < n; ++t) {
    float* w = weights + t * k;
    double acc = 0;
    for (int64_t j = 0; j < k; ++j) {
      const double a = std::fabs(static_cast<double>(w[j]));
      acc += p == 1.0 ? a : p == 2.0 ? a * a : std::pow(a, p);
    }
    const double norm = p == 1.0 ? acc : p == 2.0 ? std::sqrt(acc) : std::pow(acc, 1.0 / p);
    const auto d = static_cast<float>(norm);
    for (int64_t j = 0; j < k; ++j) w[j] = w[j] / d;
  }
}

}  // namespace moemesh
