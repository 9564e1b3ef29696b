// The collectives of tensor parallelism (kernels/cuda Collective): ranks on one GPU that add
// through device memory, a one-rank NCCL group, and NCCL over every GPU of the machine when it has
// two or more.
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda/cuda_kernels.h"
#include "tests/kernels/cuda_test_util.h"

namespace moemesh::kernels::cuda {
namespace {

namespace ct = ::moemesh::kernels::cuda::testing;

// Each rank (a thread with its GPU and stream) sums rank-dependent arrays `rounds` times, with
// sizes that change between rounds; every rank must receive the exact sum each time.
void sums_on_every_rank(std::vector<std::unique_ptr<Collective>>& group,
                        const std::vector<int>& devices) {
  const auto size = static_cast<int>(group.size());
  std::vector<std::string> errors(group.size());
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r)
    threads.emplace_back([&, r] {
      std::string& err = errors[r];
      if ((err = set_device(devices[r])).empty()) {
        StreamHandle stream = StreamHandle::create(&err);
        for (int round = 0; round < 4 && err.empty(); ++round) {
          const int64_t n = round % 2 ? 1000 : 1 << 20;
          std::vector<float> v(static_cast<std::size_t>(n));
          for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>((r + 1) * (i % 97) + round);
          DeviceBuffer d = ct::upload(v);
          if (!(err = group[r]->all_reduce_sum(d.as<float>(), n, stream.get())).empty()) break;
          if (!(err = synchronize(stream.get(), "all-reduce")).empty()) break;
          const std::vector<float> got = ct::download<float>(d, n);
          for (int64_t i = 0; i < n && err.empty(); ++i) {
            const float want = static_cast<float>(size * (size + 1) / 2 * (i % 97) + size * round);
            if (got[i] != want)
              err = "rank " + std::to_string(r) + " round " + std::to_string(round) + " [" +
                    std::to_string(i) + "] " + std::to_string(got[i]) +
                    " != " + std::to_string(want);
          }
        }
      }
      if (!err.empty()) group[r]->abort();
    });
  for (std::thread& t : threads) t.join();
  for (const std::string& e : errors) EXPECT_EQ(e, "");
}

TEST(CudaCollective, RanksOnOneGpuAddTheirArrays) {
  MOEMESH_REQUIRE_GPU();
  for (int size : {1, 2, 3}) {
    auto group = one_gpu_group(size);
    ASSERT_EQ(group.size(), static_cast<std::size_t>(size));
    EXPECT_STREQ(group[0]->kind(), "one-gpu");
    EXPECT_EQ(group.back()->rank(), size - 1);
    sums_on_every_rank(group, std::vector<int>(static_cast<std::size_t>(size), 0));
  }
}

TEST(CudaCollective, AnAbortReleasesTheRanksThatWait) {
  MOEMESH_REQUIRE_GPU();
  auto group = one_gpu_group(3);
  std::vector<std::string> errors(2);
  std::vector<std::thread> waiting;
  DeviceBuffer d = ct::upload(std::vector<float>(16, 1.0f));
  for (int r = 0; r < 2; ++r)
    waiting.emplace_back([&, r] {
      (void)set_device(0);
      StreamHandle stream = StreamHandle::create();
      errors[r] = group[r]->all_reduce_sum(d.as<float>(), 16, stream.get());
    });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  group[2]->abort();  // rank 2 failed before its sum
  for (std::thread& t : waiting) t.join();
  for (const std::string& e : errors)
    EXPECT_NE(e.find("stopped after an error"), std::string::npos) << e;
  EXPECT_NE(group[0]->all_reduce_sum(d.as<float>(), 16, nullptr), "");
}

// Without a GPU, asking for NCCL is an error that says why (NCCL missing, or no device), not a
// crash or a hang.
TEST(CudaCollective, CudaWithoutAGpuNcclIsRefused) {
  if (device_count() > 0) GTEST_SKIP() << "this machine has a GPU";
  std::string e;
  auto group = nccl_group({0}, &e);
  EXPECT_TRUE(group.empty());
  EXPECT_TRUE(e.find("could not make a communicator") != std::string::npos ||
              e.find("NCCL is not installed") != std::string::npos)
      << e;
}

TEST(CudaCollective, NcclGroupOfOneRank) {
  MOEMESH_REQUIRE_GPU();
  std::string e;
  auto group = nccl_group({0}, &e);
  ASSERT_EQ(group.size(), 1u) << e;
  EXPECT_STREQ(group[0]->kind(), "nccl");
  sums_on_every_rank(group, {0});
}

TEST(CudaCollective, NcclAcrossTwoOrMoreGpus) {
  MOEMESH_REQUIRE_GPU();
  const int n = device_count();
  if (n < 2) GTEST_SKIP() << "this machine has one GPU";
  std::vector<int> devices;
  for (int i = 0; i < n; ++i) devices.push_back(i);
  std::string e;
  auto group = nccl_group(devices, &e);
  ASSERT_EQ(group.size(), devices.size()) << e;
  sums_on_every_rank(group, devices);
}

}  // namespace
}  // namespace moemesh::kernels::cuda
