#include "kernels/cpu/cpu_kernels.h"

namespace moemesh::kernels {

void embedding(const WeightView& w, const int32_t* ids, int64_t n_tokens, float* out) {
  for (int64_t t = 0; t < n_tokens; ++t) dequantize_rows(w, ids[t], ids[t] + 1, out + t * w.cols);
}

}  // namespace moemesh::kernels
