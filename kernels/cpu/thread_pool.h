// A fixed pool of worker threads for data-parallel loops, optionally pinned to CPUs.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moemesh::kernels {

// parallel_for splits [0, n) into chunks and runs them on the pool's workers and the calling
// thread; it returns when every chunk is done. One parallel_for runs at a time (a second caller
// waits); calling it from inside a chunk runs that inner loop serially. Chunks must not throw.
//
// Thread ownership: workers only touch the job published under mu_; the job's function and its
// data belong to the caller for the duration of the call.
//
// Pinning: given CPUs (Linux numbers, as `taskset -c` takes them), worker i (1 .. threads - 1) is
// bound to cpus[i % cpus.size()], leaving cpus[0] to the calling thread, which the pool does not
// bind (bind_current_thread() binds a whole process before it starts threads). Without CPUs the
// workers float over whatever the process may use.
class ThreadPool {
 public:
  // threads <= 0 means one per CPU in `cpus`, or, when `cpus` is empty, one per CPU this process
  // may use (its affinity: taskset, a container's cpuset). The calling thread counts as one.
  explicit ThreadPool(int threads = 0, std::vector<int> cpus = {});
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  // The CPUs the workers were asked to run on (empty: not pinned), and how many workers the OS
  // let the pool pin (a CPU outside the process's cgroup or affinity is refused).
  const std::vector<int>& cpus() const { return cpus_; }
  int pinned_workers() const { return pinned_; }

  // fn(begin, end) for consecutive ranges covering [0, n); no range is shorter than min_chunk
  // except the last. With a null pool, or n <= min_chunk, runs fn(0, n) inline.
  void parallel_for(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void worker_loop();
  void run_chunks(const std::function<void(int64_t, int64_t)>& fn, int64_t n, int64_t chunk);

  std::vector<std::thread> workers_;
  std::vector<int> cpus_;
  int pinned_ = 0;      // set by the constructor only
  std::mutex call_mu_;  // serialises parallel_for callers

  std::mutex mu_;  // guards the fields below
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  int pending_ = 0;  // workers that have not finished the current generation
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int64_t chunk_ = 0;
  std::atomic<int64_t> next_{0};
};

// The CPUs the calling thread may run on (its affinity mask), ascending: the process's, when
// called from a thread nothing has pinned (e.g. before bind_current_thread or a pinned pool).
std::vector<int> allowed_cpus();

// Binds the calling thread, and every thread it starts afterwards, to `cpus`. False (and nothing
// changed) when the OS refuses, e.g. for a CPU outside the process's cgroup.
bool bind_current_thread(const std::vector<int>& cpus);

// Runs fn over [0, n) on pool, or inline when pool is null.
inline void parallel_for(ThreadPool* pool, int64_t n, int64_t min_chunk,
                         const std::function<void(int64_t, int64_t)>& fn) {
  if (pool == nullptr || n <= min_chunk) {
    if (n > 0) fn(0, n);
    return;
  }
  pool->parallel_for(n, min_chunk, fn);
}

}  // namespace moemesh::kernels
