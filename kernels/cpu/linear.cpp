#include <algorithm>
#include <new>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/detail/dot.h"
#include "kernels/cpu/detail/linear_isa.h"

namespace moemesh::kernels {
namespace {

// The portable kernel: each row of w is read once and used for every token; rows of a
// half-precision, int8 or fp8 matrix are widened into a per-thread buffer first (fp8: decoded
// through the table and multiplied by the block scales); an int8 row's scale multiplies each
// finished dot product.
void linear_rows_baseline(const float* x, int64_t n_tokens, const WeightView& w, const float* bias,
                          float* y, int64_t row_begin, int64_t row_end) {
  const int64_t rows = w.rows;
  const int64_t cols = w.cols;
  std::vector<float> widened(w.dtype == DType::F32 ? 0 : static_cast<std::size_t>(cols));
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* wr;
    if (w.dtype == DType::F32) {
      wr = static_cast<const float*>(w.row(r));
    } else if (w.dtype == DType::F8E4M3) {
      dequantize_rows(w, r, r + 1, widened.data());
      wr = widened.data();
    } else {
      to_f32(w.row(r), w.dtype, cols, widened.data());
      wr = widened.data();
    }
    const float b = bias ? bias[r] : 0.0f;
    if (w.dtype == DType::I8) {
      const float s = w.scale[r];
      for (int64_t t = 0; t < n_tokens; ++t)
        y[t * rows + r] = detail::dot(x + t * cols, wr, cols) * s + b;
    } else {
      for (int64_t t = 0; t < n_tokens; ++t)
        y[t * rows + r] = detail::dot(x + t * cols, wr, cols) + b;
    }
  }
}

}  // namespace

void PackedWeights::Free::operator()(uint32_t* p) const {
  ::operator delete (p, std::align_val_t{64});
}

PackedWeights pack_amx(const WeightView& w, ThreadPool* pool) {
  constexpr int64_t kPanel = detail::kPackedPanelRows;
  const int64_t panels = (w.rows + kPanel - 1) / kPanel;
  PackedWeights out;
  out.n_words_ = panels * detail::packed_panel_words(w.dtype, w.cols);
  out.words_.reset(static_cast<uint32_t*>(::operator new (
      static_cast<std::size_t>(out.n_words_) * sizeof(uint32_t), std::align_val_t{64})));
  uint32_t* words = out.words_.get();
  parallel_for(pool, panels, 1,
               [&](int64_t begin, int64_t end) { detail::amx_pack_panels(w, begin, end, words); });
  return out;
}

void linear(const float* x, int64_t n_tokens, const WeightView& w, const float* bias, float* y,
            ThreadPool* pool) {
  if (n_tokens <= 0 || w.rows <= 0) return;
  // Read once per call, so that every chunk of one call uses the same kernel.
  const Isa isa = active_isa();
  if (isa >= Isa::Avx512Bf16 && (w.dtype == DType::BF16 || w.dtype == DType::I8 ||
                                 (w.dtype == DType::F8E4M3 && w.packed != nullptr))) {
    // Tokens are prepared once (rounded to bf16, or for int8 weights quantized to int8 with a
    // scale each), then every thread runs panels of rows.
    thread_local std::vector<uint8_t> xq;
    thread_local std::vector<float> token_scale;
    const int64_t padded_tokens = detail::amx_padded_tokens(n_tokens);
    xq.resize(static_cast<std::size_t>(padded_tokens * detail::amx_row_stride(w.dtype, w.cols)));
    token_scale.resize(static_cast<std::size_t>(padded_tokens));
    uint8_t* xq_data = xq.data();
    float* scales = token_scale.data();
    parallel_for(pool, padded_tokens, 16, [&](int64_t begin, int64_t end) {
      detail::amx_prepare_activations(x, n_tokens, w.cols, w.dtype, begin, end, xq_data, scales);
    });
    constexpr int64_t kPanel = detail::kPackedPanelRows;
    parallel_for(pool, (w.rows + kPanel - 1) / kPanel, 1, [&](int64_t begin, int64_t end) {
      if (isa == Isa::Amx)
        detail::linear_rows_amx(xq_data, scales, n_tokens, w, bias, y, begin * kPanel,
                                std::min(end * kPanel, w.rows));
      else
        detail::linear_rows_avx512_bf16(xq_data, scales, n_tokens, w, bias, y, begin * kPanel,
                                        std::min(end * kPanel, w.rows));
    });
    return;
  }
  parallel_for(pool, w.rows, 16, [&](int64_t begin, int64_t end) {
    switch (isa) {
      case Isa::Amx:  // F32, F16, and F8E4M3 weights without a packed copy
      case Isa::Avx512Bf16:
      case Isa::Avx512:
        detail::linear_rows_avx512(x, n_tokens, w, bias, y, begin, end);
        break;
      case Isa::Avx2:
        detail::linear_rows_avx2(x, n_tokens, w, bias, y, begin, end);
        break;
      case Isa::Baseline:
        linear_rows_baseline(x, n_tokens, w, bias, y, begin, end);
        break;
    }
  });
}

}  // namespace moemesh::kernels
