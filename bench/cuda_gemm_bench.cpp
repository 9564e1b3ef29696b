// Grouped expert GEMM on a GPU against one dense cuBLAS GEMM of equal FLOPs, measured in one run.
//
// For each case (experts E, tokens T routed top_k each, projection n x k), the T * top_k rows are
// spread over the experts with a seeded, mildly skewed distribution, and every grouped method of
// kernels/cuda (loop, streams, batched, wmma; fp8 with block scales) computes rows x W_e^T; the
// dense reference multiplies all T * top_k rows by one [n, k] matrix (the same FLOPs). Times are
// medians of CUDA-event-timed repetitions after warm-up; each line of output is one JSON object,
// with the TFLOP/s and the ratio to the dense GEMM. Then dense layers with FP8 weights against
// bf16 ("bench":"fp8_dense", below). Exit status 1 on any CUDA error.
//
//   build/bin/cuda_gemm_bench [--reps N] [--quick] [--fp8-dense-only]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/cuda_kernels.h"

namespace cu = moemesh::kernels::cuda;

namespace {

struct Case {
  const char* name;
  int64_t experts, tokens, top_k, n, k;
};

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "cuda_gemm_bench: %s\n", what.c_str());
  std::exit(1);
}

void ok(const std::string& e) {
  if (!e.empty()) die(e);
}

cu::DeviceBuffer alloc(std::size_t bytes) {
  std::string e;
  cu::DeviceBuffer b = cu::DeviceBuffer::allocate(bytes, &e);
  if (!b.data()) die(e);
  return b;
}

// Random bf16 values in [-1, 1) written on the host and copied (never zeros: they run faster).
void fill_random(cu::DeviceBuffer& b, std::size_t elems, uint32_t seed, bool fp8) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(0, 0xFFFF);
  std::vector<uint16_t> h(fp8 ? (elems + 1) / 2 : elems);
  for (auto& v : h) {
    // bf16 in [-1, 1): sign, exponent 0x70..0x7E, random mantissa; fp8: two random codes.
    v = fp8 ? static_cast<uint16_t>(d(rng) & 0x7777)
            : static_cast<uint16_t>((d(rng) & 0x807F) | ((0x70 + d(rng) % 15) << 7));
  }
  cu::copy(b.data(), h.data(), h.size() * 2, nullptr);
}

// Median milliseconds of `reps` timed runs of fn after `warm` untimed ones.
double time_ms(const std::function<void()>& fn, int reps, int warm = 3) {
  for (int i = 0; i < warm; ++i) fn();
  ok(cu::synchronize(nullptr, "warm-up"));
  std::vector<float> t;
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a, nullptr);
    fn();
    cudaEventRecord(b, nullptr);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  ok(cu::check("timed runs"));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 20;
  bool quick = false, fp8_dense_only = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--reps") && i + 1 < argc)
      reps = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--quick"))
      quick = true;
    else if (!std::strcmp(argv[i], "--fp8-dense-only"))
      fp8_dense_only = true;
    else
      die(std::string("unknown argument ") + argv[i] +
          " (use --reps N, --quick, --fp8-dense-only)");
  }
  if (cu::device_count() == 0) die("no CUDA device");
  ok(cu::set_device(0));
  const std::string device = cu::device_description(0);

  // OLMoE-shaped expert projections (hidden 2048, expert width 1024, 64 experts, top 8): the
  // fused gate/up projection (n = 2048, k = 2048) and the down projection (n = 2048, k = 1024),
  // from decode-sized to prefill-sized batches.
  std::vector<Case> cases = {
      {"gate_up_T16384", 64, 16384, 8, 2048, 2048}, {"gate_up_T4096", 64, 4096, 8, 2048, 2048},
      {"down_T4096", 64, 4096, 8, 2048, 1024},      {"gate_up_T1024", 64, 1024, 8, 2048, 2048},
      {"gate_up_T128", 64, 128, 8, 2048, 2048},     {"gate_up_T16", 64, 16, 8, 2048, 2048},
  };
  if (quick) cases.resize(2);
  if (fp8_dense_only) cases.clear();

  cu::DeviceBuffer peak_a = alloc(8192ull * 8192 * 2), peak_b = alloc(8192ull * 8192 * 2);
  cu::DeviceBuffer peak_c = alloc(8192ull * 8192 * 4);
  fill_random(peak_a, 8192ull * 8192, 1, false);
  fill_random(peak_b, 8192ull * 8192, 2, false);
  std::string err;
  auto blas = cu::Blas::create(nullptr, &err);
  if (!blas) die(err);
  const double peak_ms = time_ms(
      [&] {
        ok(blas->gemm(peak_a.as<uint16_t>(), peak_b.as<uint16_t>(), peak_c.as<float>(), 8192, 8192,
                      8192));
      },
      reps);
  const double peak = 2.0 * 8192 * 8192 * 8192 / (peak_ms * 1e-3) / 1e12;
  std::printf(
      "{\"bench\":\"cuda_gemm\",\"case\":\"dense_8192\",\"device\":\"%s\",\"ms\":%.4f,"
      "\"tflops\":%.1f}\n",
      device.c_str(), peak_ms, peak);

  for (const Case& c : cases) {
    const int64_t rows_total = c.tokens * c.top_k;
    // Rows per expert: a seeded skew (some experts hot, a few idle), summing to rows_total.
    std::mt19937 rng(7);
    std::gamma_distribution<double> g(2.0, 1.0);
    std::vector<double> share(static_cast<std::size_t>(c.experts));
    double sum = 0;
    for (double& s : share) sum += (s = g(rng));
    std::vector<int64_t> rows(share.size()), offsets(share.size());
    int64_t assigned = 0;
    for (std::size_t e = 0; e < share.size(); ++e) {
      rows[e] = static_cast<int64_t>(share[e] / sum * static_cast<double>(rows_total));
      assigned += rows[e];
    }
    rows[0] += rows_total - assigned;
    for (std::size_t e = 0, off = 0; e < rows.size(); off += static_cast<std::size_t>(rows[e]), ++e)
      offsets[e] = static_cast<int64_t>(off);

    cu::DeviceBuffer x = alloc(static_cast<std::size_t>(rows_total * c.k * 2));
    cu::DeviceBuffer y = alloc(static_cast<std::size_t>(rows_total * c.n * 4));
    cu::DeviceBuffer w = alloc(static_cast<std::size_t>(c.experts * c.n * c.k * 2));
    cu::DeviceBuffer w8 = alloc(static_cast<std::size_t>(c.experts * c.n * c.k));
    const int64_t scales_per = ((c.n + 127) / 128) * ((c.k + 127) / 128);
    cu::DeviceBuffer s8 = alloc(static_cast<std::size_t>(c.experts * scales_per * 4));
    fill_random(x, static_cast<std::size_t>(rows_total * c.k), 3, false);
    fill_random(w, static_cast<std::size_t>(c.experts * c.n * c.k), 4, false);
    fill_random(w8, static_cast<std::size_t>(c.experts * c.n * c.k), 5, true);
    {
      std::vector<float> sc(static_cast<std::size_t>(c.experts * scales_per), 0.01f);
      cu::copy(s8.data(), sc.data(), sc.size() * 4, nullptr);
    }
    std::vector<cu::GroupWeight> wb, wf;
    for (int64_t e = 0; e < c.experts; ++e) {
      wb.push_back({w.as<char>() + e * c.n * c.k * 2, nullptr});
      wf.push_back({w8.as<char>() + e * c.n * c.k, s8.as<float>() + e * scales_per});
    }
    const double flops = 2.0 * static_cast<double>(rows_total) * static_cast<double>(c.n * c.k);
    const double dense_ms = time_ms(
        [&] {
          ok(blas->gemm(x.as<uint16_t>(), w.as<uint16_t>(), y.as<float>(), rows_total, c.n, c.k));
        },
        reps);
    const double dense = flops / (dense_ms * 1e-3) / 1e12;
    auto report = [&](const char* method, double ms) {
      const double tf = flops / (ms * 1e-3) / 1e12;
      // Bytes that must move at least: every expert's weights once, x in, y out.
      const double bytes =
          static_cast<double>(c.experts * c.n * c.k) * (std::strcmp(method, "fp8") ? 2.0 : 1.0) +
          static_cast<double>(rows_total) * static_cast<double>(c.k * 2 + c.n * 4);
      std::printf(
          "{\"bench\":\"cuda_gemm\",\"case\":\"%s\",\"method\":\"%s\",\"experts\":%lld,"
          "\"rows\":%lld,\"n\":%lld,\"k\":%lld,\"ms\":%.4f,\"tflops\":%.1f,"
          "\"dense_tflops\":%.1f,\"ratio_to_dense\":%.3f,\"gbps\":%.0f}\n",
          c.name, method, static_cast<long long>(c.experts), static_cast<long long>(rows_total),
          static_cast<long long>(c.n), static_cast<long long>(c.k), ms, tf, dense, tf / dense,
          bytes / (ms * 1e-3) / 1e9);
      std::fflush(stdout);
    };
    for (cu::GroupedMethod m :
         {cu::GroupedMethod::Loop, cu::GroupedMethod::Streams, cu::GroupedMethod::Batched,
          cu::GroupedMethod::Wmma, cu::GroupedMethod::Auto}) {
      auto gg = cu::GroupedGemm::create(nullptr, m, &err);
      if (!gg) die(err);
      // A method the library or this GPU refuses is reported, and the others still run.
      const std::string e =
          gg->run_bf16(x.as<uint16_t>(), wb, rows, offsets, c.n, c.k, y.as<float>());
      if (!e.empty() || !cu::synchronize(nullptr, "probe").empty()) {
        std::printf(
            "{\"bench\":\"cuda_gemm\",\"case\":\"%s\",\"method\":\"%s\","
            "\"error\":\"%s\"}\n",
            c.name, cu::grouped_method_name(m), e.c_str());
        continue;
      }
      report(cu::grouped_method_name(m),
             time_ms(
                 [&] {
                   ok(gg->run_bf16(x.as<uint16_t>(), wb, rows, offsets, c.n, c.k, y.as<float>()));
                 },
                 reps));
    }
    // FP8: what run_fp8 picks ("fp8"), then each kernel forced (the GEMV, 8 rows a pass; the
    // WMMA tiles).
    auto gg = cu::GroupedGemm::create(nullptr, cu::GroupedMethod::Auto, &err);
    if (!gg) die(err);
    for (const auto& [method, gemv_rows] :
         {std::pair<const char*, int64_t>{"fp8", cu::kFp8GroupedGemvRows},
          {"fp8_gemv", int64_t{1} << 40},
          {"fp8_wmma", 0}}) {
      gg->set_fp8_gemv_rows(gemv_rows);
      if (const std::string e =
              gg->run_fp8(x.as<uint16_t>(), wf, rows, offsets, c.n, c.k, y.as<float>());
          !e.empty()) {
        std::printf(
            "{\"bench\":\"cuda_gemm\",\"case\":\"%s\",\"method\":\"%s\","
            "\"error\":\"%s\"}\n",
            c.name, method, e.c_str());
        continue;
      }
      report(method,
             time_ms(
                 [&] {
                   ok(gg->run_fp8(x.as<uint16_t>(), wf, rows, offsets, c.n, c.k, y.as<float>()));
                 },
                 reps));
    }
  }

  // Dense layers with FP8 weights (DeepSeek-V3's attention projections) against the same layer in
  // bf16 through cuBLAS: each way the GPU forward pass can multiply by FP8 codes (fp8_gemv for a
  // few rows, the FP8 tile kernel, a bf16 copy of the weights and cuBLAS), at decode and prefill
  // sizes. What the GPU forward pass picks for m rows: gemv up to kFp8GemvMaxRows, the copy
  // beyond (the tiles are measured to see whether they should take a range of m).
  struct Dense {
    const char* name;
    int64_t n, k;
  };
  std::vector<Dense> dense = {
      {"q_a", 1536, 7168}, {"q_b", 24576, 1536}, {"kv_a", 576, 7168}, {"o", 7168, 16384}};
  std::vector<int64_t> ms = {1, 2, 4, 8, 16, 32, 128, 512};
  if (quick) dense.resize(1), ms = {1, 128};
  auto gg = cu::GroupedGemm::create(nullptr, cu::GroupedMethod::Loop, &err);
  if (!gg) die(err);
  gg->set_fp8_gemv_rows(0);  // "fp8_tiles": the tile kernel at every m
  for (const Dense& d : dense) {
    const int64_t blocks = ((d.n + 127) / 128) * ((d.k + 127) / 128);
    cu::DeviceBuffer w16 = alloc(d.n * d.k * 2), w8 = alloc(d.n * d.k), sc = alloc(blocks * 4);
    cu::DeviceBuffer copy16 = alloc(d.n * d.k * 2);
    fill_random(w16, d.n * d.k, 11, false);
    fill_random(w8, d.n * d.k, 12, true);
    std::vector<float> ones(static_cast<std::size_t>(blocks), 0.01f);
    cu::copy(sc.data(), ones.data(), ones.size() * 4, nullptr);
    const int64_t max_m = *std::max_element(ms.begin(), ms.end());
    cu::DeviceBuffer x = alloc(max_m * d.k * 2), y = alloc(max_m * d.n * 4);
    fill_random(x, max_m * d.k, 13, false);
    for (int64_t m : ms) {
      auto line = [&](const char* method, double t) {
        std::printf(
            "{\"bench\":\"fp8_dense\",\"case\":\"%s\",\"n\":%lld,\"k\":%lld,\"m\":%lld,"
            "\"method\":\"%s\",\"ms\":%.4f,\"weight_gbps\":%.0f}\n",
            d.name, static_cast<long long>(d.n), static_cast<long long>(d.k),
            static_cast<long long>(m), method, t,
            static_cast<double>(d.n * d.k) * (std::strcmp(method, "bf16_cublas") ? 1.0 : 2.0) /
                (t * 1e-3) / 1e9);
      };
      const auto* xb = x.as<uint16_t>();
      line("bf16_cublas",
           time_ms([&] { ok(blas->gemm(xb, w16.as<uint16_t>(), y.as<float>(), m, d.n, d.k)); },
                   reps));
      // Beyond kFp8GemvMaxRows rows, one product per 8 rows (each reads the codes again).
      if (m <= 4 * cu::kFp8GemvMaxRows)
        line("fp8_gemv", time_ms(
                             [&] {
                               for (int64_t r = 0; r < m; r += cu::kFp8GemvMaxRows)
                                 ok(cu::fp8_gemv(xb + r * d.k, w8.as<uint8_t>(), sc.as<float>(),
                                                 std::min(cu::kFp8GemvMaxRows, m - r), d.n, d.k,
                                                 y.as<float>() + r * d.n, nullptr));
                             },
                             reps));
      if (d.n % 64 == 0 && d.k % 32 == 0)
        line("fp8_tiles", time_ms(
                              [&] {
                                ok(gg->run_fp8(xb, {cu::GroupWeight{w8.data(), sc.as<float>()}},
                                               {m}, {0}, d.n, d.k, y.as<float>()));
                              },
                              reps));
      line("fp8_copy_cublas",
           time_ms(
               [&] {
                 cu::fp8_dequantize_bf16(w8.as<uint8_t>(), sc.as<float>(), d.n, d.k,
                                         copy16.as<uint16_t>(), nullptr);
                 ok(blas->gemm(xb, copy16.as<uint16_t>(), y.as<float>(), m, d.n, d.k));
               },
               reps));
    }
  }
  return 0;
}
