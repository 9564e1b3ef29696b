// kernels::linear for FP8 E4M3 weights with 128x128 block scales, AVX-512 (F, BW, VL, DQ). Only
// the functions below carry the target attribute (see linear_avx512.cpp).
//
// Decoding: a code s.eeee.mmm, sign-extended to 16 bits and shifted left by 7, has the sign in bit
// 15, the exponent in bits 13..10 and the mantissa in bits 9..7; with bit 14 cleared that is the
// f16 of value / 256 (normal and subnormal codes alike), which vcvtph2ps widens exactly. The block
// scale, times 256 (exact), multiplies it back: one rounding, the float32 product code * scale.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/detail/linear_isa.h"

#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define MOEMESH_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

namespace moemesh::kernels::detail {
namespace {

constexpr int kLanes = 16;
// The register tile and the token count from which the packed path is used, as in
// linear_avx512.cpp (the tile also leaves room for the block scales of its rows).
constexpr int kTileT = 4;
constexpr int kTileR = 6;
constexpr int64_t kPackMinTokens = 8;
static_assert(kFp8Block % kLanes == 0);

// Sixteen codes as float32 values / 256.
MOEMESH_AVX512 inline __m512 decode(__m128i codes) {
  const __m256i h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(codes), 7);
  return _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16(static_cast<int16_t>(0xBFFF))));
}

MOEMESH_AVX512 inline __m512 load_codes(const uint8_t* p) {
  return decode(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// As load_codes for the lanes of `m`, zero elsewhere; masked-off codes are not read.
MOEMESH_AVX512 inline __m512 load_codes_masked(const uint8_t* p, __mmask16 m) {
  return decode(_mm_maskz_loadu_epi8(m, p));
}

MOEMESH_AVX512 inline __mmask16 tail_mask(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1u);
}

// The lane tree of linear_avx512.cpp, so that the sums are the F32 kernel's.
MOEMESH_AVX512 inline float reduce(__m512 s) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}

// The chains of MT tokens x kTileR rows over all columns: element c of (token, row) goes into lane
// c % 16 of that pair's accumulator in increasing c (the last, partial vector zero past the end in
// both operands), each weight decoded and scaled first. sp[r] points at row r's block scales.
// Pointers may repeat (a partial tile repeats its last token or row).
template <int MT>
MOEMESH_AVX512 void tile(const float* const* xp, const uint8_t* const* wp, const float* const* sp,
                         int64_t cols, __m512* acc_out) {
  __m512 acc[MT][kTileR];
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t)
#pragma GCC unroll 8
    for (int r = 0; r < kTileR; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < cols; k0 += kFp8Block) {
    const int64_t kb = k0 / kFp8Block;
    const int64_t kend = std::min(cols, k0 + kFp8Block);
    const int64_t vend = k0 + (kend - k0) / kLanes * kLanes;
    __m512 sv[kTileR];
#pragma GCC unroll 8
    for (int r = 0; r < kTileR; ++r) sv[r] = _mm512_set1_ps(sp[r][kb] * 256.0f);
    for (int64_t i = k0; i < vend; i += kLanes) {
      __m512 xv[MT];
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) xv[t] = _mm512_loadu_ps(xp[t] + i);
#pragma GCC unroll 8
      for (int r = 0; r < kTileR; ++r) {
        const __m512 wv = _mm512_mul_ps(load_codes(wp[r] + i), sv[r]);
#pragma GCC unroll 8
        for (int t = 0; t < MT; ++t) acc[t][r] = _mm512_fmadd_ps(xv[t], wv, acc[t][r]);
      }
    }
    if (vend < kend) {
      const __mmask16 m = tail_mask(kend - vend);
      __m512 xv[MT];
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) xv[t] = _mm512_maskz_loadu_ps(m, xp[t] + vend);
#pragma GCC unroll 8
      for (int r = 0; r < kTileR; ++r) {
        const __m512 wv = _mm512_mul_ps(load_codes_masked(wp[r] + vend, m), sv[r]);
#pragma GCC unroll 8
        for (int t = 0; t < MT; ++t) acc[t][r] = _mm512_fmadd_ps(xv[t], wv, acc[t][r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t)
#pragma GCC unroll 8
    for (int r = 0; r < kTileR; ++r) acc_out[t * kTileR + r] = acc[t][r];
}

template <int MT>
MOEMESH_AVX512 void direct_tokens(const float* x, int64_t t0, int64_t cols,
                                  const uint8_t* const* wp, const float* const* sp, __m512* acc) {
  const float* xp[MT];
  for (int t = 0; t < MT; ++t) xp[t] = x + (t0 + t) * cols;
  tile<MT>(xp, wp, sp, cols, acc);
}

// Few tokens: each tile of rows is read once from the matrix (one byte per weight), decoded in
// registers and used by every token (up to kTileT at a time).
MOEMESH_AVX512 void rows_direct(const float* x, int64_t n_tokens, const WeightView& w,
                                const float* bias, float* y, int64_t row_begin, int64_t row_end) {
  alignas(64) __m512 acc[kTileT * kTileR];
  const uint8_t* wp[kTileR];
  const float* sp[kTileR];
  const int64_t cols = w.cols;
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kTileR) {
    for (int r = 0; r < kTileR; ++r) {
      const int64_t row = std::min(r0 + r, row_end - 1);
      wp[r] = static_cast<const uint8_t*>(w.data) + row * cols;
      sp[r] = w.scale + (row / kFp8Block) * fp8_blocks(cols);
    }
    for (int64_t t0 = 0; t0 < n_tokens; t0 += kTileT) {
      const int mt = static_cast<int>(std::min<int64_t>(kTileT, n_tokens - t0));
      switch (mt) {
        case 1:
          direct_tokens<1>(x, t0, cols, wp, sp, acc);
          break;
        case 2:
          direct_tokens<2>(x, t0, cols, wp, sp, acc);
          break;
        case 3:
          direct_tokens<3>(x, t0, cols, wp, sp, acc);
          break;
        default:
          direct_tokens<4>(x, t0, cols, wp, sp, acc);
          break;
      }
      for (int t = 0; t < mt; ++t)
        for (int r = 0; r < kTileR && r0 + r < row_end; ++r)
          y[(t0 + t) * w.rows + r0 + r] =
              reduce(acc[t * kTileR + r]) + (bias ? bias[r0 + r] : 0.0f);
    }
  }
}

// Rows [r0, r1) of w dequantized to float32 (the values dequantize_rows gives) at out.
MOEMESH_AVX512 void dequantize_panel(const WeightView& w, int64_t r0, int64_t r1, float* out) {
  const int64_t cols = w.cols;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* codes = static_cast<const uint8_t*>(w.data) + r * cols;
    const float* s = w.scale + (r / kFp8Block) * fp8_blocks(cols);
    float* o = out + (r - r0) * cols;
    int64_t i = 0;
    for (; i + kLanes <= cols; i += kLanes)
      _mm512_storeu_ps(
          o + i, _mm512_mul_ps(load_codes(codes + i), _mm512_set1_ps(s[i / kFp8Block] * 256.0f)));
    if (i < cols) {
      const __mmask16 m = tail_mask(cols - i);
      _mm512_mask_storeu_ps(o + i, m,
                            _mm512_mul_ps(load_codes_masked(codes + i, m),
                                          _mm512_set1_ps(s[i / kFp8Block] * 256.0f)));
    }
  }
}

// Many tokens: panels of rows are dequantized to float32 once (about 1 MiB, so that a panel stays
// in L2 while the tokens stream past it) and the F32 kernel's register-tiled, cache-blocked path
// runs over them; its sums are the direct path's.
void rows_packed(const float* x, int64_t n_tokens, const WeightView& w, const float* bias, float* y,
                 int64_t row_begin, int64_t row_end) {
  const int64_t cols = w.cols;
  const int64_t panel =
      std::max<int64_t>(12, (int64_t{1} << 18) / std::max<int64_t>(cols, 1) / 12 * 12);
  const int64_t max_rows = std::min(panel, row_end - row_begin);
  thread_local std::vector<float> wbuf, ybuf;
  wbuf.resize(static_cast<std::size_t>(max_rows * cols));
  ybuf.resize(static_cast<std::size_t>(n_tokens * max_rows));
  for (int64_t r0 = row_begin; r0 < row_end; r0 += panel) {
    const int64_t nr = std::min(panel, row_end - r0);
    dequantize_panel(w, r0, r0 + nr, wbuf.data());
    const WeightView f32{wbuf.data(), DType::F32, nr, cols};
    linear_rows_avx512(x, n_tokens, f32, bias ? bias + r0 : nullptr, ybuf.data(), 0, nr);
    for (int64_t t = 0; t < n_tokens; ++t)
      std::copy_n(ybuf.data() + t * nr, nr, y + t * w.rows + r0);
  }
}

}  // namespace

void linear_rows_fp8_avx512(const float* x, int64_t n_tokens, const WeightView& w,
                            const float* bias, float* y, int64_t row_begin, int64_t row_end) {
  if (n_tokens < kPackMinTokens)
    rows_direct(x, n_tokens, w, bias, y, row_begin, row_end);
  else
    rows_packed(x, n_tokens, w, bias, y, row_begin, row_end);
}

}  // namespace moemesh::kernels::detail
