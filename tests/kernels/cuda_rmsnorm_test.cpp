// The CUDA RMSNorm (with its fused residual add and bf16 output) against kernels/cpu rmsnorm.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cuda/cuda_kernels.h"
#include "tests/kernels/cuda_test_util.h"

namespace moemesh::kernels::cuda {
namespace {

namespace ct = ::moemesh::kernels::cuda::testing;

// Distance in units in the last place between two bf16 values of the same sign.
int bf16_ulps(uint16_t a, uint16_t b) {
  if ((a ^ b) & 0x8000) return (a & 0x7fff) + (b & 0x7fff);
  return std::abs(static_cast<int>(a) - static_cast<int>(b));
}

void expect_close(const std::vector<float>& got, const std::vector<float>& ref, const char* what) {
  ASSERT_EQ(got.size(), ref.size());
  EXPECT_LT(ct::rel_error(got, ref), 1e-6) << what;
  int wrong = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    if (!(std::abs(got[i] - ref[i]) <= 1e-5f * std::max(std::abs(ref[i]), 1e-3f)) && ++wrong <= 5)
      ADD_FAILURE() << what << " [" << i << "] " << got[i] << " vs " << ref[i];
}

struct Case {
  int64_t n, dim;
  int64_t offset;  // floats added to every pointer: 1 makes the kernel take its unaligned path
};

TEST(CudaRmsNorm, MatchesCpuWithAndWithoutResidual) {
  MOEMESH_REQUIRE_GPU();
  const float eps = 1e-6f;
  const Case cases[] = {{1, 1, 0},    {7, 1, 0},      {1, 33, 0},   {7, 33, 0}, {300, 64, 0},
                        {7, 4096, 0}, {300, 4096, 0}, {3, 7168, 0}, {5, 36, 1}, {2, 4096, 1}};
  for (const Case& c : cases) {
    const int64_t size = c.n * c.dim;
    const auto seed = static_cast<uint32_t>(c.n * 1000 + c.dim);
    const std::vector<float> x = ct::random_floats(size, seed, -3.0f, 3.0f);
    const std::vector<float> residual = ct::random_floats(size, seed + 1, -1.0f, 1.0f);
    const std::vector<float> weight = ct::random_floats(c.dim, seed + 2, 0.5f, 1.5f);

    for (const bool with_residual : {false, true}) {
      for (const int outputs : {1, 2, 3}) {  // 1: f32 only, 2: bf16 only, 3: both
        std::vector<float> x_ref = x;
        if (with_residual)
          for (int64_t i = 0; i < size; ++i) x_ref[i] += residual[i];
        std::vector<float> y_ref(size);
        kernels::rmsnorm(x_ref.data(), weight.data(), c.n, c.dim, eps, y_ref.data());

        // Every buffer gets `offset` extra leading floats so that the pointers can be shifted.
        auto padded = [&](const std::vector<float>& v) {
          std::vector<float> p(c.offset, 0.0f);
          p.insert(p.end(), v.begin(), v.end());
          return p;
        };
        DeviceBuffer d_x = ct::upload(padded(x));
        DeviceBuffer d_r = ct::upload(padded(residual));
        DeviceBuffer d_w = ct::upload(padded(weight));
        DeviceBuffer d_y = ct::poisoned<float>(size + c.offset);
        DeviceBuffer d_yb = ct::poisoned<uint16_t>(size + c.offset);
        float* px = d_x.as<float>() + c.offset;
        rmsnorm(px, with_residual ? d_r.as<float>() + c.offset : nullptr,
                d_w.as<float>() + c.offset, c.n, c.dim, eps,
                outputs & 1 ? d_y.as<float>() + c.offset : nullptr,
                outputs & 2 ? d_yb.as<uint16_t>() + c.offset : nullptr, nullptr);
        ASSERT_EQ(check("rmsnorm"), "");
        const std::string what = "n " + std::to_string(c.n) + " dim " + std::to_string(c.dim) +
                                 " offset " + std::to_string(c.offset) +
                                 (with_residual ? " residual" : "") + " outputs " +
                                 std::to_string(outputs);

        std::vector<float> x_got = ct::download<float>(d_x, size + c.offset);
        x_got.erase(x_got.begin(), x_got.begin() + c.offset);
        EXPECT_EQ(x_got, x_ref) << what << ": the residual stream";
        if (outputs & 1) {
          std::vector<float> y = ct::download<float>(d_y, size + c.offset);
          y.erase(y.begin(), y.begin() + c.offset);
          expect_close(y, y_ref, what.c_str());
        }
        if (outputs & 2) {
          std::vector<uint16_t> yb = ct::download<uint16_t>(d_yb, size + c.offset);
          int wrong = 0;
          for (int64_t i = 0; i < size; ++i)
            if (bf16_ulps(yb[c.offset + i], kernels::f32_to_bf16(y_ref[i])) > 1 && ++wrong <= 5)
              ADD_FAILURE() << what << " bf16 [" << i << "] " << std::hex << yb[c.offset + i]
                            << " vs " << kernels::f32_to_bf16(y_ref[i]);
        }
      }
    }
  }
}

TEST(CudaRmsNorm, InPlaceOutputOverTheResidualStream) {
  MOEMESH_REQUIRE_GPU();
  for (const int64_t dim : {33, 4096}) {
    const int64_t n = 7;
    const std::vector<float> x = ct::random_floats(n * dim, 11, -2.0f, 2.0f);
    const std::vector<float> residual = ct::random_floats(n * dim, 12, -2.0f, 2.0f);
    const std::vector<float> weight = ct::random_floats(dim, 13, 0.5f, 1.5f);
    std::vector<float> ref = x;
    for (std::size_t i = 0; i < ref.size(); ++i) ref[i] += residual[i];
    kernels::rmsnorm(ref.data(), weight.data(), n, dim, 1e-5f, ref.data());

    DeviceBuffer d_x = ct::upload(x);
    DeviceBuffer d_r = ct::upload(residual);
    DeviceBuffer d_w = ct::upload(weight);
    rmsnorm(d_x.as<float>(), d_r.as<float>(), d_w.as<float>(), n, dim, 1e-5f, d_x.as<float>(),
            nullptr, nullptr);
    ASSERT_EQ(synchronize(nullptr, "rmsnorm"), "");
    expect_close(ct::download<float>(d_x, n * dim), ref, "in place");
  }
}

// An RMSNorm whose features are split over ranks: each part's sum of squares, added up, then
// each part normalised with its piece of the weight, gives the whole row's RMSNorm.
TEST(CudaRmsNorm, SplitOverRanksMatchesTheWholeRow) {
  MOEMESH_REQUIRE_GPU();
  const float eps = 1e-6f;
  for (const auto& [n, dim, parts] : {std::tuple<int64_t, int64_t, int64_t>{1, 96, 1},
                                      {5, 96, 2},
                                      {5, 96, 3},
                                      {300, 4096, 4},
                                      {3, 2048, 8}}) {
    const std::string what =
        std::to_string(n) + "x" + std::to_string(dim) + " in " + std::to_string(parts);
    const std::vector<float> x = ct::random_floats(n * dim, 21, -3.0f, 3.0f);
    const std::vector<float> weight = ct::random_floats(dim, 22, 0.5f, 1.5f);
    std::vector<float> ref(x.size());
    kernels::rmsnorm(x.data(), weight.data(), n, dim, eps, ref.data());
    const int64_t d = dim / parts;
    std::vector<std::vector<float>> xs(parts), ws(parts);
    std::vector<float> total(n, 0.0f);
    for (int64_t p = 0; p < parts; ++p) {
      for (int64_t t = 0; t < n; ++t)
        xs[p].insert(xs[p].end(), x.begin() + t * dim + p * d, x.begin() + t * dim + (p + 1) * d);
      ws[p].assign(weight.begin() + p * d, weight.begin() + (p + 1) * d);
      DeviceBuffer d_x = ct::upload(xs[p]);
      DeviceBuffer d_ss = ct::poisoned<float>(n);
      row_sum_squares(d_x.as<float>(), n, d, d_ss.as<float>(), nullptr);
      const std::vector<float> ss = ct::download<float>(d_ss, n);
      for (int64_t t = 0; t < n; ++t) {
        double want = 0;
        for (float v : std::vector<float>(xs[p].begin() + t * d, xs[p].begin() + (t + 1) * d))
          want += double(v) * v;
        EXPECT_NEAR(ss[t], want, 1e-4 * want) << what << " part " << p << " row " << t;
        total[t] += ss[t];
      }
    }
    std::vector<float> got(x.size());
    DeviceBuffer d_total = ct::upload(total);
    for (int64_t p = 0; p < parts; ++p) {
      DeviceBuffer d_x = ct::upload(xs[p]);
      DeviceBuffer d_w = ct::upload(ws[p]);
      rmsnorm_apply(d_x.as<float>(), d_total.as<float>(), dim, d_w.as<float>(), n, d, eps, nullptr);
      const std::vector<float> y = ct::download<float>(d_x, n * d);
      for (int64_t t = 0; t < n; ++t)
        std::copy(y.begin() + t * d, y.begin() + (t + 1) * d, got.begin() + t * dim + p * d);
    }
    ASSERT_EQ(check("split rmsnorm"), "");
    EXPECT_LT(ct::rel_error(got, ref), 1e-5) << what;
  }
}

// LayerNorm without bias (dbrx) against a double-precision reference (the CPU model's norm):
// with and without the fused residual add, f32 and bf16 outputs, rows of 1 to 5000 values.
TEST(CudaLayerNorm, MatchesTheReferenceWithAndWithoutResidual) {
  MOEMESH_REQUIRE_GPU();
  const float eps = 1e-5f;
  for (auto [n, dim] : {std::pair<int64_t, int64_t>{1, 40}, {7, 2048}, {3, 5000}, {300, 96}}) {
    // An offset mean: a one-pass variance would lose the deviations to it.
    auto x = ct::random_floats(static_cast<std::size_t>(n * dim), 91, 10.0f, 12.0f);
    const auto residual = ct::random_floats(x.size(), 92);
    const auto weight = ct::random_floats(static_cast<std::size_t>(dim), 93, 0.5f, 1.5f);
    for (bool with_residual : {false, true}) {
      std::vector<float> stream = x, ref(x.size());
      if (with_residual)
        for (std::size_t i = 0; i < stream.size(); ++i) stream[i] += residual[i];
      for (int64_t t = 0; t < n; ++t) {
        const float* r = stream.data() + t * dim;
        double sum = 0, sq = 0;
        for (int64_t i = 0; i < dim; ++i) sum += r[i];
        const double mean = sum / static_cast<double>(dim);
        for (int64_t i = 0; i < dim; ++i) sq += (r[i] - mean) * (r[i] - mean);
        const double inv = 1.0 / std::sqrt(sq / static_cast<double>(dim) + eps);
        for (int64_t i = 0; i < dim; ++i)
          ref[t * dim + i] = static_cast<float>(weight[i] * ((r[i] - mean) * inv));
      }
      auto d_x = ct::upload(x);
      auto d_r = ct::upload(residual);
      auto d_w = ct::upload(weight);
      auto d_y = ct::poisoned<float>(x.size());
      auto d_b = ct::poisoned<uint16_t>(x.size());
      layernorm(d_x.as<float>(), with_residual ? d_r.as<float>() : nullptr, d_w.as<float>(), n, dim,
                eps, d_y.as<float>(), d_b.as<uint16_t>(), nullptr);
      ASSERT_EQ(synchronize(nullptr, "layernorm"), "");
      const std::string what = "n=" + std::to_string(n) + " dim=" + std::to_string(dim) +
                               (with_residual ? " residual" : "");
      EXPECT_LT(ct::rel_error(ct::download<float>(d_y, x.size()), ref), 1e-4) << what;
      EXPECT_EQ(ct::download<float>(d_x, x.size()), stream) << what;  // the residual stream
      const auto b = ct::download<uint16_t>(d_b, x.size());
      std::vector<float> bf(b.size());
      for (std::size_t i = 0; i < b.size(); ++i) bf[i] = kernels::bf16_to_f32(b[i]);
      EXPECT_LT(ct::rel_error(bf, ref), 8e-3) << what;
    }
  }
}

}  // namespace
}  // namespace moemesh::kernels::cuda
