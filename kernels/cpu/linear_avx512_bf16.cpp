// kernels::linear for Isa::Avx512Bf16: CPUs with AVX512-BF16 and AVX512-VNNI but no AMX (or
// asked for with MOEMESH_ISA=avx512bf16). It reads the activations as linear_amx.cpp prepares them
// (bf16, or int8 with a scale per token) and the weights in the same packed layout (panels of 32
// rows, column tiles of 64 bytes, 32-bit words of a column pair / quad, 16 rows to a tile row), so
// a 64-byte tile row is one vector of 16 output rows.
//   BF16 (and F8E4M3 packed as bf16): acc[row] += VDPBF16PS(token pair, row pairs) over the
//   columns (even and odd column words of a tile in two accumulators, added at the end): exact
//   bf16 products, float32 sums in an order fixed by cols.
//   I8: VPDPBUSD takes unsigned activations, so it multiplies (q + 128) and the weights' own sum
//   is taken away after: sum(q * w) = sum((q + 128) * w) - 128 * sum(w), exact in int32; then
//   y = fma(float(sum) * token scale, row scale, bias), the bits of the Amx path.
// Only the functions below carry the target attribute.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/detail/linear_isa.h"

#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define MOEMESH_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni")))

namespace moemesh::kernels::detail {
namespace {

constexpr int64_t kTileBytes = 64;
constexpr int64_t kTileWords = 256;  // 16 words x 16 rows
constexpr int64_t kPanel = 32;       // rows of a panel: two strips of 16
constexpr int kTokens = 4;           // tokens of a register tile (x 2 strips: 8 accumulators)

int64_t column_tiles(const WeightView& w) {
  return (w.cols * (w.dtype == DType::I8 ? 1 : 2) + kTileBytes - 1) / kTileBytes;
}

MOEMESH_AVX512_BF16 inline __m512i broadcast_word(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

// kT tokens (rows t0.. of xq) against one panel `b`: sums into out[t][0..32) (float32, or int32
// for I8). Each (token, row) has two accumulators, for the even and the odd column words of a
// tile (two independent chains, so that one token alone does not wait on the dot product's
// latency), added at the end: the order depends on cols only.
template <bool kInt8, int kT>
MOEMESH_AVX512_BF16 void panel_tokens(const uint8_t* xq, int64_t stride, const uint32_t* b,
                                      int64_t k_tiles, void* out) {
  __m512i acc_i[2][kT][2];
  __m512 acc_f[2][kT][2];
  __m512i row_sum[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < kT; ++t)
      for (int s = 0; s < 2; ++s) {
        acc_i[h][t][s] = _mm512_setzero_si512();
        acc_f[h][t][s] = _mm512_setzero_ps();
      }
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    const uint32_t* b0 = b + kt * kTileWords;
    const uint32_t* b1 = b + (k_tiles + kt) * kTileWords;
    for (int p = 0; p < 16; p += 2) {
      for (int h = 0; h < 2; ++h) {
        const __m512i w0 = _mm512_loadu_si512(b0 + (p + h) * 16);
        const __m512i w1 = _mm512_loadu_si512(b1 + (p + h) * 16);
        if constexpr (kInt8) {
          row_sum[0] = _mm512_dpbusd_epi32(row_sum[0], ones, w0);
          row_sum[1] = _mm512_dpbusd_epi32(row_sum[1], ones, w1);
        }
        for (int t = 0; t < kT; ++t) {
          const __m512i a = broadcast_word(xq + t * stride + kt * kTileBytes + (p + h) * 4);
          if constexpr (kInt8) {
            const __m512i au = _mm512_xor_si512(a, flip);  // q + 128 as unsigned bytes
            acc_i[h][t][0] = _mm512_dpbusd_epi32(acc_i[h][t][0], au, w0);
            acc_i[h][t][1] = _mm512_dpbusd_epi32(acc_i[h][t][1], au, w1);
          } else {
            acc_f[h][t][0] = _mm512_dpbf16_ps(acc_f[h][t][0], (__m512bh)a, (__m512bh)w0);
            acc_f[h][t][1] = _mm512_dpbf16_ps(acc_f[h][t][1], (__m512bh)a, (__m512bh)w1);
          }
        }
      }
    }
  }
  for (int t = 0; t < kT; ++t)
    for (int s = 0; s < 2; ++s) {
      if constexpr (kInt8) {
        const __m512i total = _mm512_add_epi32(acc_i[0][t][s], acc_i[1][t][s]);
        const __m512i sum = _mm512_sub_epi32(total, _mm512_slli_epi32(row_sum[s], 7));
        _mm512_storeu_si512(static_cast<int32_t*>(out) + t * kPanel + s * 16, sum);
      } else {
        _mm512_storeu_ps(static_cast<float*>(out) + t * kPanel + s * 16,
                         _mm512_add_ps(acc_f[0][t][s], acc_f[1][t][s]));
      }
    }
}

template <bool kInt8>
MOEMESH_AVX512_BF16 void run_tokens(int kt_count, const uint8_t* xq, int64_t stride,
                                    const uint32_t* b, int64_t k_tiles, void* out) {
  switch (kt_count) {
    case 4:
      return panel_tokens<kInt8, 4>(xq, stride, b, k_tiles, out);
    case 3:
      return panel_tokens<kInt8, 3>(xq, stride, b, k_tiles, out);
    case 2:
      return panel_tokens<kInt8, 2>(xq, stride, b, k_tiles, out);
    default:
      return panel_tokens<kInt8, 1>(xq, stride, b, k_tiles, out);
  }
}

}  // namespace

MOEMESH_AVX512_BF16 void linear_rows_avx512_bf16(const uint8_t* xq, const float* token_scale,
                                                 int64_t n_tokens, const WeightView& w,
                                                 const float* bias, float* y, int64_t row_begin,
                                                 int64_t row_end) {
  const bool int8 = w.dtype == DType::I8;
  const int64_t k_tiles = column_tiles(w);
  const int64_t stride = amx_row_stride(w.dtype, w.cols);
  const int64_t panel_words = kPanel * k_tiles * kTileBytes / 4;
  thread_local std::vector<uint32_t> own;  // the panel, when w has no packed copy
  if (w.packed == nullptr) own.resize(static_cast<std::size_t>(panel_words) + 16);
  // 64-byte aligned: a tile row is one aligned vector.
  auto* own_panel = reinterpret_cast<uint32_t*>(
      (reinterpret_cast<std::uintptr_t>(own.data()) + 63) & ~std::uintptr_t{63});
  alignas(64) float sums[kTokens * kPanel];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kPanel) {
    const uint32_t* b = own_panel;
    if (w.packed != nullptr)
      b = w.packed + r0 / kPanel * panel_words;
    else
      pack_tile_panel(w, r0, own_panel);
    const int64_t rows = std::min(kPanel, row_end - r0);
    for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokens) {
      const int count = static_cast<int>(std::min<int64_t>(kTokens, n_tokens - t0));
      if (int8)
        run_tokens<true>(count, xq + t0 * stride, stride, b, k_tiles, sums);
      else
        run_tokens<false>(count, xq + t0 * stride, stride, b, k_tiles, sums);
      for (int t = 0; t < count; ++t) {
        float* out = y + (t0 + t) * w.rows + r0;
        if (int8) {
          const auto* s = reinterpret_cast<const int32_t*>(sums) + t * kPanel;
          const float ts = token_scale[t0 + t];
          for (int64_t r = 0; r < rows; ++r)
            out[r] = std::fma(static_cast<float>(s[r]) * ts, w.scale[r0 + r],
                              bias ? bias[r0 + r] : 0.0f);
        } else {
          const float* s = sums + t * kPanel;
          for (int64_t r = 0; r < rows; ++r) out[r] = s[r] + (bias ? bias[r0 + r] : 0.0f);
        }
      }
    }
  }
}

}  // namespace moemesh::kernels::detail
