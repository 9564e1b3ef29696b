#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/detail/dot.h"

namespace moemesh::kernels {

void attention(const float* q, int64_t n_q, const float* k, const float* v, int64_t past,
               int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale, int64_t window,
               float* out, ThreadPool* pool) {
  const int64_t group = n_heads / n_kv_heads;
  const int64_t q_stride = n_heads * head_dim;
  const int64_t kv_stride = n_kv_heads * head_dim;
  // One task per (query token, head): work is linear in the cache length for each new token.
  parallel_for(pool, n_q * n_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / n_heads;
      const int64_t h = task % n_heads;
      const int64_t kvh = h / group;
      const int64_t pos = past + t;
      const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      const int64_t len = pos - first + 1;
      const float* qv = q + t * q_stride + h * head_dim;
      scores.resize(static_cast<std::size_t>(len));
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < len; ++j) {
        const float s =
            detail::dot(qv, k + (first + j) * kv_stride + kvh * head_dim, head_dim) * scale;
        scores[j] = s;
        max_score = std::max(max_score, s);
      }
      float sum = 0;
      for (int64_t j = 0; j < len; ++j) {
        scores[j] = std::exp(scores[j] - max_score);
        sum += scores[j];
      }
      const float inv = 1.0f / sum;
      float* o = out + t * q_stride + h * head_dim;
      std::fill(o, o + head_dim, 0.0f);
      for (int64_t j = 0; j < len; ++j) {
        const float p = scores[j] * inv;
        const float* vv = v + (first + j) * kv_stride + kvh * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) o[d] += p * vv[d];
      }
    }
  });
}

}  // namespace moemesh::kernels
