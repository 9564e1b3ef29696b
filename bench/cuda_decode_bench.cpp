// Decode step latency of a checkpoint on a GPU (Model with device "cuda"), at several batch sizes.
//
// For each batch size B: B sequences with seeded random prompts of --prompt-len tokens are
// prefilled one by one, then --steps decode steps of all B run through Model::forward_batch (each
// step: the whole model on the GPU, the [B, vocab] logits copied back, greedy argmax on the host),
// after 3 untimed ones. Prints one JSON object per batch size: milliseconds per step (median and
// mean) and tokens/s. bench/hf_decode_bench.py measures Hugging Face transformers the same way on
// the same checkpoint, and scripts/gpu-check prints the ratio.
//
//   build/bin/cuda_decode_bench --model DIR [--batches 1,32,128] [--prompt-len 128] [--steps 32]
//       [--grouped-gemm auto] [--device cuda:0] [--tensor-parallel-size 1]
//       [--collective auto|nccl|one-gpu] [--quantization none|fp8] [--kv-cache-dtype bf16|fp8]
//
// --tensor-parallel-size N splits the model over N GPUs (ModelOptions::tensor_parallel_size);
// --collective one-gpu puts the N ranks on one GPU (checks the sharded pass on a real checkpoint;
// not a speed figure), --collective nccl also runs one rank through NCCL. --quantization fp8
// quantizes the routed experts at load; they stay FP8 on the GPU (the FP8 grouped GEMM).
// --kv-cache-dtype fp8 keeps the KV cache in FP8 (half the bytes attention reads per step: with
// long --prompt-len the difference shows).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "core/model.h"

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "cuda_decode_bench: %s\n", what.c_str());
  std::exit(1);
}

std::vector<int> parse_list(const std::string& s) {
  std::vector<int> out;
  std::size_t pos = 0;
  while (pos < s.size()) {
    const std::size_t comma = s.find(',', pos);
    out.push_back(std::stoi(s.substr(pos, comma - pos)));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir, batches = "1,32,128", method = "auto", device = "cuda:0";
  std::string collective = "auto";
  std::string quantization = "none", kv_dtype = "bf16";
  int prompt_len = 128, steps = 32, tp = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) die("missing value after " + a);
      return argv[++i];
    };
    if (a == "--model")
      model_dir = next();
    else if (a == "--batches")
      batches = next();
    else if (a == "--prompt-len")
      prompt_len = std::stoi(next());
    else if (a == "--steps")
      steps = std::stoi(next());
    else if (a == "--grouped-gemm")
      method = next();
    else if (a == "--device")
      device = next();
    else if (a == "--tensor-parallel-size")
      tp = std::stoi(next());
    else if (a == "--collective")
      collective = next();
    else if (a == "--quantization")
      quantization = next();
    else if (a == "--kv-cache-dtype")
      kv_dtype = next();
    else
      die("unknown argument " + a);
  }
  if (model_dir.empty()) die("--model DIR is required");
  // Progress (model loading) on stderr: stdout carries only the JSON results.
  spdlog::set_default_logger(spdlog::stderr_color_mt("moemesh"));
  const std::vector<int> sizes = parse_list(batches);
  const int max_batch = *std::max_element(sizes.begin(), sizes.end());

  moemesh::ModelOptions o;
  o.device = device;
  o.grouped_gemm = method;
  o.tensor_parallel_size = tp;
  o.tensor_parallel_collective = collective;
  o.quantization = quantization;
  o.kv_cache_dtype = kv_dtype;
  const auto t0 = std::chrono::steady_clock::now();
  auto loaded = moemesh::Model::load(model_dir, o);
  if (!loaded) die(loaded.error().message());
  moemesh::Model& m = **loaded;
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int64_t vocab = m.config().vocab_size;
  std::fprintf(stderr, "cuda_decode_bench: loaded %s in %.1f s on %s\n", model_dir.c_str(), load_s,
               m.device_description().c_str());

  std::mt19937 rng(1);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(vocab - 1));
  std::vector<float> logits;
  for (int b : sizes) {
    std::vector<moemesh::KVCache> caches;
    std::vector<int32_t> next(static_cast<std::size_t>(b));
    for (int s = 0; s < b; ++s) {
      caches.push_back(m.new_cache(prompt_len + steps + 8));
      std::vector<int32_t> prompt(static_cast<std::size_t>(prompt_len));
      for (int32_t& t : prompt) t = tok(rng);
      if (auto st = m.forward(caches.back(), prompt, moemesh::Logits::Last, logits); !st)
        die("prefill: " + st.error().message());
      next[s] =
          static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    }
    std::vector<moemesh::KVCache*> ptrs;
    for (auto& c : caches) ptrs.push_back(&c);
    std::vector<double> ms;
    for (int step = 0; step < steps + 3; ++step) {
      const auto a = std::chrono::steady_clock::now();
      if (auto st = m.forward_batch(ptrs, next, logits); !st)
        die("decode: " + st.error().message());
      for (int s = 0; s < b; ++s) {
        const float* row = logits.data() + static_cast<int64_t>(s) * vocab;
        next[s] = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
      }
      const double t =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count();
      if (step >= 3) ms.push_back(t);
    }
    std::vector<double> sorted = ms;
    std::sort(sorted.begin(), sorted.end());
    double mean = 0;
    for (double t : ms) mean += t / static_cast<double>(ms.size());
    const double median = sorted[sorted.size() / 2];
    std::printf(
        "{\"bench\":\"cuda_decode\",\"engine\":\"moemesh\",\"grouped_gemm\":\"%s\","
        "\"tensor_parallel\":%d,\"collective\":\"%s\",\"quantization\":\"%s\","
        "\"kv_cache_dtype\":\"%s\",\"batch\":%d,\"prompt_len\":%d,\"steps\":%d,"
        "\"step_ms_median\":%.3f,"
        "\"step_ms_mean\":%.3f,\"tokens_per_s\":%.1f,\"device\":\"%s\"}\n",
        method.c_str(), tp, collective.c_str(), quantization.c_str(), kv_dtype.c_str(), b,
        prompt_len, steps, median, mean, 1000.0 * b / median, m.device_description().c_str());
    std::fflush(stdout);
  }
  (void)max_batch;
  return 0;
}
