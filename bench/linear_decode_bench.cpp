// Decode-style matmul (one token against many weight rows) measured against the machine's memory
// read bandwidth, both measured in this run on the same thread pool. A decode step of an MoE model
// is bound by reading weights, so the ratio says how close the kernel is to the limit.
//
//   build/bin/linear_decode_bench [--mib N] [--threads N] [--reps N]
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"

namespace {

using moemesh::kernels::DType;
using moemesh::kernels::ThreadPool;
using moemesh::kernels::WeightView;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Best-of-reps read bandwidth (GB/s): every thread sums its share of the buffer.
double read_probe(const std::vector<float>& buf, ThreadPool& pool, int reps) {
  double best = 1e30;
  std::atomic<double> sink{0};
  for (int r = 0; r < reps; ++r) {
    const auto t = Clock::now();
    pool.parallel_for(static_cast<int64_t>(buf.size()), 1 << 16, [&](int64_t b, int64_t e) {
      float acc[8] = {};
      int64_t i = b;
      for (; i + 8 <= e; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += buf[i + j];
      double s = 0;
      for (float a : acc) s += a;
      sink = sink + s;
    });
    best = std::min(best, seconds_since(t));
  }
  return static_cast<double>(buf.size() * sizeof(float)) / best / 1e9;
}

// Best-of-reps effective bandwidth (GB/s of weights read) of linear() for one token.
double linear_probe(const std::vector<WeightView>& mats, ThreadPool& pool, int reps) {
  const int64_t cols = mats[0].cols;
  std::vector<float> x(static_cast<std::size_t>(cols), 0.5f);
  std::vector<float> y(static_cast<std::size_t>(mats[0].rows));
  double bytes = 0;
  for (const WeightView& w : mats)
    bytes += double(w.rows * w.cols) * double(moemesh::kernels::dtype_size(w.dtype));
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t = Clock::now();
    for (const WeightView& w : mats)
      moemesh::kernels::linear(x.data(), 1, w, nullptr, y.data(), &pool);
    best = std::min(best, seconds_since(t));
  }
  return bytes / best / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t mib = 1024;  // bigger than the last-level cache of the machines seen so far (300 MiB)
  int threads = 0;
  int reps = 5;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--mib")
      mib = std::stoll(argv[i + 1]);
    else if (flag == "--threads")
      threads = std::stoi(argv[i + 1]);
    else if (flag == "--reps")
      reps = std::stoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown flag %s; flags: --mib N --threads N --reps N\n", flag.c_str());
      return 2;
    }
  }
  ThreadPool pool(threads);
  spdlog::info("linear_decode_bench: {} MiB of weights, {} threads", mib, pool.size());

  // Expert-shaped matrices: [1408, 2048] (a Qwen-MoE expert projection).
  const int64_t rows = 1408, cols = 2048;
  const int64_t bytes = mib << 20;
  std::vector<float> f32(static_cast<std::size_t>(bytes / 4));
  std::mt19937 rng(1);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  for (float& v : f32) v = dist(rng);
  std::vector<uint16_t> bf16(static_cast<std::size_t>(bytes / 2));
  for (std::size_t i = 0; i < bf16.size(); ++i)
    bf16[i] = moemesh::kernels::f32_to_bf16(f32[i % f32.size()]);

  auto views = [&](const void* base, DType dt, int64_t total_bytes) {
    std::vector<WeightView> out;
    const int64_t mat_bytes = rows * cols * static_cast<int64_t>(moemesh::kernels::dtype_size(dt));
    for (int64_t off = 0; off + mat_bytes <= total_bytes; off += mat_bytes)
      out.push_back({static_cast<const char*>(base) + off, dt, rows, cols});
    return out;
  };

  const double read_gbs = read_probe(f32, pool, reps);
  const double f32_gbs = linear_probe(views(f32.data(), DType::F32, bytes), pool, reps);
  const double bf16_gbs = linear_probe(views(bf16.data(), DType::BF16, bytes), pool, reps);
  std::printf("threads %d, %lld MiB of weights, matrices [%lld, %lld]\n", pool.size(),
              static_cast<long long>(mib), static_cast<long long>(rows),
              static_cast<long long>(cols));
  std::printf("%-28s %8.2f GB/s\n", "read probe", read_gbs);
  std::printf("%-28s %8.2f GB/s  ratio to read probe %.2f\n", "linear F32, 1 token", f32_gbs,
              f32_gbs / read_gbs);
  std::printf("%-28s %8.2f GB/s  ratio to read probe %.2f\n", "linear BF16, 1 token", bf16_gbs,
              bf16_gbs / read_gbs);
  return 0;
}
