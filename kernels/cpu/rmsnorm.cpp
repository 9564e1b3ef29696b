#include <cmath>

#include "kernels/cpu/cpu_kernels.h"

namespace moemesh::kernels {

void rmsnorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* y) {
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    float acc[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= dim; i += 4) {
      for (int j = 0; j < 4; ++j) acc[j] += xr[i + j] * xr[i + j];
    }
    float ss = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    for (; i < dim; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * inv);
  }
}

}  // namespace moemesh::kernels
