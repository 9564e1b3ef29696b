// FP8 E4M3 weights with 128x128 block scales (DType::F8E4M3): the decoding table against an
// independent decoding of all 256 codes, the in-register decoding of every ISA, linear() against a
// double-precision reference on every ISA (shapes whose sides are not multiples of 128 included),
// the same bits as linear() over the dequantized float32 matrix, batch invariance, and block
// quantization (scales, rounding, saturation without NaN).
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "tests/kernels/isa_guard.h"
#include "tests/kernels/reference.h"

namespace moemesh::kernels {
namespace {

using test::expect_batches_match_alone;
using test::IsaGuard;
using test::random_vector;
using test::supported_isas;

// E4M3 ("fn"): sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal
// (m * 2^-9), S.1111.111 is NaN, there are no infinities.
double reference_decode(int code) {
  const double sign = (code & 0x80) ? -1.0 : 1.0;
  const int e = (code >> 3) & 0xF, m = code & 7;
  if (e == 0xF && m == 7) return std::numeric_limits<double>::quiet_NaN();
  if (e == 0) return sign * std::ldexp(m, -9);
  return sign * std::ldexp(8 + m, e - 10);
}

bool is_nan_code(int code) {
  return (code & 0x7F) == 0x7F;
}

// Random codes (every finite one), random block scales, and the float32 values they stand for.
struct Fp8Matrix {
  std::vector<uint8_t> codes;
  std::vector<float> scale;
  std::vector<float> values;  // dequantize_rows: code * its block's scale, rounded to float32
  WeightView view;
};
Fp8Matrix make_fp8(int64_t rows, int64_t cols, uint32_t seed) {
  Fp8Matrix m;
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> cd(0, 255);
  std::uniform_real_distribution<float> sd(0.001f, 0.02f);
  m.codes.resize(static_cast<std::size_t>(rows * cols));
  for (uint8_t& c : m.codes) {
    int v = cd(rng);
    while (is_nan_code(v)) v = cd(rng);
    c = static_cast<uint8_t>(v);
  }
  m.scale.resize(static_cast<std::size_t>(fp8_blocks(rows) * fp8_blocks(cols)));
  for (float& s : m.scale) s = sd(rng);
  m.view = {m.codes.data(), DType::F8E4M3, rows, cols, m.scale.data()};
  m.values.resize(m.codes.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      m.values[r * cols + c] = static_cast<float>(reference_decode(m.codes[r * cols + c])) *
                               m.scale[(r / kFp8Block) * fp8_blocks(cols) + c / kFp8Block];
  return m;
}

TEST(Fp8, DtypeBasics) {
  EXPECT_EQ(dtype_size(DType::F8E4M3), 1u);
  EXPECT_STREQ(dtype_name(DType::F8E4M3), "F8_E4M3");
  EXPECT_EQ(fp8_blocks(1), 1);
  EXPECT_EQ(fp8_blocks(128), 1);
  EXPECT_EQ(fp8_blocks(129), 2);
  const uint8_t q[4] = {0x00, 0x38, 0xB8, 0x7E};
  float out[4];
  to_f32(q, DType::F8E4M3, 4, out);  // the codes without any scale
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_EQ(out[1], 1.0f);
  EXPECT_EQ(out[2], -1.0f);
  EXPECT_EQ(out[3], 448.0f);
}

TEST(Fp8, TableMatchesReferenceDecodingOfAllCodes) {
  const float* table = fp8_e4m3_table();
  for (int c = 0; c < 256; ++c) {
    const double ref = reference_decode(c);
    if (std::isnan(ref)) {
      EXPECT_TRUE(std::isnan(table[c])) << c;
      continue;
    }
    EXPECT_EQ(static_cast<double>(table[c]), ref) << c;
    EXPECT_EQ(std::signbit(table[c]), (c & 0x80) != 0) << c;
    EXPECT_EQ(std::bit_cast<uint32_t>(fp8_e4m3_to_f32(static_cast<uint8_t>(c))),
              std::bit_cast<uint32_t>(table[c]))
        << c;
    // Every finite code is the encoding of its own value.
    EXPECT_EQ(f32_to_fp8_e4m3(table[c]), c == 0x80 ? 0x80 : c) << c;
  }
}

// Every ISA's in-register decoding, at every lane position of a full vector and of a partial one:
// row r holds one finite code at column r % 40 (zeros elsewhere), so y[r] = value * scale exactly.
TEST(Fp8, EveryIsaDecodesEveryFiniteCode) {
  IsaGuard guard;
  std::vector<int> codes;
  for (int c = 0; c < 256; ++c)
    if (!is_nan_code(c)) codes.push_back(c);
  const auto rows = static_cast<int64_t>(codes.size());
  const int64_t cols = 40;  // two vectors of 16 (five of 8) and a partial one of 8
  std::vector<uint8_t> w(static_cast<std::size_t>(rows * cols), 0);
  for (int64_t r = 0; r < rows; ++r) w[r * cols + r % cols] = static_cast<uint8_t>(codes[r]);
  for (const float s : {1.0f, 0.375f, 3.1e-3f}) {
    const std::vector<float> scale(static_cast<std::size_t>(fp8_blocks(rows)), s);
    const WeightView view{w.data(), DType::F8E4M3, rows, cols, scale.data()};
    for (Isa isa : supported_isas()) {
      ASSERT_TRUE(force_isa(isa));
      for (int64_t n : {1, 3, 9}) {  // direct and packed paths
        const std::vector<float> x(static_cast<std::size_t>(n * cols), 1.0f);
        std::vector<float> y(static_cast<std::size_t>(n * rows));
        linear(x.data(), n, view, nullptr, y.data(), nullptr);
        for (int64_t t = 0; t < n; ++t)
          for (int64_t r = 0; r < rows; ++r)
            ASSERT_EQ(y[t * rows + r], static_cast<float>(reference_decode(codes[r])) * s)
                << isa_name(isa) << " code " << codes[r] << " scale " << s << " n=" << n;
      }
    }
  }
}

// Every supported ISA against the reference: sides below, at and above 128 (partial blocks),
// partial vectors, partial row tiles, direct and packed paths (one panel of dequantized rows, or
// several), with and without bias.
TEST(Fp8, LinearMatchesReferenceOnEveryIsa) {
  IsaGuard guard;
  struct Shape {
    int64_t n, rows, cols;
  };
  const Shape shapes[] = {
      {1, 1, 1},      {1, 7, 5},       {3, 13, 17},    {4, 6, 16},     {2, 130, 129},
      {5, 129, 257},  {7, 25, 100},    {8, 11, 47},    {9, 200, 300},  {17, 5, 515},
      {1, 300, 128},  {70, 131, 1100}, {12, 256, 384}, {6, 257, 1000}, {40, 70, 2100},
      {12, 257, 2100}};  // several dequantized panels (~120 rows at 2100)
  for (Isa isa : supported_isas()) {
    ASSERT_TRUE(force_isa(isa));
    for (const Shape& s : shapes) {
      const Fp8Matrix w = make_fp8(s.rows, s.cols, static_cast<uint32_t>(s.rows * 131 + s.cols));
      const std::vector<float> x = random_vector(s.n * s.cols, static_cast<uint32_t>(s.n + 7));
      const std::vector<float> bias = random_vector(s.rows, 99, 0.1f);
      for (const float* b : {static_cast<const float*>(nullptr), bias.data()}) {
        const std::vector<double> ref = test::ref_linear(x, s.n, w.values, s.rows, s.cols, b);
        std::vector<double> mag(ref.size(), 0.0);
        for (int64_t t = 0; t < s.n; ++t)
          for (int64_t r = 0; r < s.rows; ++r)
            for (int64_t c = 0; c < s.cols; ++c)
              mag[t * s.rows + r] +=
                  std::fabs(double(x[t * s.cols + c]) * w.values[r * s.cols + c]);
        std::vector<float> y(static_cast<std::size_t>(s.n * s.rows), -1.0f);
        linear(x.data(), s.n, w.view, b, y.data(), nullptr);
        for (std::size_t i = 0; i < y.size(); ++i)
          ASSERT_NEAR(y[i], ref[i], 1e-5 * (mag[i] + std::fabs(ref[i])) + 1e-30)
              << isa_name(isa) << " n=" << s.n << " rows=" << s.rows << " cols=" << s.cols
              << " i=" << i << " bias=" << (b != nullptr);
      }
    }
  }
}

// On each ISA, linear over the codes and block scales is linear over the dequantized float32
// matrix, to the bit: the weights enter the sums already scaled, in the F32 kernel's order.
TEST(Fp8, SameBitsAsDequantizedFloat32) {
  IsaGuard guard;
  ThreadPool pool(3);
  for (const auto& [rows, cols] :
       {std::pair<int64_t, int64_t>{21, 77}, {300, 260}, {129, 1030}, {257, 2100}}) {
    const Fp8Matrix w = make_fp8(rows, cols, static_cast<uint32_t>(rows + 3 * cols));
    std::vector<float> deq(w.values.size());
    dequantize_rows(w.view, 0, rows, deq.data());
    ASSERT_EQ(deq, w.values);
    const WeightView f32{deq.data(), DType::F32, rows, cols};
    const std::vector<float> bias = random_vector(rows, 5, 0.1f);
    const int64_t n = 70;
    const std::vector<float> x = random_vector(n * cols, 4);
    for (Isa isa : supported_isas()) {
      ASSERT_TRUE(force_isa(isa));
      for (int64_t m : {int64_t{1}, int64_t{5}, int64_t{12}, n}) {
        std::vector<float> yq(static_cast<std::size_t>(m * rows));
        std::vector<float> yf(static_cast<std::size_t>(m * rows));
        linear(x.data(), m, w.view, bias.data(), yq.data(), &pool);
        linear(x.data(), m, f32, bias.data(), yf.data(), &pool);
        for (std::size_t i = 0; i < yq.size(); ++i)
          ASSERT_EQ(std::bit_cast<uint32_t>(yq[i]), std::bit_cast<uint32_t>(yf[i]))
              << isa_name(isa) << " rows=" << rows << " cols=" << cols << " m=" << m << " i=" << i;
      }
    }
  }
}

// A token's outputs are the same bits alone, in batches of any size at any position, and with
// any thread split of the rows.
TEST(Fp8, BatchInvariantOnEveryIsa) {
  IsaGuard guard;
  ThreadPool pool(3);
  for (Isa isa : supported_isas()) {
    ASSERT_TRUE(force_isa(isa));
    for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{37, 75}, {150, 600}, {9, 16}}) {
      const Fp8Matrix w = make_fp8(rows, cols, static_cast<uint32_t>(rows + cols));
      const std::vector<float> bias = random_vector(rows, 5, 0.1f);
      const int64_t max_n = 130;
      const std::vector<float> x = random_vector(max_n * cols, 11);
      for (int64_t n : {1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 130}) {
        std::vector<std::pair<int64_t, int64_t>> batches;
        for (int64_t t0 = 0; t0 < max_n; t0 += n) batches.emplace_back(std::min(n, max_n - t0), t0);
        for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool})
          expect_batches_match_alone(w.view, bias.data(), x, max_n, batches, p,
                                     std::string(isa_name(isa)) + " rows=" + std::to_string(rows) +
                                         " cols=" + std::to_string(cols) + (p ? " pool" : ""));
      }
    }
  }
}

// Block quantization of an odd shape: one scale per 128x128 block (partial blocks at the edges),
// scale = max|v| / 448, each code the rounding of v / scale, the dequantized values within half
// an E4M3 step of the originals.
TEST(Fp8, QuantizeBlocksScalesAndRounding) {
  const int64_t rows = 200, cols = 300;
  std::vector<float> v = random_vector(rows * cols, 21, 0.02f);
  v[5 * cols + 290] = 0.5f;  // the largest of block (0, 2)
  const WeightView w{v.data(), DType::F32, rows, cols};
  std::vector<uint8_t> codes(static_cast<std::size_t>(rows * cols));
  std::vector<float> scale(static_cast<std::size_t>(fp8_blocks(rows) * fp8_blocks(cols)));
  ASSERT_EQ(scale.size(), 6u);
  ThreadPool pool(2);
  quantize_fp8_e4m3(w, codes.data(), scale.data(), &pool);
  for (int64_t rb = 0; rb < 2; ++rb)
    for (int64_t cb = 0; cb < 3; ++cb) {
      float amax = 0;
      for (int64_t r = rb * 128; r < std::min(rows, rb * 128 + 128); ++r)
        for (int64_t c = cb * 128; c < std::min(cols, cb * 128 + 128); ++c)
          amax = std::max(amax, std::fabs(v[r * cols + c]));
      EXPECT_EQ(scale[rb * 3 + cb], amax / 448.0f) << rb << "," << cb;
    }
  EXPECT_EQ(scale[2], 0.5f / 448.0f);
  const WeightView q{codes.data(), DType::F8E4M3, rows, cols, scale.data()};
  std::vector<float> deq(v.size());
  dequantize_rows(q, 0, rows, deq.data());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      const float s = scale[(r / 128) * 3 + c / 128];
      ASSERT_EQ(codes[i], f32_to_fp8_e4m3(v[i] / s)) << r << "," << c;
      ASSERT_FALSE(is_nan_code(codes[i])) << r << "," << c;
      // Half a step: 2^-4 of the value for normal codes, 2^-10 * scale for subnormal ones.
      ASSERT_LE(std::fabs(deq[i] - v[i]), std::max(std::fabs(v[i]) / 16.0f, s / 1024.0f) * 1.0001f)
          << r << "," << c;
    }
  EXPECT_EQ(codes[5 * cols + 290], 0x7E);  // the block's largest value is +448 * scale

  // Quantizing a bf16 matrix reads it through its dtype: the same codes as its float32 values.
  std::vector<uint16_t> bf(v.size());
  std::vector<float> bf_values(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    bf[i] = f32_to_bf16(v[i]);
    bf_values[i] = bf16_to_f32(bf[i]);
  }
  std::vector<uint8_t> c1(codes.size()), c2(codes.size());
  std::vector<float> s1(scale.size()), s2(scale.size());
  quantize_fp8_e4m3({bf.data(), DType::BF16, rows, cols}, c1.data(), s1.data(), nullptr);
  quantize_fp8_e4m3({bf_values.data(), DType::F32, rows, cols}, c2.data(), s2.data(), nullptr);
  EXPECT_EQ(c1, c2);
  EXPECT_EQ(s1, s2);
}

// Saturation never makes a NaN code: +-inf and values past 448 * scale saturate to +-448, NaN
// becomes 0, an all-zero block gets scale 1, and non-finite values do not enter the scale.
TEST(Fp8, QuantizeSaturatesWithoutNaN) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Row 0: one block with inf, -inf, NaN and finite values; row 1 of the same block.
  const std::vector<float> v = {inf, -inf, nan, 2.0f, -1.0f, 0.0f, 1e-30f, -2.0f};
  std::vector<uint8_t> codes(v.size());
  float scale = 0;
  quantize_fp8_e4m3({v.data(), DType::F32, 2, 4}, codes.data(), &scale, nullptr);
  EXPECT_EQ(scale, 2.0f / 448.0f);
  const std::vector<uint8_t> want = {0x7E, 0xFE, 0x00, 0x7E, f32_to_fp8_e4m3(-1.0f / scale),
                                     0x00, 0x00, 0xFE};
  EXPECT_EQ(codes, want);
  for (uint8_t c : codes) EXPECT_FALSE(is_nan_code(c));

  const std::vector<float> zeros(6, 0.0f);
  std::vector<uint8_t> zc(6, 0xAA);
  float zs = 0;
  quantize_fp8_e4m3({zeros.data(), DType::F32, 2, 3}, zc.data(), &zs, nullptr);
  EXPECT_EQ(zs, 1.0f);
  EXPECT_EQ(zc, std::vector<uint8_t>(6, 0));

  // The float32 -> E4M3 conversion itself saturates finite values and infinities to +-448.
  EXPECT_EQ(f32_to_fp8_e4m3(1e6f), 0x7E);
  EXPECT_EQ(f32_to_fp8_e4m3(-465.0f), 0xFE);
  EXPECT_EQ(f32_to_fp8_e4m3(inf), 0x7E);
}

// dequantize_rows applies each dtype's scales, and embedding() reads FP8 rows through it.
TEST(Fp8, DequantizeRowsAndEmbedding) {
  const Fp8Matrix w = make_fp8(260, 140, 8);
  std::vector<float> rows(3 * 140);
  dequantize_rows(w.view, 127, 130, rows.data());
  for (int64_t i = 0; i < 3 * 140; ++i) ASSERT_EQ(rows[i], w.values[127 * 140 + i]) << i;
  const int32_t ids[2] = {259, 3};
  std::vector<float> out(2 * 140);
  embedding(w.view, ids, 2, out.data());
  for (int64_t c = 0; c < 140; ++c) {
    ASSERT_EQ(out[c], w.values[259 * 140 + c]);
    ASSERT_EQ(out[140 + c], w.values[3 * 140 + c]);
  }
  const int8_t q[4] = {-3, 2, 5, 127};
  const float s[2] = {0.5f, 0.25f};
  float d[4];
  dequantize_rows({q, DType::I8, 2, 2, s}, 0, 2, d);
  EXPECT_EQ(d[0], -1.5f);
  EXPECT_EQ(d[1], 1.0f);
  EXPECT_EQ(d[2], 1.25f);
  EXPECT_EQ(d[3], 31.75f);
}

}  // namespace
}  // namespace moemesh::kernels
