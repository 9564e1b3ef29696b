// Decode-style matmul (one token against many weight rows) measured against the machine's memory
// read bandwidth, both measured in this run on the same thread pool. A decode step of an MoE model
// is bound by reading weights, so the ratio says how close the kernel is to the limit. linear() is
// measured on every ISA this machine supports (kernels::force_isa), F32, BF16, F16, I8 (per-row
// scales) and F8_E4M3 (128x128 block scales) weights. With --prefill N it instead times linear()
// on N tokens at once against two matrices (BF16 and FP8) shaped like an MoE model's attention
// projection and expert, where the work is bound by arithmetic, and reports GFLOP/s
// (2 * N * rows * cols per call).
//
//   build/bin/linear_decode_bench [--mib N] [--threads N] [--reps N] [--prefill N]
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"

namespace {

using moemesh::kernels::DType;
using moemesh::kernels::Isa;
using moemesh::kernels::ThreadPool;
using moemesh::kernels::WeightView;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Sum of buf[b, e) in eight independent lanes. Cloned per ISA so that the probe reads as fast as
// the widest kernel could: with portable SSE code alone it is slower than the AVX-512 kernels.
__attribute__((target_clones("avx512f", "avx2", "default"))) double sum_range(const float* buf,
                                                                              int64_t b,
                                                                              int64_t e) {
  float acc[16] = {};
  int64_t i = b;
  for (; i + 16 <= e; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += buf[i + j];
  double s = 0;
  for (float a : acc) s += a;
  return s;
}

// Best-of-reps read bandwidth (GB/s): every thread sums its share of the buffer.
double read_probe(const std::vector<float>& buf, ThreadPool& pool, int reps) {
  double best = 1e30;
  std::atomic<double> sink{0};
  for (int r = 0; r < reps; ++r) {
    const auto t = Clock::now();
    pool.parallel_for(static_cast<int64_t>(buf.size()), 1 << 16,
                      [&](int64_t b, int64_t e) { sink = sink + sum_range(buf.data(), b, e); });
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

// Best-of-reps GFLOP/s of linear() on n_tokens tokens against one BF16 matrix [rows, cols], or
// (fp8) its FP8 block quantization.
double prefill_probe(int64_t n_tokens, int64_t rows, int64_t cols, bool fp8, ThreadPool& pool,
                     int reps) {
  std::mt19937 rng(2);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  std::vector<uint16_t> w(static_cast<std::size_t>(rows * cols));
  for (uint16_t& v : w) v = moemesh::kernels::f32_to_bf16(dist(rng));
  std::vector<float> x(static_cast<std::size_t>(n_tokens * cols));
  for (float& v : x) v = dist(rng);
  std::vector<float> y(static_cast<std::size_t>(n_tokens * rows));
  WeightView view{w.data(), DType::BF16, rows, cols};
  std::vector<uint8_t> codes(fp8 ? w.size() : 0);
  std::vector<float> scales(static_cast<std::size_t>(
      fp8 ? moemesh::kernels::fp8_blocks(rows) * moemesh::kernels::fp8_blocks(cols) : 0));
  if (fp8) {
    moemesh::kernels::quantize_fp8_e4m3(view, codes.data(), scales.data(), &pool);
    view = {codes.data(), DType::F8E4M3, rows, cols, scales.data()};
  }
  // One untimed call: first touch of y and the pool's threads waking up.
  moemesh::kernels::linear(x.data(), n_tokens, view, nullptr, y.data(), &pool);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t = Clock::now();
    moemesh::kernels::linear(x.data(), n_tokens, view, nullptr, y.data(), &pool);
    best = std::min(best, seconds_since(t));
  }
  return 2.0 * double(n_tokens) * double(rows) * double(cols) / best / 1e9;
}

int run_prefill(int64_t n_tokens, ThreadPool& pool, int reps) {
  const Isa active = moemesh::kernels::active_isa();
  std::printf("threads %d, %lld tokens, BF16 and FP8 weights, detected ISA %s\n", pool.size(),
              static_cast<long long>(n_tokens), isa_name(moemesh::kernels::detected_isa()));
  // An attention projection [2048, 2048] and an expert projection [1024, 2048] (OLMoE shapes).
  const std::pair<int64_t, int64_t> shapes[] = {{2048, 2048}, {1024, 2048}};
  for (Isa isa : {Isa::Baseline, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Amx}) {
    if (!moemesh::kernels::force_isa(isa)) continue;  // not supported here
    for (const bool fp8 : {false, true})
      for (const auto& [rows, cols] : shapes) {
        const double gflops = prefill_probe(n_tokens, rows, cols, fp8, pool, reps);
        std::printf("linear %-8s %-4s [%lld, %lld] x %lld tokens %9.2f GFLOP/s\n", isa_name(isa),
                    fp8 ? "FP8" : "BF16", static_cast<long long>(rows),
                    static_cast<long long>(cols), static_cast<long long>(n_tokens), gflops);
      }
  }
  moemesh::kernels::force_isa(active);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t mib = 1024;  // bigger than the last-level cache of the machines seen so far (300 MiB)
  int threads = 0;
  int reps = 5;
  int64_t prefill = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--mib")
      mib = std::stoll(argv[i + 1]);
    else if (flag == "--threads")
      threads = std::stoi(argv[i + 1]);
    else if (flag == "--reps")
      reps = std::stoi(argv[i + 1]);
    else if (flag == "--prefill")
      prefill = std::stoll(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown flag %s; flags: --mib N --threads N --reps N --prefill N\n",
                   flag.c_str());
      return 2;
    }
  }
  ThreadPool pool(threads);
  if (prefill > 0) return run_prefill(prefill, pool, reps);
  spdlog::info("linear_decode_bench: {} MiB of weights, {} threads", mib, pool.size());

  // Expert-shaped matrices: [1408, 2048] (a Qwen-MoE expert projection).
  const int64_t rows = 1408, cols = 2048;
  const int64_t bytes = mib << 20;
  std::vector<float> f32(static_cast<std::size_t>(bytes / 4));
  std::mt19937 rng(1);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  for (float& v : f32) v = dist(rng);
  std::vector<uint16_t> bf16(static_cast<std::size_t>(bytes / 2));
  std::vector<uint16_t> f16(bf16.size());
  for (std::size_t i = 0; i < bf16.size(); ++i) {
    bf16[i] = moemesh::kernels::f32_to_bf16(f32[i % f32.size()]);
    f16[i] = moemesh::kernels::f32_to_f16(f32[i % f32.size()]);
  }

  auto views = [&](const void* base, DType dt, int64_t total_bytes) {
    std::vector<WeightView> out;
    const int64_t mat_bytes = rows * cols * static_cast<int64_t>(moemesh::kernels::dtype_size(dt));
    for (int64_t off = 0; off + mat_bytes <= total_bytes; off += mat_bytes)
      out.push_back({static_cast<const char*>(base) + off, dt, rows, cols});
    return out;
  };
  const std::vector<WeightView> f32_views = views(f32.data(), DType::F32, bytes);
  const std::vector<WeightView> bf16_views = views(bf16.data(), DType::BF16, bytes);
  const std::vector<WeightView> f16_views = views(f16.data(), DType::F16, bytes);
  // Int8 weights (--quantization int8) with a float32 scale per row; the same bytes of int8.
  std::vector<int8_t> i8(static_cast<std::size_t>(bytes));
  for (std::size_t i = 0; i < i8.size(); ++i)
    i8[i] = static_cast<int8_t>(
        std::lround(std::clamp(f32[i % f32.size()] / 0.02f * 40.0f, -127.0f, 127.0f)));
  std::vector<float> i8_scales(static_cast<std::size_t>(rows), 0.0005f);
  std::vector<WeightView> i8_views = views(i8.data(), DType::I8, bytes);
  for (WeightView& v : i8_views) v.scale = i8_scales.data();
  // FP8 E4M3 weights with a float32 scale per 128x128 block (FP8 checkpoints, --quantization fp8):
  // one matrix's worth of the bf16 weights quantized, its codes repeated over the same bytes.
  std::vector<uint8_t> f8(static_cast<std::size_t>(bytes));
  std::vector<float> f8_scales(static_cast<std::size_t>(moemesh::kernels::fp8_blocks(rows) *
                                                        moemesh::kernels::fp8_blocks(cols)));
  moemesh::kernels::quantize_fp8_e4m3({bf16.data(), DType::BF16, rows, cols}, f8.data(),
                                      f8_scales.data(), &pool);
  for (std::size_t i = static_cast<std::size_t>(rows * cols); i < f8.size(); ++i)
    f8[i] = f8[i % static_cast<std::size_t>(rows * cols)];
  std::vector<WeightView> f8_views = views(f8.data(), DType::F8E4M3, bytes);
  for (WeightView& v : f8_views) v.scale = f8_scales.data();

  // Avx512Bf16 and Amx read BF16, I8 and FP8 matrices in the tile layout the model loader packs
  // them into (FP8: as bf16, twice its bytes; the figure counts the FP8 bytes the matrix stands
  // for).
  std::vector<moemesh::kernels::PackedWeights> packed;
  std::vector<WeightView> bf16_packed_views, i8_packed_views, f8_packed_views;
  if (moemesh::kernels::detected_isa() >= Isa::Avx512Bf16)
    for (const std::vector<WeightView>* from :
         std::initializer_list<const std::vector<WeightView>*>{&bf16_views, &i8_views, &f8_views})
      for (WeightView v : *from) {
        packed.push_back(moemesh::kernels::pack_amx(v, &pool));
        v.packed = packed.back().data();
        (from == &bf16_views ? bf16_packed_views
         : from == &i8_views ? i8_packed_views
                             : f8_packed_views)
            .push_back(v);
      }

  const Isa active = moemesh::kernels::active_isa();
  // The machine is shared: the probe runs before and after the kernels and keeps its best, so
  // that a noisy moment does not flatter the ratios.
  double read_gbs = read_probe(f32, pool, reps);
  std::vector<std::pair<std::string, double>> results;
  for (Isa isa : {Isa::Baseline, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Amx}) {
    if (!moemesh::kernels::force_isa(isa)) continue;  // not supported here
    const std::pair<const char*, const std::vector<WeightView>*> runs[] = {{"F32", &f32_views},
                                                                           {"BF16", &bf16_views},
                                                                           {"F16", &f16_views},
                                                                           {"I8", &i8_views},
                                                                           {"FP8", &f8_views}};
    for (const auto& [name, mats] : runs) {
      const bool packs = isa >= Isa::Avx512Bf16;
      if (packs && mats != &bf16_views && mats != &i8_views && mats != &f8_views)
        continue;  // the Avx512 kernels
      const std::vector<WeightView>* m = isa != Isa::Amx       ? mats
                                         : mats == &bf16_views ? &bf16_packed_views
                                         : mats == &i8_views   ? &i8_packed_views
                                                               : &f8_packed_views;
      const double gbs = linear_probe(*m, pool, reps);
      const std::string label = std::string("linear ") + isa_name(isa) + " " + name + ", 1 token";
      results.emplace_back(label, gbs);
    }
  }
  read_gbs = std::max(read_gbs, read_probe(f32, pool, reps));
  std::printf("threads %d, %lld MiB of weights, matrices [%lld, %lld], detected ISA %s\n",
              pool.size(), static_cast<long long>(mib), static_cast<long long>(rows),
              static_cast<long long>(cols), isa_name(moemesh::kernels::detected_isa()));
  std::printf("%-34s %8.2f GB/s\n", "read probe", read_gbs);
  for (const auto& [label, gbs] : results)
    std::printf("%-34s %8.2f GB/s  ratio to read probe %.2f\n", label.c_str(), gbs, gbs / read_gbs);
  moemesh::kernels::force_isa(active);
  return 0;
}
