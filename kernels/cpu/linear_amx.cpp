// kernels::linear for BF16 weights on AMX tiles (Isa::Amx). The activations are rounded to bf16
// (nearest even) once per call; each product of two bf16 values is exact in float32 and the tile
// unit sums them in float32. Only the functions below carry the target attribute.
//
// Layout: a B tile holds 16 output rows x 32 input columns of the weight in the "VNNI" order the
// tile unit wants (16 rows of 64 bytes, row p = column pairs 2p, 2p+1 of the 16 output rows); a
// thread packs the rows of its chunk, 32 at a time, into such tiles (zero past the matrix) and
// runs every token against them: C[16 tokens x 16 rows] += A[16 tokens x 32 columns] . B, four C
// tiles (2 x 2) at a time. The sum of each (token, row) runs over the column tiles in order, and
// within a tile over the column pairs in order: it depends on cols only, never on the tokens of
// the call, so the path is batch invariant like the others.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/detail/linear_isa.h"

#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define MOEMESH_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))

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

constexpr int64_t kTileRows = 16;  // tokens of an A tile, output rows of a B tile
constexpr int64_t kTileK = 32;     // bf16 columns of an A tile (64 bytes a row)
constexpr int64_t kPanel = 32;     // output rows packed together: two B tiles

// The tile configuration of the 2 x 2 kernel: tiles 0-3 accumulators (16 x 16 float32), 4-5 A
// (16 x 32 bf16), 6-7 B (16 pairs x 16 rows x 2 bf16). Every tile is 16 rows of 64 bytes.
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

// Packs rows [r0, r0 + kPanel) of w (zero past w.rows and past w.cols) into kPanel / 16 column
// strips of B tiles: strip s, column tile kt at packed + (s * k_tiles + kt) * 256 words. A B tile
// row is one column pair of 16 weight rows, so packing a tile transposes 16 x 16 32-bit words:
// word (pair p, lane n) of tile kt is the pair kt * 16 + p of weight row n.
MOEMESH_AMX void pack_panel(const WeightView& w, int64_t r0, int64_t k_tiles, uint32_t* packed) {
  const auto* base = static_cast<const uint16_t*>(w.data);
  const int64_t cols = w.cols;
  constexpr int64_t kTileWords = kTileRows * kTileK / 2;  // 256
  const int64_t rows = std::min(kPanel, w.rows - r0);
  for (int64_t s = 0; s < kPanel / kTileRows; ++s) {
    const int64_t strip_rows = std::clamp<int64_t>(rows - s * kTileRows, 0, kTileRows);
    const uint16_t* strip_base = base + (r0 + s * kTileRows) * cols;
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      uint32_t* tile = packed + (s * k_tiles + kt) * kTileWords;
      if (strip_rows == kTileRows && (kt + 1) * kTileK <= cols) {
        __m512i in[16], out[16];
        for (int n = 0; n < 16; ++n)
          in[n] = _mm512_loadu_si512(strip_base + n * cols + kt * kTileK);
        transpose16(in, out);
        for (int p = 0; p < 16; ++p) _mm512_storeu_si512(tile + p * kTileRows, out[p]);
        continue;
      }
      std::memset(tile, 0, kTileWords * sizeof(uint32_t));
      for (int64_t n = 0; n < strip_rows; ++n) {
        const uint16_t* row = strip_base + n * cols;
        for (int64_t c = kt * kTileK; c < std::min(cols, (kt + 1) * kTileK); ++c) {
          const int64_t within = c - kt * kTileK;
          reinterpret_cast<uint16_t*>(tile)[(within / 2) * (kTileRows * 2) + n * 2 + (within & 1)] =
              row[c];
        }
      }
    }
  }
}

// The tile programs over column tiles [kt_begin, kt_end). Tile numbers are immediates, so the 1-
// and 2-row-tile variants are spelled out. a: the bf16 activations of 32 (16) tokens, a_stride
// bytes a row; b: a panel as packed by pack_panel; c: the running sums, 32 (16) tokens x 32 rows
// of float32 (row stride 32), zero when `first`, loaded into the tiles and stored back.
MOEMESH_AMX void run_2x2(const uint16_t* a, int64_t a_stride, const uint16_t* b, int64_t k_tiles,
                         int64_t kt_begin, int64_t kt_end, bool first, float* c) {
  constexpr int64_t ld = kPanel * sizeof(float);
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, c, ld);
    _tile_loadd(1, c + kTileRows, ld);
    _tile_loadd(2, c + kTileRows * kPanel, ld);
    _tile_loadd(3, c + kTileRows * kPanel + kTileRows, ld);
  }
  const uint16_t* b1 = b + k_tiles * (kTileRows * kTileK);
  const auto* a1 = reinterpret_cast<const char*>(a) + kTileRows * a_stride;
  for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
    _tile_loadd(4, a + kt * kTileK, a_stride);
    _tile_loadd(6, b + kt * (kTileRows * kTileK), 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b1 + kt * (kTileRows * kTileK), 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a1 + kt * kTileK * 2, a_stride);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, ld);
  _tile_stored(1, c + kTileRows, ld);
  _tile_stored(2, c + kTileRows * kPanel, ld);
  _tile_stored(3, c + kTileRows * kPanel + kTileRows, ld);
}

MOEMESH_AMX void run_1x2(const uint16_t* a, int64_t a_stride, const uint16_t* b, int64_t k_tiles,
                         int64_t kt_begin, int64_t kt_end, bool first, float* c) {
  constexpr int64_t ld = kPanel * sizeof(float);
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
  } else {
    _tile_loadd(0, c, ld);
    _tile_loadd(1, c + kTileRows, ld);
  }
  const uint16_t* b1 = b + k_tiles * (kTileRows * kTileK);
  for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
    _tile_loadd(4, a + kt * kTileK, a_stride);
    _tile_loadd(6, b + kt * (kTileRows * kTileK), 64);
    _tile_loadd(7, b1 + kt * (kTileRows * kTileK), 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
  }
  _tile_stored(0, c, ld);
  _tile_stored(1, c + kTileRows, ld);
}

MOEMESH_AMX void release_tiles() {
  _tile_release();
}

}  // namespace

int64_t amx_padded_tokens(int64_t n_tokens) {
  return (n_tokens + kTileRows - 1) / kTileRows * kTileRows;
}

int64_t amx_row_stride(int64_t cols) {
  // One cache line more than the padded columns: rows of a power-of-two length would otherwise
  // map the 16 rows of an A tile to the same L1 set.
  return (cols + kTileK - 1) / kTileK * kTileK + kTileK;
}

MOEMESH_AMX void amx_round_activations(const float* x, int64_t n_tokens, int64_t cols,
                                       int64_t t_begin, int64_t t_end, uint16_t* xb) {
  const int64_t padded = amx_row_stride(cols);
  for (int64_t t = t_begin; t < t_end; ++t) {
    uint16_t* out = xb + t * padded;
    if (t >= n_tokens) {
      std::memset(out, 0, static_cast<std::size_t>(padded) * sizeof(uint16_t));
      continue;
    }
    const float* in = x + t * cols;
    int64_t c = 0;
    // vcvtneps2bf16 rounds to nearest even (NaN stays NaN), as f32_to_bf16 does.
    for (; c + 32 <= cols; c += 32) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(in + c + 16), _mm512_loadu_ps(in + c));
      _mm512_storeu_si512(out + c, reinterpret_cast<const __m512i&>(v));
    }
    for (; c < cols; ++c) out[c] = f32_to_bf16(in[c]);
    for (; c < padded; ++c) out[c] = 0;
  }
}

MOEMESH_AMX void linear_rows_amx(const uint16_t* xb, int64_t n_tokens, const WeightView& w,
                                 const float* bias, float* y, int64_t row_begin, int64_t row_end) {
  const int64_t k_tiles = (w.cols + kTileK - 1) / kTileK;
  const int64_t a_stride = amx_row_stride(w.cols) * static_cast<int64_t>(sizeof(uint16_t));
  const int64_t padded_tokens = amx_padded_tokens(n_tokens);
  // Per thread: the packed panel (32 rows x all columns) and the panel's running sums for every
  // token. The columns go in chunks whose two B strips (16 KiB) stay in L1 while every token's
  // tiles stream past; the sums go through memory between chunks (exactly: float32 both ways), so
  // each sum still runs over the column tiles in order.
  constexpr int64_t kChunkTiles = 8;
  thread_local std::vector<uint32_t, AlignedAllocator<uint32_t>> packed;
  thread_local std::vector<float, AlignedAllocator<float>> sums;
  if (w.packed == nullptr) packed.resize(static_cast<std::size_t>(kPanel * k_tiles * kTileK / 2));
  sums.resize(static_cast<std::size_t>(std::min<int64_t>(padded_tokens, 256) * kPanel));
  const auto* b = reinterpret_cast<const uint16_t*>(packed.data());  // or the panel of w.packed
  const int64_t panel_words = kPanel * k_tiles * kTileK / 2;
  load_tile_config();
  // Tokens in blocks whose activations (kTokenBlock rows, 1 MiB at 2,048 columns) stay in L2
  // while every panel of the chunk runs past them; a panel is packed again for each block.
  constexpr int64_t kTokenBlock = 256;
  for (int64_t m0 = 0; m0 < padded_tokens; m0 += kTokenBlock) {
    const int64_t m1 = std::min(padded_tokens, m0 + kTokenBlock);
    for (int64_t r0 = row_begin; r0 < row_end; r0 += kPanel) {
      if (w.packed != nullptr)
        b = reinterpret_cast<const uint16_t*>(w.packed + r0 / kPanel * panel_words);
      else
        pack_panel(w, r0, k_tiles, packed.data());
      // One token step (decode): no other tokens reuse the strips, so no chunks.
      const int64_t chunk = m1 - m0 <= 2 * kTileRows ? k_tiles : kChunkTiles;
      for (int64_t k0 = 0; k0 < k_tiles; k0 += chunk) {
        const int64_t k1 = std::min(k_tiles, k0 + chunk);
        for (int64_t t0 = m0; t0 < m1; t0 += 2 * kTileRows) {
          const uint16_t* a = xb + t0 * amx_row_stride(w.cols);
          float* c = sums.data() + (t0 - m0) * kPanel;
          if (t0 + kTileRows < m1)
            run_2x2(a, a_stride, b, k_tiles, k0, k1, k0 == 0, c);
          else
            run_1x2(a, a_stride, b, k_tiles, k0, k1, k0 == 0, c);
        }
      }
      const int64_t rows = std::min(kPanel, row_end - r0);
      for (int64_t t = m0; t < std::min(m1, n_tokens); ++t) {
        float* out = y + t * w.rows + r0;
        const float* c = sums.data() + (t - m0) * kPanel;
        if (bias != nullptr)
          for (int64_t r = 0; r < rows; ++r) out[r] = c[r] + bias[r0 + r];
        else
          std::memcpy(out, c, static_cast<std::size_t>(rows) * sizeof(float));
      }
    }
  }
  release_tiles();
}

MOEMESH_AMX void amx_pack_panels(const WeightView& w, int64_t panel_begin, int64_t panel_end,
                                 uint32_t* out) {
  const int64_t k_tiles = (w.cols + kTileK - 1) / kTileK;
  const int64_t panel_words = kPanel * k_tiles * kTileK / 2;
  for (int64_t p = panel_begin; p < panel_end; ++p)
    pack_panel(w, p * kPanel, k_tiles, out + p * panel_words);
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
