// The CUDA f32 <-> bf16 conversions against the CPU's, bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cuda/cuda_kernels.h"
#include "tests/kernels/cuda_test_util.h"

namespace moemesh::kernels::cuda {
namespace {

namespace ct = ::moemesh::kernels::cuda::testing;

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Random values over many magnitudes, with the awkward cases planted at the front: zeros of both
// signs, infinities, NaNs with payloads, subnormals, rounding ties, values that round to inf.
std::vector<float> awkward_floats(std::size_t n, uint32_t seed) {
  std::vector<float> v = ct::random_floats(n, seed, -1.0f, 1.0f);
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> exponent(-40, 40);
  for (float& x : v) x = std::ldexp(x, exponent(rng));
  const float special[] = {0.0f,
                           -0.0f,
                           std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(),
                           from_bits(0x7fc00000u),
                           from_bits(0xffffffffu),
                           from_bits(0x7f800001u),  // signalling NaN
                           1e-40f,
                           -1e-41f,
                           std::numeric_limits<float>::max(),
                           from_bits(0x3f808000u),  // a tie: rounds down to even
                           from_bits(0x3f818000u),  // a tie: rounds up to even
                           from_bits(0x7f7f8000u),  // rounds to inf
                           from_bits(0x3f80ffffu)};
  for (std::size_t i = 0; i < std::size(special) && i < n; ++i) v[i] = special[i];
  return v;
}

TEST(CudaConvert, F32ToBf16MatchesCpuBitForBit) {
  MOEMESH_REQUIRE_GPU();
  for (const std::size_t n : {1u, 7u, 33u, 4096u, 100003u}) {
    const std::vector<float> x = awkward_floats(n, static_cast<uint32_t>(n));
    DeviceBuffer d_x = ct::upload(x);
    // offset 0: the vectorised path; offset 1: unaligned, the scalar path.
    for (const std::size_t offset : {0u, 1u}) {
      if (offset >= n) continue;
      const std::size_t m = n - offset;
      DeviceBuffer d_y = ct::poisoned<uint16_t>(n);
      f32_to_bf16(d_x.as<float>() + offset, static_cast<int64_t>(m), d_y.as<uint16_t>() + offset,
                  nullptr);
      ASSERT_EQ(check("f32_to_bf16"), "");
      const std::vector<uint16_t> y = ct::download<uint16_t>(d_y, n);
      int wrong = 0;
      for (std::size_t i = offset; i < n; ++i) {
        if (y[i] != kernels::f32_to_bf16(x[i]) && ++wrong <= 5)
          ADD_FAILURE() << "n " << n << " offset " << offset << " i " << i << ": 0x" << std::hex
                        << to_bits(x[i]) << " -> 0x" << y[i] << ", CPU 0x"
                        << kernels::f32_to_bf16(x[i]);
      }
      EXPECT_EQ(wrong, 0) << "n " << n << " offset " << offset;
      for (std::size_t i = 0; i < offset; ++i) EXPECT_EQ(y[i], 0xffff) << "wrote before the start";
    }
  }
}

TEST(CudaConvert, Bf16ToF32IsExactForEveryBitPattern) {
  MOEMESH_REQUIRE_GPU();
  std::vector<uint16_t> x(65536 + 5);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<uint16_t>(i * 40503u);
  DeviceBuffer d_x = ct::upload(x);
  for (const std::size_t offset : {0u, 1u, 3u}) {
    const std::size_t m = x.size() - offset;
    DeviceBuffer d_y = ct::poisoned<float>(x.size());
    bf16_to_f32(d_x.as<uint16_t>() + offset, static_cast<int64_t>(m), d_y.as<float>() + offset,
                nullptr);
    ASSERT_EQ(check("bf16_to_f32"), "");
    const std::vector<float> y = ct::download<float>(d_y, x.size());
    int wrong = 0;
    for (std::size_t i = offset; i < x.size(); ++i)
      wrong += to_bits(y[i]) != to_bits(kernels::bf16_to_f32(x[i]));
    EXPECT_EQ(wrong, 0) << "offset " << offset;
  }
}

TEST(CudaConvert, SmallSizesTouchNothingPastTheEnd) {
  MOEMESH_REQUIRE_GPU();
  for (const int64_t n : {1, 2, 3, 5, 9}) {
    const std::vector<float> x = ct::random_floats(16, 5, -3.0f, 3.0f);
    DeviceBuffer d_x = ct::upload(x);
    DeviceBuffer d_y = ct::poisoned<uint16_t>(16);
    DeviceBuffer d_z = ct::poisoned<float>(16);
    f32_to_bf16(d_x.as<float>(), n, d_y.as<uint16_t>(), nullptr);
    bf16_to_f32(d_y.as<uint16_t>(), n, d_z.as<float>(), nullptr);
    ASSERT_EQ(synchronize(nullptr, "convert"), "");
    const std::vector<uint16_t> y = ct::download<uint16_t>(d_y, 16);
    const std::vector<float> z = ct::download<float>(d_z, 16);
    for (int64_t i = 0; i < 16; ++i) {
      if (i < n) {
        EXPECT_EQ(y[i], kernels::f32_to_bf16(x[i]));
        EXPECT_EQ(z[i], kernels::bf16_to_f32(kernels::f32_to_bf16(x[i])));
      } else {
        EXPECT_EQ(y[i], 0xffff) << "n " << n << " i " << i;
        EXPECT_EQ(to_bits(z[i]), 0xffffffffu) << "n " << n << " i " << i;
      }
    }
  }
}

}  // namespace
}  // namespace moemesh::kernels::cuda
