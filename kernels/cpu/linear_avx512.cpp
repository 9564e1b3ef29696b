// kernels::linear for AVX-512 (F, BW, VL, DQ). Only the functions below carry the target
// attribute, so nothing else of this translation unit (nor an inline function of a header that
// another translation unit also instantiates) is compiled for AVX-512.
#include <immintrin.h>

#include <cstdint>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/detail/linear_isa.h"

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which -Wuninitialized mistakes
// for a read of an uninitialised variable wherever they are inlined.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define MOEMESH_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

namespace moemesh::kernels::detail {
namespace {

constexpr int kLanes = 16;
// Independent accumulators per token: enough to hide the FMA latency when the weights are in
// cache; 4 tokens x 4 accumulators still fit the 32 zmm registers.
constexpr int kAcc = 4;
constexpr int kStep = kLanes * kAcc;
// Tokens that share each loaded weight vector.
constexpr int kMaxGroup = 4;

// bf16 -> float32: word k of h becomes the high half of lane k, the low half zero. One vpermw
// with a zeroing mask instead of a zero-extension and a shift: half the uops on the shuffle port.
MOEMESH_AVX512 inline __m512 widen_bf16(__m256i h) {
  const __m512i idx = _mm512_set_epi16(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8,
                                       7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  return _mm512_castsi512_ps(
      _mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, idx, _mm512_castsi256_si512(h)));
}

// Sixteen weights from element i of a row, widened exactly to float32 (bf16: the bits are the high
// half of a float32; f16: the hardware conversion, exact for every f16 value).
template <DType D>
MOEMESH_AVX512 inline __m512 load_w(const void* row, int64_t i) {
  if constexpr (D == DType::F32) {
    return _mm512_loadu_ps(static_cast<const float*>(row) + i);
  } else {
    const __m256i h =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + i));
    if constexpr (D == DType::BF16)
      return widen_bf16(h);
    else
      return _mm512_cvtph_ps(h);
  }
}

// As load_w for the lanes of `m`, zero elsewhere; masked-off elements are not read.
template <DType D>
MOEMESH_AVX512 inline __m512 load_w_masked(const void* row, int64_t i, __mmask16 m) {
  if constexpr (D == DType::F32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(row) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(row) + i);
    if constexpr (D == DType::BF16)
      return widen_bf16(h);
    else
      return _mm512_cvtph_ps(h);
  }
}

// y[t * rows] = dot(x[t * cols ...], row) + bias for NT tokens. The order of the sum depends on
// cols only: element c goes to lane c % 16 of accumulator (c / 16) % 4 of its token, then the
// accumulators are added pairwise and reduced by one fixed tree. So a token gets the same bits
// whatever NT is.
template <DType D, int NT>
MOEMESH_AVX512 void dot_group(const float* x, int64_t cols, const void* row, float bias, float* y,
                              int64_t rows) {
  __m512 acc[NT][kAcc];
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int a = 0; a < kAcc; ++a) acc[t][a] = _mm512_setzero_ps();

  int64_t i = 0;
  for (; i + kStep <= cols; i += kStep) {
#pragma GCC unroll 4
    for (int a = 0; a < kAcc; ++a) {
      const __m512 w = load_w<D>(row, i + a * kLanes);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t)
        acc[t][a] = _mm512_fmadd_ps(_mm512_loadu_ps(x + t * cols + i + a * kLanes), w, acc[t][a]);
    }
  }
  // The last partial block (under 64 elements): up to four vectors, the last one partial, each
  // masked so that nothing past the row is read. Constant accumulator indices (the loop is
  // unrolled) keep the accumulators in registers.
#pragma GCC unroll 4
  for (int a = 0; a < kAcc; ++a) {
    const int64_t left = cols - i;
    if (left <= 0) break;
    const __mmask16 m =
        left >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
    const __m512 w = load_w_masked<D>(row, i, m);
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t)
      acc[t][a] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + t * cols + i), w, acc[t][a]);
    i += kLanes;
  }
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) {
    const __m512 s =
        _mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3]));
    // 16 -> 8 -> 4 -> 2 -> 1 lanes, always the same halves added.
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
    y[t * rows] = _mm_cvtss_f32(s1) + bias;
  }
}

template <DType D>
MOEMESH_AVX512 void rows_impl(const float* x, int64_t n_tokens, const WeightView& w,
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

void linear_rows_avx512(const float* x, int64_t n_tokens, const WeightView& w, const float* bias,
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
