// The GPU forward pass (ModelOptions::device "cuda") against the CPU one on the stored fixtures:
// prefill logits, chunked prefill, batched decode, remote experts through an outside backend, a
// full KV pool, and tensor parallelism (ranks on one GPU, NCCL). Skips where no GPU is present,
// except the checks of refused devices and sizes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/detail/tensor_parallel.h"
#include "core/expert_shard.h"
#include "core/model.h"
#include "kernels/cuda/cuda_kernels.h"
#include "tests/core/expert_shard_helpers.h"
#include "tests/core/test_checkpoint_writer.h"

namespace moemesh {
namespace {

using test::fixture;
using test::fixture_prompt;

#define REQUIRE_GPU()                                                                       \
  do {                                                                                      \
    if (kernels::cuda::device_count() == 0)                                                 \
      GTEST_SKIP() << "no CUDA device on this machine: GPU tests run in scripts/gpu-check"; \
  } while (0)

double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

ModelOptions gpu_options() {
  ModelOptions o;
  o.device = "cuda:0";
  o.gpu_kv_cache_bytes = 64 << 20;
  return o;
}

TEST(CudaModelDevice, BadDeviceNamesAreRefused) {
  ModelOptions o;
  o.device = "gpu";
  auto m = Model::load(fixture("qwen3moe-tiny"), o);
  ASSERT_FALSE(m);
  EXPECT_NE(m.error().message().find("cpu, cuda, cuda:N"), std::string::npos)
      << m.error().message();
}

TEST(CudaModelDevice, CudaWithoutAGpuIsAClearError) {
  if (kernels::cuda::device_count() > 0) GTEST_SKIP() << "this machine has a GPU";
  ModelOptions o;
  o.device = "cuda";
  auto m = Model::load(fixture("qwen3moe-tiny"), o);
  ASSERT_FALSE(m);
  EXPECT_NE(m.error().message().find("no CUDA device"), std::string::npos) << m.error().message();
}

class CudaModel : public ::testing::TestWithParam<const char*> {};

// Prefill logits at every position, and a greedy continuation, close to the CPU's (bf16 weights
// and matrix operands on the GPU: logits within 3% of the CPU's, relative to their norm).
TEST_P(CudaModel, PrefillLogitsMatchTheCpu) {
  REQUIRE_GPU();
  auto cpu = Model::load(fixture(GetParam()));
  ASSERT_TRUE(cpu) << cpu.error().message();
  auto gpu = Model::load(fixture(GetParam()), gpu_options());
  ASSERT_TRUE(gpu) << gpu.error().message();
  const std::vector<int32_t> prompt = fixture_prompt(GetParam());
  KVCache cc = (*cpu)->new_cache(64), gc = (*gpu)->new_cache(64);
  std::vector<float> cl, gl;
  ASSERT_TRUE((*cpu)->forward(cc, prompt, Logits::All, cl));
  auto s = (*gpu)->forward(gc, prompt, Logits::All, gl);
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ(gc.length(), static_cast<int64_t>(prompt.size()));
  EXPECT_LT(rel_error(gl, cl), 3e-2) << (*gpu)->device_description();

  // Decode steps: the GPU's logits follow the CPU's (both fed the CPU's greedy tokens).
  const int64_t vocab = (*cpu)->config().vocab_size;
  std::vector<float> last_c(cl.end() - vocab, cl.end());
  for (int step = 0; step < 4; ++step) {
    const int32_t next = test::argmax(last_c.data(), vocab);
    ASSERT_TRUE((*cpu)->forward(cc, std::vector<int32_t>{next}, Logits::Last, last_c));
    ASSERT_TRUE((*gpu)->forward(gc, std::vector<int32_t>{next}, Logits::Last, gl));
    EXPECT_LT(rel_error(gl, last_c), 3e-2) << "step " << step;
  }
}

// Chunked prefill and a batched decode step give what one chunk and single sequences give.
TEST_P(CudaModel, ChunksAndBatchesAgreeOnTheGpu) {
  REQUIRE_GPU();
  auto gpu = Model::load(fixture(GetParam()), gpu_options());
  ASSERT_TRUE(gpu) << gpu.error().message();
  Model& m = **gpu;
  const int64_t vocab = m.config().vocab_size;
  const std::vector<int32_t> prompt = fixture_prompt(GetParam());
  const auto half = static_cast<std::ptrdiff_t>(prompt.size() / 2);
  KVCache whole = m.new_cache(64), chunked = m.new_cache(64);
  std::vector<float> a, b;
  ASSERT_TRUE(m.forward(whole, prompt, Logits::Last, a));
  ASSERT_TRUE(m.forward(chunked, std::vector<int32_t>(prompt.begin(), prompt.begin() + half),
                        Logits::None, b));
  ASSERT_TRUE(m.forward(chunked, std::vector<int32_t>(prompt.begin() + half, prompt.end()),
                        Logits::Last, b));
  EXPECT_LT(rel_error(b, a), 1e-2);

  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3}, {7}, {9, 8, 7, 6, 5}};
  std::vector<KVCache> batched, alone;
  std::vector<float> logits;
  for (const auto& p : prompts) {
    batched.push_back(m.new_cache(32));
    alone.push_back(m.new_cache(32));
    ASSERT_TRUE(m.forward(batched.back(), p, Logits::Last, logits));
    ASSERT_TRUE(m.forward(alone.back(), p, Logits::Last, logits));
  }
  const std::vector<int32_t> next = {11, 12, 13};
  std::vector<KVCache*> caches;
  for (KVCache& c : batched) caches.push_back(&c);
  std::vector<float> rows;
  auto s = m.forward_batch(caches, next, rows);
  ASSERT_TRUE(s) << s.error().message();
  ASSERT_EQ(rows.size(), static_cast<std::size_t>(3 * vocab));
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    std::vector<float> one;
    ASSERT_TRUE(m.forward(alone[i], std::span<const int32_t>(&next[i], 1), Logits::Last, one));
    const std::vector<float> row(rows.begin() + static_cast<int64_t>(i) * vocab,
                                 rows.begin() + static_cast<int64_t>(i + 1) * vocab);
    EXPECT_LT(rel_error(row, one), 1e-2) << "sequence " << i;
    EXPECT_EQ(batched[i].length(), alone[i].length());
  }
}

// An attention-only GPU model whose experts come from an outside backend (staged through pinned
// host memory) gives what the GPU model with its own experts gives.
TEST_P(CudaModel, OutsideExpertBackendThroughHostStaging) {
  REQUIRE_GPU();
  auto full = Model::load(fixture(GetParam()), gpu_options());
  ASSERT_TRUE(full) << full.error().message();
  ModelOptions ao = gpu_options();
  ao.routed_experts = false;
  auto attn = Model::load(fixture(GetParam()), ao);
  ASSERT_TRUE(attn) << attn.error().message();
  auto experts = Model::load(fixture(GetParam()));  // CPU experts stand in for remote ones
  ASSERT_TRUE(experts) << experts.error().message();
  (*attn)->set_expert_backend(&(*experts)->local_experts());
  const std::vector<int32_t> prompt = fixture_prompt(GetParam());
  KVCache fc = (*full)->new_cache(64), ac = (*attn)->new_cache(64);
  std::vector<float> fl, al;
  ASSERT_TRUE((*full)->forward(fc, prompt, Logits::All, fl));
  auto s = (*attn)->forward(ac, prompt, Logits::All, al);
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_LT(rel_error(al, fl), 3e-2);
}

// What the engine does with a GPU model: caches that grow block by block, forks for n > 1, and
// steps that mix a decode token with a prompt chunk (logits of rows that are not contiguous).
TEST_P(CudaModel, EngineStyleCachesAndStepsAgreeOnTheGpu) {
  REQUIRE_GPU();
  auto gpu = Model::load(fixture(GetParam()), gpu_options());
  ASSERT_TRUE(gpu) << gpu.error().message();
  Model& m = **gpu;
  const auto V = static_cast<std::size_t>(m.config().vocab_size);
  const std::vector<int32_t> prompt = fixture_prompt(GetParam());
  const auto n = static_cast<int64_t>(prompt.size());
  std::vector<float> grown, whole;
  KVCache a = m.new_cache(0), ref = m.new_cache(64);
  ASSERT_TRUE(m.reserve(a, n));
  ASSERT_TRUE(m.forward(a, prompt, Logits::Last, grown));
  ASSERT_TRUE(m.forward(ref, prompt, Logits::Last, whole));
  EXPECT_LT(rel_error(grown, whole), 1e-2);
  for (int32_t t : {5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21}) {
    ASSERT_TRUE(m.reserve(a, a.length() + 1));  // crosses block boundaries on the way
    ASSERT_TRUE(m.forward(a, std::vector<int32_t>{t}, Logits::Last, grown));
    ASSERT_TRUE(m.forward(ref, std::vector<int32_t>{t}, Logits::Last, whole));
    EXPECT_LT(rel_error(grown, whole), 1e-2) << "token " << t;
  }
  ASSERT_TRUE(m.reserve(a, a.length() + 2));
  Expected<KVCache> b = m.fork(a);
  ASSERT_TRUE(b) << b.error().message();
  std::vector<float> la, lb;
  ASSERT_TRUE(m.forward(a, std::vector<int32_t>{3}, Logits::Last, la));
  ASSERT_TRUE(m.forward(*b, std::vector<int32_t>{3}, Logits::Last, lb));
  EXPECT_LT(rel_error(lb, la), 1e-3);

  // One step: a decode token of `a`, a prompt chunk of `c` without logits, one of `d` with.
  KVCache c = m.new_cache(32), d = m.new_cache(32), d1 = m.new_cache(32);
  KVCache a1 = std::move(*b);
  const std::vector<int32_t> tok = {4}, p1 = {1, 2, 3}, p2 = {9, 8, 7, 6, 5};
  std::vector<Model::Chunk> chunks = {{&a, tok, true}, {&c, p1, false}, {&d, p2, true}};
  std::vector<float> step, one, two;
  ASSERT_TRUE(m.forward_step(chunks, step));
  ASSERT_EQ(step.size(), 2 * V);
  ASSERT_TRUE(m.forward(a1, tok, Logits::Last, one));
  ASSERT_TRUE(m.forward(d1, p2, Logits::Last, two));
  EXPECT_LT(rel_error(std::vector<float>(step.begin(), step.begin() + V), one), 1e-2);
  EXPECT_LT(rel_error(std::vector<float>(step.begin() + V, step.end()), two), 1e-2);
  EXPECT_EQ(c.length(), 3);
}

// The deepseek fixtures run multi-head latent attention (with and without q's low rank, with
// interleaved rotary features and without, attention biases) and the grouped router (softmax and
// sigmoid scoring, group max and top-2 sums, the correction bias); the glm4moe ones partial
// rotary embeddings with the sigmoid router; dbrx-bf16-clip LayerNorm, clip_qkv and p-norm
// routing (p = 2). (deepseek-v3-tiny is not compared with the CPU: at
// its third prompt token one router's second choice is a near-tie that bf16 operands flip, 6 vs
// 7 on the CPU and 4 here in layer 2, so that one position's logits differ by 24%; it runs under
// tensor parallelism.)
INSTANTIATE_TEST_SUITE_P(Fixtures, CudaModel,
                         ::testing::Values("mixtral-tiny", "olmoe-bf16-clip", "qwen2moe-bf16",
                                           "qwen3moe-tiny", "mixtral-odd-sharded",
                                           "deepseek-v3-bf16", "deepseek-v2-tiny",
                                           "deepseek-v2-bf16", "glm4moe-tiny", "glm4moe-bf16",
                                           "dbrx-bf16-clip"));

// YaRN rotary scaling of the deepseek families: scaled inverse frequencies, the attention factor
// that multiplies the rotated features (folded into the rotary rows of q and kv_a at upload) and
// the softmax scale's mscale^2. A copy of deepseek-v2-bf16 (low-rank q, interleaved rotary
// features) with rope_scaling added, whose attention factor is not 1.
TEST(CudaModelMla, YarnScalingMatchesTheCpu) {
  REQUIRE_GPU();
  test::ScopedTempDir dir;
  for (const auto& e : std::filesystem::directory_iterator(fixture("deepseek-v2-bf16")))
    std::filesystem::copy(e.path(), dir / e.path().filename().string());
  nlohmann::json config;
  {
    std::ifstream in(dir / "config.json");
    config = nlohmann::json::parse(in);
  }
  config["rope_scaling"] = {{"type", "yarn"},
                            {"factor", 4.0},
                            {"mscale", 1.0},
                            {"mscale_all_dim", 0.5},
                            {"beta_fast", 32},
                            {"beta_slow", 1},
                            {"original_max_position_embeddings", 8}};
  std::ofstream(dir / "config.json") << config.dump();

  auto cpu = Model::load(dir.path());
  ASSERT_TRUE(cpu) << cpu.error().message();
  ASSERT_TRUE((*cpu)->config().yarn.has_value());
  EXPECT_GT((*cpu)->config().yarn->attention_factor, 1.05);
  auto gpu = Model::load(dir.path(), gpu_options());
  ASSERT_TRUE(gpu) << gpu.error().message();
  const std::vector<int32_t> prompt = fixture_prompt("deepseek-v2-bf16");
  KVCache cc = (*cpu)->new_cache(64), gc = (*gpu)->new_cache(64);
  std::vector<float> cl, gl;
  ASSERT_TRUE((*cpu)->forward(cc, prompt, Logits::All, cl));
  auto s = (*gpu)->forward(gc, prompt, Logits::All, gl);
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_LT(rel_error(gl, cl), 3e-2);

  // Without the scaling the logits are further off: the test sees what YaRN changes.
  auto plain = Model::load(fixture("deepseek-v2-bf16"));
  ASSERT_TRUE(plain) << plain.error().message();
  KVCache pc = (*plain)->new_cache(64);
  std::vector<float> pl;
  ASSERT_TRUE((*plain)->forward(pc, prompt, Logits::All, pl));
  EXPECT_GT(rel_error(pl, cl), 3 * rel_error(gl, cl));
}

// The median over rows of [rows, width] logits of each row's relative error.
double median_row_error(const std::vector<float>& a, const std::vector<float>& b, int64_t width) {
  if (a.size() != b.size() || a.empty() || a.size() % static_cast<std::size_t>(width) != 0)
    return INFINITY;
  std::vector<double> errors;
  for (std::size_t at = 0; at < a.size(); at += static_cast<std::size_t>(width))
    errors.push_back(rel_error(std::vector<float>(a.begin() + at, a.begin() + at + width),
                               std::vector<float>(b.begin() + at, b.begin() + at + width)));
  std::sort(errors.begin(), errors.end());
  return errors[errors.size() / 2];
}

// The FP8 checkpoints among the fixtures (DeepSeek-V3's layout: F8_E4M3 weights with
// weight_scale_inv blocks) keep their attention projections in FP8 on the GPU, and the logits of
// a prompt follow the CPU's on the same codes.
TEST(CudaModelFp8, Fp8FixturesMatchTheCpu) {
  REQUIRE_GPU();
  for (const char* name : {"deepseek-v3-fp8", "mixtral-fp8"}) {
    auto cpu = Model::load(fixture(name));
    ASSERT_TRUE(cpu) << cpu.error().message();
    auto gpu = Model::load(fixture(name), gpu_options());
    ASSERT_TRUE(gpu) << gpu.error().message();
    const std::string d = (*gpu)->device_description();
    EXPECT_NE(d.find("fp8_dense="), std::string::npos) << d;
    EXPECT_EQ(d.find("fp8_dense=0 "), std::string::npos) << d;
    const std::vector<int32_t> prompt = {1, 5, 9, 13, 2, 7, 11, 3, 17, 4};
    KVCache cc = (*cpu)->new_cache(64), gc = (*gpu)->new_cache(64);
    std::vector<float> cl, gl;
    ASSERT_TRUE((*cpu)->forward(cc, prompt, Logits::All, cl));
    auto s = (*gpu)->forward(gc, prompt, Logits::All, gl);
    ASSERT_TRUE(s) << s.error().message();
    EXPECT_LT(median_row_error(gl, cl, (*gpu)->config().vocab_size), 2e-2) << name;
    // Decode steps (the few-row kernel). Not for mixtral-fp8: from its first step a router
    // near-tie sends the GPU's tokens to other experts than the CPU's, with bf16 weights as well
    // (steps 43% and 45% apart); deepseek-v3-fp8's steps stay within 1.5%.
    if (std::string(name) == "mixtral-fp8") continue;
    for (int32_t t : {6, 8, 10, 12}) {
      const std::vector<int32_t> one = {t};
      ASSERT_TRUE((*cpu)->forward(cc, one, Logits::Last, cl));
      s = (*gpu)->forward(gc, one, Logits::Last, gl);
      ASSERT_TRUE(s) << s.error().message();
      EXPECT_LT(rel_error(gl, cl), 3e-2) << name << " token " << t;
    }
  }
}

// Latent attention's projections in FP8 (--quantization fp8 on both devices): q_a and q_b, or
// q, kv_a and o stay FP8 on the GPU, their rotary rows reordered code by code (both fixtures
// interleave them), and the logits follow the CPU's on the same codes. (Reordering the codes'
// rows wrongly moves every position's logits by 20-60%.)
TEST(CudaModelMla, Fp8ProjectionsMatchTheCpu) {
  REQUIRE_GPU();
  for (const char* name : {"deepseek-v2-bf16", "deepseek-v2-tiny"}) {
    ModelOptions cpu_fp8;
    cpu_fp8.quantization = "fp8";
    ModelOptions gpu_fp8 = gpu_options();
    gpu_fp8.quantization = "fp8";
    auto cpu = Model::load(fixture(name), cpu_fp8);
    ASSERT_TRUE(cpu) << cpu.error().message();
    auto gpu = Model::load(fixture(name), gpu_fp8);
    ASSERT_TRUE(gpu) << gpu.error().message();
    const ModelConfig& c = (*gpu)->config();
    ASSERT_TRUE(c.mla && c.mla->rope_interleave) << name;
    const std::string d = (*gpu)->device_description();
    const auto at = d.find("fp8_dense=");
    ASSERT_NE(at, std::string::npos) << d;
    // q_a and q_b (or q), kv_a and o of every layer, at least.
    EXPECT_GE(std::stoll(d.substr(at + 10)), c.num_layers * (c.mla->q_lora_rank ? 4 : 3)) << d;
    const std::vector<int32_t> prompt = fixture_prompt(name);
    KVCache cc = (*cpu)->new_cache(64), gc = (*gpu)->new_cache(64);
    std::vector<float> cl, gl;
    ASSERT_TRUE((*cpu)->forward(cc, prompt, Logits::All, cl));
    auto s = (*gpu)->forward(gc, prompt, Logits::All, gl);
    ASSERT_TRUE(s) << s.error().message();
    // Per position, as for FP8 caches below: these tiny random models route some tokens on
    // near-ties that the GPU's bf16 activations flip (one position of eight then differs by
    // 5-20%); the others stay within about 1%.
    EXPECT_LT(median_row_error(gl, cl, c.vocab_size), 2e-2) << name;
  }
}

// An FP8 KV cache on the GPU (--kv-cache-dtype fp8: E4M3 values with a float32 scale per token
// and kv head, latent attention's rows one scale each) gives the CPU's FP8 logits: the prompt at
// every position, decode steps, and a fork, whose partly filled block is copied with its scales.
// It is not the bf16 pool's arithmetic (its logits differ from those), and its bytes per token
// count the scales.
//
// The bound is per position, as a median: the GPU's keys and values differ from the CPU's by
// bf16 rounding, and where one lies near the midpoint of two E4M3 codes the two caches store
// neighbouring codes, 6-12% apart. On these small fixtures that puts positions 0.3-7% apart (a
// router's near-tie that flips: 50%), medians 1-4.7%. Caches that read the keys' scales for the
// values, or every layer's scales from one plane, were 15-74% off (medians), and a fork without
// its scales gives non-finite logits.
class CudaModelFp8Kv : public ::testing::TestWithParam<const char*> {};

TEST_P(CudaModelFp8Kv, LogitsMatchTheCpusFp8Cache) {
  REQUIRE_GPU();
  constexpr double kMedian = 7.5e-2;
  ModelOptions cpu_o, gpu_o = gpu_options();
  cpu_o.kv_cache_dtype = gpu_o.kv_cache_dtype = "fp8";
  auto cpu = Model::load(fixture(GetParam()), cpu_o);
  ASSERT_TRUE(cpu) << cpu.error().message();
  auto gpu = Model::load(fixture(GetParam()), gpu_o);
  ASSERT_TRUE(gpu) << gpu.error().message();
  auto bf16 = Model::load(fixture(GetParam()), gpu_options());
  ASSERT_TRUE(bf16) << bf16.error().message();
  Model& m = **gpu;
  EXPECT_NE(m.device_description().find("kv_dtype=fp8"), std::string::npos)
      << m.device_description();
  const ModelConfig& c = m.config();
  const int64_t per_layer = c.mla ? c.mla->kv_lora_rank + c.mla->qk_rope_head_dim + 4
                                  : 2 * c.num_kv_heads * (c.head_dim + 4);
  EXPECT_EQ(m.kv_bytes_per_token(), c.num_layers * per_layer);

  const int64_t V = c.vocab_size;
  const std::vector<int32_t> prompt = fixture_prompt(GetParam());
  KVCache cc = (*cpu)->new_cache(64), gc = m.new_cache(64), bc = (*bf16)->new_cache(64);
  std::vector<float> cl, gl, bl;
  ASSERT_TRUE((*cpu)->forward(cc, prompt, Logits::All, cl));
  auto s = m.forward(gc, prompt, Logits::All, gl);
  ASSERT_TRUE(s) << s.error().message();
  ASSERT_TRUE((*bf16)->forward(bc, prompt, Logits::All, bl));
  EXPECT_LT(median_row_error(gl, cl, V), kMedian);
  EXPECT_GT(rel_error(gl, bl), 1e-3) << "the FP8 pool computes what the bf16 one does";

  // Decode steps (both fed the CPU's greedy tokens).
  std::vector<float> last_c(cl.end() - V, cl.end()), steps_c, steps_g;
  for (int step = 0; step < 6; ++step) {
    const int32_t next = test::argmax(last_c.data(), V);
    ASSERT_TRUE((*cpu)->forward(cc, std::vector<int32_t>{next}, Logits::Last, last_c));
    ASSERT_TRUE(m.forward(gc, std::vector<int32_t>{next}, Logits::Last, gl));
    steps_c.insert(steps_c.end(), last_c.begin(), last_c.end());
    steps_g.insert(steps_g.end(), gl.begin(), gl.end());
  }
  EXPECT_LT(median_row_error(steps_g, steps_c, V), kMedian) << "decode steps";
  ASSERT_TRUE(m.reserve(gc, gc.length() + 2));
  Expected<KVCache> fork = m.fork(gc);
  ASSERT_TRUE(fork) << fork.error().message();
  std::vector<float> la, lb;
  ASSERT_TRUE(m.forward(gc, std::vector<int32_t>{3}, Logits::Last, la));
  ASSERT_TRUE(m.forward(*fork, std::vector<int32_t>{3}, Logits::Last, lb));
  EXPECT_LT(rel_error(lb, la), 1e-3) << "a fork of the FP8 cache";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaModelFp8Kv,
                         ::testing::Values("qwen3moe-tiny", "olmoe-bf16-clip",
                                           "mixtral-odd-sharded", "glm4moe-bf16",
                                           "deepseek-v2-bf16", "deepseek-v3-bf16"));

// Latent attention's expanded form reads an FP8 cache's rows as bf16 (code * scale): a prompt in
// two chunks, the second over rows the first cached in FP8, gives what the absorbed form over the
// same cache gives, and the CPU's FP8 logits (per position, as above).
TEST(CudaModelFp8Kv, ExpandedPrefillOverAnFp8LatentCache) {
  REQUIRE_GPU();
  for (const char* name : {"deepseek-v2-bf16", "deepseek-v3-bf16"}) {
    SCOPED_TRACE(name);
    ModelOptions cpu_o, absorbed_o = gpu_options(), expanded_o = gpu_options();
    cpu_o.kv_cache_dtype = absorbed_o.kv_cache_dtype = expanded_o.kv_cache_dtype = "fp8";
    absorbed_o.mla_expanded_min_tokens = 0;
    expanded_o.mla_expanded_min_tokens = 1;
    auto cpu = Model::load(fixture(name), cpu_o);
    auto absorbed = Model::load(fixture(name), absorbed_o);
    auto expanded = Model::load(fixture(name), expanded_o);
    ASSERT_TRUE(cpu && absorbed && expanded);
    const int64_t V = (*cpu)->config().vocab_size;
    const std::vector<int32_t> prompt = fixture_prompt(name);
    const auto half = static_cast<std::ptrdiff_t>(prompt.size() / 2);
    KVCache cc = (*cpu)->new_cache(64), ac = (*absorbed)->new_cache(64),
            ec = (*expanded)->new_cache(64);
    std::vector<float> cl, al, el, tail;
    for (auto [model, cache, out] : {std::tuple{cpu->get(), &cc, &cl},
                                     {absorbed->get(), &ac, &al},
                                     {expanded->get(), &ec, &el}}) {
      ASSERT_TRUE(model->forward(
          *cache, std::vector<int32_t>(prompt.begin(), prompt.begin() + half), Logits::All, *out));
      auto st = model->forward(*cache, std::vector<int32_t>(prompt.begin() + half, prompt.end()),
                               Logits::All, tail);
      ASSERT_TRUE(st) << st.error().message();
      out->insert(out->end(), tail.begin(), tail.end());
    }
    EXPECT_LT(median_row_error(el, al, V), 7.5e-2);
    EXPECT_LT(median_row_error(el, cl, V), 7.5e-2);
    EXPECT_LT(median_row_error(al, cl, V), 7.5e-2);
  }
}

// Latent attention's expanded form (a chunk of many tokens: keys and values expanded from the
// cached latent rows) gives what the absorbed form gives, and the CPU: a whole prompt, a prompt in
// two chunks (the second over cached rows), decode steps, and a step that mixes an expanded chunk
// with absorbed ones of other sequences.
TEST(CudaModelMla, ExpandedPrefillEqualsTheAbsorbedForm) {
  REQUIRE_GPU();
  // Each form is within 1% of the CPU's logits here, rounding differently (the expanded keys and
  // values are rounded to bf16 too): they differ by up to about 1.5%.
  constexpr double kForms = 2.5e-2;
  for (const char* name : {"deepseek-v2-tiny", "deepseek-v2-bf16", "deepseek-v3-bf16"}) {
    SCOPED_TRACE(name);
    ModelOptions absorbed_o = gpu_options(), expanded_o = gpu_options(), mixed_o = gpu_options();
    absorbed_o.mla_expanded_min_tokens = 0;
    expanded_o.mla_expanded_min_tokens = 1;  // every chunk, decode tokens too
    mixed_o.mla_expanded_min_tokens = 4;
    auto absorbed = Model::load(fixture(name), absorbed_o);
    auto expanded = Model::load(fixture(name), expanded_o);
    auto mixed = Model::load(fixture(name), mixed_o);
    auto cpu = Model::load(fixture(name));
    ASSERT_TRUE(absorbed && expanded && mixed && cpu);
    const std::vector<int32_t> prompt = fixture_prompt(name);
    const auto half = static_cast<std::ptrdiff_t>(prompt.size() / 2);
    const int64_t V = (*cpu)->config().vocab_size;
    KVCache ac = (*absorbed)->new_cache(64), ec = (*expanded)->new_cache(64),
            cc = (*cpu)->new_cache(64), two = (*expanded)->new_cache(64);
    std::vector<float> al, el, cl, first, second;
    ASSERT_TRUE((*absorbed)->forward(ac, prompt, Logits::All, al));
    auto st = (*expanded)->forward(ec, prompt, Logits::All, el);
    ASSERT_TRUE(st) << st.error().message();
    ASSERT_TRUE((*cpu)->forward(cc, prompt, Logits::All, cl));
    EXPECT_LT(rel_error(el, al), kForms);
    EXPECT_LT(rel_error(el, cl), 3e-2);
    ASSERT_TRUE((*expanded)->forward(
        two, std::vector<int32_t>(prompt.begin(), prompt.begin() + half), Logits::All, first));
    ASSERT_TRUE((*expanded)->forward(two, std::vector<int32_t>(prompt.begin() + half, prompt.end()),
                                     Logits::All, second));
    first.insert(first.end(), second.begin(), second.end());
    EXPECT_LT(rel_error(first, al), kForms) << "two chunks";
    std::vector<float> a1, e1;
    for (int32_t t : {3, 9, 27}) {
      ASSERT_TRUE((*absorbed)->forward(ac, std::vector<int32_t>{t}, Logits::Last, a1));
      ASSERT_TRUE((*expanded)->forward(ec, std::vector<int32_t>{t}, Logits::Last, e1));
      EXPECT_LT(rel_error(e1, a1), kForms) << "decode " << t;
    }

    // One step: a decode token (absorbed), a 5-token prompt (expanded), a 2-token prompt
    // (absorbed), against each sequence alone in the absorbed model.
    KVCache d = (*mixed)->new_cache(64), p5 = (*mixed)->new_cache(64), p2 = (*mixed)->new_cache(64);
    KVCache rd = (*absorbed)->new_cache(64), r5 = (*absorbed)->new_cache(64),
            r2 = (*absorbed)->new_cache(64);
    std::vector<float> unused;
    ASSERT_TRUE((*mixed)->forward(d, prompt, Logits::Last, unused));
    ASSERT_TRUE((*absorbed)->forward(rd, prompt, Logits::Last, unused));
    const std::vector<int32_t> tok = {11}, five = {5, 6, 7, 8, 9}, pair = {4, 2};
    std::vector<Model::Chunk> chunks = {{&d, tok, true}, {&p5, five, true}, {&p2, pair, true}};
    std::vector<float> step, w1, w5, w2;
    st = (*mixed)->forward_step(chunks, step);
    ASSERT_TRUE(st) << st.error().message();
    ASSERT_EQ(step.size(), static_cast<std::size_t>(3 * V));
    ASSERT_TRUE((*absorbed)->forward(rd, tok, Logits::Last, w1));
    ASSERT_TRUE((*absorbed)->forward(r5, five, Logits::Last, w5));
    ASSERT_TRUE((*absorbed)->forward(r2, pair, Logits::Last, w2));
    EXPECT_LT(rel_error(std::vector<float>(step.begin(), step.begin() + V), w1), kForms);
    EXPECT_LT(rel_error(std::vector<float>(step.begin() + V, step.begin() + 2 * V), w5), kForms);
    EXPECT_LT(rel_error(std::vector<float>(step.begin() + 2 * V, step.end()), w2), kForms);
  }
}

// A latent cache's blocks hold one row per token and layer: the pool reports MLA's bytes per
// token (the latent and the rotary key, bf16), not keys and values per head.
TEST(CudaModelMla, KvBytesPerTokenAreTheLatentRows) {
  REQUIRE_GPU();
  auto gpu = Model::load(fixture("deepseek-v3-bf16"), gpu_options());
  ASSERT_TRUE(gpu) << gpu.error().message();
  const ModelConfig& c = (*gpu)->config();
  EXPECT_EQ((*gpu)->kv_bytes_per_token(),
            c.num_layers * (c.mla->kv_lora_rank + c.mla->qk_rope_head_dim) * 2);
}

// ---- Tensor parallelism ----------------------------------------------------------------------

ModelOptions tp_options(int size, const char* collective) {
  ModelOptions o = gpu_options();
  o.tensor_parallel_size = size;
  o.tensor_parallel_collective = collective;
  return o;
}

// Sizes that do not divide the model are refused before any GPU is touched.
TEST(CudaModelDevice, TensorParallelSizesThatDoNotDivideAreRefused) {
  auto m = Model::load(fixture("mixtral-odd-sharded"), tp_options(2, "auto"));
  ASSERT_FALSE(m);
  EXPECT_NE(m.error().message().find("5 attention heads"), std::string::npos)
      << m.error().message();
  auto c = Model::load(fixture("qwen3moe-tiny"), tp_options(2, "mpi"));
  ASSERT_FALSE(c);
  EXPECT_NE(c.error().message().find("auto, nccl, one-gpu"), std::string::npos)
      << c.error().message();
}

// What a sharded model computes, step by step, against the same model on one rank: a prompt's
// logits, decode steps on caches grown block by block, a fork, and a step that mixes a decode
// token with prompt chunks; with its own experts and with experts from an outside backend.
// The bound: shards sum their partial products in another order, which moves some bf16
// roundings of the activations by one unit; on the kernels of kernels/cuda (tests/cuda_sim)
// positions differ by 0.3-1.1% at four ranks. A wrong shard is off by tens of percent.
constexpr double kShardedBound = 2e-2;

void expect_same_as_one_rank(const char* name, Model& tp, Model& one) {
  const auto V = static_cast<std::size_t>(one.config().vocab_size);
  const std::vector<int32_t> prompt = fixture_prompt(name);
  const auto n = static_cast<int64_t>(prompt.size());
  KVCache a = tp.new_cache(0), ref = one.new_cache(0);
  ASSERT_TRUE(tp.reserve(a, n));
  ASSERT_TRUE(one.reserve(ref, n));
  std::vector<float> got, want;
  auto s = tp.forward(a, prompt, Logits::All, got);
  ASSERT_TRUE(s) << s.error().message();
  ASSERT_TRUE(one.forward(ref, prompt, Logits::All, want));
  EXPECT_LT(rel_error(got, want), kShardedBound) << name << " prompt";
  for (int32_t t : {5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21}) {
    ASSERT_TRUE(tp.reserve(a, a.length() + 1));
    ASSERT_TRUE(one.reserve(ref, ref.length() + 1));
    ASSERT_TRUE(tp.forward(a, std::vector<int32_t>{t}, Logits::Last, got));
    ASSERT_TRUE(one.forward(ref, std::vector<int32_t>{t}, Logits::Last, want));
    EXPECT_LT(rel_error(got, want), kShardedBound) << name << " token " << t;
  }
  Expected<KVCache> b = tp.fork(a);
  ASSERT_TRUE(b) << b.error().message();
  ASSERT_TRUE(tp.reserve(*b, b->length() + 1));
  ASSERT_TRUE(one.reserve(ref, ref.length() + 1));
  KVCache c = tp.new_cache(32), c1 = one.new_cache(32);
  const std::vector<int32_t> tok = {4}, p = {9, 8, 7, 6, 5};
  std::vector<Model::Chunk> chunks = {{&*b, tok, true}, {&c, p, true}};
  std::vector<float> step, one_tok, one_p;
  ASSERT_TRUE(tp.forward_step(chunks, step));
  ASSERT_EQ(step.size(), 2 * V);
  ASSERT_TRUE(one.forward(ref, tok, Logits::Last, one_tok));
  ASSERT_TRUE(one.forward(c1, p, Logits::Last, one_p));
  EXPECT_LT(rel_error(std::vector<float>(step.begin(), step.begin() + V), one_tok), kShardedBound)
      << name;
  EXPECT_LT(rel_error(std::vector<float>(step.begin() + V, step.end()), one_p), kShardedBound)
      << name;
}

// Ranks past the machine's last GPU are refused with the GPUs needed and the fix.
TEST(CudaModelDevice, MoreRanksThanGpusAreRefused) {
  REQUIRE_GPU();
  ModelOptions o = tp_options(2, "auto");
  o.device = "cuda:" + std::to_string(kernels::cuda::device_count() - 1);
  auto m = Model::load(fixture("qwen2moe-bf16"), o);
  ASSERT_FALSE(m);
  EXPECT_NE(m.error().message().find("lower the size or the first device"), std::string::npos)
      << m.error().message();
}

class CudaModelTensorParallel : public ::testing::TestWithParam<const char*> {};

// Two ranks on one GPU (the arithmetic of tensor parallelism where one GPU is at hand), and four
// where the model splits into four (replicating its KV heads where it has fewer).
TEST_P(CudaModelTensorParallel, RanksOnOneGpuComputeWhatOneRankComputes) {
  REQUIRE_GPU();
  auto one = Model::load(fixture(GetParam()), gpu_options());
  ASSERT_TRUE(one) << one.error().message();
  for (int size : {2, 4}) {
    const ModelConfig& c = (*one)->config();
    // The sizes the model splits into; 4 ranks replicate 2 KV heads.
    if (!detail::check_tensor_parallel(c, size)) continue;
    auto tp = Model::load(fixture(GetParam()), tp_options(size, "one-gpu"));
    ASSERT_TRUE(tp) << tp.error().message();
    EXPECT_NE((*tp)->device_description().find("tensor_parallel=" + std::to_string(size)),
              std::string::npos)
        << (*tp)->device_description();
    // The LM head is split by vocabulary rows where the ranks divide the vocabulary.
    const bool split = c.vocab_size % size == 0;
    EXPECT_NE((*tp)->device_description().find(split ? "lm_head=vocab-parallel" : "lm_head=rank0"),
              std::string::npos)
        << (*tp)->device_description();
    expect_same_as_one_rank(GetParam(), **tp, **one);
  }
}

// Remote experts with two ranks: rank 0 drives the backend, rank 1 adds its shared-expert part.
TEST_P(CudaModelTensorParallel, OutsideExpertBackendWithTwoRanks) {
  REQUIRE_GPU();
  auto one = Model::load(fixture(GetParam()), gpu_options());
  ASSERT_TRUE(one) << one.error().message();
  ModelOptions ao = tp_options(2, "one-gpu");
  ao.routed_experts = false;
  auto attn = Model::load(fixture(GetParam()), ao);
  ASSERT_TRUE(attn) << attn.error().message();
  auto experts = Model::load(fixture(GetParam()));  // CPU experts stand in for remote ones
  ASSERT_TRUE(experts) << experts.error().message();
  (*attn)->set_expert_backend(&(*experts)->local_experts());
  const std::vector<int32_t> prompt = fixture_prompt(GetParam());
  KVCache oc = (*one)->new_cache(64), ac = (*attn)->new_cache(64);
  std::vector<float> ol, al;
  ASSERT_TRUE((*one)->forward(oc, prompt, Logits::All, ol));
  auto s = (*attn)->forward(ac, prompt, Logits::All, al);
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_LT(rel_error(al, ol), 3e-2);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaModelTensorParallel,
                         ::testing::Values("mixtral-tiny", "olmoe-bf16-clip", "qwen2moe-bf16",
                                           "qwen3moe-tiny", "deepseek-v3-tiny", "deepseek-v2-bf16",
                                           "glm4moe-tiny"));

// An FP8 KV cache under tensor parallelism: each rank quantizes the rows of its own kv heads
// (replicated ones too; under latent attention every rank the same rows), so two and four ranks
// give one rank's FP8 logits, prompt and decode steps, up to the neighbouring-code noise of
// CudaModelFp8Kv (medians per position).
TEST(CudaModelFp8Kv, TensorParallelRanksKeepTheirKvHeadsInFp8) {
  REQUIRE_GPU();
  for (const char* name : {"qwen3moe-tiny", "olmoe-bf16-clip", "deepseek-v2-bf16"}) {
    SCOPED_TRACE(name);
    ModelOptions one_o = gpu_options();
    one_o.kv_cache_dtype = "fp8";
    auto one = Model::load(fixture(name), one_o);
    ASSERT_TRUE(one) << one.error().message();
    const int64_t V = (*one)->config().vocab_size;
    for (int size : {2, 4}) {
      if (!detail::check_tensor_parallel((*one)->config(), size)) continue;
      ModelOptions o = tp_options(size, "one-gpu");
      o.kv_cache_dtype = "fp8";
      auto tp = Model::load(fixture(name), o);
      ASSERT_TRUE(tp) << tp.error().message();
      const std::vector<int32_t> prompt = fixture_prompt(name);
      KVCache a = (*tp)->new_cache(64), ref = (*one)->new_cache(64);
      std::vector<float> got, want, steps_got, steps_want;
      ASSERT_TRUE((*tp)->forward(a, prompt, Logits::All, got));
      ASSERT_TRUE((*one)->forward(ref, prompt, Logits::All, want));
      EXPECT_LT(median_row_error(got, want, V), 7.5e-2) << size << " ranks, prompt";
      for (int32_t t : {5, 6, 7, 8, 9, 10}) {
        ASSERT_TRUE((*tp)->forward(a, std::vector<int32_t>{t}, Logits::Last, got));
        ASSERT_TRUE((*one)->forward(ref, std::vector<int32_t>{t}, Logits::Last, want));
        steps_got.insert(steps_got.end(), got.begin(), got.end());
        steps_want.insert(steps_want.end(), want.begin(), want.end());
      }
      EXPECT_LT(median_row_error(steps_got, steps_want, V), 7.5e-2) << size << " ranks, decode";
    }
  }
}

// NCCL with one rank (what --tensor-parallel-size 1 --device cuda runs through when NCCL is asked
// for) gives exactly what no collective gives.
TEST(CudaModelNccl, OneRankThroughNcclIsExact) {
  REQUIRE_GPU();
  auto plain = Model::load(fixture("qwen2moe-bf16"), gpu_options());
  ASSERT_TRUE(plain) << plain.error().message();
  auto nccl = Model::load(fixture("qwen2moe-bf16"), tp_options(1, "nccl"));
  ASSERT_TRUE(nccl) << nccl.error().message();
  EXPECT_NE((*nccl)->device_description().find("collective=nccl"), std::string::npos);
  const std::vector<int32_t> prompt = fixture_prompt("qwen2moe-bf16");
  KVCache a = (*plain)->new_cache(64), b = (*nccl)->new_cache(64);
  std::vector<float> la, lb;
  ASSERT_TRUE((*plain)->forward(a, prompt, Logits::All, la));
  auto s = (*nccl)->forward(b, prompt, Logits::All, lb);
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ(la, lb);
}

// Every GPU of the machine, one rank each, through NCCL.
TEST(CudaModelNccl, RanksOnTwoOrMoreGpus) {
  REQUIRE_GPU();
  if (kernels::cuda::device_count() < 2) GTEST_SKIP() << "this machine has one GPU";
  for (const char* name : {"qwen2moe-bf16", "olmoe-bf16-clip"}) {
    auto one = Model::load(fixture(name), gpu_options());
    ASSERT_TRUE(one) << one.error().message();
    auto tp = Model::load(fixture(name), tp_options(2, "auto"));
    ASSERT_TRUE(tp) << tp.error().message();
    expect_same_as_one_rank(name, **tp, **one);
  }
}

TEST(CudaModelPool, AFullPoolIsAnErrorNotACrash) {
  REQUIRE_GPU();
  ModelOptions o = gpu_options();
  o.gpu_kv_cache_bytes = 1;  // less than one block
  auto refused = Model::load(fixture("qwen3moe-tiny"), o);
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message().find("holds no block"), std::string::npos);

  auto probe = Model::load(fixture("qwen3moe-tiny"), gpu_options());
  ASSERT_TRUE(probe);
  const ModelConfig& c = (*probe)->config();
  o.gpu_kv_cache_bytes = c.num_layers * 2 * 16 * c.num_kv_heads * c.head_dim * 2 * 2;  // 2 blocks
  auto m = Model::load(fixture("qwen3moe-tiny"), o);
  ASSERT_TRUE(m) << m.error().message();
  KVCache a = (*m)->new_cache(32);  // both blocks
  KVCache b = (*m)->new_cache(16);  // none left
  EXPECT_EQ(a.capacity(), 32);
  EXPECT_EQ(b.capacity(), 0);
  std::vector<float> logits;
  auto s = (*m)->forward(b, std::vector<int32_t>{1}, Logits::Last, logits);
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("pool"), std::string::npos) << s.error().message();
  { KVCache gone = std::move(a); }  // blocks return to the pool
  KVCache c2 = (*m)->new_cache(16);
  EXPECT_EQ(c2.capacity(), 16);
  EXPECT_TRUE((*m)->forward(c2, std::vector<int32_t>{1, 2}, Logits::Last, logits));
}

// Prefix caching on the GPU pool: a second sequence with the same prompt starts from the first
// one's full blocks (shared, not copied) and computes only the rest, with the same logits; a fork
// shares full blocks and copies the partly filled one on the device.
TEST(CudaModelPool, PrefixCachingSharesBlocksOfTheGpuPool) {
  REQUIRE_GPU();
  ModelOptions o = gpu_options();
  o.prefix_caching = true;
  auto m = Model::load(fixture("qwen2moe-bf16"), o);
  ASSERT_TRUE(m) << m.error().message();
  Model& model = **m;
  const int64_t bs = model.kv_stats().block_size;
  std::vector<int32_t> prompt;
  for (int32_t i = 0; i < 3 * bs + 5; ++i) prompt.push_back(1 + (i * 37) % 200);
  const auto n = static_cast<int64_t>(prompt.size());
  KVCache first = model.new_cache(n + 4);
  std::vector<float> want, got;
  ASSERT_TRUE(model.forward(first, prompt, Logits::Last, want));
  const int64_t used = model.kv_stats().num_blocks - model.kv_stats().free_blocks;

  int64_t cached = 0;
  KVCache second = model.new_cache_from_prefix(prompt, &cached);
  EXPECT_EQ(cached, 3 * bs);
  EXPECT_EQ(second.length(), 3 * bs);
  EXPECT_EQ(model.kv_stats().num_blocks - model.kv_stats().free_blocks, used)
      << "the matched blocks are shared, not copied";
  EXPECT_GT(model.kv_stats().prefix_hits_tokens, 0u);
  ASSERT_TRUE(model.reserve(second, n + 4));
  auto s =
      model.forward(second, std::span<const int32_t>(prompt).subspan(3 * bs), Logits::Last, got);
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_LT(rel_error(got, want), 1e-2);

  // Both go on alike; a fork of the second (partly filled last block) too.
  Expected<KVCache> third = model.fork(second);
  ASSERT_TRUE(third) << third.error().message();
  std::vector<float> a, b, c;
  ASSERT_TRUE(model.forward(first, std::vector<int32_t>{7}, Logits::Last, a));
  ASSERT_TRUE(model.forward(second, std::vector<int32_t>{7}, Logits::Last, b));
  ASSERT_TRUE(model.forward(*third, std::vector<int32_t>{7}, Logits::Last, c));
  EXPECT_LT(rel_error(b, a), 1e-2);
  EXPECT_LT(rel_error(c, b), 1e-3);
}

// What the engine asks of a GPU model's KV cache when it starts: prefix caching is taken, the
// pool's bf16 dtype and block size stay (a warning says so), and nothing changes while a
// sequence holds blocks.
TEST(CudaModelPool, TheEngineTurnsOnPrefixCachingOfTheGpuPool) {
  REQUIRE_GPU();
  auto m = Model::load(fixture("qwen3moe-tiny"), gpu_options());
  ASSERT_TRUE(m) << m.error().message();
  Model& model = **m;
  const KvCacheStats before = model.kv_stats();
  ASSERT_TRUE(model.configure_kv_cache("fp8", 32, 0, 0, true));
  EXPECT_EQ(model.kv_stats().block_size, before.block_size);
  EXPECT_EQ(model.kv_stats().num_blocks, before.num_blocks);
  std::vector<int32_t> prompt;
  for (int32_t i = 0; i < 2 * before.block_size + 3; ++i) prompt.push_back(3 + i);
  KVCache a = model.new_cache(64);
  std::vector<float> logits;
  ASSERT_TRUE(model.forward(a, prompt, Logits::Last, logits));
  int64_t cached = 0;
  KVCache b = model.new_cache_from_prefix(prompt, &cached);
  EXPECT_EQ(cached, 2 * before.block_size);
  EXPECT_FALSE(model.configure_kv_cache("auto", 16, 0, 0, false));
}

// An expert shard on the GPU computes what the same shard computes on the CPU.
TEST(CudaExpertShard, RunMatchesTheCpuShard) {
  REQUIRE_GPU();
  for (const char* name : {"qwen2moe-bf16", "mixtral-tiny"}) {
    auto config = load_model_config(fixture(name));
    ASSERT_TRUE(config);
    const std::vector<ExpertRef> refs = test::experts_with_parity(*config, 1);
    auto cpu = ExpertShard::load(fixture(name), refs);
    ASSERT_TRUE(cpu) << cpu.error().message();
    ExpertShardOptions o;
    o.device = "cuda:0";
    auto gpu = ExpertShard::load(fixture(name), refs, o);
    ASSERT_TRUE(gpu) << gpu.error().message();
    EXPECT_NE((*gpu)->device_description(), "cpu");
    const int64_t H = config->hidden_size;
    for (int64_t m : {1, 5, 37}) {
      std::vector<float> x(static_cast<std::size_t>(m * H));
      for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
      std::vector<float> yc(x.size()), yg(x.size(), NAN);
      for (const ExpertRef& r : {refs.front(), refs.back()}) {
        ASSERT_TRUE((*cpu)->run(r.layer, r.expert, x.data(), m, yc.data()));
        auto s = (*gpu)->run(r.layer, r.expert, x.data(), m, yg.data());
        ASSERT_TRUE(s) << s.error().message();
        EXPECT_LT(rel_error(yg, yc), 2e-2) << name << " m=" << m;
      }
    }
    // Released experts leave the GPU too; running one is an error.
    const ExpertRef gone = refs.front();
    (*gpu)->release(std::span<const ExpertRef>(&gone, 1));
    std::vector<float> x(static_cast<std::size_t>(H), 0.5f), y(x.size());
    EXPECT_FALSE((*gpu)->run(gone.layer, gone.expert, x.data(), 1, y.data()));
  }
}

// A layer's experts at once (run_layer: one copy each way, grouped GEMMs; run_layer_bf16 for bf16
// rows) compute what each expert computes alone, on the GPU and on the CPU; a group of no rows and
// experts in any order are fine; an expert not held or rows outside the batch are errors.
TEST(CudaExpertShard, RunLayerMatchesRunPerExpert) {
  REQUIRE_GPU();
  for (const char* name : {"qwen2moe-bf16", "mixtral-tiny"}) {
    auto config = load_model_config(fixture(name));
    ASSERT_TRUE(config);
    const std::vector<ExpertRef> refs = test::experts_with_parity(*config, 1);
    auto cpu = ExpertShard::load(fixture(name), refs);
    ASSERT_TRUE(cpu) << cpu.error().message();
    ExpertShardOptions o;
    o.device = "cuda:0";
    auto gpu = ExpertShard::load(fixture(name), refs, o);
    ASSERT_TRUE(gpu) << gpu.error().message();
    const int32_t layer = refs.front().layer;
    std::vector<int32_t> held;
    for (const ExpertRef& r : refs)
      if (r.layer == layer) held.push_back(r.expert);
    ASSERT_GE(held.size(), 3u);
    const std::vector<ExpertRows> groups = {
        {held[2], 0, 3}, {held[0], 3, 0}, {held[1], 3, 5}, {held[0], 8, 1}};
    const int64_t total = 9, H = config->hidden_size;
    std::vector<float> x(static_cast<std::size_t>(total * H));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::cos(0.21f * static_cast<float>(i));
    std::vector<float> want(x.size()), yc(x.size(), NAN), yg(x.size(), NAN);
    for (const ExpertRows& g : groups)
      ASSERT_TRUE((*cpu)->run(layer, g.expert, x.data() + g.offset * H, g.rows,
                              want.data() + g.offset * H));
    ASSERT_TRUE((*cpu)->run_layer(layer, groups, x.data(), total, yc.data()));
    EXPECT_EQ(yc, want) << name;
    auto s = (*gpu)->run_layer(layer, groups, x.data(), total, yg.data());
    ASSERT_TRUE(s) << s.error().message();
    EXPECT_LT(rel_error(yg, want), 2e-2) << name;
    // Each group's rows on their own, too (not only the whole).
    for (const ExpertRows& g : groups) {
      if (g.rows == 0) continue;
      const auto at = static_cast<std::ptrdiff_t>(g.offset * H);
      const auto end = at + static_cast<std::ptrdiff_t>(g.rows * H);
      EXPECT_LT(rel_error(std::vector<float>(yg.begin() + at, yg.begin() + end),
                          std::vector<float>(want.begin() + at, want.begin() + end)),
                2e-2)
          << name << " expert " << g.expert;
    }
    // bf16 rows (a bf16 wire's, run_layer_bf16): the GPU copies them up as they are and computes
    // what it computes from the same values in float32 (its operands are bf16 either way); the
    // CPU widens them and computes what run_layer computes.
    std::vector<uint16_t> x16(x.size());
    std::vector<float> xr(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      x16[i] = kernels::f32_to_bf16(x[i]);
      xr[i] = kernels::bf16_to_f32(x16[i]);
    }
    std::vector<float> g32(x.size(), NAN), g16(x.size(), NAN), c32(x.size(), NAN),
        c16(x.size(), NAN);
    ASSERT_TRUE((*gpu)->run_layer(layer, groups, xr.data(), total, g32.data()));
    s = (*gpu)->run_layer_bf16(layer, groups, x16.data(), total, g16.data());
    ASSERT_TRUE(s) << s.error().message();
    EXPECT_EQ(g16, g32) << name;
    ASSERT_TRUE((*cpu)->run_layer(layer, groups, xr.data(), total, c32.data()));
    ASSERT_TRUE((*cpu)->run_layer_bf16(layer, groups, x16.data(), total, c16.data()));
    EXPECT_EQ(c16, c32) << name;

    // The tokens' weighted sums (run_layer_combined): on the GPU the bits of run_layer's rows
    // summed on the host, in order, float32 and rounded to bf16; on the CPU likewise. Token 2
    // has no row, token 0 three.
    const std::vector<int64_t> offsets = {0, 3, 4, 4, 6, 9};
    const std::vector<int32_t> rows = {0, 4, 8, 1, 2, 5, 3, 6, 7};
    const std::vector<float> weights = {0.5f, 0.25f, 1.5f, 1.0f, 0.75f, -0.5f, 2.0f, 0.125f, 1.0f};
    const RowCombine plan{offsets, rows, weights};
    const int64_t n_out = 5;
    for (auto* shard : {gpu->get(), cpu->get()}) {
      std::vector<float> y(x.size()), want_sums(static_cast<std::size_t>(n_out * H), 0.0f);
      ASSERT_TRUE(shard->run_layer(layer, groups, xr.data(), total, y.data()));
      for (int64_t r = 0; r < n_out; ++r)
        for (int64_t i = offsets[r]; i < offsets[r + 1]; ++i)
          for (int64_t k = 0; k < H; ++k)
            want_sums[static_cast<std::size_t>(r * H + k)] +=
                weights[static_cast<std::size_t>(i)] * y[static_cast<std::size_t>(rows[i] * H + k)];
      std::vector<uint16_t> want16(want_sums.size()), got16(want_sums.size(), 0xFFFF);
      for (std::size_t i = 0; i < want16.size(); ++i)
        want16[i] = kernels::f32_to_bf16(want_sums[i]);
      std::vector<float> got(want_sums.size(), NAN);
      s = shard->run_layer_combined(layer, groups, xr.data(), nullptr, total, plan, got.data(),
                                    nullptr);
      ASSERT_TRUE(s) << s.error().message();
      EXPECT_EQ(got, want_sums) << name << " " << shard->device_description();
      s = shard->run_layer_combined(layer, groups, nullptr, x16.data(), total, plan, nullptr,
                                    got16.data());
      ASSERT_TRUE(s) << s.error().message();
      EXPECT_EQ(got16, want16) << name << " " << shard->device_description();
      // Malformed combines are refused.
      const std::vector<int64_t> not_from_zero = {1, 3, 4, 4, 6, 9};
      const std::vector<int32_t> outside = {0, 4, 8, 1, 2, 5, 3, 6, 9};
      const std::vector<float> short_weights(8, 1.0f);
      for (const RowCombine& bad_plan :
           {RowCombine{not_from_zero, rows, weights}, RowCombine{offsets, outside, weights},
            RowCombine{offsets, rows, short_weights}})
        EXPECT_FALSE(shard->run_layer_combined(layer, groups, xr.data(), nullptr, total, bad_plan,
                                               got.data(), nullptr));
      EXPECT_FALSE(shard->run_layer_combined(layer, groups, xr.data(), x16.data(), total, plan,
                                             got.data(), nullptr));
    }

    int32_t missing = 0;
    while (std::find(held.begin(), held.end(), missing) != held.end()) ++missing;
    const std::vector<ExpertRows> bad = {{missing, 0, 1}};
    EXPECT_FALSE((*gpu)->run_layer(layer, bad, x.data(), total, yg.data()));
    EXPECT_FALSE((*gpu)->run_layer_bf16(layer, bad, x16.data(), total, g16.data()));
    EXPECT_FALSE((*cpu)->run_layer_bf16(layer, bad, x16.data(), total, c16.data()));
    const std::vector<ExpertRows> outside = {{held[0], 7, 3}};
    EXPECT_FALSE((*gpu)->run_layer(layer, outside, x.data(), total, yg.data()));
    EXPECT_FALSE((*cpu)->run_layer(layer, outside, x.data(), total, yc.data()));
  }
}

}  // namespace
}  // namespace moemesh
