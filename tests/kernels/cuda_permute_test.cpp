// The CUDA token permutation (moe_align, moe_gather, moe_combine) against host references.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cuda/cuda_kernels.h"
#include "tests/kernels/cuda_test_util.h"

namespace moemesh::kernels::cuda {
namespace {

namespace ct = ::moemesh::kernels::cuda::testing;

// Expert ids with a skew (low ids far more likely) so that some experts get nothing.
std::vector<int32_t> skewed_ids(int64_t n_slots, int64_t n_experts, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<int32_t> ids(n_slots);
  for (int32_t& id : ids) {
    const double x = u(rng);
    id = static_cast<int32_t>(static_cast<double>(n_experts) * x * x);
    id = std::min<int32_t>(id, static_cast<int32_t>(n_experts - 1));
  }
  if (n_slots > 0) ids[n_slots - 1] = static_cast<int32_t>(n_experts - 1);  // the last expert
  return ids;
}

struct Aligned {
  std::vector<int32_t> counts, offsets, row_of_slot, slot_of_row;
};

Aligned align_on_gpu(const std::vector<int32_t>& ids, int64_t n_experts) {
  const auto n_slots = static_cast<int64_t>(ids.size());
  DeviceBuffer d_ids = ct::upload(ids);
  DeviceBuffer d_counts = ct::poisoned<int32_t>(n_experts);
  DeviceBuffer d_offsets = ct::poisoned<int32_t>(n_experts + 1);
  DeviceBuffer d_ros = ct::poisoned<int32_t>(n_slots);
  DeviceBuffer d_sor = ct::poisoned<int32_t>(n_slots);
  moe_align(d_ids.as<int32_t>(), n_slots, n_experts, d_counts.as<int32_t>(),
            d_offsets.as<int32_t>(), d_ros.as<int32_t>(), d_sor.as<int32_t>(), nullptr);
  EXPECT_EQ(check("moe_align"), "");
  return {ct::download<int32_t>(d_counts, n_experts),
          ct::download<int32_t>(d_offsets, n_experts + 1), ct::download<int32_t>(d_ros, n_slots),
          ct::download<int32_t>(d_sor, n_slots)};
}

TEST(CudaPermute, AlignCountsOffsetsAndAPermutation) {
  MOEMESH_REQUIRE_GPU();
  for (const int64_t n_experts : {1, 8, 60, 256, 1024}) {
    for (const int64_t n_slots :
         {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{300}, int64_t{4097}, int64_t{1} << 20}) {
      const std::string what =
          "experts " + std::to_string(n_experts) + " slots " + std::to_string(n_slots);
      const std::vector<int32_t> ids =
          skewed_ids(n_slots, n_experts, static_cast<uint32_t>(n_slots + n_experts));
      const Aligned a = align_on_gpu(ids, n_experts);

      std::vector<int32_t> counts(n_experts, 0);
      for (int32_t id : ids) ++counts[id];
      std::vector<int32_t> offsets(n_experts + 1, 0);
      std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1);
      ASSERT_EQ(a.counts, counts) << what;
      ASSERT_EQ(a.offsets, offsets) << what;

      std::vector<uint8_t> row_seen(n_slots, 0);
      for (int64_t s = 0; s < n_slots; ++s) {
        const int32_t row = a.row_of_slot[s];
        ASSERT_GE(row, offsets[ids[s]]) << what << " slot " << s;
        ASSERT_LT(row, offsets[ids[s] + 1]) << what << " slot " << s;
        ASSERT_EQ(row_seen[row], 0) << what << ": row " << row << " taken twice";
        row_seen[row] = 1;
        ASSERT_EQ(a.slot_of_row[row], s) << what << ": slot_of_row is not the inverse";
      }
    }
  }
}

TEST(CudaPermute, AlignRejectsTooManyExperts) {
  MOEMESH_REQUIRE_GPU();
  const std::vector<int32_t> ids(16, 3);
  DeviceBuffer d_ids = ct::upload(ids);
  DeviceBuffer d_counts = ct::poisoned<int32_t>(2000);
  DeviceBuffer d_offsets = ct::poisoned<int32_t>(2001);
  DeviceBuffer d_ros = ct::poisoned<int32_t>(16);
  DeviceBuffer d_sor = ct::poisoned<int32_t>(16);
  ASSERT_EQ(check("before"), "");
  moe_align(d_ids.as<int32_t>(), 16, 1025, d_counts.as<int32_t>(), d_offsets.as<int32_t>(),
            d_ros.as<int32_t>(), d_sor.as<int32_t>(), nullptr);
  EXPECT_NE(check("moe_align"), "");
  EXPECT_EQ(synchronize(nullptr, "after"), "");
}

TEST(CudaPermute, GatherCopiesTokenRowsInExpertOrder) {
  MOEMESH_REQUIRE_GPU();
  for (const int64_t hidden : {1, 8, 33, 4096}) {
    for (const int64_t n_tokens : {1, 7, 300}) {
      const int64_t top_k = 3, n_experts = 16;
      const std::vector<int32_t> ids =
          skewed_ids(n_tokens * top_k, n_experts, static_cast<uint32_t>(hidden + n_tokens));
      const Aligned a = align_on_gpu(ids, n_experts);
      const std::vector<uint16_t> x = ct::to_bf16(
          ct::random_floats(n_tokens * hidden, static_cast<uint32_t>(hidden), -3.0f, 3.0f));
      const int64_t n_rows = n_tokens * top_k;
      DeviceBuffer d_x = ct::upload(x);
      DeviceBuffer d_sor = ct::upload(a.slot_of_row);
      DeviceBuffer d_out = ct::poisoned<uint16_t>(n_rows * hidden);
      moe_gather(d_x.as<uint16_t>(), d_sor.as<int32_t>(), n_rows, top_k, hidden,
                 d_out.as<uint16_t>(), nullptr);
      ASSERT_EQ(check("moe_gather"), "");
      const std::vector<uint16_t> out = ct::download<uint16_t>(d_out, n_rows * hidden);
      std::vector<uint16_t> ref(n_rows * hidden);
      for (int64_t r = 0; r < n_rows; ++r) {
        const int64_t token = a.slot_of_row[r] / top_k;
        std::copy(x.begin() + token * hidden, x.begin() + (token + 1) * hidden,
                  ref.begin() + r * hidden);
      }
      EXPECT_EQ(out, ref) << "hidden " << hidden << " tokens " << n_tokens;
    }
  }
}

TEST(CudaPermute, CombineSumsWeightedRowsInSlotOrder) {
  MOEMESH_REQUIRE_GPU();
  for (const int64_t hidden : {1, 33, 4096}) {
    for (const int64_t n_tokens : {1, 7, 300}) {
      for (const int64_t top_k : {1, 6}) {
        for (const bool accumulate : {false, true}) {
          const int64_t n_rows = n_tokens * top_k;
          // A random permutation stands in for moe_align's rows.
          std::vector<int32_t> row_of_slot(n_rows);
          std::iota(row_of_slot.begin(), row_of_slot.end(), 0);
          std::shuffle(row_of_slot.begin(), row_of_slot.end(),
                       std::mt19937(static_cast<uint32_t>(n_rows + hidden)));
          const std::vector<float> y = ct::random_floats(n_rows * hidden, 31, -2.0f, 2.0f);
          const std::vector<float> w = ct::random_floats(n_rows, 32, 0.05f, 1.0f);
          const std::vector<float> out0 = ct::random_floats(n_tokens * hidden, 33, -1.0f, 1.0f);
          std::vector<float> ref(n_tokens * hidden);
          for (int64_t t = 0; t < n_tokens; ++t) {
            for (int64_t i = 0; i < hidden; ++i) {
              float acc = accumulate ? out0[t * hidden + i] : 0.0f;
              for (int64_t j = 0; j < top_k; ++j)
                acc += w[t * top_k + j] * y[row_of_slot[t * top_k + j] * hidden + i];
              ref[t * hidden + i] = acc;
            }
          }
          DeviceBuffer d_y = ct::upload(y);
          DeviceBuffer d_ros = ct::upload(row_of_slot);
          DeviceBuffer d_w = ct::upload(w);
          DeviceBuffer d_out = accumulate ? ct::upload(out0) : ct::poisoned<float>(out0.size());
          moe_combine(d_y.as<float>(), d_ros.as<int32_t>(), d_w.as<float>(), n_tokens, top_k,
                      hidden, accumulate, d_out.as<float>(), nullptr);
          ASSERT_EQ(check("moe_combine"), "");
          const std::vector<float> got = ct::download<float>(d_out, n_tokens * hidden);
          int wrong = 0;
          for (std::size_t i = 0; i < got.size(); ++i)
            if (!(std::abs(got[i] - ref[i]) <= 1e-6f * (1.0f + std::abs(ref[i]))) && ++wrong <= 5)
              ADD_FAILURE() << "hidden " << hidden << " tokens " << n_tokens << " top_k " << top_k
                            << (accumulate ? " accumulate" : "") << " [" << i << "] " << got[i]
                            << " vs " << ref[i];
        }
      }
    }
  }
}

// combine_rows: output rows of any number of contributions (none included), each the host loop's
// bits (products and sums rounded once, in order), as float32 and as bf16; and a call naming
// both outputs or neither fails at check().
TEST(CudaPermute, CombineRowsSumsEachOutputRowsContributionsInOrder) {
  MOEMESH_REQUIRE_GPU();
  for (const int64_t hidden : {1, 48, 7168}) {
    const int64_t n_out = 37, n_y = 90;
    std::mt19937 rng(static_cast<uint32_t>(hidden));
    std::vector<int64_t> offsets = {0};
    std::vector<int32_t> rows;
    for (int64_t o = 0; o < n_out; ++o) {
      const int64_t k = o % 5 == 3 ? 0 : 1 + static_cast<int64_t>(rng() % 4);
      for (int64_t j = 0; j < k; ++j) rows.push_back(static_cast<int32_t>(rng() % n_y));
      offsets.push_back(static_cast<int64_t>(rows.size()));
    }
    const std::vector<float> y = ct::random_floats(n_y * hidden, 41, -2.0f, 2.0f);
    const std::vector<float> w = ct::random_floats(rows.size(), 42, 0.05f, 1.0f);
    std::vector<float> ref(n_out * hidden);
    std::vector<uint16_t> ref16(ref.size());
    for (int64_t o = 0; o < n_out; ++o)
      for (int64_t i = 0; i < hidden; ++i) {
        float acc = 0.0f;
        for (int64_t j = offsets[o]; j < offsets[o + 1]; ++j) acc += w[j] * y[rows[j] * hidden + i];
        ref[o * hidden + i] = acc;
        ref16[o * hidden + i] = kernels::f32_to_bf16(acc);
      }
    DeviceBuffer d_y = ct::upload(y);
    DeviceBuffer d_offsets = ct::upload(offsets);
    DeviceBuffer d_rows = ct::upload(rows);
    DeviceBuffer d_w = ct::upload(w);
    DeviceBuffer d_out = ct::poisoned<float>(ref.size());
    DeviceBuffer d_out16 = ct::poisoned<uint16_t>(ref.size());
    combine_rows(d_y.as<float>(), d_offsets.as<int64_t>(), d_rows.as<int32_t>(), d_w.as<float>(),
                 n_out, hidden, d_out.as<float>(), nullptr, nullptr);
    combine_rows(d_y.as<float>(), d_offsets.as<int64_t>(), d_rows.as<int32_t>(), d_w.as<float>(),
                 n_out, hidden, nullptr, d_out16.as<uint16_t>(), nullptr);
    ASSERT_EQ(check("combine_rows"), "");
    EXPECT_EQ(ct::download<float>(d_out, ref.size()), ref) << "hidden " << hidden;
    EXPECT_EQ(ct::download<uint16_t>(d_out16, ref.size()), ref16) << "hidden " << hidden;
    combine_rows(d_y.as<float>(), d_offsets.as<int64_t>(), d_rows.as<int32_t>(), d_w.as<float>(),
                 n_out, hidden, nullptr, nullptr, nullptr);
    EXPECT_NE(check("combine_rows without an output"), "");
    EXPECT_EQ(synchronize(nullptr, "after"), "");
  }
}

}  // namespace
}  // namespace moemesh::kernels::cuda
