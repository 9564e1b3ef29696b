#include "kernels/cpu/cpu_kernels.h"

namespace moemesh::kernels {

void swiglu_ffn(const float* x, int64_t n_tokens, const FfnWeights& w, float* scratch, float* out,
                ThreadPool* pool) {
  const int64_t inter = w.gate.rows;
  float* gate = scratch;
  float* up = scratch + n_tokens * inter;
  linear(x, n_tokens, w.gate, nullptr, gate, pool);
  linear(x, n_tokens, w.up, nullptr, up, pool);
  swiglu(gate, up, n_tokens * inter, gate);
  linear(gate, n_tokens, w.down, nullptr, out, pool);
}

}  // namespace moemesh::kernels
