// FP8 E4M3 weights with 128x128 block scales: the decoding table, dequantization of any weight
// matrix to float32, and block quantization (kernels/cpu/cpu_kernels.h).
#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"

namespace moemesh::kernels {

const float* fp8_e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) t[c] = fp8_e4m3_to_f32(static_cast<uint8_t>(c));
    return t;
  }();
  return table.data();
}

void dequantize_rows(const WeightView& w, int64_t row_begin, int64_t row_end, float* out) {
  const int64_t cols = w.cols;
  for (int64_t r = row_begin; r < row_end; ++r) {
    float* o = out + (r - row_begin) * cols;
    if (w.dtype == DType::F8E4M3) {
      const auto* codes = static_cast<const uint8_t*>(w.row(r));
      const float* table = fp8_e4m3_table();
      const float* s = w.scale + (r / kFp8Block) * fp8_blocks(cols);
      for (int64_t c = 0; c < cols; ++c) o[c] = table[codes[c]] * s[c / kFp8Block];
      continue;
    }
    to_f32(w.row(r), w.dtype, cols, o);
    if (w.dtype == DType::I8) {
      const float s = w.scale[r];
      for (int64_t c = 0; c < cols; ++c) o[c] *= s;
    }
  }
}

void quantize_fp8_e4m3(const WeightView& w, uint8_t* codes, float* scale, ThreadPool* pool) {
  const int64_t rows = w.rows, cols = w.cols;
  const int64_t col_blocks = fp8_blocks(cols);
  parallel_for(pool, fp8_blocks(rows), 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> block;
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int64_t r0 = rb * kFp8Block, r1 = std::min(rows, r0 + kFp8Block);
      block.resize(static_cast<std::size_t>((r1 - r0) * cols));
      dequantize_rows(w, r0, r1, block.data());
      for (int64_t cb = 0; cb < col_blocks; ++cb) {
        const int64_t c0 = cb * kFp8Block, c1 = std::min(cols, c0 + kFp8Block);
        float amax = 0.0f;
        for (int64_t r = 0; r < r1 - r0; ++r)
          for (int64_t c = c0; c < c1; ++c) {
            const float a = std::fabs(block[r * cols + c]);
            if (std::isfinite(a)) amax = std::max(amax, a);
          }
        float s = amax / 448.0f;
        if (!(s > 0.0f)) s = 1.0f;  // an all-zero block (or one too small to scale)
        scale[rb * col_blocks + cb] = s;
        for (int64_t r = 0; r < r1 - r0; ++r)
          for (int64_t c = c0; c < c1; ++c) {
            const float v = block[r * cols + c];
            codes[(r0 + r) * cols + c] = std::isnan(v) ? uint8_t{0} : f32_to_fp8_e4m3(v / s);
          }
      }
    }
  });
}

}  // namespace moemesh::kernels
