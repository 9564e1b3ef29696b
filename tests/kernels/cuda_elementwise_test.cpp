// The CUDA elementwise ops (add, clamp, add_bias, swiglu, add_gated_rows) against the CPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cuda/cuda_kernels.h"
#include "tests/kernels/cuda_test_util.h"

namespace moemesh::kernels::cuda {
namespace {

namespace ct = ::moemesh::kernels::cuda::testing;

int bf16_ulps(uint16_t a, uint16_t b) {
  if ((a ^ b) & 0x8000) return (a & 0x7fff) + (b & 0x7fff);
  return std::abs(static_cast<int>(a) - static_cast<int>(b));
}

TEST(CudaElementwise, AddMatchesCpuExactly) {
  MOEMESH_REQUIRE_GPU();
  for (const int64_t n : {1, 3, 7, 33, 4096, 100001}) {
    for (const int64_t offset : {0, 1}) {  // 1: unaligned, the scalar path only
      const int64_t size = n + offset;
      const std::vector<float> x = ct::random_floats(size, 1, -5.0f, 5.0f);
      const std::vector<float> d = ct::random_floats(size, 2, -5.0f, 5.0f);
      std::vector<float> ref = x;
      for (int64_t i = offset; i < size; ++i) ref[i] = x[i] + d[i];
      DeviceBuffer d_x = ct::upload(x);
      DeviceBuffer d_d = ct::upload(d);
      add(d_x.as<float>() + offset, d_d.as<float>() + offset, n, nullptr);
      ASSERT_EQ(check("add"), "");
      EXPECT_EQ(ct::download<float>(d_x, size), ref) << "n " << n << " offset " << offset;
    }
  }
}

TEST(CudaElementwise, ClampMatchesStdClampAndKeepsNaN) {
  MOEMESH_REQUIRE_GPU();
  for (const int64_t n : {1, 7, 33, 70001}) {
    std::vector<float> x = ct::random_floats(n, 3, -20.0f, 20.0f);
    x[0] = std::numeric_limits<float>::quiet_NaN();
    if (n > 2) {
      x[1] = std::numeric_limits<float>::infinity();
      x[2] = -std::numeric_limits<float>::infinity();
    }
    const float limit = 7.5f;
    DeviceBuffer d_x = ct::upload(x);
    clamp(d_x.as<float>(), n, limit, nullptr);
    ASSERT_EQ(check("clamp"), "");
    const std::vector<float> got = ct::download<float>(d_x, n);
    EXPECT_TRUE(std::isnan(got[0]));
    for (int64_t i = 1; i < n; ++i) ASSERT_EQ(got[i], std::clamp(x[i], -limit, limit)) << i;
  }
}

TEST(CudaElementwise, AddBiasMatchesCpuExactly) {
  MOEMESH_REQUIRE_GPU();
  for (const int64_t n : {1, 7, 300}) {
    for (const int64_t dim : {1, 33, 4096}) {
      const std::vector<float> x = ct::random_floats(n * dim, 4, -3.0f, 3.0f);
      const std::vector<float> bias = ct::random_floats(dim, 5, -1.0f, 1.0f);
      std::vector<float> ref = x;
      for (int64_t t = 0; t < n; ++t)
        for (int64_t i = 0; i < dim; ++i) ref[t * dim + i] += bias[i];
      DeviceBuffer d_x = ct::upload(x);
      DeviceBuffer d_b = ct::upload(bias);
      add_bias(d_x.as<float>(), d_b.as<float>(), n, dim, nullptr);
      ASSERT_EQ(check("add_bias"), "");
      EXPECT_EQ(ct::download<float>(d_x, n * dim), ref) << "n " << n << " dim " << dim;
    }
  }
}

TEST(CudaElementwise, SwigluMatchesCpuWithinOneBf16Ulp) {
  MOEMESH_REQUIRE_GPU();
  for (const int64_t n : {1, 7, 300}) {
    for (const int64_t inter : {1, 33, 1408}) {
      const std::vector<float> gate_up = ct::random_floats(n * 2 * inter, 6, -6.0f, 6.0f);
      std::vector<float> ref(n * inter);
      for (int64_t t = 0; t < n; ++t)
        kernels::swiglu(gate_up.data() + t * 2 * inter, gate_up.data() + t * 2 * inter + inter,
                        inter, ref.data() + t * inter);
      DeviceBuffer d_in = ct::upload(gate_up);
      DeviceBuffer d_out = ct::poisoned<uint16_t>(n * inter);
      swiglu(d_in.as<float>(), n, inter, d_out.as<uint16_t>(), nullptr);
      ASSERT_EQ(check("swiglu"), "");
      const std::vector<uint16_t> got = ct::download<uint16_t>(d_out, n * inter);
      int wrong = 0;
      for (int64_t i = 0; i < n * inter; ++i)
        if (bf16_ulps(got[i], kernels::f32_to_bf16(ref[i])) > 1 && ++wrong <= 5)
          ADD_FAILURE() << "n " << n << " inter " << inter << " [" << i << "] " << std::hex
                        << got[i] << " vs " << kernels::f32_to_bf16(ref[i]);
    }
  }
}

TEST(CudaElementwise, AddGatedRowsMatchesCpu) {
  MOEMESH_REQUIRE_GPU();
  for (const int64_t n : {1, 7, 300}) {
    for (const int64_t dim : {1, 33, 4096}) {
      for (const bool gated : {false, true}) {
        const std::vector<float> out = ct::random_floats(n * dim, 7, -2.0f, 2.0f);
        const std::vector<float> x = ct::random_floats(n * dim, 8, -2.0f, 2.0f);
        const std::vector<float> gate = ct::random_floats(n, 9, -4.0f, 4.0f);
        std::vector<float> ref = out;
        for (int64_t t = 0; t < n; ++t) {
          const float s = gated ? 1.0f / (1.0f + std::exp(-gate[t])) : 1.0f;
          for (int64_t i = 0; i < dim; ++i) ref[t * dim + i] += s * x[t * dim + i];
        }
        DeviceBuffer d_out = ct::upload(out);
        DeviceBuffer d_x = ct::upload(x);
        DeviceBuffer d_g = ct::upload(gate);
        add_gated_rows(d_out.as<float>(), d_x.as<float>(), gated ? d_g.as<float>() : nullptr, n,
                       dim, nullptr);
        ASSERT_EQ(check("add_gated_rows"), "");
        const std::vector<float> got = ct::download<float>(d_out, n * dim);
        if (!gated) {
          EXPECT_EQ(got, ref) << "n " << n << " dim " << dim;
          continue;
        }
        int wrong = 0;
        for (int64_t i = 0; i < n * dim; ++i) {
          // The terms are below ~4 in size: an absolute bound of a few float32 ulps of them.
          if (!(std::abs(got[i] - ref[i]) <= 4e-6f) && ++wrong <= 5)
            ADD_FAILURE() << "n " << n << " dim " << dim << " [" << i << "] " << got[i] << " vs "
                          << ref[i];
        }
      }
    }
  }
}

}  // namespace
}  // namespace moemesh::kernels::cuda
