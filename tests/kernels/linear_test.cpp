#include <gtest/gtest.h>

#include "kernels/cpu/cpu_kernels.h"
#include "tests/kernels/reference.h"

namespace moemesh::kernels {
namespace {

using test::random_vector;
using test::ref_linear;

// Stores `w` in `dtype` and returns both the stored bytes and the values they represent.
struct Stored {
  std::vector<uint16_t> half;
  std::vector<float> values;
};
Stored store(const std::vector<float>& w, DType dtype) {
  Stored s;
  for (float v : w) {
    const uint16_t h = dtype == DType::BF16 ? f32_to_bf16(v) : f32_to_f16(v);
    s.half.push_back(h);
    s.values.push_back(dtype == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h));
  }
  return s;
}

class LinearTest
    : public ::testing::TestWithParam<std::tuple<DType, int64_t, int64_t, int64_t, int>> {};

TEST_P(LinearTest, MatchesReference) {
  const auto [dtype, n, rows, cols, threads] = GetParam();
  const std::vector<float> x = random_vector(n * cols, 1);
  std::vector<float> w = random_vector(rows * cols, 2, 0.2f);
  const std::vector<float> bias = random_vector(rows, 3);
  Stored stored;
  WeightView view{w.data(), DType::F32, rows, cols};
  if (dtype != DType::F32) {
    stored = store(w, dtype);
    w = stored.values;
    view.data = stored.half.data();
    view.dtype = dtype;
  }
  ThreadPool pool(threads);
  std::vector<float> y(static_cast<std::size_t>(n * rows));
  linear(x.data(), n, view, bias.data(), y.data(), &pool);
  const std::vector<double> ref = ref_linear(x, n, w, rows, cols, bias.data());
  for (std::size_t i = 0; i < y.size(); ++i)
    ASSERT_NEAR(y[i], ref[i], 1e-4 * (1 + std::abs(ref[i]))) << i;
}

INSTANTIATE_TEST_SUITE_P(Shapes, LinearTest,
                         ::testing::Values(std::make_tuple(DType::F32, 1, 7, 5, 1),
                                           std::make_tuple(DType::F32, 3, 130, 67, 3),
                                           std::make_tuple(DType::BF16, 5, 64, 33, 2),
                                           std::make_tuple(DType::F16, 2, 41, 128, 4),
                                           std::make_tuple(DType::F32, 17, 300, 9, 2)));

TEST(Linear, NullBiasAndNullPool) {
  const std::vector<float> x = random_vector(2 * 3, 4);
  const std::vector<float> w = random_vector(4 * 3, 5);
  std::vector<float> y(8);
  linear(x.data(), 2, WeightView{w.data(), DType::F32, 4, 3}, nullptr, y.data(), nullptr);
  const std::vector<double> ref = ref_linear(x, 2, w, 4, 3, nullptr);
  for (std::size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y[i], ref[i], 1e-5);
}

TEST(Embedding, GathersRowsInAnyDtype) {
  const std::vector<float> table = random_vector(10 * 4, 6);
  std::vector<uint16_t> bf;
  for (float v : table) bf.push_back(f32_to_bf16(v));
  const int32_t ids[3] = {9, 0, 9};
  std::vector<float> out(12);
  embedding(WeightView{bf.data(), DType::BF16, 10, 4}, ids, 3, out.data());
  for (int t = 0; t < 3; ++t)
    for (int d = 0; d < 4; ++d) EXPECT_EQ(out[t * 4 + d], bf16_to_f32(bf[ids[t] * 4 + d]));
}

}  // namespace
}  // namespace moemesh::kernels
