// kernels::linear for AVX2 + FMA + F16C. Only the functions below carry the target attribute, so
// nothing else of this translation unit (nor an inline function of a header that another
// translation unit also instantiates) is compiled for AVX2.
#include <immintrin.h>

#include <cstdint>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/detail/linear_isa.h"

#define MOEMESH_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace moemesh::kernels::detail {
namespace {

constexpr int kLanes = 8;
// Independent accumulators per token; 4 tokens x 2 accumulators leave half of the 16 ymm
// registers for weights and activations.
constexpr int kAcc = 2;
constexpr int kStep = kLanes * kAcc;
// Tokens that share each loaded weight vector.
constexpr int kMaxGroup = 4;

// Widens eight 16-bit weights exactly to float32 (bf16: the bits are the high half of a float32;
// f16: the F16C conversion, exact for every f16 value).
template <DType D>
MOEMESH_AVX2 inline __m256 widen(__m128i h) {
  if constexpr (D == DType::BF16)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  else
    return _mm256_cvtph_ps(h);
}

// Eight weights from element i of a row, as float32.
template <DType D>
MOEMESH_AVX2 inline __m256 load_w(const void* row, int64_t i) {
  if constexpr (D == DType::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(row) + i);
  } else {
    return widen<D>(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + i)));
  }
}

// As load_w for the first `n` (< 8) elements, zero in the other lanes, reading nothing past them.
template <DType D>
MOEMESH_AVX2 inline __m256 load_w_partial(const void* row, int64_t i, int64_t n, __m256i mask) {
  if constexpr (D == DType::F32) {
    return _mm256_maskload_ps(static_cast<const float*>(row) + i, mask);
  } else {
    // AVX2 has no masked 16-bit load: the few tail elements go through a zeroed buffer.
    alignas(16) uint16_t buf[kLanes] = {};
    const uint16_t* src = static_cast<const uint16_t*>(row) + i;
    for (int64_t k = 0; k < n; ++k) buf[k] = src[k];
    return widen<D>(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
}

// y[t * rows] = dot(x[t * cols ...], row) + bias for NT tokens. The order of the sum depends on
// cols only: element c goes to lane c % 8 of accumulator (c / 8) % 2 of its token, then the two
// accumulators are added and reduced by one fixed tree. So a token gets the same bits whatever
// NT is.
template <DType D, int NT>
MOEMESH_AVX2 void dot_group(const float* x, int64_t cols, const void* row, float bias, float* y,
                            int64_t rows) {
  __m256 acc[NT][kAcc];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 2
    for (int a = 0; a < kAcc; ++a) acc[t][a] = _mm256_setzero_ps();

  int64_t i = 0;
  for (; i + kStep <= cols; i += kStep) {
#pragma GCC unroll 2
    for (int a = 0; a < kAcc; ++a) {
      const __m256 w = load_w<D>(row, i + a * kLanes);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t)
        acc[t][a] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * cols + i + a * kLanes), w, acc[t][a]);
    }
  }
  // The last partial block (under 16 elements): a full vector, if any, then a partial one whose
  // activations are loaded under a mask and whose weights are zero-padded, so that nothing past
  // the row is read. Constant accumulator indices (the loop is unrolled) keep the accumulators in
  // registers.
#pragma GCC unroll 2
  for (int a = 0; a < kAcc; ++a) {
    const int64_t left = cols - i;
    if (left <= 0) break;
    if (left >= kLanes) {
      const __m256 w = load_w<D>(row, i);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t)
        acc[t][a] = _mm256_fmadd_ps(_mm256_loadu_ps(x + t * cols + i), w, acc[t][a]);
    } else {
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      const __m256 w = load_w_partial<D>(row, i, left, mask);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t)
        acc[t][a] = _mm256_fmadd_ps(_mm256_maskload_ps(x + t * cols + i, mask), w, acc[t][a]);
    }
    i += kLanes;
  }
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) {
    const __m256 s = _mm256_add_ps(acc[t][0], acc[t][1]);
    // 8 -> 4 -> 2 -> 1 lanes, always the same halves added.
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
    y[t * rows] = _mm_cvtss_f32(s1) + bias;
  }
}

template <DType D>
MOEMESH_AVX2 void rows_impl(const float* x, int64_t n_tokens, const WeightView& w,
                            const float* bias, float* y, int64_t row_begin, int64_t row_end) {
  const int64_t rows = w.rows, cols = w.cols;
  const int64_t row_bytes = cols * (D == DType::F32 ? 4 : 2);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const void* row = static_cast<const char*>(w.data) + r * row_bytes;
    const float b = bias ? bias[r] : 0.0f;
    // The row is read from memory by the first group and from cache by the others.
    int64_t t = 0;
    for (; t + kMaxGroup <= n_tokens; t += kMaxGroup)
      dot_group<D, kMaxGroup>(x + t * cols, cols, row, b, y + t * rows + r, rows);
    switch (n_tokens - t) {
      case 3:
        dot_group<D, 3>(x + t * cols, cols, row, b, y + t * rows + r, rows);
        break;
      case 2:
        dot_group<D, 2>(x + t * cols, cols, row, b, y + t * rows + r, rows);
        break;
      case 1:
        dot_group<D, 1>(x + t * cols, cols, row, b, y + t * rows + r, rows);
        break;
      default:
        break;
    }
  }
}

}  // namespace

void linear_rows_avx2(const float* x, int64_t n_tokens, const WeightView& w, const float* bias,
                      float* y, int64_t row_begin, int64_t row_end) {
  switch (w.dtype) {
    case DType::F32:
      rows_impl<DType::F32>(x, n_tokens, w, bias, y, row_begin, row_end);
      break;
    case DType::BF16:
      rows_impl<DType::BF16>(x, n_tokens, w, bias, y, row_begin, row_end);
      break;
    case DType::F16:
      rows_impl<DType::F16>(x, n_tokens, w, bias, y, row_begin, row_end);
      break;
  }
}

}  // namespace moemesh::kernels::detail
