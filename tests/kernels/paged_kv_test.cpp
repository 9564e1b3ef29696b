// The paged KV cache kernels: writes (F32, BF16, FP8 with per-row scales), paged attention
// against attention() on the same values gathered contiguously, FP8 E4M3 conversions and accuracy,
// and block copies.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "tests/kernels/reference.h"

namespace moemesh::kernels {
namespace {

using test::random_vector;

constexpr KvDtype kDtypes[] = {KvDtype::F32, KvDtype::BF16, KvDtype::FP8};

// FP8 E4M3 ("fn") by its definition: (-1)^s * 2^(e-7) * (1 + m/8), subnormals m * 2^-9,
// S.1111.111 NaN.
float naive_fp8_decode(uint8_t code) {
  const int e = (code >> 3) & 0xF;
  const int m = code & 7;
  if (e == 0xF && m == 7) return std::numeric_limits<float>::quiet_NaN();
  const double mag = e == 0 ? std::ldexp(m, -9) : std::ldexp(1.0 + m / 8.0, e - 7);
  return static_cast<float>((code & 0x80) ? -mag : mag);
}

// The nearest finite code to v (ties to the code with an even mantissa), saturating at 448.
uint8_t naive_fp8_encode(float v) {
  const double a = std::fabs(static_cast<double>(v));
  int best = 0;
  for (int c = 1; c <= 0x7E; ++c) {
    const double dc = std::fabs(naive_fp8_decode(static_cast<uint8_t>(c)) - a);
    const double db = std::fabs(naive_fp8_decode(static_cast<uint8_t>(best)) - a);
    if (dc < db || (dc == db && (c & 1) == 0)) best = c;
  }
  return static_cast<uint8_t>(best | (std::signbit(v) ? 0x80 : 0));
}

// A paged cache of `layers` layers over n_blocks separately allocated blocks, laid out as
// [layer][K | V][block_size][n_kv_heads][head_dim], then (FP8) the scales [layer][K |
// V][block_size] [n_kv_heads]. Blocks start poisoned (every byte 0xFF: NaN in each dtype).
class Blocks {
 public:
  Blocks(KvDtype dtype, int64_t n_blocks, int64_t block_size, int64_t n_kv, int64_t head_dim,
         int64_t layers = 2)
      : dtype_(dtype), bs_(block_size), n_kv_(n_kv), hd_(head_dim), layers_(layers) {
    plane_ = bs_ * n_kv_ * hd_ * static_cast<int64_t>(kv_dtype_size(dtype));
    scale_plane_ = dtype == KvDtype::FP8 ? bs_ * n_kv_ * 4 : 0;
    bytes_ = layers_ * 2 * (plane_ + scale_plane_);
    for (int64_t b = 0; b < n_blocks; ++b) {
      mem_.emplace_back(new char[static_cast<std::size_t>(bytes_)]);
      std::memset(mem_.back().get(), 0xFF, static_cast<std::size_t>(bytes_));
      // Something between the blocks, so that they are not evenly spaced either.
      spacers_.emplace_back(new char[static_cast<std::size_t>(64 * (b % 5) + 8)]);
      ptrs_.push_back(mem_.back().get());
    }
  }

  PagedKv layer(int64_t l) const {
    PagedKv v;
    v.blocks = ptrs_.data();
    v.k_offset = 2 * l * plane_;
    v.v_offset = (2 * l + 1) * plane_;
    v.k_scale_offset = 2 * layers_ * plane_ + 2 * l * scale_plane_;
    v.v_scale_offset = 2 * layers_ * plane_ + (2 * l + 1) * scale_plane_;
    v.dtype = dtype_;
    v.block_size = bs_;
    v.n_kv_heads = n_kv_;
    v.head_dim = hd_;
    return v;
  }
  int64_t bytes() const { return bytes_; }
  char* block(int32_t b) const { return ptrs_[static_cast<std::size_t>(b)]; }
  int64_t n_blocks() const { return static_cast<int64_t>(ptrs_.size()); }

 private:
  KvDtype dtype_;
  int64_t bs_, n_kv_, hd_, layers_;
  int64_t plane_ = 0, scale_plane_ = 0, bytes_ = 0;
  std::vector<std::unique_ptr<char[]>> mem_;
  std::vector<std::unique_ptr<char[]>> spacers_;
  std::vector<char*> ptrs_;
};

// A shuffled table of `needed` distinct blocks out of n_blocks.
std::vector<int32_t> shuffled_table(int64_t needed, int64_t n_blocks, uint32_t seed) {
  std::vector<int32_t> ids(static_cast<std::size_t>(n_blocks));
  std::iota(ids.begin(), ids.end(), 0);
  std::mt19937 rng(seed);
  std::shuffle(ids.begin(), ids.end(), rng);
  ids.resize(static_cast<std::size_t>(needed));
  return ids;
}

// Byte address of row (position p, kv head h) of a layer's keys (or values), read naively.
const char* row_at(const PagedKv& c, const std::vector<int32_t>& table, int64_t p, int64_t h,
                   bool values) {
  const char* base = c.blocks[table[static_cast<std::size_t>(p / c.block_size)]];
  const int64_t esize = static_cast<int64_t>(kv_dtype_size(c.dtype));
  return base + (values ? c.v_offset : c.k_offset) +
         ((p % c.block_size) * c.n_kv_heads + h) * c.head_dim * esize;
}

const char* scale_ptr(const PagedKv& c, const std::vector<int32_t>& table, int64_t p, int64_t h,
                      bool values) {
  const char* base = c.blocks[table[static_cast<std::size_t>(p / c.block_size)]];
  return base + (values ? c.v_scale_offset : c.k_scale_offset) +
         ((p % c.block_size) * c.n_kv_heads + h) * 4;
}

float scale_at(const PagedKv& c, const std::vector<int32_t>& table, int64_t p, int64_t h,
               bool values) {
  float s;
  std::memcpy(&s, scale_ptr(c, table, p, h, values), sizeof s);
  return s;
}

// The stored keys (or values) of positions [0, total) as float32 [total, n_kv * head_dim]: FP8
// codes times their row's scale.
std::vector<float> gather(const PagedKv& c, const std::vector<int32_t>& table, int64_t total,
                          bool values) {
  const int64_t hd = c.head_dim;
  std::vector<float> out(static_cast<std::size_t>(total * c.n_kv_heads * hd));
  for (int64_t p = 0; p < total; ++p)
    for (int64_t h = 0; h < c.n_kv_heads; ++h) {
      const char* r = row_at(c, table, p, h, values);
      float* o = out.data() + (p * c.n_kv_heads + h) * hd;
      for (int64_t d = 0; d < hd; ++d) {
        switch (c.dtype) {
          case KvDtype::F32:
            std::memcpy(&o[d], r + 4 * d, 4);
            break;
          case KvDtype::BF16: {
            uint16_t bits;
            std::memcpy(&bits, r + 2 * d, 2);
            o[d] = bf16_to_f32(bits);
            break;
          }
          case KvDtype::FP8:
            o[d] = naive_fp8_decode(static_cast<uint8_t>(r[d])) * scale_at(c, table, p, h, values);
            break;
        }
      }
    }
  return out;
}

std::vector<float> bf16_rounded(const std::vector<float>& x) {
  std::vector<float> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = bf16_to_f32(f32_to_bf16(x[i]));
  return y;
}

std::vector<float> poisoned(std::size_t n) {
  return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN());
}

// Each element within rel * (|expected| + max|expected|) of expected (NaN fails).
void expect_close(const std::vector<float>& got, const std::vector<float>& want, double rel,
                  const char* what) {
  ASSERT_EQ(got.size(), want.size());
  double peak = 0;
  for (float w : want) peak = std::max(peak, std::fabs(double(w)));
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double tol = rel * (std::fabs(double(want[i])) + peak);
    ASSERT_TRUE(std::fabs(double(got[i]) - want[i]) <= tol)
        << what << " element " << i << ": " << got[i] << " vs " << want[i];
  }
}

// Writes positions [0, total) of k and v into the cache in a few chunks of random sizes, as
// a prefill followed by decode steps would.
void write_in_chunks(const std::vector<float>& k, const std::vector<float>& v, int64_t total,
                     const std::vector<int32_t>& table, const PagedKv& c, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t row = c.n_kv_heads * c.head_dim;
  int64_t p = 0;
  while (p < total) {
    const int64_t n = std::min<int64_t>(total - p, 1 + static_cast<int64_t>(rng() % 13));
    paged_kv_write(k.data() + p * row, v.data() + p * row, n, table.data(), p, c);
    p += n;
  }
}

struct Case {
  int64_t n_q, past, heads, kv_heads, d, window, block_size;
};

class PagedAttentionTest : public ::testing::TestWithParam<Case> {};

// For every dtype and with and without a pool: paged_attention equals attention() over the
// stored values gathered contiguously (F32: the inputs; BF16: the inputs rounded to bf16; FP8:
// the decoded codes times their scales), to 1e-5 relative, and to the bit for F32 and BF16.
TEST_P(PagedAttentionTest, MatchesContiguousAttention) {
  const Case c = GetParam();
  const int64_t total = c.past + c.n_q;
  const int64_t row = c.kv_heads * c.d;
  const auto q = random_vector(c.n_q * c.heads * c.d, 11);
  const auto k = random_vector(total * row, 12);
  const auto v = random_vector(total * row, 13);
  const float scale = 1.0f / std::sqrt(float(c.d));
  const int64_t needed = (total + c.block_size - 1) / c.block_size;
  ThreadPool pool4(4);
  for (KvDtype dtype : kDtypes) {
    SCOPED_TRACE(kv_dtype_name(dtype));
    Blocks blocks(dtype, needed + 5, c.block_size, c.kv_heads, c.d);
    const PagedKv cache = blocks.layer(1);
    const auto table = shuffled_table(needed, blocks.n_blocks(), 14);
    write_in_chunks(k, v, total, table, cache, 15);

    std::vector<float> kr = k, vr = v;
    if (dtype == KvDtype::BF16) {
      kr = bf16_rounded(k);
      vr = bf16_rounded(v);
    } else if (dtype == KvDtype::FP8) {
      kr = gather(cache, table, total, false);
      vr = gather(cache, table, total, true);
    }
    auto want = poisoned(q.size());
    attention(q.data(), c.n_q, kr.data(), vr.data(), c.past, c.heads, c.kv_heads, c.d, scale,
              c.window, want.data(), nullptr);
    for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &pool4}) {
      SCOPED_TRACE(pool ? "pool of 4" : "no pool");
      auto got = poisoned(q.size());
      paged_attention(q.data(), c.n_q, cache, table.data(), c.past, c.heads, scale, c.window,
                      got.data(), pool);
      expect_close(got, want, 1e-5, "output");
      if (dtype != KvDtype::FP8) {
        // The contract's stronger promise: the same sums in the same order as attention().
        EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, PagedAttentionTest,
    ::testing::Values(Case{1, 300, 8, 2, 64, 0, 16},   // decode, GQA 4
                      Case{1, 40, 4, 4, 16, 0, 1},     // decode, block size 1
                      Case{1, 99, 6, 3, 20, 0, 7},     // decode, GQA 2, head_dim % 8 != 0
                      Case{1, 0, 4, 2, 8, 0, 16},      // the first token
                      Case{37, 0, 4, 1, 16, 0, 16},    // prefill, GQA 4
                      Case{20, 0, 6, 3, 8, 0, 7},      // prefill, GQA 2, block size 7
                      Case{19, 0, 2, 2, 12, 0, 1},     // prefill, block size 1
                      Case{9, 23, 4, 2, 16, 0, 7},     // chunked prefill
                      Case{33, 50, 8, 8, 24, 0, 16},   // chunked prefill, no GQA
                      Case{13, 20, 4, 2, 16, 5, 7},    // sliding window, chunk
                      Case{1, 100, 4, 1, 16, 17, 16},  // sliding window, decode
                      Case{40, 0, 8, 2, 8, 3, 1},      // window shorter than a query tile
                      Case{6, 4, 4, 2, 8, 64, 16}));   // window longer than the sequence

// Every stored element of positions [first, first + n) holds what the spec says, and every other
// byte of every block (the other layer, other rows, other positions) keeps its poison.
TEST(PagedKvWrite, StoresEachDtypeAsSpecifiedAndNothingElse) {
  const int64_t bs = 7, n_kv = 3, hd = 12, first = 5, n = 17;
  const int64_t row = n_kv * hd;
  const auto k = random_vector(n * row, 21);
  const auto v = random_vector(n * row, 22, 3.0f);
  for (KvDtype dtype : kDtypes) {
    SCOPED_TRACE(kv_dtype_name(dtype));
    Blocks blocks(dtype, 6, bs, n_kv, hd);
    const auto table = shuffled_table(4, blocks.n_blocks(), 23);
    const PagedKv cache = blocks.layer(1);
    paged_kv_write(k.data(), v.data(), n, table.data(), first, cache);

    std::vector<std::vector<bool>> touched(static_cast<std::size_t>(blocks.n_blocks()),
                                           std::vector<bool>(blocks.bytes(), false));
    const auto mark = [&](const char* p, int64_t len) {
      for (int64_t b = 0; b < blocks.n_blocks(); ++b) {
        const char* base = blocks.block(static_cast<int32_t>(b));
        if (p >= base && p < base + blocks.bytes())
          for (int64_t i = 0; i < len; ++i) touched[b][(p - base) + i] = true;
      }
    };
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < n_kv; ++h)
        for (bool values : {false, true}) {
          const float* x = (values ? v.data() : k.data()) + (t * n_kv + h) * hd;
          const char* r = row_at(cache, table, first + t, h, values);
          const int64_t esize = static_cast<int64_t>(kv_dtype_size(dtype));
          mark(r, hd * esize);
          if (dtype == KvDtype::F32) {
            ASSERT_EQ(std::memcmp(r, x, static_cast<std::size_t>(hd * 4)), 0) << t << " " << h;
          } else if (dtype == KvDtype::BF16) {
            for (int64_t d = 0; d < hd; ++d) {
              uint16_t bits;
              std::memcpy(&bits, r + 2 * d, 2);
              ASSERT_EQ(bits, f32_to_bf16(x[d])) << t << " " << h << " " << d;
            }
          } else {
            float amax = 0;
            for (int64_t d = 0; d < hd; ++d) amax = std::max(amax, std::fabs(x[d]));
            const float s = scale_at(cache, table, first + t, h, values);
            ASSERT_EQ(s, amax / 448.0f) << t << " " << h;
            mark(scale_ptr(cache, table, first + t, h, values), 4);
            for (int64_t d = 0; d < hd; ++d) {
              const auto code = static_cast<uint8_t>(r[d]);
              ASSERT_EQ(code, naive_fp8_encode(x[d] / s)) << t << " " << h << " " << d;
              // The largest magnitude of a row is stored as +-448 exactly.
              if (std::fabs(x[d]) == amax) {
                ASSERT_EQ(code & 0x7F, 0x7E);
              }
            }
          }
        }
    for (int64_t b = 0; b < blocks.n_blocks(); ++b)
      for (int64_t i = 0; i < blocks.bytes(); ++i)
        if (!touched[b][i]) {
          ASSERT_EQ(static_cast<uint8_t>(blocks.block(static_cast<int32_t>(b))[i]), 0xFF)
              << "block " << b << " byte " << i;
        }
  }
}

// Round trip of FP8 rows: each element within half a step of e4m3 of the original. For
// y = x / scale with |y| <= 448, a normal y (|y| >= 2^-6) is stored with 3 mantissa bits, so
// |q - y| <= 2^-4 * 2^floor(log2 |y|) <= 2^-4 |y|; a subnormal one in steps of 2^-9, so
// |q - y| <= 2^-10. In the units of x: |q * scale - x| <= max(2^-4 |x|, 2^-10 scale), plus float
// rounding of the division and the product (a few ulps).
TEST(PagedKvWrite, Fp8RoundTripWithinHalfAStep) {
  const int64_t bs = 16, n_kv = 2, hd = 64, n = 40;
  auto k = random_vector(n * n_kv * hd, 31);
  auto v = random_vector(n * n_kv * hd, 32, 100.0f);
  // Rows with a wide dynamic range, so that some elements land among the subnormals.
  for (std::size_t i = 0; i < k.size(); i += 7) k[i] *= 1e-5f;
  Blocks blocks(KvDtype::FP8, 3, bs, n_kv, hd);
  const auto table = shuffled_table(3, 3, 33);
  const PagedKv cache = blocks.layer(0);
  paged_kv_write(k.data(), v.data(), n, table.data(), 0, cache);
  int subnormals = 0;
  double worst = 0;  // worst error as a fraction of its bound
  for (bool values : {false, true}) {
    const auto& x = values ? v : k;
    const auto back = gather(cache, table, n, values);
    for (int64_t p = 0; p < n; ++p)
      for (int64_t h = 0; h < n_kv; ++h) {
        const float s = scale_at(cache, table, p, h, values);
        for (int64_t d = 0; d < hd; ++d) {
          const std::size_t i = static_cast<std::size_t>((p * n_kv + h) * hd + d);
          if (std::fabs(x[i] / s) < 0x1p-6f) ++subnormals;
          const double bound =
              std::max(std::ldexp(std::fabs(double(x[i])), -4), std::ldexp(double(s), -10)) +
              1e-6 * std::fabs(double(x[i]));
          const double err = std::fabs(double(back[i]) - x[i]);
          ASSERT_LE(err, bound) << (values ? "v " : "k ") << i << ": " << x[i] << " -> " << back[i];
          worst = std::max(worst, err / bound);
        }
      }
  }
  EXPECT_GT(subnormals, 0);
  EXPECT_GT(worst, 0.5);  // the bound is tight: rounding does use most of it
}

TEST(PagedKvWrite, Fp8ZeroRowHasScaleOne) {
  const int64_t hd = 8;
  std::vector<float> k(2 * hd, 0.0f), v = random_vector(2 * hd, 41);
  k[hd + 3] = -2.0f;  // the second key row is not all zero
  Blocks blocks(KvDtype::FP8, 1, 4, 1, hd);
  const std::vector<int32_t> table = {0};
  const PagedKv cache = blocks.layer(0);
  paged_kv_write(k.data(), v.data(), 2, table.data(), 0, cache);
  EXPECT_EQ(scale_at(cache, table, 0, 0, false), 1.0f);
  for (int64_t d = 0; d < hd; ++d) EXPECT_EQ(row_at(cache, table, 0, 0, false)[d], 0);
  EXPECT_EQ(scale_at(cache, table, 1, 0, false), 2.0f / 448.0f);
  EXPECT_EQ(static_cast<uint8_t>(row_at(cache, table, 1, 0, false)[3]), 0xFE);  // -448
}

TEST(Fp8E4m3, DecodesEveryCodeByDefinition) {
  for (int c = 0; c < 256; ++c) {
    const float want = naive_fp8_decode(static_cast<uint8_t>(c));
    const float got = fp8_e4m3_to_f32(static_cast<uint8_t>(c));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << c;
    } else {
      EXPECT_EQ(got, want) << c;
      EXPECT_EQ(std::signbit(got), (c & 0x80) != 0) << c;
      EXPECT_EQ(f32_to_fp8_e4m3(got), c) << c;  // every finite code round-trips
    }
  }
  EXPECT_EQ(fp8_e4m3_to_f32(0x7E), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_f32(0x01), 0x1p-9f);
}

TEST(Fp8E4m3, EncodesToNearestEvenSaturating) {
  std::vector<float> xs;
  // Every midpoint between neighbouring codes (ties), and the floats either side of it.
  for (int c = 0; c < 0x7E; ++c) {
    const float mid = (naive_fp8_decode(static_cast<uint8_t>(c)) +
                       naive_fp8_decode(static_cast<uint8_t>(c + 1))) /
                      2;
    for (float x : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1000.0f)}) {
      xs.push_back(x);
      xs.push_back(-x);
    }
  }
  std::mt19937 rng(51);
  std::uniform_real_distribution<float> exp2(-14.0f, 9.5f);
  for (int i = 0; i < 20000; ++i) xs.push_back(std::exp2(exp2(rng)) * ((rng() & 1) ? 1.0f : -1.0f));
  for (float x : {448.0f, 463.9f, 464.0f, 1e6f, std::numeric_limits<float>::infinity()}) {
    xs.push_back(x);
    xs.push_back(-x);
  }
  for (float x : xs) ASSERT_EQ(f32_to_fp8_e4m3(x), naive_fp8_encode(x)) << x;
  EXPECT_EQ(f32_to_fp8_e4m3(1e6f), 0x7E);
  EXPECT_EQ(f32_to_fp8_e4m3(-std::numeric_limits<float>::infinity()), 0xFE);
  EXPECT_EQ(f32_to_fp8_e4m3(std::numeric_limits<float>::quiet_NaN()) & 0x7F, 0x7F);
  EXPECT_EQ(f32_to_fp8_e4m3(1.1875f), 0x3A);  // between 0x39 and 0x3A: to even
}

// Every finite code read through paged_attention (whose rows are widened by vectorised code, not
// by fp8_e4m3_to_f32): two keys and two values that hold all 254 of them between them, against
// attention() over their values by definition. Then a NaN code reaches the output as NaN.
TEST(PagedAttention, Fp8ReadsEveryCode) {
  const int64_t hd = 127, heads = 2;
  std::vector<uint8_t> codes;
  for (int c = 0; c < 256; ++c)
    if ((c & 0x7F) != 0x7F) codes.push_back(static_cast<uint8_t>(c));
  ASSERT_EQ(codes.size(), 2u * hd);
  Blocks blocks(KvDtype::FP8, 1, 4, 1, hd);
  const std::vector<int32_t> table = {0};
  const PagedKv cache = blocks.layer(0);
  const float scales[2][2] = {{0.003f, 0.0021f}, {0.5f, 1.75f}};  // [K | V][position]
  std::vector<float> k(2 * hd), v(2 * hd);
  for (int64_t p = 0; p < 2; ++p)
    for (bool values : {false, true}) {
      char* row = const_cast<char*>(row_at(cache, table, p, 0, values));
      const float s = scales[values][p];
      std::memcpy(const_cast<char*>(scale_ptr(cache, table, p, 0, values)), &s, sizeof s);
      for (int64_t d = 0; d < hd; ++d) {
        // Values take the codes in reverse, so that a key's and a value's codes differ.
        const uint8_t code =
            codes[static_cast<std::size_t>(values ? 2 * hd - 1 - (p * hd + d) : p * hd + d)];
        row[d] = static_cast<char>(code);
        (values ? v : k)[p * hd + d] = naive_fp8_decode(code) * s;
      }
    }
  const auto q = random_vector(heads * hd, 81, 0.05f);
  auto want = poisoned(q.size()), got = poisoned(q.size());
  attention(q.data(), 1, k.data(), v.data(), 1, heads, 1, hd, 1.0f, 0, want.data(), nullptr);
  paged_attention(q.data(), 1, cache, table.data(), 1, heads, 1.0f, 0, got.data(), nullptr);
  expect_close(got, want, 1e-5, "output");

  const_cast<char*>(row_at(cache, table, 1, 0, true))[5] = 0x7F;
  paged_attention(q.data(), 1, cache, table.data(), 1, heads, 1.0f, 0, got.data(), nullptr);
  for (int64_t h = 0; h < heads; ++h) {
    EXPECT_TRUE(std::isnan(got[h * hd + 5])) << h;
    EXPECT_FALSE(std::isnan(got[h * hd + 6])) << h;
  }
}

// ||a - b|| / ||b||.
double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

// FP8 attention against F32 attention on the same random inputs, for decode and prefill. E4M3
// keeps 3 mantissa bits: on Gaussian rows the stored values themselves are off by about 2.5%
// (relative L2), and the output inherits that error from the values plus a little more through
// the scores, so it is compared with the stored values' own error.
TEST(PagedAttention, Fp8AccuracyAgainstF32) {
  const int64_t heads = 8, kv_heads = 2, d = 64, bs = 16;
  ThreadPool pool(2);
  for (const auto& [n_q, past] : {std::pair<int64_t, int64_t>{1, 1023}, {64, 0}, {16, 200}}) {
    const int64_t total = past + n_q;
    const auto q = random_vector(n_q * heads * d, 61);
    const auto k = random_vector(total * kv_heads * d, 62);
    const auto v = random_vector(total * kv_heads * d, 63);
    const float scale = 1.0f / std::sqrt(float(d));
    const int64_t needed = (total + bs - 1) / bs;
    std::vector<float> outs[2];
    double stored_err = 0;
    for (int i = 0; i < 2; ++i) {
      Blocks blocks(i == 0 ? KvDtype::F32 : KvDtype::FP8, needed, bs, kv_heads, d);
      const auto table = shuffled_table(needed, needed, 64);
      const PagedKv cache = blocks.layer(0);
      paged_kv_write(k.data(), v.data(), total, table.data(), 0, cache);
      if (i == 1) stored_err = rel_l2(gather(cache, table, total, true), v);
      outs[i] = poisoned(q.size());
      paged_attention(q.data(), n_q, cache, table.data(), past, heads, scale, 0, outs[i].data(),
                      &pool);
    }
    double max_err = 0, peak = 0;
    for (std::size_t i = 0; i < outs[0].size(); ++i) {
      max_err = std::max(max_err, std::fabs(double(outs[1][i]) - outs[0][i]));
      peak = std::max(peak, std::fabs(double(outs[0][i])));
    }
    const double rel = rel_l2(outs[1], outs[0]);
    std::printf(
        "FP8 vs F32 (n_q %lld, past %lld): output relative L2 error %.4f (stored values"
        " %.4f), max abs error %.4f of max |out| %.4f\n",
        static_cast<long long>(n_q), static_cast<long long>(past), rel, stored_err, max_err, peak);
    EXPECT_LT(stored_err, 3e-2);
    EXPECT_LT(rel, 5e-2);
    EXPECT_LT(rel, 1.6 * stored_err);
    EXPECT_GT(rel, 0.5 * stored_err);  // FP8 really is in use
  }
}

// A copy of a partially filled block (copy-on-write): every byte of every layer is copied, other
// blocks are untouched, and attention through a table that points at the copy is unchanged.
TEST(CopyKvBlock, CopiesEveryLayerAndAttentionReadsTheCopy) {
  const int64_t bs = 8, n_kv = 2, hd = 16, heads = 4, total = 13;  // the second block is partial
  const auto k = random_vector(total * n_kv * hd, 71);
  const auto v = random_vector(total * n_kv * hd, 72);
  const auto q = random_vector(heads * hd, 73);
  for (KvDtype dtype : kDtypes) {
    SCOPED_TRACE(kv_dtype_name(dtype));
    Blocks blocks(dtype, 4, bs, n_kv, hd, 3);
    std::vector<int32_t> table = {2, 0};
    for (int64_t layer = 0; layer < 3; ++layer)
      paged_kv_write(k.data(), v.data(), total, table.data(), 0, blocks.layer(layer));
    const std::vector<char> before3(blocks.block(3), blocks.block(3) + blocks.bytes());
    copy_kv_block(blocks.layer(1), 0, 1, blocks.bytes());
    EXPECT_EQ(std::memcmp(blocks.block(1), blocks.block(0), blocks.bytes()), 0);
    EXPECT_EQ(std::memcmp(blocks.block(3), before3.data(), blocks.bytes()), 0);
    copy_kv_block(blocks.layer(0), 1, 1, blocks.bytes());  // onto itself: nothing changes
    EXPECT_EQ(std::memcmp(blocks.block(1), blocks.block(0), blocks.bytes()), 0);

    const std::vector<int32_t> copied = {2, 1};
    for (int64_t layer = 0; layer < 3; ++layer) {
      auto a = poisoned(q.size()), b = poisoned(q.size());
      paged_attention(q.data(), 1, blocks.layer(layer), table.data(), total - 1, heads, 0.25f, 0,
                      a.data(), nullptr);
      paged_attention(q.data(), 1, blocks.layer(layer), copied.data(), total - 1, heads, 0.25f, 0,
                      b.data(), nullptr);
      for (std::size_t i = 0; i < a.size(); ++i) {
        ASSERT_FALSE(std::isnan(a[i]));
        ASSERT_EQ(a[i], b[i]) << layer << " " << i;
      }
    }
  }
}

TEST(KvDtype, NamesAndSizes) {
  EXPECT_STREQ(kv_dtype_name(KvDtype::F32), "F32");
  EXPECT_STREQ(kv_dtype_name(KvDtype::BF16), "BF16");
  EXPECT_STREQ(kv_dtype_name(KvDtype::FP8), "FP8");
  EXPECT_EQ(kv_dtype_size(KvDtype::F32), 4u);
  EXPECT_EQ(kv_dtype_size(KvDtype::BF16), 2u);
  EXPECT_EQ(kv_dtype_size(KvDtype::FP8), 1u);
}

}  // namespace
}  // namespace moemesh::kernels
