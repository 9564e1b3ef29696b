// The CUDA embedding lookup against kernels/cpu embedding.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cuda/cuda_kernels.h"
#include "tests/kernels/cuda_test_util.h"

namespace moemesh::kernels::cuda {
namespace {

namespace ct = ::moemesh::kernels::cuda::testing;

TEST(CudaEmbedding, MatchesCpuExactly) {
  MOEMESH_REQUIRE_GPU();
  const int64_t vocab = 301;
  for (const int64_t hidden : {1, 6, 33, 4096}) {
    for (const int64_t n : {1, 7, 300}) {
      const std::vector<uint16_t> table =
          ct::to_bf16(ct::random_floats(vocab * hidden, static_cast<uint32_t>(hidden), -2, 2));
      std::mt19937 rng(static_cast<uint32_t>(n * 31 + hidden));
      std::uniform_int_distribution<int32_t> pick(0, vocab - 1);
      std::vector<int32_t> ids(n);
      for (int32_t& id : ids) id = pick(rng);
      ids[0] = vocab - 1;          // the last row
      if (n > 2) ids[2] = ids[1];  // a repeated token

      std::vector<float> ref(n * hidden);
      kernels::embedding(WeightView{table.data(), DType::BF16, vocab, hidden}, ids.data(), n,
                         ref.data());

      DeviceBuffer d_table = ct::upload(table);
      DeviceBuffer d_ids = ct::upload(ids);
      // The output at offset 0 (aligned: the vectorised path where hidden % 4 == 0) and at
      // offset 1 (unaligned: the scalar path).
      for (const int64_t offset : {0, 1}) {
        DeviceBuffer d_out = ct::poisoned<float>(n * hidden + 1);
        embedding(d_table.as<uint16_t>(), hidden, d_ids.as<int32_t>(), n,
                  d_out.as<float>() + offset, nullptr);
        ASSERT_EQ(check("embedding"), "");
        const std::vector<float> out = ct::download<float>(d_out, n * hidden + 1);
        const std::vector<float> got(out.begin() + offset, out.begin() + offset + n * hidden);
        EXPECT_EQ(got, ref) << "hidden " << hidden << " n " << n << " offset " << offset;
      }
    }
  }
}

}  // namespace
}  // namespace moemesh::kernels::cuda
