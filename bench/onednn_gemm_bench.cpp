// Prefill GEMMs of an OLMoE-shaped model: moemesh's CPU linear() against oneDNN's matmul on the
// same shapes, the same machine and the same number of threads, in one run.
//
// Shapes (OLMoE-1B-7B: hidden 2048, expert width 1024, 16 heads of 128): M tokens (128 .. 2048)
// times a weight [N, K] (N outputs, K inputs):
//   expert gate / up  [1024, 2048]
//   expert down       [2048, 1024]
//   attention q/k/v/o [2048, 2048]
// Two precisions:
//   BF16: moemesh's BF16 weights with float32 activations (what the engine runs by default:
//         weights widened in registers, float32 FMA; with MOEMESH_ISA=amx or avx512bf16, the
//         activations rounded to bf16 inside the call, and AMX tiles or VDPBF16PS over the weights
//         packed beforehand, untimed, as the model loader packs them) against oneDNN's
//         bf16 x bf16 -> f32 matmul (both operands bf16, the fastest BF16 path oneDNN has on this
//         CPU: AMX or AVX-512 BF16 where present).
//   F32:  float32 weights and activations in both.
// oneDNN gets its weights in the layout it asks for (format_tag::any, reordered once, untimed, as
// an engine would at load); sources and destinations are plain row-major, and the bf16 copy of
// the activations is made outside the timing. Each figure is the best of --reps calls after one
// untimed call; GFLOP/s = 2 * M * N * K / seconds. moemesh runs on its ThreadPool, oneDNN on
// OpenMP with the same number of threads (the two never run at the same time).
//
//   build/bin/onednn_gemm_bench [--threads N] [--reps N] [--tokens 128,256,512,1024,2048]
//                               [--dtypes bf16,f32]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace {

using moemesh::kernels::DType;
using moemesh::kernels::ThreadPool;
using moemesh::kernels::WeightView;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(std::stoll(item));
  return out;
}

template <typename F>
double best_of(int reps, F&& call) {
  call();  // untimed: first touch, threads waking up, oneDNN's kernel generation
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t = Clock::now();
    call();
    best = std::min(best, seconds_since(t));
  }
  return best;
}

struct Shape {
  const char* name;
  int64_t n;  // output features (weight rows)
  int64_t k;  // input features (weight cols)
};

const char* cpu_isa_name(dnnl::cpu_isa isa) {
  switch (isa) {
    case dnnl::cpu_isa::avx512_core_amx:
      return "avx512_core_amx";
    case dnnl::cpu_isa::avx512_core_bf16:
      return "avx512_core_bf16";
    case dnnl::cpu_isa::avx512_core_vnni:
      return "avx512_core_vnni";
    case dnnl::cpu_isa::avx512_core:
      return "avx512_core";
    case dnnl::cpu_isa::avx2_vnni:
      return "avx2_vnni";
    case dnnl::cpu_isa::avx2:
      return "avx2";
    case dnnl::cpu_isa::all:
      return "all";
    default:
      return "other";
  }
}

// Seconds of the best oneDNN matmul: src [m, k] x weights [k, n] -> dst [m, n] f32. `w_nk` is the
// weight [n, k] row-major (moemesh's layout: oneDNN's [k, n] with format "ba"), of `dt`;
// `src` is [m, k] of `dt`.
double onednn_matmul(dnnl::engine& eng, dnnl::stream& strm, dnnl::memory::data_type dt,
                     const void* src, const void* w_nk, float* dst, int64_t m, int64_t n, int64_t k,
                     int reps) {
  using dnnl::memory;
  const memory::desc src_md({m, k}, dt, memory::format_tag::ab);
  const memory::desc w_user_md({k, n}, dt, memory::format_tag::ba);
  const memory::desc w_any_md({k, n}, dt, memory::format_tag::any);
  const memory::desc dst_md({m, n}, memory::data_type::f32, memory::format_tag::ab);
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, w_any_md, dst_md), eng);
  memory src_mem(src_md, eng, const_cast<void*>(src));
  memory w_user(w_user_md, eng, const_cast<void*>(w_nk));
  memory w_mem = w_user;
  if (pd.weights_desc() != w_user_md) {  // prepack once, as an engine would at load
    w_mem = memory(pd.weights_desc(), eng);
    dnnl::reorder(w_user, w_mem).execute(strm, w_user, w_mem);
    strm.wait();
  }
  memory dst_mem(dst_md, eng, dst);
  dnnl::matmul mm(pd);
  return best_of(reps, [&] {
    mm.execute(strm, {{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_WEIGHTS, w_mem}, {DNNL_ARG_DST, dst_mem}});
    strm.wait();
  });
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 0;
  int reps = 5;
  std::vector<int64_t> tokens = {128, 256, 512, 1024, 2048};
  std::string dtypes = "bf16,f32";
  for (int i = 1; i < argc; i += 2) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "%s needs a value\n", flag.c_str());
      return 2;
    }
    const std::string value = argv[i + 1];
    if (flag == "--threads")
      threads = std::stoi(value);
    else if (flag == "--reps")
      reps = std::stoi(value);
    else if (flag == "--tokens")
      tokens = parse_list(value);
    else if (flag == "--dtypes")
      dtypes = value;
    else {
      std::fprintf(stderr,
                   "unknown flag %s; flags: --threads N --reps N --tokens 128,256,... "
                   "--dtypes bf16,f32\n",
                   flag.c_str());
      return 2;
    }
  }
  const bool run_bf16 = dtypes.find("bf16") != std::string::npos;
  const bool run_f32 = dtypes.find("f32") != std::string::npos;
  if (tokens.empty() || (!run_bf16 && !run_f32) || reps < 1) {
    std::fprintf(stderr, "nothing to run: --tokens, --dtypes (bf16, f32) and --reps >= 1\n");
    return 2;
  }

  ThreadPool pool(threads);
  omp_set_num_threads(pool.size());
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream strm(eng);
  const dnnl_version_t* v = dnnl_version();
  std::printf("threads %d; moemesh ISA %s; oneDNN %d.%d.%d, ISA %s\n", pool.size(),
              moemesh::kernels::isa_name(moemesh::kernels::active_isa()), v->major, v->minor,
              v->patch, cpu_isa_name(dnnl::get_effective_cpu_isa()));

  const Shape shapes[] = {
      {"expert gate/up", 1024, 2048}, {"expert down", 2048, 1024}, {"attention", 2048, 2048}};
  const int64_t max_m = *std::max_element(tokens.begin(), tokens.end());
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  std::vector<float> x(static_cast<std::size_t>(max_m * 2048));
  for (float& e : x) e = dist(rng);
  std::vector<uint16_t> x_bf16(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x_bf16[i] = moemesh::kernels::f32_to_bf16(x[i]);
  std::vector<float> y(static_cast<std::size_t>(max_m * 2048));

  std::printf("%-6s %-15s %12s %6s %14s %14s %16s\n", "dtype", "matrix", "[N, K]", "M",
              "moemesh GF/s", "oneDNN GF/s", "moemesh/oneDNN");
  for (const bool bf16 : {true, false}) {
    if ((bf16 && !run_bf16) || (!bf16 && !run_f32)) continue;
    for (const Shape& s : shapes) {
      std::vector<float> w(static_cast<std::size_t>(s.n * s.k));
      for (float& e : w) e = dist(rng);
      std::vector<uint16_t> w_bf16(w.size());
      for (std::size_t i = 0; i < w.size(); ++i) w_bf16[i] = moemesh::kernels::f32_to_bf16(w[i]);
      WeightView view = bf16 ? WeightView{w_bf16.data(), DType::BF16, s.n, s.k}
                             : WeightView{w.data(), DType::F32, s.n, s.k};
      moemesh::kernels::PackedWeights packed;
      if (bf16 && moemesh::kernels::active_isa() >= moemesh::kernels::Isa::Avx512Bf16) {
        packed = moemesh::kernels::pack_amx(view, &pool);
        view.packed = packed.data();
      }
      for (const int64_t m : tokens) {
        const double flop = 2.0 * double(m) * double(s.n) * double(s.k);
        const double t_mm = best_of(
            reps, [&] { moemesh::kernels::linear(x.data(), m, view, nullptr, y.data(), &pool); });
        // Let the pool's threads go to sleep before OpenMP's start (and the other way round).
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        const double t_dnnl =
            bf16 ? onednn_matmul(eng, strm, dnnl::memory::data_type::bf16, x_bf16.data(),
                                 w_bf16.data(), y.data(), m, s.n, s.k, reps)
                 : onednn_matmul(eng, strm, dnnl::memory::data_type::f32, x.data(), w.data(),
                                 y.data(), m, s.n, s.k, reps);
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        char dims[48];
        std::snprintf(dims, sizeof dims, "[%lld, %lld]", static_cast<long long>(s.n),
                      static_cast<long long>(s.k));
        std::printf("%-6s %-15s %12s %6lld %14.1f %14.1f %15.2fx\n", bf16 ? "BF16" : "F32", s.name,
                    dims, static_cast<long long>(m), flop / t_mm / 1e9, flop / t_dnnl / 1e9,
                    t_dnnl / t_mm);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
