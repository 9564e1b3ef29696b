// The CUDA rotary embedding against kernels/cpu rope.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cuda/cuda_kernels.h"
#include "tests/kernels/cuda_test_util.h"

namespace moemesh::kernels::cuda {
namespace {

namespace ct = ::moemesh::kernels::cuda::testing;

struct Case {
  int64_t n_tokens, n_heads, head_dim, rotary_dim, pad;  // pad: floats after each token's heads
  double theta;
};

TEST(CudaRope, MatchesCpu) {
  MOEMESH_REQUIRE_GPU();
  const Case cases[] = {
      {1, 1, 2, 2, 0, 10000.0},     {7, 3, 64, 64, 5, 10000.0}, {300, 8, 128, 128, 0, 1e6},
      {33, 4, 128, 64, 3, 10000.0},  // partial rotary
      {5, 32, 72, 72, 0, 500000.0}, {7, 2, 64, 32, 1, 50000.0}, {300, 1, 256, 2, 7, 10000.0}};
  for (const Case& c : cases) {
    const int64_t stride = c.n_heads * c.head_dim + c.pad;
    const std::vector<float> x = ct::random_floats(c.n_tokens * stride, 21, -2.0f, 2.0f);
    std::vector<int32_t> pos(c.n_tokens);
    std::mt19937 rng(static_cast<uint32_t>(c.n_tokens + c.head_dim));
    std::uniform_int_distribution<int32_t> any(0, 131071);
    for (int32_t& p : pos) p = any(rng);
    pos[0] = 0;
    if (c.n_tokens > 1) pos[1] = 131071;
    std::vector<float> inv(c.rotary_dim / 2);
    rope_inv_freq(c.theta, c.rotary_dim, inv.data());

    std::vector<float> ref = x;
    kernels::rope(ref.data(), c.n_tokens, stride, c.n_heads, c.head_dim, c.rotary_dim, pos.data(),
                  inv.data());

    DeviceBuffer d_x = ct::upload(x);
    DeviceBuffer d_pos = ct::upload(pos);
    DeviceBuffer d_inv = ct::upload(inv);
    rope(d_x.as<float>(), c.n_tokens, stride, c.n_heads, c.head_dim, c.rotary_dim,
         d_pos.as<int32_t>(), d_inv.as<float>(), nullptr);
    ASSERT_EQ(check("rope"), "");
    const std::vector<float> got = ct::download<float>(d_x, x.size());

    const int64_t half = c.rotary_dim / 2;
    int wrong = 0;
    for (int64_t t = 0; t < c.n_tokens; ++t) {
      for (int64_t f = 0; f < stride; ++f) {
        const int64_t i = t * stride + f;
        const int64_t h = f / c.head_dim, d = f % c.head_dim;
        if (h >= c.n_heads || d >= c.rotary_dim) {
          // Padding and the features past rotary_dim are left alone.
          if (got[i] != x[i] && ++wrong <= 5) ADD_FAILURE() << "touched [" << i << "]";
          continue;
        }
        // A rotated feature mixes two inputs a and b: its error scales with |a| + |b|.
        const int64_t base = t * stride + h * c.head_dim;
        const float scale = std::abs(x[base + d % half]) + std::abs(x[base + d % half + half]);
        if (!(std::abs(got[i] - ref[i]) <= 1e-5f * scale) && ++wrong <= 5)
          ADD_FAILURE() << "token " << t << " head " << h << " feature " << d << " at position "
                        << pos[t] << ": " << got[i] << " vs " << ref[i];
      }
    }
    EXPECT_EQ(wrong, 0) << "n_tokens " << c.n_tokens << " heads " << c.n_heads << " head_dim "
                        << c.head_dim << " rotary_dim " << c.rotary_dim;
  }
}

TEST(CudaRope, PositionZeroIsTheIdentity) {
  MOEMESH_REQUIRE_GPU();
  const int64_t n = 3, heads = 4, head_dim = 64;
  const std::vector<float> x = ct::random_floats(n * heads * head_dim, 22, -2.0f, 2.0f);
  const std::vector<int32_t> pos(n, 0);
  std::vector<float> inv(head_dim / 2);
  rope_inv_freq(10000.0, head_dim, inv.data());
  DeviceBuffer d_x = ct::upload(x);
  DeviceBuffer d_pos = ct::upload(pos);
  DeviceBuffer d_inv = ct::upload(inv);
  rope(d_x.as<float>(), n, heads * head_dim, heads, head_dim, head_dim, d_pos.as<int32_t>(),
       d_inv.as<float>(), nullptr);
  ASSERT_EQ(check("rope"), "");
  EXPECT_EQ(ct::download<float>(d_x, x.size()), x);
}

}  // namespace
}  // namespace moemesh::kernels::cuda
