#include "kernels/cpu/thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>

namespace moemesh::kernels {
namespace {
thread_local bool t_inside_chunk = false;

bool to_cpu_set(const std::vector<int>& cpus, cpu_set_t* set) {
  CPU_ZERO(set);
  for (int c : cpus) {
    if (c < 0 || c >= CPU_SETSIZE) return false;
    CPU_SET(c, set);
  }
  return !cpus.empty();
}
}  // namespace

std::vector<int> allowed_cpus() {
  std::vector<int> out;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return out;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set)) out.push_back(c);
  return out;
}

bool bind_current_thread(const std::vector<int>& cpus) {
  cpu_set_t set;
  return to_cpu_set(cpus, &set) && sched_setaffinity(0, sizeof(set), &set) == 0;
}

ThreadPool::ThreadPool(int threads, std::vector<int> cpus) : cpus_(std::move(cpus)) {
  if (threads <= 0) {
    // The CPUs this process may use (taskset, a container's cpuset), not every CPU of the host.
    const std::size_t usable = cpus_.empty() ? allowed_cpus().size() : cpus_.size();
    threads = usable > 0 ? static_cast<int>(usable)
                         : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }
  workers_.reserve(threads - 1);
  for (int i = 1; i < threads; ++i) {
    workers_.emplace_back([this] { worker_loop(); });
    if (cpus_.empty()) continue;
    cpu_set_t set;
    if (to_cpu_set({cpus_[i % cpus_.size()]}, &set) &&
        pthread_setaffinity_np(workers_.back().native_handle(), sizeof(set), &set) == 0)
      ++pinned_;
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_chunks(const std::function<void(int64_t, int64_t)>& fn, int64_t n,
                            int64_t chunk) {
  t_inside_chunk = true;
  for (;;) {
    const int64_t begin = next_.fetch_add(chunk);
    if (begin >= n) break;
    fn(begin, std::min(n, begin + chunk));
  }
  t_inside_chunk = false;
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    const std::function<void(int64_t, int64_t)>* fn = nullptr;
    int64_t n = 0;
    int64_t chunk = 0;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      fn = fn_;
      n = n_;
      chunk = chunk_;
    }
    run_chunks(*fn, n, chunk);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t min_chunk,
                              const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  min_chunk = std::max<int64_t>(1, min_chunk);
  if (workers_.empty() || n <= min_chunk || t_inside_chunk) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> call(call_mu_);
  // About four chunks per thread balances uneven rows without much scheduling overhead.
  const int64_t chunks = static_cast<int64_t>(size()) * 4;
  const int64_t chunk = std::max(min_chunk, (n + chunks - 1) / chunks);
  {
    std::lock_guard<std::mutex> lock(mu_);
    fn_ = &fn;
    n_ = n;
    chunk_ = chunk;
    next_.store(0);
    pending_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  work_cv_.notify_all();
  run_chunks(fn, n, chunk);
  // Every worker takes part in every generation (possibly finding no chunk left), so none can
  // still be reading this job when the next one is published.
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [&] { return pending_ == 0; });
  fn_ = nullptr;
}

}  // namespace moemesh::kernels
