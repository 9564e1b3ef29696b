// kernels::linear on AMX tiles (Isa::Amx), for BF16 and I8 weights, and F8E4M3 weights with a
// packed copy (made at load: dequantized and rounded to bf16, then computed as BF16). Only the
// functions below carry the target attribute.
//
// BF16: the activations are rounded to bf16 (nearest even) once per call; each product of two
// bf16 values is exact in float32 and the tile unit sums them in float32 (TDPBF16PS).
// I8: each token's activations are quantized to int8 with one scale per token (absmax / 127, the
// values rounded to nearest even), the int8 x int8 products are summed exactly in int32
// (TDPBSSD), and y = fma(float(sum) * token scale, row scale, bias).
//
// Layout: every tile is 16 rows of 64 bytes. A B tile holds 16 output rows x 64 bytes of their
// columns (32 bf16 or 64 int8) in the order the tile unit wants: row p holds 32-bit word p (a
// column pair, or quad) of each of the 16 output rows. Panels of 32 rows (two strips of B tiles)
// are packed at load (pack_amx) or by the thread, per panel, on every call. C[16 tokens x 16 rows]
// += A[16 tokens x 64 bytes] . B, four C tiles (2 x 2) at a time. Each (token, row) sum runs over
// the column tiles in order, and within a tile in the unit's fixed order (I8: exact anyway): it
// depends on cols only, never on the tokens of the call, so the path is batch invariant.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/detail/linear_isa.h"

#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define MOEMESH_AMX                                                             \
  __attribute__((                                                               \
      target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16," \
             "amx-int8")))

namespace moemesh::kernels::detail {
namespace {

// 64-byte aligned storage for packed tiles and sums.
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new (n * sizeof(T), std::align_val_t{64}));
  }
  void deallocate(T* p, std::size_t) { ::operator delete (p, std::align_val_t{64}); }
  bool operator==(const AlignedAllocator&) const { return true; }
};

constexpr int64_t kTileRows = 16;                 // tokens of an A tile, output rows of a B tile
constexpr int64_t kTileBytes = kPackedTileBytes;  // bytes of a tile row: 32 bf16 or 64 int8
constexpr int64_t kTileWords = kTileRows * kTileBytes / 4;  // 32-bit words of a tile
constexpr int64_t kPanel = kPackedPanelRows;                // output rows packed together

// The tile configuration of the 2 x 2 kernel: tiles 0-3 accumulators (16 x 16 float32 or int32),
// 4-5 A (16 tokens x 64 bytes), 6-7 B (16 words x 16 rows). Every tile is 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

MOEMESH_AMX void load_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// 16 x 16 32-bit words: out[j] word i = in[i] word j.
MOEMESH_AMX inline void transpose16(const __m512i in[16], __m512i out[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(in[2 * i], in[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(in[2 * i], in[2 * i + 1]);
  }
  // u[4g + j]: 128-bit lane L holds word 4L + j of rows 4g .. 4g + 3.
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);       // words j, j + 8
    const __m512i v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);       // words j + 4, j + 12
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);  // rows 8 .. 15
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
    out[j] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    out[j + 8] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    out[j + 4] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    out[j + 12] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// Packs rows [r0, r0 + kPanel) of w (zero past w.rows and past w.cols) into two strips of B
// tiles: strip s, column tile kt at packed + (s * k_tiles + kt) * kTileWords. Packing a tile
// transposes 16 x 16 32-bit words: word (p, lane n) of tile kt is word kt * 16 + p of row n.
MOEMESH_AMX void pack_panel(const WeightView& w, int64_t r0, int64_t k_tiles, uint32_t* packed) {
  const auto* base = static_cast<const uint8_t*>(w.data);
  const int64_t row_bytes = w.cols * (w.dtype == DType::I8 ? 1 : 2);
  const int64_t rows = std::min(kPanel, w.rows - r0);
  for (int64_t s = 0; s < kPanel / kTileRows; ++s) {
    const int64_t strip_rows = std::clamp<int64_t>(rows - s * kTileRows, 0, kTileRows);
    const uint8_t* strip_base = base + (r0 + s * kTileRows) * row_bytes;
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      uint32_t* tile = packed + (s * k_tiles + kt) * kTileWords;
      if (strip_rows == kTileRows && (kt + 1) * kTileBytes <= row_bytes) {
        __m512i in[16], out[16];
        for (int n = 0; n < 16; ++n)
          in[n] = _mm512_loadu_si512(strip_base + n * row_bytes + kt * kTileBytes);
        transpose16(in, out);
        for (int p = 0; p < 16; ++p) _mm512_storeu_si512(tile + p * kTileRows, out[p]);
        continue;
      }
      std::memset(tile, 0, kTileWords * sizeof(uint32_t));
      auto* bytes = reinterpret_cast<uint8_t*>(tile);
      for (int64_t n = 0; n < strip_rows; ++n) {
        const uint8_t* row = strip_base + n * row_bytes;
        for (int64_t b = kt * kTileBytes; b < std::min(row_bytes, (kt + 1) * kTileBytes); ++b) {
          const int64_t within = b - kt * kTileBytes;
          bytes[(within / 4) * kTileBytes + n * 4 + within % 4] = row[b];
        }
      }
    }
  }
}

// The tile programs over column tiles [kt_begin, kt_end). Tile numbers are immediates, so the 1-
// and 2-row-tile variants are spelled out. a: the activations of 32 (16) tokens, a_stride bytes a
// row; b: a panel as pack_panel lays it out; c: the running sums, 32 (16) tokens x 32 rows of
// float32 (kInt8: int32; row stride 32), zero when `first`, loaded into the tiles and stored back.
#define MOEMESH_TDP(C, A, B)   \
  do {                         \
    if constexpr (kInt8)       \
      _tile_dpbssd(C, A, B);   \
    else                       \
      _tile_dpbf16ps(C, A, B); \
  } while (0)

template <bool kInt8>
MOEMESH_AMX void run_2x2(const uint8_t* a, int64_t a_stride, const uint8_t* b, int64_t k_tiles,
                         int64_t kt_begin, int64_t kt_end, bool first, void* sums) {
  constexpr int64_t ld = kPanel * 4;
  auto* c = static_cast<uint8_t*>(sums);
  // The tile loads are asm without a memory clobber: make every earlier store (packed weights,
  // prepared activations, sums) happen before them.
  __asm__ volatile("" ::: "memory");
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, c, ld);
    _tile_loadd(1, c + kTileRows * 4, ld);
    _tile_loadd(2, c + kTileRows * ld, ld);
    _tile_loadd(3, c + kTileRows * ld + kTileRows * 4, ld);
  }
  constexpr int64_t tile_bytes = kTileWords * 4;
  const uint8_t* b1 = b + k_tiles * tile_bytes;
  const uint8_t* a1 = a + kTileRows * a_stride;
  for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
    _tile_loadd(4, a + kt * kTileBytes, a_stride);
    _tile_loadd(6, b + kt * tile_bytes, kTileBytes);
    MOEMESH_TDP(0, 4, 6);
    _tile_loadd(7, b1 + kt * tile_bytes, kTileBytes);
    MOEMESH_TDP(1, 4, 7);
    _tile_loadd(5, a1 + kt * kTileBytes, a_stride);
    MOEMESH_TDP(2, 5, 6);
    MOEMESH_TDP(3, 5, 7);
  }
  _tile_stored(0, c, ld);
  _tile_stored(1, c + kTileRows * 4, ld);
  _tile_stored(2, c + kTileRows * ld, ld);
  _tile_stored(3, c + kTileRows * ld + kTileRows * 4, ld);
}

template <bool kInt8>
MOEMESH_AMX void run_1x2(const uint8_t* a, int64_t a_stride, const uint8_t* b, int64_t k_tiles,
                         int64_t kt_begin, int64_t kt_end, bool first, void* sums) {
  constexpr int64_t ld = kPanel * 4;
  auto* c = static_cast<uint8_t*>(sums);
  // The tile loads are asm without a memory clobber: make every earlier store (packed weights,
  // prepared activations, sums) happen before them.
  __asm__ volatile("" ::: "memory");
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
  } else {
    _tile_loadd(0, c, ld);
    _tile_loadd(1, c + kTileRows * 4, ld);
  }
  constexpr int64_t tile_bytes = kTileWords * 4;
  const uint8_t* b1 = b + k_tiles * tile_bytes;
  for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
    _tile_loadd(4, a + kt * kTileBytes, a_stride);
    _tile_loadd(6, b + kt * tile_bytes, kTileBytes);
    _tile_loadd(7, b1 + kt * tile_bytes, kTileBytes);
    MOEMESH_TDP(0, 4, 6);
    MOEMESH_TDP(1, 4, 7);
  }
  _tile_stored(0, c, ld);
  _tile_stored(1, c + kTileRows * 4, ld);
}

#undef MOEMESH_TDP

MOEMESH_AMX void release_tiles() {
  _tile_release();
}

}  // namespace

int64_t amx_padded_tokens(int64_t n_tokens) {
  return (n_tokens + kTileRows - 1) / kTileRows * kTileRows;
}

int64_t amx_row_stride(DType dtype, int64_t cols) {
  // One cache line more than the padded columns: rows of a power-of-two length would otherwise
  // map the 16 rows of an A tile to the same L1 set.
  return (packed_column_tiles(dtype, cols) + 1) * kTileBytes;
}

MOEMESH_AMX void amx_prepare_activations(const float* x, int64_t n_tokens, int64_t cols,
                                         DType dtype, int64_t t_begin, int64_t t_end, uint8_t* xq,
                                         float* token_scale) {
  const int64_t stride = amx_row_stride(dtype, cols);
  for (int64_t t = t_begin; t < t_end; ++t) {
    uint8_t* out = xq + t * stride;
    if (t >= n_tokens) {
      std::memset(out, 0, static_cast<std::size_t>(stride));
      if (token_scale != nullptr) token_scale[t] = 0.0f;
      continue;
    }
    const float* in = x + t * cols;
    int64_t c = 0;
    if (dtype != DType::I8) {
      auto* o = reinterpret_cast<uint16_t*>(out);
      // vcvtne2ps2bf16 rounds to nearest even (NaN stays NaN), as f32_to_bf16 does.
      for (; c + 32 <= cols; c += 32) {
        const __m512bh v =
            _mm512_cvtne2ps_pbh(_mm512_loadu_ps(in + c + 16), _mm512_loadu_ps(in + c));
        _mm512_storeu_si512(o + c, reinterpret_cast<const __m512i&>(v));
      }
      for (; c < cols; ++c) o[c] = f32_to_bf16(in[c]);
      std::memset(o + cols, 0, static_cast<std::size_t>(stride - cols * 2));
      continue;
    }
    // I8: q = round-to-nearest-even(x * (127 / absmax)), in [-127, 127]; scale = absmax / 127.
    __m512 vmax = _mm512_setzero_ps();
    for (; c + 16 <= cols; c += 16)
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(in + c)));
    float absmax = _mm512_reduce_max_ps(vmax);
    for (; c < cols; ++c) absmax = std::max(absmax, std::fabs(in[c]));
    const bool usable = absmax > 0.0f && std::isfinite(absmax);
    const float inv = usable ? 127.0f / absmax : 0.0f;
    token_scale[t] = usable ? absmax / 127.0f : 0.0f;
    auto* o = reinterpret_cast<int8_t*>(out);
    const __m512 vinv = _mm512_set1_ps(inv);
    c = 0;
    for (; c + 16 <= cols; c += 16) {
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(in + c), vinv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + c), _mm512_cvtsepi32_epi8(q));
    }
    for (; c < cols; ++c)
      o[c] = static_cast<int8_t>(std::clamp(std::nearbyint(in[c] * inv), -127.0f, 127.0f));
    std::memset(o + cols, 0, static_cast<std::size_t>(stride - cols));
  }
}

MOEMESH_AMX void linear_rows_amx(const uint8_t* xq, const float* token_scale, int64_t n_tokens,
                                 const WeightView& w, const float* bias, float* y,
                                 int64_t row_begin, int64_t row_end) {
  const bool int8 = w.dtype == DType::I8;
  const int64_t k_tiles = packed_column_tiles(w.dtype, w.cols);
  const int64_t a_stride = amx_row_stride(w.dtype, w.cols);
  // The tile programs: 2 x 2 tiles, or 1 x 2 for a last block of 16 tokens.
  const auto run_two = int8 ? &run_2x2<true> : &run_2x2<false>;
  const auto run_one = int8 ? &run_1x2<true> : &run_1x2<false>;
  const int64_t padded_tokens = amx_padded_tokens(n_tokens);
  // Per thread: the packed panel (32 rows x all columns) when w has none, and the panel's running
  // sums for a block of tokens. The columns go in chunks whose two B strips (16 KiB) stay in L1
  // while the block's tiles stream past; the sums go through memory between chunks (exactly:
  // float32 or int32 both ways), so each sum still runs over the column tiles in order.
  constexpr int64_t kChunkTiles = 8;
  // Tokens in blocks whose activations (1 MiB of bf16 at 2,048 columns) stay in L2 while every
  // panel runs past them; a panel not packed at load is packed again for each block.
  constexpr int64_t kTokenBlock = 256;
  const int64_t panel_words = packed_panel_words(w.dtype, w.cols);
  thread_local std::vector<uint32_t, AlignedAllocator<uint32_t>> packed;
  thread_local std::vector<float, AlignedAllocator<float>> sums;
  if (w.packed == nullptr) packed.resize(static_cast<std::size_t>(panel_words));
  sums.resize(static_cast<std::size_t>(std::min(padded_tokens, kTokenBlock) * kPanel));
  const auto* b = reinterpret_cast<const uint8_t*>(packed.data());  // or the panel of w.packed
  load_tile_config();
  for (int64_t m0 = 0; m0 < padded_tokens; m0 += kTokenBlock) {
    const int64_t m1 = std::min(padded_tokens, m0 + kTokenBlock);
    for (int64_t r0 = row_begin; r0 < row_end; r0 += kPanel) {
      if (w.packed != nullptr)
        b = reinterpret_cast<const uint8_t*>(w.packed + r0 / kPanel * panel_words);
      else
        pack_panel(w, r0, k_tiles, packed.data());
      // One token step (decode): no other tokens reuse the strips, so no chunks.
      const int64_t chunk = m1 - m0 <= 2 * kTileRows ? k_tiles : kChunkTiles;
      for (int64_t k0 = 0; k0 < k_tiles; k0 += chunk) {
        const int64_t k1 = std::min(k_tiles, k0 + chunk);
        for (int64_t t0 = m0; t0 < m1; t0 += 2 * kTileRows) {
          const uint8_t* a = xq + t0 * a_stride;
          float* c = sums.data() + (t0 - m0) * kPanel;
          (t0 + kTileRows < m1 ? run_two : run_one)(a, a_stride, b, k_tiles, k0, k1, k0 == 0, c);
        }
      }
      const int64_t rows = std::min(kPanel, row_end - r0);
      for (int64_t t = m0; t < std::min(m1, n_tokens); ++t) {
        float* out = y + t * w.rows + r0;
        const float* c = sums.data() + (t - m0) * kPanel;
        if (int8) {
          const auto* s = reinterpret_cast<const int32_t*>(c);
          const float ts = token_scale[t];
          // One fused multiply-add, spelled out so that no compiler contracts it differently.
          for (int64_t r = 0; r < rows; ++r)
            out[r] = std::fma(static_cast<float>(s[r]) * ts, w.scale[r0 + r],
                              bias ? bias[r0 + r] : 0.0f);
        } else if (bias != nullptr) {
          for (int64_t r = 0; r < rows; ++r) out[r] = c[r] + bias[r0 + r];
        } else {
          std::memcpy(out, c, static_cast<std::size_t>(rows) * sizeof(float));
        }
      }
    }
  }
  release_tiles();
}

MOEMESH_AMX void amx_pack_panels(const WeightView& w, int64_t panel_begin, int64_t panel_end,
                                 uint32_t* out) {
  const int64_t k_tiles = packed_column_tiles(w.dtype, w.cols);
  const int64_t panel_words = packed_panel_words(w.dtype, w.cols);
  // F8E4M3: a panel's rows dequantized (code x block scale, in float32), rounded to bf16, then
  // packed as BF16 rows.
  std::vector<float> dequantized;
  std::vector<uint16_t> bf16;
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    if (w.dtype != DType::F8E4M3) {
      pack_panel(w, p * kPanel, k_tiles, out + p * panel_words);
      continue;
    }
    const int64_t r0 = p * kPanel, rows = std::min(kPanel, w.rows - r0);
    dequantized.resize(static_cast<std::size_t>(rows * w.cols));
    bf16.resize(dequantized.size());
    dequantize_rows(w, r0, r0 + rows, dequantized.data());
    for (std::size_t i = 0; i < dequantized.size(); ++i) bf16[i] = f32_to_bf16(dequantized[i]);
    const WeightView panel{bf16.data(), DType::BF16, rows, w.cols};
    pack_panel(panel, 0, k_tiles, out + p * panel_words);
  }
}

void pack_tile_panel(const WeightView& w, int64_t r0, uint32_t* packed) {
  pack_panel(w, r0, packed_column_tiles(w.dtype, w.cols), packed);
}

bool amx_request_permission() {
#if defined(__x86_64__)
  // Linux hands out the tile state only to processes that ask (ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA); the permission covers every thread of the process.
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

}  // namespace moemesh::kernels::detail
