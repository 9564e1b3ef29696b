// Runtime ISA dispatch and the ISA-specific linear kernels: each ISA this machine supports must
// match a double-precision reference and give a token the same bits alone or in any batch.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
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
using test::reduced_precision_isas;
using test::supported_isas;

// A weight matrix in `dtype` and the float32 values it holds.
struct Matrix {
  std::vector<float> values;
  std::vector<uint16_t> half;
  WeightView view;
};
Matrix make_matrix(DType dtype, int64_t rows, int64_t cols, uint32_t seed) {
  Matrix m;
  m.values = random_vector(rows * cols, seed, 0.3f);
  if (dtype != DType::F32) {
    for (float& v : m.values) {
      const uint16_t h = dtype == DType::BF16 ? f32_to_bf16(v) : f32_to_f16(v);
      m.half.push_back(h);
      v = dtype == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
    }
    m.view = {m.half.data(), dtype, rows, cols};
  } else {
    m.view = {m.values.data(), dtype, rows, cols};
  }
  return m;
}

TEST(Isa, NamesAndDetection) {
  EXPECT_STREQ(isa_name(Isa::Baseline), "baseline");
  EXPECT_STREQ(isa_name(Isa::Avx2), "avx2");
  EXPECT_STREQ(isa_name(Isa::Avx512), "avx512");
  EXPECT_STREQ(isa_name(Isa::Avx512Bf16), "avx512bf16");
  EXPECT_STREQ(isa_name(Isa::Amx), "amx");
  EXPECT_LE(active_isa(), detected_isa());
  if (std::getenv("MOEMESH_ISA") == nullptr) {
    EXPECT_LE(active_isa(), Isa::Avx512) << "bf16 / int8 activations: never the default";
  }
#if defined(__x86_64__)
  // Detection must agree with the compiler's own view of the CPU (every AVX2 + FMA CPU has F16C).
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    EXPECT_GE(detected_isa(), Isa::Avx512);
    if (!__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("avx512vnni")) {
      EXPECT_EQ(detected_isa(), Isa::Avx512);
    } else {
      EXPECT_GE(detected_isa(), Isa::Avx512Bf16);
    }
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    EXPECT_GE(detected_isa(), Isa::Avx2);
  }
#endif
}

TEST(Isa, ForceAcceptsSupportedAndRefusesHigher) {
  IsaGuard guard;
  for (Isa isa : supported_isas()) {
    EXPECT_TRUE(force_isa(isa)) << isa_name(isa);
    EXPECT_EQ(active_isa(), isa);
  }
  ASSERT_TRUE(force_isa(Isa::Baseline));
  for (Isa isa : {Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Amx}) {
    if (isa <= detected_isa()) continue;
    EXPECT_FALSE(force_isa(isa)) << isa_name(isa);
    EXPECT_EQ(active_isa(), Isa::Baseline) << "a refused force_isa changed the active ISA";
  }
  // Above every real ISA (so that the refusal is exercised on an AVX-512 machine too).
  EXPECT_FALSE(force_isa(static_cast<Isa>(static_cast<uint8_t>(Isa::Amx) + 1)));
  EXPECT_EQ(active_isa(), Isa::Baseline);
}

// linear against a double-precision reference. The error is relative to sum |x w| + |bias|, the
// scale of the rounding errors of a float32 sum (relative to |y| itself, cancellation would make
// any float32 kernel fail). On Avx512Bf16 and Amx, BF16 weights multiply the activations rounded
// to bf16: the
// reference rounds them too, and the bound is the same.
TEST(Isa, LinearMatchesReferenceOnEveryIsa) {
  IsaGuard guard;
  ThreadPool pool(2);
  for (Isa isa : supported_isas()) {
    ASSERT_TRUE(force_isa(isa));
    for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
      // cols: partial vectors, and (700, 2049) a partial column block of the many-token kernels;
      // rows: partial register tiles of rows; n: the few-token kernels (1..9), then partial tiles
      // and blocks of tokens in the many-token kernels.
      for (int64_t cols : {1, 7, 33, 700, 2049}) {
        for (int64_t rows : {1, 5, 13, 37}) {
          const Matrix m = make_matrix(dtype, rows, cols, static_cast<uint32_t>(rows * cols));
          const std::vector<float> bias = random_vector(rows, 7);
          for (int64_t n : {1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 64, 130}) {
            const std::vector<float> x = random_vector(n * cols, static_cast<uint32_t>(n));
            for (bool with_bias : {false, true}) {
              const float* b = with_bias ? bias.data() : nullptr;
              std::vector<float> y(static_cast<std::size_t>(n * rows));
              linear(x.data(), n, m.view, b, y.data(), &pool);
              for (int64_t t = 0; t < n; ++t)
                for (int64_t r = 0; r < rows; ++r) {
                  double ref = b ? b[r] : 0.0, scale = b ? std::abs(b[r]) : 0.0;
                  const bool rounded = isa >= Isa::Avx512Bf16 && dtype == DType::BF16;
                  for (int64_t c = 0; c < cols; ++c) {
                    const float xv =
                        rounded ? bf16_to_f32(f32_to_bf16(x[t * cols + c])) : x[t * cols + c];
                    const double p = double(xv) * double(m.values[r * cols + c]);
                    ref += p;
                    scale += std::abs(p);
                  }
                  const double err = std::abs(double(y[t * rows + r]) - ref) / (scale + 1e-30);
                  ASSERT_LT(err, 1e-5) << isa_name(isa) << " " << dtype_name(dtype)
                                       << " cols=" << cols << " rows=" << rows << " n=" << n
                                       << " bias=" << with_bias << " t=" << t << " r=" << r;
                }
            }
          }
        }
      }
    }
  }
}

// Model::forward_batch relies on this: a token's outputs are the same bits whether it is computed
// alone or with other tokens, in any position of the batch.
TEST(Isa, LinearIsBatchInvariantOnEveryIsa) {
  IsaGuard guard;
  ThreadPool pool(2);
  constexpr int64_t kTokens = 9;
  for (Isa isa : supported_isas()) {
    ASSERT_TRUE(force_isa(isa));
    for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
      for (int64_t cols : {1, 7, 33, 2049}) {
        const int64_t rows = 37;
        const Matrix m = make_matrix(dtype, rows, cols, 11);
        const std::vector<float> bias = random_vector(rows, 12);
        const std::vector<float> x = random_vector(kTokens * cols, 13);
        std::vector<std::pair<int64_t, int64_t>> batches;  // every batch of x at every position
        for (int64_t n = 1; n <= kTokens; ++n)
          for (int64_t first = 0; first + n <= kTokens; ++first) batches.emplace_back(n, first);
        expect_batches_match_alone(
            m.view, bias.data(), x, kTokens, batches, &pool,
            std::string(isa_name(isa)) + " " + dtype_name(dtype) + " cols=" + std::to_string(cols));
      }
    }
  }
}

// The same with many tokens: a token alone (the decode kernel) against the same token anywhere in
// batches large enough for the blocked many-token kernels, with partial tiles and blocks of
// tokens, rows and columns.
TEST(Isa, LinearIsBatchInvariantWithManyTokensOnEveryIsa) {
  IsaGuard guard;
  ThreadPool pool(2);
  constexpr int64_t kTokens = 140;
  // {n, first}: a batch of x[first, first + n).
  const std::vector<std::pair<int64_t, int64_t>> batches = {
      {130, 0}, {130, 10}, {64, 3}, {17, 5}, {10, 1}};
  for (Isa isa : supported_isas()) {
    ASSERT_TRUE(force_isa(isa));
    for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
      for (int64_t cols : {7, 700, 2049}) {
        const int64_t rows = 37;
        const Matrix m = make_matrix(dtype, rows, cols, 21);
        const std::vector<float> bias = random_vector(rows, 22);
        const std::vector<float> x = random_vector(kTokens * cols, 23);
        expect_batches_match_alone(
            m.view, bias.data(), x, kTokens, batches, &pool,
            std::string(isa_name(isa)) + " " + dtype_name(dtype) + " cols=" + std::to_string(cols));
      }
    }
  }
}

// How the rows are split across threads must not change a bit: no pool, and pools whose chunks
// start at different rows, give the same outputs.
TEST(Isa, LinearIsThreadInvariantOnEveryIsa) {
  IsaGuard guard;
  ThreadPool pool2(2), pool3(3);
  for (Isa isa : supported_isas()) {
    ASSERT_TRUE(force_isa(isa));
    for (DType dtype : {DType::F32, DType::BF16}) {
      const int64_t rows = 101, cols = 700;
      const Matrix m = make_matrix(dtype, rows, cols, 31);
      for (int64_t n : {1, 5, 70}) {
        const std::vector<float> x = random_vector(n * cols, 32);
        std::vector<float> serial(static_cast<std::size_t>(n * rows));
        linear(x.data(), n, m.view, nullptr, serial.data(), nullptr);
        for (ThreadPool* pool : {&pool2, &pool3}) {
          std::vector<float> y(serial.size());
          linear(x.data(), n, m.view, nullptr, y.data(), pool);
          for (std::size_t i = 0; i < y.size(); ++i)
            ASSERT_EQ(std::bit_cast<uint32_t>(y[i]), std::bit_cast<uint32_t>(serial[i]))
                << isa_name(isa) << " " << dtype_name(dtype) << " n=" << n << " i=" << i
                << " threads=" << pool->size();
        }
      }
    }
  }
}

}  // namespace
// Avx512Bf16 and Amx (Amx: more tokens than one of its token blocks, 256) and columns that are not
// a multiple of its column tiles: every token against the bf16-rounded reference, and the same bits
// as alone.
TEST(Isa, Bf16ActivationPathsWithManyTokens) {
  if (reduced_precision_isas().empty()) GTEST_SKIP() << "this CPU has neither AVX512-BF16 nor AMX";
  IsaGuard guard;
  for (Isa isa : reduced_precision_isas()) {
    ASSERT_TRUE(force_isa(isa));
    ThreadPool pool(2);
    const int64_t n = 600, rows = 70, cols = 300;
    const Matrix m = make_matrix(DType::BF16, rows, cols, 41);
    const std::vector<float> bias = random_vector(rows, 42);
    const std::vector<float> x = random_vector(n * cols, 43);
    std::vector<float> y(static_cast<std::size_t>(n * rows));
    linear(x.data(), n, m.view, bias.data(), y.data(), &pool);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t r = 0; r < rows; ++r) {
        double ref = bias[r], scale = std::abs(bias[r]);
        for (int64_t c = 0; c < cols; ++c) {
          const double p =
              double(bf16_to_f32(f32_to_bf16(x[t * cols + c]))) * double(m.values[r * cols + c]);
          ref += p;
          scale += std::abs(p);
        }
        ASSERT_LT(std::abs(double(y[t * rows + r]) - ref) / scale, 1e-5)
            << isa_name(isa) << " t=" << t << " r=" << r;
      }
    expect_batches_match_alone(m.view, bias.data(), x, n, {{600, 0}, {300, 299}, {257, 1}}, &pool,
                               std::string(isa_name(isa)) + " many tokens");
  }
}

// Weights packed once (pack_amx, as the model loader does on Avx512Bf16 and Amx) give the bits of
// rows packed on every call, for shapes with partial panels and column tiles.
TEST(Isa, PackedWeightsGiveTheSameBits) {
  if (reduced_precision_isas().empty()) GTEST_SKIP() << "this CPU has neither AVX512-BF16 nor AMX";
  IsaGuard guard;
  for (Isa isa : reduced_precision_isas()) {
    ASSERT_TRUE(force_isa(isa));
    ThreadPool pool(2);
    for (DType dtype : {DType::BF16, DType::I8}) {
      for (int64_t rows : {1, 37, 64, 100}) {
        for (int64_t cols : {7, 64, 300}) {
          Matrix m = make_matrix(DType::BF16, rows, cols, static_cast<uint32_t>(rows + cols));
          std::vector<int8_t> q(static_cast<std::size_t>(rows * cols));
          std::vector<float> scale(static_cast<std::size_t>(rows));
          if (dtype == DType::I8) {
            for (std::size_t i = 0; i < q.size(); ++i)
              q[i] = static_cast<int8_t>(static_cast<int>(i * 37 % 255) - 127);
            for (std::size_t r = 0; r < scale.size(); ++r) scale[r] = 0.01f * float(r + 1);
            m.view = {q.data(), DType::I8, rows, cols, scale.data()};
          }
          const PackedWeights packed = pack_amx(m.view, &pool);
          WeightView with = m.view;
          with.packed = packed.data();
          for (int64_t n : {1, 3, 40, 300}) {
            const std::vector<float> x = random_vector(n * cols, 51);
            std::vector<float> a(static_cast<std::size_t>(n * rows)), b(a.size());
            linear(x.data(), n, m.view, nullptr, a.data(), &pool);
            linear(x.data(), n, with, nullptr, b.data(), &pool);
            for (std::size_t i = 0; i < a.size(); ++i)
              ASSERT_EQ(std::bit_cast<uint32_t>(a[i]), std::bit_cast<uint32_t>(b[i]))
                  << isa_name(isa) << " " << dtype_name(dtype) << " rows=" << rows
                  << " cols=" << cols << " n=" << n << " i=" << i;
          }
        }
      }
    }
  }
}

// F8E4M3 with a packed copy on Avx512Bf16 and Amx: the weights dequantized and rounded to bf16 at
// load, the activations rounded to bf16, against a double reference of exactly those values.
TEST(Isa, PackedFp8MatchesReference) {
  if (reduced_precision_isas().empty()) GTEST_SKIP() << "this CPU has neither AVX512-BF16 nor AMX";
  IsaGuard guard;
  for (Isa isa : reduced_precision_isas()) {
    ASSERT_TRUE(force_isa(isa));
    ThreadPool pool(2);
    const int64_t rows = 150, cols = 260;
    const Matrix m = make_matrix(DType::BF16, rows, cols, 61);
    std::vector<uint8_t> codes(static_cast<std::size_t>(rows * cols));
    std::vector<float> scale(static_cast<std::size_t>(fp8_blocks(rows) * fp8_blocks(cols)));
    quantize_fp8_e4m3(m.view, codes.data(), scale.data(), &pool);
    WeightView w{codes.data(), DType::F8E4M3, rows, cols, scale.data()};
    std::vector<float> deq(static_cast<std::size_t>(rows * cols));
    dequantize_rows(w, 0, rows, deq.data());
    const PackedWeights packed = pack_amx(w, &pool);
    w.packed = packed.data();
    for (int64_t n : {1, 5, 70}) {
      const std::vector<float> x = random_vector(n * cols, 62);
      std::vector<float> y(static_cast<std::size_t>(n * rows));
      linear(x.data(), n, w, nullptr, y.data(), &pool);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t r = 0; r < rows; ++r) {
          double ref = 0, mag = 0;
          for (int64_t c = 0; c < cols; ++c) {
            const double p = double(bf16_to_f32(f32_to_bf16(x[t * cols + c]))) *
                             double(bf16_to_f32(f32_to_bf16(deq[r * cols + c])));
            ref += p;
            mag += std::abs(p);
          }
          ASSERT_LT(std::abs(double(y[t * rows + r]) - ref) / (mag + 1e-30), 1e-5)
              << isa_name(isa) << " n=" << n << " t=" << t << " r=" << r;
        }
    }
  }
}

// int8 sums are exact on both paths, and the steps after them the same: Avx512Bf16 and Amx give
// the same bits for I8 weights.
TEST(Isa, Int8ActivationPathsAgreeToTheBit) {
  if (detected_isa() < Isa::Amx) GTEST_SKIP() << "this CPU has no AMX";
  IsaGuard guard;
  ThreadPool pool(2);
  const int64_t rows = 70, cols = 333, n = 40;
  std::vector<int8_t> q(static_cast<std::size_t>(rows * cols));
  for (std::size_t i = 0; i < q.size(); ++i)
    q[i] = static_cast<int8_t>(static_cast<int>(i * 53 % 255) - 127);
  std::vector<float> scale(static_cast<std::size_t>(rows), 0.02f);
  const WeightView w{q.data(), DType::I8, rows, cols, scale.data()};
  const std::vector<float> x = random_vector(n * cols, 71);
  const std::vector<float> bias = random_vector(rows, 72);
  std::vector<float> a(static_cast<std::size_t>(n * rows)), b(a.size());
  ASSERT_TRUE(force_isa(Isa::Avx512Bf16));
  linear(x.data(), n, w, bias.data(), a.data(), &pool);
  ASSERT_TRUE(force_isa(Isa::Amx));
  linear(x.data(), n, w, bias.data(), b.data(), &pool);
  for (std::size_t i = 0; i < a.size(); ++i)
    ASSERT_EQ(std::bit_cast<uint32_t>(a[i]), std::bit_cast<uint32_t>(b[i])) << "i=" << i;
}

}  // namespace moemesh::kernels
