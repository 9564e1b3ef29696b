// kernels::linear for FP8 E4M3 weights with 128x128 block scales, AVX2 + FMA + F16C. Only the
// functions below carry the target attribute (see linear_avx2.cpp). Codes are decoded as in
// linear_fp8_avx512.cpp: sign-extended to 16 bits, shifted left by 7, bit 14 cleared: the f16 of
// value / 256, widened exactly by vcvtph2ps, then multiplied by the block scale times 256.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/detail/linear_isa.h"

#define MOEMESH_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace moemesh::kernels::detail {
namespace {

constexpr int kLanes = 8;
// The register tile and the token count from which the packed path is used, as in
// linear_avx2.cpp.
constexpr int kTileT = 3;
constexpr int kTileR = 4;
constexpr int64_t kPackMinTokens = 6;
static_assert(kFp8Block % kLanes == 0);

// Eight codes (the low 8 bytes of `codes`) as float32 values / 256.
MOEMESH_AVX2 inline __m256 decode(__m128i codes) {
  const __m128i h = _mm_slli_epi16(_mm_cvtepi8_epi16(codes), 7);
  return _mm256_cvtph_ps(_mm_and_si128(h, _mm_set1_epi16(static_cast<int16_t>(0xBFFF))));
}

MOEMESH_AVX2 inline __m256 load_codes(const uint8_t* p) {
  return decode(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// As load_codes for the first n (< 8) codes, zero in the other lanes, reading nothing past them.
MOEMESH_AVX2 inline __m256 load_codes_partial(const uint8_t* p, int64_t n) {
  alignas(16) uint8_t buf[16] = {};
  for (int64_t k = 0; k < n; ++k) buf[k] = p[k];
  return decode(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
}

MOEMESH_AVX2 inline __m256i tail_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The lane tree of linear_avx2.cpp, so that the sums are the F32 kernel's.
MOEMESH_AVX2 inline float reduce(__m256 s) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}

// The chains of MT tokens x kTileR rows over all columns, in the order of linear_avx2.cpp: element
// c of (token, row) into lane c % 8 in increasing c, each weight decoded and scaled first. sp[r]
// points at row r's block scales. Pointers may repeat.
template <int MT>
MOEMESH_AVX2 void tile(const float* const* xp, const uint8_t* const* wp, const float* const* sp,
                       int64_t cols, __m256* acc_out) {
  __m256 acc[MT][kTileR];
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t)
#pragma GCC unroll 8
    for (int r = 0; r < kTileR; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < cols; k0 += kFp8Block) {
    const int64_t kb = k0 / kFp8Block;
    const int64_t kend = std::min(cols, k0 + kFp8Block);
    const int64_t vend = k0 + (kend - k0) / kLanes * kLanes;
    __m256 sv[kTileR];
#pragma GCC unroll 8
    for (int r = 0; r < kTileR; ++r) sv[r] = _mm256_set1_ps(sp[r][kb] * 256.0f);
    for (int64_t i = k0; i < vend; i += kLanes) {
      __m256 xv[MT];
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) xv[t] = _mm256_loadu_ps(xp[t] + i);
#pragma GCC unroll 8
      for (int r = 0; r < kTileR; ++r) {
        const __m256 wv = _mm256_mul_ps(load_codes(wp[r] + i), sv[r]);
#pragma GCC unroll 8
        for (int t = 0; t < MT; ++t) acc[t][r] = _mm256_fmadd_ps(xv[t], wv, acc[t][r]);
      }
    }
    if (vend < kend) {
      const int64_t n = kend - vend;
      const __m256i m = tail_mask(n);
      __m256 xv[MT];
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) xv[t] = _mm256_maskload_ps(xp[t] + vend, m);
#pragma GCC unroll 8
      for (int r = 0; r < kTileR; ++r) {
        const __m256 wv = _mm256_mul_ps(load_codes_partial(wp[r] + vend, n), sv[r]);
#pragma GCC unroll 8
        for (int t = 0; t < MT; ++t) acc[t][r] = _mm256_fmadd_ps(xv[t], wv, acc[t][r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t)
#pragma GCC unroll 8
    for (int r = 0; r < kTileR; ++r) acc_out[t * kTileR + r] = acc[t][r];
}

template <int MT>
MOEMESH_AVX2 void direct_tokens(const float* x, int64_t t0, int64_t cols, const uint8_t* const* wp,
                                const float* const* sp, __m256* acc) {
  const float* xp[MT];
  for (int t = 0; t < MT; ++t) xp[t] = x + (t0 + t) * cols;
  tile<MT>(xp, wp, sp, cols, acc);
}

// Few tokens: each tile of rows is read once from the matrix (one byte per weight), decoded in
// registers and used by every token (up to kTileT at a time).
MOEMESH_AVX2 void rows_direct(const float* x, int64_t n_tokens, const WeightView& w,
                              const float* bias, float* y, int64_t row_begin, int64_t row_end) {
  alignas(32) __m256 acc[kTileT * kTileR];
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
        default:
          direct_tokens<3>(x, t0, cols, wp, sp, acc);
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
MOEMESH_AVX2 void dequantize_panel(const WeightView& w, int64_t r0, int64_t r1, float* out) {
  const int64_t cols = w.cols;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* codes = static_cast<const uint8_t*>(w.data) + r * cols;
    const float* s = w.scale + (r / kFp8Block) * fp8_blocks(cols);
    float* o = out + (r - r0) * cols;
    int64_t i = 0;
    for (; i + kLanes <= cols; i += kLanes)
      _mm256_storeu_ps(
          o + i, _mm256_mul_ps(load_codes(codes + i), _mm256_set1_ps(s[i / kFp8Block] * 256.0f)));
    if (i < cols)
      _mm256_maskstore_ps(o + i, tail_mask(cols - i),
                          _mm256_mul_ps(load_codes_partial(codes + i, cols - i),
                                        _mm256_set1_ps(s[i / kFp8Block] * 256.0f)));
  }
}

// Many tokens: panels of rows (about 1 MiB of float32) are dequantized once and the F32 kernel's
// register-tiled, cache-blocked path runs over them; its sums are the direct path's.
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
    linear_rows_avx2(x, n_tokens, f32, bias ? bias + r0 : nullptr, ybuf.data(), 0, nr);
    for (int64_t t = 0; t < n_tokens; ++t)
      std::copy_n(ybuf.data() + t * nr, nr, y + t * w.rows + r0);
  }
}

}  // namespace

void linear_rows_fp8_avx2(const float* x, int64_t n_tokens, const WeightView& w, const float* bias,
                          float* y, int64_t row_begin, int64_t row_end) {
  if (n_tokens < kPackMinTokens)
    rows_direct(x, n_tokens, w, bias, y, row_begin, row_end);
  else
    rows_packed(x, n_tokens, w, bias, y, row_begin, row_end);
}

}  // namespace moemesh::kernels::detail
