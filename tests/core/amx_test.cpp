// The kernels with bf16 / int8 activations (MOEMESH_ISA=avx512bf16 or amx): BF16 and FP8
// matrices run with activations rounded to bf16, int8 ones with int8 activations. Their logits stay
// within a stated bound of the default float32-activation path on the BF16 fixtures, and the path
// keeps the engine's invariants: decode gives the prefill's bits. Skipped on CPUs with neither.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <utility>
#include <vector>

#include "core/model.h"
#include "kernels/cpu/cpu_kernels.h"
#include "tests/core/expert_shard_helpers.h"
#include "tests/kernels/isa_guard.h"

namespace moemesh {
namespace {

using test::fixture;
using test::reduced_precision_isas;
using test::relative_error;

// Relative norm error of all logits of the reference prompt, Amx against Avx512. Rounding an
// activation to bf16 moves it by at most 2^-9 relative (RMS ~2^-9 / sqrt(3) ~ 0.11%), once per
// projection input; a token passes ~7 projections per layer in series, so ~0.3% before the norms
// and the residual stream damp it. Measured: mixtral-bf16 0.0028, qwen2moe-bf16 0.0047,
// olmoe-bf16-clip 0.0048, glm4moe-bf16 0.0054, deepseek-v3-bf16 0.0070, dbrx-bf16-clip 0.0069
// (docs/correctness.md). The bound is 4x the worst; a wrong packing or a missed column gives
// errors of order 1.
constexpr double kAmxLogitBound = 0.03;
// int8 weights and activations on Amx against the float32 path; measured: mixtral-tiny 0.0202,
// mixtral-bf16 0.0111, qwen2moe-tiny 0.0554, qwen2moe-bf16 0.0223, olmoe-bf16-clip 0.0210,
// olmoe-tiny 0.0301, qwen3moe-tiny 0.0244, deepseek-v3-tiny 0.0328, deepseek-v2-tiny 0.0283,
// glm4moe-bf16 0.0293, dbrx-tiny 0.0189 (weight-only int8 on the other paths: up to 0.0274). The
// bound is 2x the worst.
constexpr double kAmxInt8LogitBound = 0.12;
// FP8 on Amx against FP8 on the float32 path; measured: mixtral-fp8 0.0044, deepseek-v3-fp8
// 0.0074, qwen2moe-bf16 quantized at load 0.0058 (the bf16 path's own move, with the dequantized
// weights' rounding to bf16 on top). The bound is 4x the worst.
constexpr double kAmxFp8LogitBound = 0.03;

// The logits of every position of the reference prompt of `prompt_of` (default: the fixture's own).
std::vector<float> prompt_logits(const char* name, kernels::Isa isa,
                                 const char* quantization = "none",
                                 const char* prompt_of = nullptr) {
  test::IsaGuard guard;
  EXPECT_TRUE(kernels::force_isa(isa));
  Expected<std::unique_ptr<Model>> model =
      Model::load(fixture(name), {.threads = 2, .quantization = quantization});
  EXPECT_TRUE(model.ok()) << model.error().message();
  if (!model.ok()) return {};
  const std::vector<int32_t> prompt = test::fixture_prompt(prompt_of ? prompt_of : name);
  KVCache cache = (*model)->new_cache(static_cast<int64_t>(prompt.size()));
  std::vector<float> logits;
  EXPECT_TRUE((*model)->forward(cache, prompt, Logits::All, logits).ok());
  return logits;
}

// The relative error of `isa`'s logits of fixture `name` against `float32`, the default path's
// (printed); with must_differ, the logits must not be the same.
double error_against(const std::vector<float>& float32, kernels::Isa isa, const char* name,
                     const char* quantization = "none", const char* prompt_of = nullptr,
                     bool must_differ = true) {
  const std::vector<float> reduced = prompt_logits(name, isa, quantization, prompt_of);
  EXPECT_EQ(float32.size(), reduced.size()) << name;
  if (float32.size() != reduced.size()) return HUGE_VAL;
  if (must_differ) {
    EXPECT_NE(float32, reduced) << name << ": the reduced path did not run";
  }
  const double err = relative_error(reduced, float32);
  std::printf("[ %s ] %s (quantization %s) logits relative error %.5f\n", kernels::isa_name(isa),
              name, quantization, err);
  return err;
}

TEST(ReducedPrecision, Bf16LogitsCloseToTheFloat32Path) {
  if (reduced_precision_isas().empty()) GTEST_SKIP() << "this CPU has neither AVX512-BF16 nor AMX";
  for (const char* name : {"mixtral-bf16", "qwen2moe-bf16", "olmoe-bf16-clip", "glm4moe-bf16",
                           "deepseek-v3-bf16", "dbrx-bf16-clip"}) {
    const std::vector<float> float32 = prompt_logits(name, kernels::Isa::Avx512);
    for (kernels::Isa isa : reduced_precision_isas())
      EXPECT_LT(error_against(float32, isa, name), kAmxLogitBound) << name;
  }
}

// --quantization int8 on Amx: int8 weights (per-row scales) times int8 activations (a scale per
// token), against the unquantized float32 path. Per-token activation scales add the rounding of
// each activation to 1/127 of its row's largest value to int8's weight rounding.
TEST(ReducedPrecision, Int8LogitsCloseToTheFloat32Path) {
  if (reduced_precision_isas().empty()) GTEST_SKIP() << "this CPU has neither AVX512-BF16 nor AMX";
  for (const char* name : {"mixtral-tiny", "mixtral-bf16", "qwen2moe-tiny", "qwen2moe-bf16",
                           "olmoe-bf16-clip", "olmoe-tiny", "qwen3moe-tiny", "deepseek-v3-tiny",
                           "deepseek-v2-tiny", "glm4moe-bf16", "dbrx-tiny"}) {
    const std::vector<float> float32 = prompt_logits(name, kernels::Isa::Avx512);
    for (kernels::Isa isa : reduced_precision_isas())
      EXPECT_LT(error_against(float32, isa, name, "int8", nullptr, /*must_differ=*/false),
                kAmxInt8LogitBound)
          << name;
  }
}

// FP8 weights on Amx (rounded to bf16 at load, then as BF16) against the float32 path of the same
// checkpoint: FP8 checkpoints as they are, and BF16 ones quantized at load. Only the bf16
// roundings of the dequantized weights and of the activations separate them.
TEST(ReducedPrecision, Fp8LogitsCloseToTheFloat32Path) {
  if (reduced_precision_isas().empty()) GTEST_SKIP() << "this CPU has neither AVX512-BF16 nor AMX";
  struct Case {
    const char* name;
    const char* quantization;
    const char* prompt_of;  // FP8 checkpoints use the prompt of the fixture they were made from
  };
  const Case cases[] = {{"mixtral-fp8", "none", "mixtral-bf16"},
                        {"deepseek-v3-fp8", "none", "deepseek-v3-bf16"},
                        {"qwen2moe-bf16", "fp8", "qwen2moe-bf16"}};
  for (const auto& [name, quantization, prompt_of] : cases) {
    const std::vector<float> float32 =
        prompt_logits(name, kernels::Isa::Avx512, quantization, prompt_of);
    for (kernels::Isa isa : reduced_precision_isas())
      EXPECT_LT(error_against(float32, isa, name, quantization, prompt_of), kAmxFp8LogitBound)
          << name;
  }
}

// Token by token the Amx path gives the prefill's logits to the bit: its sums do not depend on
// the tokens that share a call.
TEST(ReducedPrecision, DecodeMatchesPrefill) {
  if (reduced_precision_isas().empty()) GTEST_SKIP() << "this CPU has neither AVX512-BF16 nor AMX";
  for (kernels::Isa isa : reduced_precision_isas()) {
    for (const char* quantization : {"none", "int8", "fp8"}) {
      test::IsaGuard guard;
      ASSERT_TRUE(kernels::force_isa(isa));
      Expected<std::unique_ptr<Model>> model =
          Model::load(fixture("qwen2moe-bf16"), {.threads = 2, .quantization = quantization});
      ASSERT_TRUE(model.ok()) << model.error().message();
      const std::vector<int32_t> prompt = test::fixture_prompt("qwen2moe-bf16");
      const auto n = static_cast<int64_t>(prompt.size());
      const int64_t vocab = (*model)->config().vocab_size;
      KVCache all = (*model)->new_cache(n), one = (*model)->new_cache(n);
      std::vector<float> prefill, step;
      ASSERT_TRUE((*model)->forward(all, prompt, Logits::All, prefill).ok());
      for (int64_t t = 0; t < n; ++t) {
        ASSERT_TRUE((*model)->forward(one, {prompt.data() + t, 1}, Logits::Last, step).ok());
        for (int64_t v = 0; v < vocab; ++v)
          ASSERT_EQ(step[v], prefill[t * vocab + v])
              << quantization << " position " << t << " token " << v;
      }
    }
  }
}

}  // namespace
}  // namespace moemesh
