// The paged KV cache: FP8 E4M3 conversions, writing keys and values into blocks, attention over
// the blocks of one sequence, and block copies.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/detail/dot.h"

namespace moemesh::kernels {

namespace {

constexpr float kFp8Max = 448.0f;

// Rounds to nearest even, as f32_to_bf16 does (inline here so that a row's loop stays tight).
inline uint16_t to_bf16(float v) {
  uint32_t u = std::bit_cast<uint32_t>(v);
  if (std::isnan(v)) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

// E4M3 code to float32 without a table, so that a row's loop vectorises. With c the code less
// its sign, c << 20 are a normal value's exponent and mantissa bits under a rebiased exponent
// (bias 127 instead of 7), which reads a subnormal code m (c < 8) as 2^-7 + m * 2^-10 instead of
// m * 2^-9: adding (that - 2^-6) again makes it exact. 0x7F is NaN (all bits set). Selections are
// masks, not branches.
inline float fp8_bits_to_f32(uint8_t code) {
  const uint32_t b = code;
  const uint32_t c = b & 0x7F;
  const float normal = std::bit_cast<float>((c << 20) + (120u << 23));
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(c < 8);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(c == 0x7F);
  const float fix = std::bit_cast<float>(std::bit_cast<uint32_t>(normal - 0x1p-6f) & is_subnormal);
  return std::bit_cast<float>((std::bit_cast<uint32_t>(normal + fix) | is_nan) |
                              ((b & 0x80) << 24));
}

// Rows are widened by these two, compiled for AVX-512 and AVX2 as well where the compiler can
// (chosen when the program loads): on a Xeon with AVX-512 that widens FP8 rows about 3x faster
// than the SSE2 loop, which is no faster than a table lookup.
#if defined(__SANITIZE_THREAD__)
// ThreadSanitizer: ifunc resolvers run while the program is relocated, before TSan's runtime is
// up, and crash there once instrumented; TSan builds keep the portable loop.
#define MOEMESH_ROW_CLONES
#elif defined(__x86_64__) && defined(__clang__)
// clang refuses noinline on multiversioned functions (their ifunc is never inlined anyway).
#define MOEMESH_ROW_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__GNUC__)
#define MOEMESH_ROW_CLONES \
  __attribute__((noinline, target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define MOEMESH_ROW_CLONES
#endif

MOEMESH_ROW_CLONES void bf16_row_to_f32(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i)
    dst[i] = std::bit_cast<float>(static_cast<uint32_t>(src[i]) << 16);
}

MOEMESH_ROW_CLONES void fp8_row_to_f32(const uint8_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = fp8_bits_to_f32(src[i]);
}

float load_f32(const char* p) {
  float f;
  std::memcpy(&f, p, sizeof f);
  return f;
}

// A stored row as float32: F32 rows are read in place, others are widened into `buf`. FP8 rows
// come back unscaled (the caller applies the row's scale to a dot product or a weight instead of
// to every element).
template <KvDtype D>
const float* widen(const char* row, int64_t n, float* buf) {
  if constexpr (D == KvDtype::F32) {
    return reinterpret_cast<const float*>(row);
  } else if constexpr (D == KvDtype::BF16) {
    bf16_row_to_f32(reinterpret_cast<const uint16_t*>(row), n, buf);
    return buf;
  } else {
    fp8_row_to_f32(reinterpret_cast<const uint8_t*>(row), n, buf);
    return buf;
  }
}

// Rows are visited in runs of up to kRun consecutive positions within one block, so that a few
// independent dot products (or multiply-adds into one output) are in flight at once.
constexpr int kRun = 4;

// How many positions ahead of the rows in use for_each_run prefetches. A kv head's consecutive
// rows are n_kv_heads rows apart and blocks are anywhere, which the hardware prefetchers do not
// follow: without it, decode waits on memory at every row.
constexpr int64_t kPrefetchAhead = 2 * kRun;

// Calls fn(p, n, rows, scales) for the rows of kv head kvh at positions [first, end) of a
// sequence, in order, n <= kRun rows at a time: rows[r] points at the values of position p + r (at
// `offset` in its block), scales[r] at its float32 scale (at `scale_offset`; FP8 only).
template <typename Fn>
inline void for_each_run(const PagedKv& c, const int32_t* table, int64_t offset,
                         int64_t scale_offset, int64_t kvh, int64_t first, int64_t end, Fn&& fn) {
  const int64_t row_bytes = c.head_dim * static_cast<int64_t>(kv_dtype_size(c.dtype));
  const int64_t token_bytes = c.n_kv_heads * row_bytes;
  const auto scale_bytes = static_cast<int64_t>(sizeof(float));
  const int64_t token_scale_bytes = c.n_kv_heads * scale_bytes;
  int64_t p = first;
  while (p < end) {
    const int64_t b = p / c.block_size;
    const int64_t stop = std::min(end, (b + 1) * c.block_size);
    const char* base = c.blocks[table[b]];
    for (; p < stop; p += kRun) {
      const int n = static_cast<int>(std::min<int64_t>(kRun, stop - p));
      const int64_t r0 = p % c.block_size;
      const char* rows[kRun];
      const char* scales[kRun];
      for (int r = 0; r < n; ++r) {
        rows[r] = base + offset + (r0 + r) * token_bytes + kvh * row_bytes;
        scales[r] = base + scale_offset + (r0 + r) * token_scale_bytes + kvh * scale_bytes;
      }
      for (int64_t a = p + kPrefetchAhead, a_end = std::min(end, a + n); a < a_end; ++a) {
        const char* ab = c.blocks[table[a / c.block_size]];
        const char* row = ab + offset + (a % c.block_size) * token_bytes + kvh * row_bytes;
        for (int64_t byte = 0; byte < row_bytes; byte += 64) __builtin_prefetch(row + byte);
        if (c.dtype == KvDtype::FP8)
          __builtin_prefetch(ab + scale_offset + (a % c.block_size) * token_scale_bytes +
                             kvh * scale_bytes);
      }
      fn(p, n, rows, scales);
    }
    p = stop;
  }
}

// Four floats in one register (GCC/Clang vector extension: lane-wise arithmetic, nothing
// reassociated).
typedef float F4 __attribute__((vector_size(16)));

inline F4 load4(const float* p) {
  F4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// kRun dot products of q with k[0..kRun), each summed exactly as detail::dot sums it (its eight
// accumulators are the low and high halves here), so that a result does not depend on how rows
// are grouped; the kRun products are interleaved to keep more additions in flight.
inline void dot_run(const float* q, const float* const* k, int64_t n, float* out) {
  static_assert(kRun == 4);
  const float *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
  F4 l0 = {}, h0 = {}, l1 = {}, h1 = {}, l2 = {}, h2 = {}, l3 = {}, h3 = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const F4 ql = load4(q + i), qh = load4(q + i + 4);
    l0 += ql * load4(k0 + i);
    h0 += qh * load4(k0 + i + 4);
    l1 += ql * load4(k1 + i);
    h1 += qh * load4(k1 + i + 4);
    l2 += ql * load4(k2 + i);
    h2 += qh * load4(k2 + i + 4);
    l3 += ql * load4(k3 + i);
    h3 += qh * load4(k3 + i + 4);
  }
  const F4 sums[kRun] = {l0 + h0, l1 + h1, l2 + h2, l3 + h3};
  for (int r = 0; r < kRun; ++r) {
    float tail = 0;
    for (int64_t t = i; t < n; ++t) tail += q[t] * k[r][t];
    const F4& a = sums[r];
    out[r] = ((a[0] + a[1]) + (a[2] + a[3])) + tail;
  }
}

// o += w[r] * v[r] for r < kRun, added in that order, element by element: the same roundings as
// kRun separate passes, with one load and store of o instead of kRun.
inline void axpy_run(float* __restrict o, const float* w, const float* const* v, int64_t n) {
  const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  const float *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
  static_assert(kRun == 4);
  for (int64_t d = 0; d < n; ++d)
    o[d] = (((o[d] + w0 * v0[d]) + w1 * v1[d]) + w2 * v2[d]) + w3 * v3[d];
}

inline void axpy(float* __restrict o, float w, const float* v, int64_t n) {
  for (int64_t d = 0; d < n; ++d) o[d] += w * v[d];
}

// How paged_attention divides its work. A task is a tile of `tile` consecutive queries and a
// slice of `per` consecutive query heads of one GQA group: it reads each key and value row it
// needs once, for all tile * per (query, head) pairs. The group is split only when there are
// fewer (query, kv head) pairs than threads (decode with few kv heads); queries are tiled up to
// kMaxPairsPerTask pairs, while enough tasks remain to balance the pool and a task's scores stay
// within kMaxScores floats.
struct Plan {
  int64_t split = 1;  // slices per GQA group
  int64_t per = 1;    // query heads per slice
  int64_t tile = 1;   // queries per tile
  int64_t n_tiles = 1;
};

constexpr int64_t kMaxPairsPerTask = 16;
constexpr int64_t kMaxScores = int64_t{1} << 20;

Plan make_plan(int64_t n_q, int64_t n_keys, int64_t n_kv, int64_t group, int threads) {
  Plan plan;
  while (plan.split < group && n_q * n_kv * plan.split < threads) {
    ++plan.split;
    while (group % plan.split != 0) ++plan.split;
  }
  plan.per = group / plan.split;
  plan.tile = std::clamp<int64_t>(kMaxPairsPerTask / plan.per, 1, n_q);
  const auto n_tiles = [&](int64_t tile) { return (n_q + tile - 1) / tile; };
  while (plan.tile > 1 && (n_tiles(plan.tile) * n_kv * plan.split < 4 * threads ||
                           plan.tile * plan.per * n_keys > kMaxScores))
    plan.tile = (plan.tile + 1) / 2;
  plan.n_tiles = n_tiles(plan.tile);
  return plan;
}

struct Task {
  const float* q;  // query t0, head h0
  float* out;      // likewise
  int64_t n_queries, heads, kvh;
  int64_t pos0;    // position of the tile's first query
  int64_t stride;  // floats between consecutive queries of q and out
};

// The attention of one task. scores holds n_queries * heads * (keys of the tile) floats, rows
// kRun * head_dim floats.
template <KvDtype D>
void attend(const Task& task, const PagedKv& c, const int32_t* table, float scale, int64_t window,
            std::vector<float>& scores, std::vector<float>& rows) {
  const int64_t hd = c.head_dim;
  const auto first_key = [&](int64_t pos) {
    return window > 0 ? std::max<int64_t>(0, pos - window + 1) : int64_t{0};
  };
  const int64_t key0 = first_key(task.pos0);
  const int64_t key_end = task.pos0 + task.n_queries;  // one past the last query's position
  const int64_t n_keys = key_end - key0;
  const int64_t pairs = task.n_queries * task.heads;
  scores.resize(static_cast<std::size_t>(pairs * n_keys));
  rows.resize(static_cast<std::size_t>(kRun * hd));
  // Pair (i, g) (query i of the tile, head g of the slice) has its scores at pair_scores(i, g),
  // indexed by key position - key0; it sees keys [first_key(pos0 + i), pos0 + i].
  const auto pair_scores = [&](int64_t i, int64_t g) {
    return scores.data() + (i * task.heads + g) * n_keys;
  };
  // A key at position p is seen by the queries i in [seen_from(p), seen_to(p)) of the tile.
  const auto seen_from = [&](int64_t p) { return std::max<int64_t>(0, p - task.pos0); };
  const auto seen_to = [&](int64_t p) {
    return window > 0 ? std::min(task.n_queries, p + window - task.pos0) : task.n_queries;
  };
  // Widens a run's rows (and reads their scales, FP8 only; 1 otherwise).
  const auto widen_run = [&](int n, const char* const* src, const char* const* scales,
                             const float** dst, float* dst_scales) {
    for (int r = 0; r < n; ++r) {
      dst[r] = widen<D>(src[r], hd, rows.data() + r * hd);
      dst_scales[r] = D == KvDtype::FP8 ? load_f32(scales[r]) : 1.0f;
    }
  };

  // Scores. A query that sees every row of a full run takes them together; the others (at the
  // edges of the causal triangle or the window) row by row.
  for_each_run(c, table, c.k_offset, c.k_scale_offset, task.kvh, key0, key_end,
               [&](int64_t p, int n, const char* const* src, const char* const* scales) {
                 const float* k[kRun];
                 float ks[kRun];
                 widen_run(n, src, scales, k, ks);
                 for (int r = 0; r < n; ++r) ks[r] = D == KvDtype::FP8 ? scale * ks[r] : scale;
                 const int64_t all_from = seen_from(p + n - 1), all_to = seen_to(p);
                 for (int64_t i = seen_from(p), end = seen_to(p + n - 1); i < end; ++i) {
                   const float* qi = task.q + i * task.stride;
                   if (n == kRun && i >= all_from && i < all_to) {
                     for (int64_t g = 0; g < task.heads; ++g) {
                       float dots[kRun];
                       dot_run(qi + g * hd, k, hd, dots);
                       float* s = pair_scores(i, g) + (p - key0);
                       for (int r = 0; r < kRun; ++r) s[r] = dots[r] * ks[r];
                     }
                     continue;
                   }
                   for (int r = 0; r < n; ++r) {
                     if (i < seen_from(p + r) || i >= seen_to(p + r)) continue;
                     for (int64_t g = 0; g < task.heads; ++g)
                       pair_scores(i, g)[p + r - key0] = detail::dot(qi + g * hd, k[r], hd) * ks[r];
                   }
                 }
               });

  // Softmax of each pair over its keys, in float32, as attention() computes it; the scores
  // become the weights.
  for (int64_t i = 0; i < task.n_queries; ++i) {
    const int64_t lo = first_key(task.pos0 + i) - key0;
    const int64_t hi = task.pos0 + i + 1 - key0;
    for (int64_t g = 0; g < task.heads; ++g) {
      float* s = pair_scores(i, g);
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t j = lo; j < hi; ++j) max_score = std::max(max_score, s[j]);
      float sum = 0;
      for (int64_t j = lo; j < hi; ++j) {
        s[j] = std::exp(s[j] - max_score);
        sum += s[j];
      }
      const float inv = 1.0f / sum;
      for (int64_t j = lo; j < hi; ++j) s[j] *= inv;
      float* o = task.out + i * task.stride + g * hd;
      std::fill(o, o + hd, 0.0f);
    }
  }

  // Outputs: the weighted values, added in key order.
  for_each_run(c, table, c.v_offset, c.v_scale_offset, task.kvh, key0, key_end,
               [&](int64_t p, int n, const char* const* src, const char* const* scales) {
                 const float* v[kRun];
                 float vs[kRun];
                 widen_run(n, src, scales, v, vs);
                 const int64_t all_from = seen_from(p + n - 1), all_to = seen_to(p);
                 for (int64_t i = seen_from(p), end = seen_to(p + n - 1); i < end; ++i) {
                   float* oi = task.out + i * task.stride;
                   if (n == kRun && i >= all_from && i < all_to) {
                     for (int64_t g = 0; g < task.heads; ++g) {
                       const float* s = pair_scores(i, g) + (p - key0);
                       float w[kRun];
                       for (int r = 0; r < kRun; ++r)
                         w[r] = D == KvDtype::FP8 ? s[r] * vs[r] : s[r];
                       axpy_run(oi + g * hd, w, v, hd);
                     }
                     continue;
                   }
                   for (int r = 0; r < n; ++r) {
                     if (i < seen_from(p + r) || i >= seen_to(p + r)) continue;
                     for (int64_t g = 0; g < task.heads; ++g) {
                       const float s = pair_scores(i, g)[p + r - key0];
                       axpy(oi + g * hd, D == KvDtype::FP8 ? s * vs[r] : s, v[r], hd);
                     }
                   }
                 }
               });
}

template <KvDtype D>
void write_rows(const float* x, int64_t n, const int32_t* table, int64_t first_pos,
                const PagedKv& c, int64_t offset, int64_t scale_offset) {
  const int64_t hd = c.head_dim;
  const int64_t row_bytes = hd * static_cast<int64_t>(kv_dtype_size(D));
  for (int64_t t = 0; t < n; ++t) {
    const int64_t p = first_pos + t;
    char* base = c.blocks[table[p / c.block_size]];
    const int64_t r = p % c.block_size;
    for (int64_t h = 0; h < c.n_kv_heads; ++h) {
      const float* src = x + (t * c.n_kv_heads + h) * hd;
      char* dst = base + offset + (r * c.n_kv_heads + h) * row_bytes;
      if constexpr (D == KvDtype::F32) {
        std::memcpy(dst, src, static_cast<std::size_t>(row_bytes));
      } else if constexpr (D == KvDtype::BF16) {
        auto* out = reinterpret_cast<uint16_t*>(dst);
        for (int64_t d = 0; d < hd; ++d) out[d] = to_bf16(src[d]);
      } else {
        float amax = 0;
        for (int64_t d = 0; d < hd; ++d) amax = std::max(amax, std::fabs(src[d]));
        float scale = amax / kFp8Max;
        if (!(scale > 0)) scale = 1.0f;  // an all-zero row (or one too small to scale)
        auto* out = reinterpret_cast<uint8_t*>(dst);
        for (int64_t d = 0; d < hd; ++d) out[d] = f32_to_fp8_e4m3(src[d] / scale);
        std::memcpy(base + scale_offset + (r * c.n_kv_heads + h) * sizeof(float), &scale,
                    sizeof scale);
      }
    }
  }
}

template <KvDtype D>
void write_kv(const float* k, const float* v, int64_t n, const int32_t* table, int64_t first_pos,
              const PagedKv& c) {
  write_rows<D>(k, n, table, first_pos, c, c.k_offset, c.k_scale_offset);
  write_rows<D>(v, n, table, first_pos, c, c.v_offset, c.v_scale_offset);
}

}  // namespace

const char* kv_dtype_name(KvDtype t) {
  switch (t) {
    case KvDtype::F32:
      return "F32";
    case KvDtype::BF16:
      return "BF16";
    case KvDtype::FP8:
      return "FP8";
  }
  return "?";
}

std::size_t kv_dtype_size(KvDtype t) {
  switch (t) {
    case KvDtype::F32:
      return 4;
    case KvDtype::BF16:
      return 2;
    case KvDtype::FP8:
      return 1;
  }
  return 0;
}

float fp8_e4m3_to_f32(uint8_t bits) {
  return fp8_bits_to_f32(bits);
}

uint8_t f32_to_fp8_e4m3(float v) {
  uint32_t u = std::bit_cast<uint32_t>(v);
  const auto sign = static_cast<uint8_t>((u >> 24) & 0x80);
  u &= 0x7FFFFFFF;
  if (u > 0x7F800000) return 0x7F;                                // NaN
  if (u >= std::bit_cast<uint32_t>(kFp8Max)) return sign | 0x7E;  // saturate (infinities too)
  if (u < std::bit_cast<uint32_t>(0x1p-6f)) {
    // Subnormal, in steps of 2^-9: the ulp of 2^14, so the addition rounds to nearest even and
    // leaves the step count in the low bits (8 steps carry into the smallest normal, 0x08).
    const float r = std::bit_cast<float>(u) + 0x1p14f;
    return sign |
           static_cast<uint8_t>(std::bit_cast<uint32_t>(r) - std::bit_cast<uint32_t>(0x1p14f));
  }
  // Normal: keep three mantissa bits, rounding to nearest even (a carry bumps the exponent), and
  // rebias the exponent from 127 to 7.
  u += 0x7FFFF + ((u >> 20) & 1);
  const uint32_t code = (u >> 20) - (120u << 3);
  return sign | static_cast<uint8_t>(std::min<uint32_t>(code, 0x7E));
}

void paged_kv_write(const float* k, const float* v, int64_t n, const int32_t* block_table,
                    int64_t first_pos, const PagedKv& cache) {
  switch (cache.dtype) {
    case KvDtype::F32:
      return write_kv<KvDtype::F32>(k, v, n, block_table, first_pos, cache);
    case KvDtype::BF16:
      return write_kv<KvDtype::BF16>(k, v, n, block_table, first_pos, cache);
    case KvDtype::FP8:
      return write_kv<KvDtype::FP8>(k, v, n, block_table, first_pos, cache);
  }
}

void paged_attention(const float* q, int64_t n_q, const PagedKv& cache, const int32_t* block_table,
                     int64_t past, int64_t n_heads, float scale, int64_t window, float* out,
                     ThreadPool* pool) {
  if (n_q <= 0) return;
  const int64_t n_kv = cache.n_kv_heads;
  const int64_t hd = cache.head_dim;
  const int64_t group = n_heads / n_kv;
  const int64_t stride = n_heads * hd;
  // Keys a task may read: the whole sequence, or a window and the tile's own positions.
  const int64_t n_keys = window > 0 ? std::min(past + n_q, window + n_q) : past + n_q;
  const Plan plan = make_plan(n_q, n_keys, n_kv, group, pool ? pool->size() : 1);
  const int64_t n_tasks = plan.n_tiles * n_kv * plan.split;
  parallel_for(pool, n_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> rows;
    for (int64_t id = begin; id < end; ++id) {
      const int64_t tile = id / (n_kv * plan.split);
      const int64_t kvh = id / plan.split % n_kv;
      const int64_t h0 = kvh * group + id % plan.split * plan.per;
      const int64_t t0 = tile * plan.tile;
      Task task;
      task.q = q + t0 * stride + h0 * hd;
      task.out = out + t0 * stride + h0 * hd;
      task.n_queries = std::min(plan.tile, n_q - t0);
      task.heads = plan.per;
      task.kvh = kvh;
      task.pos0 = past + t0;
      task.stride = stride;
      switch (cache.dtype) {
        case KvDtype::F32:
          attend<KvDtype::F32>(task, cache, block_table, scale, window, scores, rows);
          break;
        case KvDtype::BF16:
          attend<KvDtype::BF16>(task, cache, block_table, scale, window, scores, rows);
          break;
        case KvDtype::FP8:
          attend<KvDtype::FP8>(task, cache, block_table, scale, window, scores, rows);
          break;
      }
    }
  });
}

void copy_kv_block(const PagedKv& cache, int32_t src, int32_t dst, int64_t block_bytes) {
  if (src == dst || block_bytes <= 0) return;
  std::memcpy(cache.blocks[dst], cache.blocks[src], static_cast<std::size_t>(block_bytes));
}

}  // namespace moemesh::kernels
