// kernels::linear for AVX-512 (F, BW, VL, DQ). Only the functions below carry the target
// attribute, so nothing else of this translation unit (nor an inline function of a header that
// another translation unit also instantiates) is compiled for AVX-512.
#include <immintrin.h>

#include <algorithm>
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
// Register tile: kTileT tokens x kTileR rows, one accumulator each (24 zmm), plus the kTileT
// activation vectors and one weight vector of a step: 29 of the 32 zmm registers. Each step loads
// 10 vectors for 24 FMAs, so the FMA units, not the loads, set the pace.
constexpr int kTileT = 4;
constexpr int kTileR = 6;
// Below this many tokens the weights are read straight from the matrix and widened in registers
// (decode: each weight is used by few tokens, the row is streamed once); from it on, a block of
// rows is widened once into an L1 buffer and used by every token of a token block.
constexpr int64_t kPackMinTokens = 8;
// Cache blocking of the packed path: kBlockK columns of kTileR rows (12 KiB of float32) stay in
// L1 while kBlockT tokens (their kBlockK-column slices, 128 KiB) stream from L2. A longer block
// means fewer round trips of the accumulators through memory (512 measured ~10% faster than 256
// on 2048 columns; 1024 about the same as 512).
constexpr int64_t kBlockK = 512;
constexpr int64_t kBlockT = 64;
static_assert(kBlockK % kLanes == 0 && kBlockT % kTileT == 0);

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
  } else if constexpr (D == DType::I8) {
    // int8: sign-extended to int32, then converted (exact: every int8 is a float32).
    const __m128i b =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(row) + i));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
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
  } else if constexpr (D == DType::I8) {
    const __m128i b = _mm_maskz_loadu_epi8(m, static_cast<const int8_t*>(row) + i);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(row) + i);
    if constexpr (D == DType::BF16)
      return widen_bf16(h);
    else
      return _mm512_cvtph_ps(h);
  }
}

MOEMESH_AVX512 inline __mmask16 tail_mask(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1u);
}

// The order of every sum, on both paths and for any n_tokens: element c of (token, row) is
// multiplied into lane c % 16 of that pair's single accumulator, in increasing c (the last,
// partial vector with its missing lanes zero in both operands); then reduce() adds the lanes by
// one fixed tree. A k block only pauses the chains (the accumulators go to memory whole and come
// back), so neither the blocking, nor the tile a pair lands in, nor the pair's neighbours in the
// tile change its bits.
MOEMESH_AVX512 inline float reduce(__m512 s) {
  // 16 -> 8 -> 4 -> 2 -> 1 lanes, always the same halves added.
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}

// Runs the chains of MT tokens x MR rows over `full` whole vectors and then, if tail > 0, one
// vector of `tail` elements, from element 0 of xp[t] and wp[r]. acc_in (null: zeros) and acc_out
// hold the MT x MR accumulators, token-major. Pointers may repeat (a partial tile repeats its last
// token or row); their results are simply not used.
template <DType D, int MT, int MR>
MOEMESH_AVX512 void tile(const float* const* xp, const void* const* wp, int64_t full, int64_t tail,
                         const __m512* acc_in, __m512* acc_out) {
  const float* xs[MT];
  const void* ws[MR];
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t) xs[t] = xp[t];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) ws[r] = wp[r];
  __m512 acc[MT][MR];
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[t][r] = acc_in ? acc_in[t * MR + r] : _mm512_setzero_ps();

  for (int64_t i = 0; i < full * kLanes; i += kLanes) {
    __m512 xv[MT];
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) xv[t] = _mm512_loadu_ps(xs[t] + i);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 wv = load_w<D>(ws[r], i);
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) acc[t][r] = _mm512_fmadd_ps(xv[t], wv, acc[t][r]);
    }
  }
  if (tail > 0) {
    const int64_t i = full * kLanes;
    const __mmask16 m = tail_mask(tail);
    __m512 xv[MT];
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) xv[t] = _mm512_maskz_loadu_ps(m, xs[t] + i);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 wv = load_w_masked<D>(ws[r], i, m);
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) acc[t][r] = _mm512_fmadd_ps(xv[t], wv, acc[t][r]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      _mm512_store_ps(reinterpret_cast<float*>(acc_out + t * MR + r), acc[t][r]);
}

// Pointers to the rows r0 .. r0 + kTileR - 1 of w, the ones past row_end repeating the last.
template <DType D>
MOEMESH_AVX512 void row_pointers(const WeightView& w, int64_t r0, int64_t row_end,
                                 const void** wp) {
  const int64_t row_bytes = w.cols * (D == DType::F32 ? 4 : D == DType::I8 ? 1 : 2);
  for (int r = 0; r < kTileR; ++r)
    wp[r] = static_cast<const char*>(w.data) + std::min(r0 + r, row_end - 1) * row_bytes;
}

// y[t, r] = reduce(acc) (* scale[r], for int8 rows) + bias for the tile's real tokens and rows.
MOEMESH_AVX512 void store_tile(const __m512* acc, int mt, int64_t t0, int64_t n_tokens, int64_t r0,
                               int64_t row_end, int64_t rows, const float* scale, const float* bias,
                               float* y) {
  for (int t = 0; t < mt && t0 + t < n_tokens; ++t)
    for (int r = 0; r < kTileR && r0 + r < row_end; ++r) {
      float sum = reduce(acc[t * kTileR + r]);
      if (scale) sum *= scale[r0 + r];
      y[(t0 + t) * rows + r0 + r] = sum + (bias ? bias[r0 + r] : 0.0f);
    }
}

// Few tokens: each tile of rows is read once from the matrix, widened in registers, and used by
// every token (up to kTileT at a time).
template <DType D, int MT>
MOEMESH_AVX512 void direct_tokens(const float* x, int64_t t0, const void* const* wp,
                                  const WeightView& w, __m512* acc) {
  const float* xp[MT];
  for (int t = 0; t < MT; ++t) xp[t] = x + (t0 + t) * w.cols;
  tile<D, MT, kTileR>(xp, wp, w.cols / kLanes, w.cols % kLanes, nullptr, acc);
}

template <DType D>
MOEMESH_AVX512 void rows_direct(const float* x, int64_t n_tokens, const WeightView& w,
                                const float* bias, float* y, int64_t row_begin, int64_t row_end) {
  alignas(64) __m512 acc[kTileT * kTileR];
  const void* wp[kTileR];
  const float* scale = D == DType::I8 ? w.scale : nullptr;
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kTileR) {
    row_pointers<D>(w, r0, row_end, wp);
    for (int64_t t0 = 0; t0 < n_tokens; t0 += kTileT) {
      const int mt = static_cast<int>(std::min<int64_t>(kTileT, n_tokens - t0));
      switch (mt) {
        case 1:
          direct_tokens<D, 1>(x, t0, wp, w, acc);
          break;
        case 2:
          direct_tokens<D, 2>(x, t0, wp, w, acc);
          break;
        case 3:
          direct_tokens<D, 3>(x, t0, wp, w, acc);
          break;
        default:
          direct_tokens<D, 4>(x, t0, wp, w, acc);
          break;
      }
      store_tile(acc, mt, t0, n_tokens, r0, row_end, w.rows, scale, bias, y);
    }
  }
}

// Many tokens: for each token block and tile of rows, each kBlockK-column slice of the rows is
// widened once into an L1 buffer (zero past the last column, like the masked loads of the direct
// path) and used by every token of the block, kTileT x kTileR pairs per register tile.
template <DType D>
MOEMESH_AVX512 void rows_packed(const float* x, int64_t n_tokens, const WeightView& w,
                                const float* bias, float* y, int64_t row_begin, int64_t row_end) {
  const int64_t cols = w.cols;
  const float* scale = D == DType::I8 ? w.scale : nullptr;
  alignas(64) float wbuf[kTileR][kBlockK];
  alignas(64) __m512 acc[kBlockT * kTileR];
  const void* wp[kTileR];
  const void* packed[kTileR];
  for (int r = 0; r < kTileR; ++r) packed[r] = wbuf[r];
  for (int64_t tb = 0; tb < n_tokens; tb += kBlockT) {
    const int64_t nt = std::min(kBlockT, n_tokens - tb);
    for (int64_t r0 = row_begin; r0 < row_end; r0 += kTileR) {
      row_pointers<D>(w, r0, row_end, wp);
      for (int64_t k0 = 0; k0 < cols; k0 += kBlockK) {
        const int64_t kc = std::min(kBlockK, cols - k0);
        const int64_t full = kc / kLanes, tail = kc % kLanes;
        for (int r = 0; r < kTileR; ++r) {
          for (int64_t i = 0; i < full * kLanes; i += kLanes)
            _mm512_store_ps(&wbuf[r][i], load_w<D>(wp[r], k0 + i));
          if (tail > 0)
            _mm512_store_ps(&wbuf[r][full * kLanes],
                            load_w_masked<D>(wp[r], k0 + full * kLanes, tail_mask(tail)));
        }
        for (int64_t t = 0; t < nt; t += kTileT) {
          const float* xp[kTileT];
          for (int j = 0; j < kTileT; ++j)
            xp[j] = x + (tb + std::min<int64_t>(t + j, nt - 1)) * cols + k0;
          // The packed rows are float32, zero past kc: the tail needs no masked weight load.
          tile<DType::F32, kTileT, kTileR>(xp, packed, full, tail,
                                           k0 == 0 ? nullptr : acc + t * kTileR, acc + t * kTileR);
        }
      }
      for (int64_t t = 0; t < nt; t += kTileT)
        store_tile(acc + t * kTileR, kTileT, tb + t, tb + nt, r0, row_end, w.rows, scale, bias, y);
    }
  }
}

template <DType D>
MOEMESH_AVX512 void rows_impl(const float* x, int64_t n_tokens, const WeightView& w,
                              const float* bias, float* y, int64_t row_begin, int64_t row_end) {
  if (n_tokens < kPackMinTokens)
    rows_direct<D>(x, n_tokens, w, bias, y, row_begin, row_end);
  else
    rows_packed<D>(x, n_tokens, w, bias, y, row_begin, row_end);
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
    case DType::I8:
      rows_impl<DType::I8>(x, n_tokens, w, bias, y, row_begin, row_end);
      break;
    case DType::F8E4M3:
      linear_rows_fp8_avx512(x, n_tokens, w, bias, y, row_begin, row_end);
      break;
  }
}

}  // namespace moemesh::kernels::detail
