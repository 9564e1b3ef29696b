#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/detail/dot.h"

namespace moemesh::kernels {

void linear(const float* x, int64_t n_tokens, const WeightView& w, const float* bias, float* y,
            ThreadPool* pool) {
  const int64_t rows = w.rows;
  const int64_t cols = w.cols;
  // Each row of w is read once and used for every token; rows of a half-precision matrix are
  // widened into a per-thread buffer first.
  parallel_for(pool, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> widened(w.dtype == DType::F32 ? 0 : static_cast<std::size_t>(cols));
    for (int64_t r = begin; r < end; ++r) {
      const float* wr;
      if (w.dtype == DType::F32) {
        wr = static_cast<const float*>(w.row(r));
      } else {
        to_f32(w.row(r), w.dtype, cols, widened.data());
        wr = widened.data();
      }
      const float b = bias ? bias[r] : 0.0f;
      for (int64_t t = 0; t < n_tokens; ++t)
        y[t * rows + r] = detail::dot(x + t * cols, wr, cols) + b;
    }
  });
}

}  // namespace moemesh::kernels
