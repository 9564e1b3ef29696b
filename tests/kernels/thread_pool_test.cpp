#include <gtest/gtest.h>
#include <sched.h>

#include <atomic>
#include <map>
#include <set>
#include <thread>

#include "kernels/cpu/thread_pool.h"

namespace moemesh::kernels {
namespace {

TEST(ThreadPool, CoversTheRangeExactlyOnce) {
  ThreadPool pool(4);
  EXPECT_EQ(pool.size(), 4);
  for (int64_t n : {1, 2, 7, 100, 1001}) {
    std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
    pool.parallel_for(n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i]++;
    });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " i=" << i;
  }
}

TEST(ThreadPool, UsesSeveralThreadsForLargeWork) {
  ThreadPool pool(3);
  std::mutex mu;
  std::set<std::thread::id> seen;
  for (int rep = 0; rep < 50 && seen.size() < 2; ++rep) {
    pool.parallel_for(3000, 1, [&](int64_t, int64_t) {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      std::lock_guard<std::mutex> lock(mu);
      seen.insert(std::this_thread::get_id());
    });
  }
  EXPECT_GE(seen.size(), 2u);
}

TEST(ThreadPool, NestedCallsRunInline) {
  ThreadPool pool(2);
  std::atomic<int64_t> total{0};
  pool.parallel_for(8, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      pool.parallel_for(10, 1, [&](int64_t ib, int64_t ie) { total += ie - ib; });
  });
  EXPECT_EQ(total.load(), 80);
}

TEST(ThreadPool, ConcurrentCallersAreSerialised) {
  ThreadPool pool(2);
  std::atomic<int64_t> total{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 3; ++c)
    callers.emplace_back([&] {
      for (int rep = 0; rep < 100; ++rep)
        pool.parallel_for(64, 1, [&](int64_t b, int64_t e) { total += e - b; });
    });
  for (auto& t : callers) t.join();
  EXPECT_EQ(total.load(), 3 * 100 * 64);
}

TEST(ThreadPool, FreeFunctionRunsInlineWithoutPool) {
  int64_t calls = 0, covered = 0;
  parallel_for(nullptr, 10, 1, [&](int64_t b, int64_t e) {
    ++calls;
    covered += e - b;
  });
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(covered, 10);
}

// The CPUs the calling thread may run on.
std::vector<int> thread_cpus() {
  cpu_set_t set;
  std::vector<int> out;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return out;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set)) out.push_back(c);
  return out;
}

// Every thread's affinity seen by the chunks of enough parallel_for calls to reach each worker.
std::map<std::thread::id, std::vector<int>> affinities(ThreadPool& pool) {
  std::mutex mu;
  std::map<std::thread::id, std::vector<int>> seen;
  for (int rep = 0; rep < 200 && static_cast<int>(seen.size()) < pool.size(); ++rep)
    pool.parallel_for(4 * pool.size(), 1, [&](int64_t, int64_t) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      std::vector<int> cpus = thread_cpus();
      std::lock_guard<std::mutex> lock(mu);
      seen[std::this_thread::get_id()] = std::move(cpus);
    });
  return seen;
}

TEST(ThreadPool, AllowedCpusAreThisProcesssAffinity) {
  const std::vector<int> allowed = allowed_cpus();
  ASSERT_FALSE(allowed.empty());
  EXPECT_EQ(allowed, thread_cpus());
  EXPECT_TRUE(std::is_sorted(allowed.begin(), allowed.end()));
}

TEST(ThreadPool, PinsOneWorkerToEachCpuAfterTheFirst) {
  const std::vector<int> cpus = allowed_cpus();
  ThreadPool pool(0, cpus);
  EXPECT_EQ(pool.size(), static_cast<int>(cpus.size()));  // threads 0: one per CPU
  EXPECT_EQ(pool.cpus(), cpus);
  EXPECT_EQ(pool.pinned_workers(), pool.size() - 1);
  const auto seen = affinities(pool);
  std::multiset<int> worker_cpus;
  for (const auto& [id, mask] : seen) {
    if (id == std::this_thread::get_id()) {
      EXPECT_EQ(mask, cpus) << "the calling thread is left as it was";
      continue;
    }
    ASSERT_EQ(mask.size(), 1u) << "a worker is pinned to a single CPU";
    worker_cpus.insert(mask[0]);
  }
  EXPECT_EQ(worker_cpus, std::multiset<int>(cpus.begin() + 1, cpus.end()));
}

TEST(ThreadPool, MoreThreadsThanCpusShareThemInTurn) {
  const int cpu = allowed_cpus().back();
  ThreadPool pool(4, {cpu});
  EXPECT_EQ(pool.size(), 4);
  EXPECT_EQ(pool.pinned_workers(), 3);
  for (const auto& [id, mask] : affinities(pool)) {
    if (id != std::this_thread::get_id()) {
      EXPECT_EQ(mask, std::vector<int>{cpu});
    }
  }
}

TEST(ThreadPool, ACpuTheProcessMayNotUseIsNotPinnedAndThePoolStillWorks) {
  const std::vector<int> allowed = allowed_cpus();
  const int outside = CPU_SETSIZE + 3;  // no such CPU
  ThreadPool pool(2, {allowed[0], outside});
  EXPECT_EQ(pool.pinned_workers(), 0);  // worker 1 wanted `outside`
  std::atomic<int64_t> total{0};
  pool.parallel_for(100, 1, [&](int64_t b, int64_t e) { total += e - b; });
  EXPECT_EQ(total.load(), 100);
  for (const auto& [id, mask] : affinities(pool)) EXPECT_EQ(mask, allowed);
}

TEST(ThreadPool, BindCurrentThreadAlsoBindsTheThreadsItStarts) {
  const int cpu = allowed_cpus().back();
  std::vector<int> own, child;
  bool bound = false;
  std::thread([&] {
    bound = bind_current_thread({cpu});
    own = thread_cpus();
    std::thread([&] { child = thread_cpus(); }).join();
  }).join();
  EXPECT_TRUE(bound);
  EXPECT_EQ(own, std::vector<int>{cpu});
  EXPECT_EQ(child, std::vector<int>{cpu});
  EXPECT_EQ(thread_cpus(), allowed_cpus()) << "other threads keep their affinity";
  EXPECT_FALSE(bind_current_thread({}));
  EXPECT_FALSE(bind_current_thread({CPU_SETSIZE + 1}));
  EXPECT_EQ(thread_cpus(), allowed_cpus());
}

}  // namespace
}  // namespace moemesh::kernels
