// cuBLAS products and the grouped expert GEMM (BF16 by every method, FP8 with block scales)
// against kernels::linear; FP8 E4M3 conversions on the host.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "tests/kernels/cuda_test_util.h"

namespace moemesh::kernels::cuda {
namespace {

using testing::download;
using testing::poisoned;
using testing::random_floats;
using testing::rel_error;
using testing::to_bf16;
using testing::upload;

// y = x * w^T on the CPU with w as bf16 bits (the reference kernel).
std::vector<float> cpu_linear(const std::vector<float>& x, int64_t m,
                              const std::vector<uint16_t>& w, int64_t n, int64_t k) {
  kernels::ThreadPool pool(1);
  std::vector<float> y(static_cast<std::size_t>(m * n));
  kernels::linear(x.data(), m, kernels::WeightView{w.data(), kernels::DType::BF16, n, k}, nullptr,
                  y.data(), &pool);
  return y;
}

TEST(Fp8E4m3, EveryCodeRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<uint8_t>(c);
    const float v = fp8_e4m3_to_f32(code);
    if ((c & 0x7F) == 0x7F) {
      EXPECT_TRUE(std::isnan(v)) << c;
      continue;
    }
    EXPECT_EQ(f32_to_fp8_e4m3(v), code) << "code " << c << " value " << v;
  }
}

TEST(Fp8E4m3, KnownValuesRoundingAndSaturation) {
  EXPECT_EQ(fp8_e4m3_to_f32(0x38), 1.0f);
  EXPECT_EQ(fp8_e4m3_to_f32(0x7E), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(fp8_e4m3_to_f32(0xB8), -1.0f);
  EXPECT_EQ(f32_to_fp8_e4m3(1000.0f), 0x7E);
  EXPECT_EQ(f32_to_fp8_e4m3(-1000.0f), 0xFE);
  // 1.0625 is halfway between 1.0 (0x38) and 1.125 (0x39): ties to even.
  EXPECT_EQ(f32_to_fp8_e4m3(1.0625f), 0x38);
  EXPECT_EQ(f32_to_fp8_e4m3(1.1875f), 0x3A);  // between 0x39 and 0x3A: to even
  EXPECT_EQ(f32_to_fp8_e4m3(1.07f), 0x39);
}

TEST(CudaBlas, GemmMatchesLinear) {
  MOEMESH_REQUIRE_GPU();
  std::string error;
  auto blas = Blas::create(nullptr, &error);
  ASSERT_TRUE(blas) << error;
  for (auto [m, n, k] :
       {std::tuple<int64_t, int64_t, int64_t>{1, 64, 128}, {7, 33, 96}, {300, 256, 512}}) {
    const auto x = testing::bf16_round(random_floats(m * k, 1));
    const auto w = to_bf16(random_floats(n * k, 2));
    const auto ref = cpu_linear(x, m, w, n, k);
    auto dx = upload(to_bf16(x));
    auto dw = upload(w);
    auto dy = poisoned<float>(m * n);
    ASSERT_EQ(blas->gemm(dx.as<uint16_t>(), dw.as<uint16_t>(), dy.as<float>(), m, n, k), "");
    EXPECT_LT(rel_error(download<float>(dy, m * n), ref), 1e-4) << m << "x" << n << "x" << k;

    // beta = 1 adds to what is there.
    ASSERT_EQ(blas->gemm(dx.as<uint16_t>(), dw.as<uint16_t>(), dy.as<float>(), m, n, k, 1.0f), "");
    std::vector<float> twice(ref);
    for (float& v : twice) v *= 2;
    EXPECT_LT(rel_error(download<float>(dy, m * n), twice), 1e-4);

    auto dyb = poisoned<uint16_t>(m * n);
    ASSERT_EQ(
        blas->gemm_bf16_out(dx.as<uint16_t>(), dw.as<uint16_t>(), dyb.as<uint16_t>(), m, n, k), "");
    const auto yb = download<uint16_t>(dyb, m * n);
    std::vector<float> yf(yb.size());
    for (std::size_t i = 0; i < yb.size(); ++i) yf[i] = kernels::bf16_to_f32(yb[i]);
    EXPECT_LT(rel_error(yf, ref), 8e-3);
  }
}

// Per-head products as multi-head latent attention issues them: x's heads interleaved in rows of
// tokens, w's heads stacked rows of one matrix, read as [n, k] or as its transpose [k, n].
TEST(CudaBlas, StridedBatchedGemmMatchesPerHeadLinear) {
  MOEMESH_REQUIRE_GPU();
  std::string error;
  auto blas = Blas::create(nullptr, &error);
  ASSERT_TRUE(blas) << error;
  const int64_t m = 5, heads = 3, k = 24, n = 40, pad = 8;  // x rows: heads * (pad + k)
  const int64_t x_row = heads * (pad + k);
  const auto x = testing::bf16_round(random_floats(m * x_row, 3));
  const auto w = to_bf16(random_floats(heads * n * k, 4));  // head h: rows h * n .. [n, k]
  auto dx = upload(to_bf16(x));
  auto dw = upload(w);
  for (bool k_major : {false, true}) {
    auto dy = poisoned<float>(m * heads * n);
    Blas::StridedBatch b;
    b.x = dx.as<uint16_t>() + pad;
    b.ldx = x_row;
    b.x_stride = pad + k;
    b.w = dw.as<uint16_t>();
    b.ldw = k_major ? n : k;
    b.w_stride = n * k;
    b.w_k_major = k_major;
    b.y = dy.as<float>();
    b.ldy = heads * n;
    b.y_stride = n;
    ASSERT_EQ(blas->gemm_strided_batched(b, m, n, k, heads), "");
    const auto y = download<float>(dy, m * heads * n);
    for (int64_t h = 0; h < heads; ++h) {
      std::vector<float> xh(static_cast<std::size_t>(m * k));
      for (int64_t t = 0; t < m; ++t)
        for (int64_t i = 0; i < k; ++i) xh[t * k + i] = x[t * x_row + h * (pad + k) + pad + i];
      // The head's weight as [n, k]: its block read as such, or the transpose of its [k, n] view.
      std::vector<uint16_t> wh(static_cast<std::size_t>(n * k));
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < k; ++i)
          wh[j * k + i] = k_major ? w[h * n * k + i * n + j] : w[h * n * k + j * k + i];
      const auto ref = cpu_linear(xh, m, wh, n, k);
      std::vector<float> yh(static_cast<std::size_t>(m * n));
      for (int64_t t = 0; t < m; ++t)
        for (int64_t j = 0; j < n; ++j) yh[t * n + j] = y[t * heads * n + h * n + j];
      EXPECT_LT(rel_error(yh, ref), 1e-4) << "head " << h << " k_major " << k_major;
    }
  }
}

struct Groups {
  std::vector<int64_t> rows, offsets;
  int64_t total = 0;
};

Groups make_groups(const std::vector<int64_t>& rows) {
  Groups g{rows, {}, 0};
  for (int64_t r : rows) {
    g.offsets.push_back(g.total);
    g.total += r;
  }
  return g;
}

class CudaGroupedGemm : public ::testing::TestWithParam<GroupedMethod> {};

TEST_P(CudaGroupedGemm, Bf16MatchesLinearPerGroup) {
  MOEMESH_REQUIRE_GPU();
  std::string error;
  auto gg = GroupedGemm::create(nullptr, GetParam(), &error);
  ASSERT_TRUE(gg) << error;
  const int64_t n = 192, k = 96;
  const Groups g = make_groups({3, 0, 17, 64, 1, 0, 130, 5});
  const auto x = testing::bf16_round(random_floats(g.total * k, 3));
  std::vector<std::vector<uint16_t>> w;
  std::vector<DeviceBuffer> dw;
  std::vector<GroupWeight> weights;
  for (std::size_t e = 0; e < g.rows.size(); ++e) {
    w.push_back(to_bf16(random_floats(n * k, 10 + static_cast<uint32_t>(e))));
    dw.push_back(upload(w.back()));
    weights.push_back({dw.back().data(), nullptr});
  }
  auto dx = upload(to_bf16(x));
  auto dy = poisoned<float>(g.total * n);
  ASSERT_EQ(gg->run_bf16(dx.as<uint16_t>(), weights, g.rows, g.offsets, n, k, dy.as<float>()), "");
  const auto y = download<float>(dy, g.total * n);
  for (std::size_t e = 0; e < g.rows.size(); ++e) {
    if (g.rows[e] == 0) continue;
    const std::vector<float> xe(x.begin() + g.offsets[e] * k,
                                x.begin() + (g.offsets[e] + g.rows[e]) * k);
    const auto ref = cpu_linear(xe, g.rows[e], w[e], n, k);
    const std::vector<float> got(y.begin() + g.offsets[e] * n,
                                 y.begin() + (g.offsets[e] + g.rows[e]) * n);
    // Batched rounds its result to bf16 (all cuBLAS offers there) before widening it, and Auto
    // picks Batched for groups this small.
    const double tolerance =
        GetParam() == GroupedMethod::Batched || GetParam() == GroupedMethod::Auto ? 8e-3 : 1e-4;
    EXPECT_LT(rel_error(got, ref), tolerance)
        << "group " << e << " method " << grouped_method_name(GetParam());
  }
  // Mismatched argument lists are an error message, not a crash.
  EXPECT_NE(gg->run_bf16(dx.as<uint16_t>(), weights, {1}, {0}, n, k, dy.as<float>()), "");
}

INSTANTIATE_TEST_SUITE_P(Methods, CudaGroupedGemm,
                         ::testing::Values(GroupedMethod::Loop, GroupedMethod::Streams,
                                           GroupedMethod::Batched, GroupedMethod::Wmma,
                                           GroupedMethod::Auto),
                         [](const auto& p) { return grouped_method_name(p.param); });

// FP8 weights with 128x128 block scales: quantised on the host as DeepSeek-V3 ships them.
struct Fp8Weight {
  std::vector<uint8_t> q;
  std::vector<float> scale;
  std::vector<float> dequant;  // what the weight means
};

Fp8Weight quantize(const std::vector<float>& w, int64_t n, int64_t k) {
  const int64_t nb = (n + 127) / 128, kb = (k + 127) / 128;
  Fp8Weight f{std::vector<uint8_t>(w.size()), std::vector<float>(nb * kb),
              std::vector<float>(w.size())};
  for (int64_t bi = 0; bi < nb; ++bi)
    for (int64_t bj = 0; bj < kb; ++bj) {
      float amax = 0;
      for (int64_t r = bi * 128; r < std::min(n, bi * 128 + 128); ++r)
        for (int64_t c = bj * 128; c < std::min(k, bj * 128 + 128); ++c)
          amax = std::max(amax, std::fabs(w[r * k + c]));
      const float s = amax > 0 ? amax / 448.0f : 1.0f;
      f.scale[bi * kb + bj] = s;
      for (int64_t r = bi * 128; r < std::min(n, bi * 128 + 128); ++r)
        for (int64_t c = bj * 128; c < std::min(k, bj * 128 + 128); ++c) {
          f.q[r * k + c] = f32_to_fp8_e4m3(w[r * k + c] / s);
          f.dequant[r * k + c] = fp8_e4m3_to_f32(f.q[r * k + c]) * s;
        }
    }
  return f;
}

// `count` experts' [n, k] FP8 weights (seeds seed, seed + 1, ...), on the host and the device.
// Rows of different magnitude, so that the block scales differ and matter.
struct Fp8Experts {
  std::vector<Fp8Weight> w;
  std::vector<DeviceBuffer> codes, scales;
  std::vector<GroupWeight> weights;
};
Fp8Experts fp8_experts(std::size_t count, int64_t n, int64_t k, uint32_t seed) {
  Fp8Experts ex;
  for (std::size_t e = 0; e < count; ++e) {
    auto raw = random_floats(n * k, seed + static_cast<uint32_t>(e));
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < k; ++c)
        raw[r * k + c] *= 1.0f + static_cast<float>((r / 128 + c / 128) % 3) * 5.0f;
    ex.w.push_back(quantize(raw, n, k));
    ex.codes.push_back(upload(ex.w.back().q));
    ex.scales.push_back(upload(ex.w.back().scale));
    ex.weights.push_back({ex.codes.back().data(), ex.scales.back().as<float>()});
  }
  return ex;
}

TEST(CudaGroupedGemmFp8, MatchesDequantizedReference) {
  MOEMESH_REQUIRE_GPU();
  std::string error;
  auto gg = GroupedGemm::create(nullptr, GroupedMethod::Loop, &error);
  ASSERT_TRUE(gg) << error;
  const int64_t n = 384, k = 320;  // blocks of 128 that end part-way in both dimensions
  const Groups g = make_groups({1, 0, 70, 5, 129});
  const auto x = testing::bf16_round(random_floats(g.total * k, 4));
  const Fp8Experts ex = fp8_experts(g.rows.size(), n, k, 20);
  const auto& w = ex.w;
  const auto& weights = ex.weights;
  auto dx = upload(to_bf16(x));
  auto dy = poisoned<float>(g.total * n);
  ASSERT_EQ(gg->run_fp8(dx.as<uint16_t>(), weights, g.rows, g.offsets, n, k, dy.as<float>()), "");
  const auto y = download<float>(dy, g.total * n);
  kernels::ThreadPool pool(1);
  for (std::size_t e = 0; e < g.rows.size(); ++e) {
    if (g.rows[e] == 0) continue;
    std::vector<float> ref(static_cast<std::size_t>(g.rows[e] * n));
    kernels::linear(x.data() + g.offsets[e] * k, g.rows[e],
                    kernels::WeightView{w[e].dequant.data(), kernels::DType::F32, n, k}, nullptr,
                    ref.data(), &pool);
    const std::vector<float> got(y.begin() + g.offsets[e] * n,
                                 y.begin() + (g.offsets[e] + g.rows[e]) * n);
    // The kernel rounds each dequantised weight to bf16 before the tensor-core product.
    EXPECT_LT(rel_error(got, ref), 5e-3) << "group " << e;
  }
  // Shapes the kernel does not tile are refused with a message.
  const std::string bad =
      gg->run_fp8(dx.as<uint16_t>(), weights, g.rows, g.offsets, 100, k, dy.as<float>());
  EXPECT_NE(bad.find("n % 64"), std::string::npos) << bad;
}

// Groups of few rows (decode) take the GEMV: the CPU's result on the same bf16-rounded weights up
// to the order of the additions, on shapes the tile kernel refuses (n = 200). By default groups of
// one row do; raised to 64, groups of up to 64 rows do, in passes of 8. With x misaligned, or set
// to never, the same call goes to the tile kernel, which refuses n = 200.
TEST(CudaGroupedGemmFp8, FewRowsPerGroupTakeTheGemv) {
  MOEMESH_REQUIRE_GPU();
  std::string error;
  auto gg = GroupedGemm::create(nullptr, GroupedMethod::Auto, &error);
  ASSERT_TRUE(gg) << error;
  const int64_t n = 200, k = 336;
  const std::vector<int64_t> most = {3, 0, 8, 1, 17, 64};
  const Fp8Experts ex = fp8_experts(most.size(), n, k, 50);
  const auto& w = ex.w;
  const auto& weights = ex.weights;
  kernels::ThreadPool pool(1);
  auto matches = [&](const std::vector<int64_t>& rows) {
    const Groups g = make_groups(rows);
    const auto x = testing::bf16_round(random_floats(g.total * k, 6));
    auto dx = upload(to_bf16(x));
    auto dy = poisoned<float>(g.total * n);
    ASSERT_EQ(gg->run_fp8(dx.as<uint16_t>(), weights, g.rows, g.offsets, n, k, dy.as<float>()), "");
    const auto y = download<float>(dy, g.total * n);
    for (std::size_t e = 0; e < g.rows.size(); ++e) {
      if (g.rows[e] == 0) continue;
      std::vector<float> ref(static_cast<std::size_t>(g.rows[e] * n));
      const auto rounded = testing::bf16_round(w[e].dequant);
      kernels::linear(x.data() + g.offsets[e] * k, g.rows[e],
                      kernels::WeightView{rounded.data(), kernels::DType::F32, n, k}, nullptr,
                      ref.data(), &pool);
      const std::vector<float> got(y.begin() + g.offsets[e] * n,
                                   y.begin() + (g.offsets[e] + g.rows[e]) * n);
      EXPECT_LT(rel_error(got, ref), 1e-5) << "group " << e << " of " << g.rows[e] << " rows";
    }
  };
  ASSERT_EQ(kFp8GroupedGemvRows, 1);
  matches({1, 0, 1, 1, 0, 1});
  gg->set_fp8_gemv_rows(64);
  matches(most);
  const Groups g = make_groups({1, 0, 1, 1, 0, 1});
  auto dx = upload(std::vector<uint16_t>(g.total * k + 1, 0x3F80));
  auto dy = poisoned<float>(g.total * n);
  // x not 16-byte aligned: the GEMV does not take it, and the call goes to the tile kernel.
  const std::string misaligned =
      gg->run_fp8(dx.as<uint16_t>() + 1, weights, g.rows, g.offsets, n, k, dy.as<float>());
  EXPECT_NE(misaligned.find("n % 64"), std::string::npos) << misaligned;
  gg->set_fp8_gemv_rows(0);
  const std::string tiles =
      gg->run_fp8(dx.as<uint16_t>(), weights, g.rows, g.offsets, n, k, dy.as<float>());
  EXPECT_NE(tiles.find("n % 64"), std::string::npos) << tiles;
  EXPECT_EQ(check("after the refused shape"), "");
}

// A dense layer on FP8 weights: the product for a few rows (every count up to the limit, a k that
// ends inside a scale block) and the dequantised bf16 copy for cuBLAS, against the CPU on the
// weights the codes stand for. Shapes: a k shorter than one pass of the block's threads; a k of
// three passes with features that end inside a block of features and cross a 128-row scale block;
// a k the 16-wide copy does not take.
TEST(CudaFp8Linear, FewRowsAndDequantizedWeightsMatchTheCpu) {
  MOEMESH_REQUIRE_GPU();
  kernels::ThreadPool pool(1);
  struct Shape {
    int64_t n, k;
  };
  for (const Shape sh : {Shape{200, 336}, Shape{131, 8240}, Shape{7, 100}}) {
    const int64_t n = sh.n, k = sh.k;
    auto raw = random_floats(n * k, 31);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < k; ++c)
        raw[r * k + c] *= 1.0f + static_cast<float>((r / 128 + 2 * (c / 128)) % 4) * 7.0f;
    const Fp8Weight w = quantize(raw, n, k);
    auto dw = upload(w.q);
    auto ds = upload(w.scale);
    const auto rounded = testing::bf16_round(w.dequant);
    const kernels::WeightView ref_w{rounded.data(), kernels::DType::F32, n, k};
    for (int64_t m = 1; m <= kFp8GemvMaxRows && k % 16 == 0; ++m) {
      const auto x = testing::bf16_round(random_floats(m * k, 40 + static_cast<uint32_t>(m)));
      auto dx = upload(to_bf16(x));
      auto dy = poisoned<float>(m * n);
      ASSERT_EQ(fp8_gemv(dx.as<uint16_t>(), dw.as<uint8_t>(), ds.as<float>(), m, n, k,
                         dy.as<float>(), nullptr),
                "");
      const auto got = download<float>(dy, m * n);
      std::vector<float> ref(static_cast<std::size_t>(m * n));
      kernels::linear(x.data(), m, ref_w, nullptr, ref.data(), &pool);
      // The same bf16 weights, exact products, float32 sums: only the order of the additions
      // differs.
      EXPECT_LT(rel_error(got, ref), 1e-5) << "m = " << m << ", n = " << n << ", k = " << k;
    }
    auto dq = poisoned<uint16_t>(n * k);
    fp8_dequantize_bf16(dw.as<uint8_t>(), ds.as<float>(), n, k, dq.as<uint16_t>(), nullptr);
    const auto q = download<uint16_t>(dq, n * k);
    for (int64_t i = 0; i < n * k; ++i)
      ASSERT_EQ(q[i], kernels::f32_to_bf16(w.dequant[i])) << "weight " << i << ", k = " << k;
  }
  const int64_t n = 200, k = 336;
  auto dw = upload(std::vector<uint8_t>(n * k, 0x38));
  auto ds = upload(std::vector<float>(2 * 3, 1.0f));
  // Shapes the product does not take are refused with a message, launching nothing.
  auto dx = upload(to_bf16(random_floats(9 * k, 5)));
  auto dy = poisoned<float>(9 * n);
  EXPECT_NE(fp8_gemv(dx.as<uint16_t>(), dw.as<uint8_t>(), ds.as<float>(), 9, n, k, dy.as<float>(),
                     nullptr)
                .find("m <= 8"),
            std::string::npos);
  EXPECT_NE(fp8_gemv(dx.as<uint16_t>(), dw.as<uint8_t>(), ds.as<float>(), 1, n, 100, dy.as<float>(),
                     nullptr)
                .find("multiple of 16"),
            std::string::npos);
  EXPECT_EQ(check("after refused shapes"), "");
}

}  // namespace
}  // namespace moemesh::kernels::cuda
