// Weight quantization at load (ModelOptions::quantization, ExpertShardOptions::quantization): the
// int8 conversion itself, the logits of int8 models against the unquantized ones on the stored
// fixtures, int8 expert shards against the model's int8 local experts, and the refused values.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "core/detail/weights.h"
#include "core/expert_shard.h"
#include "core/model.h"
#include "tests/core/expert_shard_helpers.h"

namespace moemesh {
namespace {

using test::fixture;

// Bounds of the relative (norm) errors of int8 against the checkpoint's dtypes; see the tests.
constexpr double kInt8LogitBound = 0.06;
// One expert is three quantized matrices (gate and up in parallel, then down): ~0.6% * sqrt(2..3)
// per output; measured worst over all experts: mixtral-bf16 0.0226, qwen2moe-bf16 0.0133,
// olmoe-bf16-clip 0.0126.
constexpr double kInt8ExpertBound = 0.05;

// ||a - b|| / ||b||.
double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

TEST(Quantization, Int8PerRowScaleAndRounding) {
  // Row 0: max |v| = 2.54 -> scale 0.02; row 1 all zero -> scale 1; row 2 has ties at .5.
  const std::vector<float> w = {2.54f, -2.54f, 0.01f,  1.0f,  //
                                0.0f,  0.0f,   0.0f,   0.0f,  //
                                1.27f, 0.025f, 0.035f, -0.015f};
  const kernels::WeightView view{w.data(), kernels::DType::F32, 3, 4};
  detail::QuantizedStore store;
  const kernels::WeightView q = detail::quantize_int8(view, store, nullptr);
  ASSERT_EQ(q.dtype, kernels::DType::I8);
  ASSERT_EQ(q.rows, 3);
  ASSERT_EQ(q.cols, 4);
  ASSERT_EQ(store.matrices.size(), 1u);
  EXPECT_EQ(store.bytes(), 3 * 4 + 3 * 4);
  EXPECT_FLOAT_EQ(q.scale[0], 2.54f / 127.0f);
  EXPECT_EQ(q.scale[1], 1.0f);
  EXPECT_FLOAT_EQ(q.scale[2], 0.01f);
  const auto* v = static_cast<const int8_t*>(q.data);
  EXPECT_EQ(v[0], 127);
  EXPECT_EQ(v[1], -127);
  EXPECT_EQ(v[2], 0);   // 0.5: ties to even
  EXPECT_EQ(v[3], 50);  // 1 / 0.02
  for (int c = 0; c < 4; ++c) EXPECT_EQ(v[4 + c], 0);
  EXPECT_EQ(v[8], 127);
  // The values divide into float32 quotients near, not exactly at, the ties; each must round to
  // the nearest integer of the float32 quotient.
  for (int c = 1; c < 4; ++c)
    EXPECT_EQ(v[8 + c], static_cast<int8_t>(std::nearbyint(w[8 + c] / q.scale[2]))) << c;

  // Already int8: the view comes back as it is, nothing stored.
  EXPECT_EQ(detail::quantize_int8(q, store, nullptr).data, q.data);
  EXPECT_EQ(store.matrices.size(), 1u);
}

TEST(Quantization, BadValuesAreRefused) {
  Expected<std::unique_ptr<Model>> m =
      Model::load(fixture("mixtral-tiny"), {.threads = 1, .quantization = "int4"});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.error().message(), "quantization 'int4' is not one of none, int8");

  ModelOptions gpu;
  gpu.device = "cuda";
  gpu.quantization = "int8";
  m = Model::load(fixture("mixtral-tiny"), gpu);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.error().message().find("not supported on device 'cuda'"), std::string::npos)
      << m.error().message();

  Expected<std::unique_ptr<ExpertShard>> s =
      ExpertShard::load(fixture("mixtral-tiny"), {}, {.threads = 1, .quantization = "fp4"});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().message(), "quantization 'fp4' is not one of none, int8");
  s = ExpertShard::load(fixture("mixtral-tiny"), {},
                        {.threads = 1, .device = "cuda:0", .quantization = "int8"});
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message().find("not supported on device 'cuda:0'"), std::string::npos)
      << s.error().message();
}

// The logits of every prompt position of the fixture's reference prompt, int8 against the
// checkpoint's dtypes. Per-row int8 rounds each weight by at most scale / 2 with scale =
// max|row| / 127; the rounding error is about uniform, so its RMS is scale / sqrt(12), and for the
// Gaussian rows of these fixtures (max|row| ~ 2.5 sigma at 20..96 columns) that is ~0.6% of a
// row's RMS: ~0.6% relative error per projection. A token passes 7 quantized matrices per layer in
// series (q/k/v, o, then gate/up and down of the experts it is routed to), 2 or 3 layers, so the
// errors add to ~0.6% * sqrt(14..21) ~ 2.2..2.7% before the norms and the residual stream damp
// them. Measured (relative norm error of all logits, the same on every ISA): mixtral-tiny 0.0149,
// mixtral-bf16 0.0091, qwen2moe-tiny 0.0274, qwen2moe-bf16 0.0151, olmoe-bf16-clip 0.0153,
// olmoe-tiny 0.0273, qwen3moe-tiny 0.0156, deepseek-v3-tiny 0.0180, deepseek-v2-tiny 0.0151. The
// bound, 0.06, leaves about 2x headroom over the worst; a broken scale or rounding (a scale applied
// twice, a row off by one) gives errors of order 1.
TEST(Quantization, Int8LogitsCloseToUnquantized) {
  for (const char* name :
       {"mixtral-tiny", "mixtral-bf16", "qwen2moe-tiny", "qwen2moe-bf16", "olmoe-bf16-clip",
        "olmoe-tiny", "qwen3moe-tiny", "deepseek-v3-tiny", "deepseek-v2-tiny"}) {
    Expected<std::unique_ptr<Model>> plain = Model::load(fixture(name), {.threads = 2});
    Expected<std::unique_ptr<Model>> int8 =
        Model::load(fixture(name), {.threads = 2, .quantization = "int8"});
    ASSERT_TRUE(plain.ok()) << plain.error().message();
    ASSERT_TRUE(int8.ok()) << int8.error().message();
    const std::vector<int32_t> prompt = test::fixture_prompt(name);
    const auto n = static_cast<int64_t>(prompt.size());
    KVCache ca = (*plain)->new_cache(n), cb = (*int8)->new_cache(n);
    std::vector<float> la, lb;
    ASSERT_TRUE((*plain)->forward(ca, prompt, Logits::All, la).ok());
    ASSERT_TRUE((*int8)->forward(cb, prompt, Logits::All, lb).ok());
    ASSERT_EQ(la.size(), lb.size());
    EXPECT_NE(la, lb) << name << ": int8 weights should change the logits";
    const double err = relative_error(lb, la);
    std::printf("[ quantization ] %s int8 logits relative error %.5f\n", name, err);
    EXPECT_LT(err, kInt8LogitBound) << name;
  }
}

// Decoding token by token gives the int8 model's prefill logits too (the same kernels and sums on
// both paths, whatever the number of tokens).
TEST(Quantization, Int8DecodeMatchesPrefill) {
  Expected<std::unique_ptr<Model>> model =
      Model::load(fixture("qwen2moe-bf16"), {.threads = 2, .quantization = "int8"});
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
      ASSERT_EQ(step[v], prefill[t * vocab + v]) << "position " << t << " token " << v;
  }
}

// An int8 shard runs each expert as the int8 model's local experts do (the same quantized weights
// and kernel: equal bits), and close to the unquantized shard.
TEST(Quantization, Int8ExpertShard) {
  for (const char* name : {"mixtral-bf16", "qwen2moe-bf16", "olmoe-bf16-clip"}) {
    Expected<std::unique_ptr<Model>> model =
        Model::load(fixture(name), {.threads = 2, .quantization = "int8"});
    ASSERT_TRUE(model.ok()) << model.error().message();
    const ModelConfig& c = (*model)->config();
    std::vector<ExpertRef> all = test::experts_with_parity(c, 0);
    const std::vector<ExpertRef> odd = test::experts_with_parity(c, 1);
    all.insert(all.end(), odd.begin(), odd.end());
    Expected<std::unique_ptr<ExpertShard>> q =
        ExpertShard::load(fixture(name), all, {.threads = 2, .quantization = "int8"});
    Expected<std::unique_ptr<ExpertShard>> plain =
        ExpertShard::load(fixture(name), all, {.threads = 2});
    ASSERT_TRUE(q.ok()) << q.error().message();
    ASSERT_TRUE(plain.ok()) << plain.error().message();
    // int8 holds one byte per weight and a float32 scale per row; bf16 two bytes per weight.
    const int64_t per_expert = 3 * c.moe_intermediate_size * c.hidden_size;
    const int64_t scales = 2 * c.moe_intermediate_size + c.hidden_size;
    EXPECT_EQ((*q)->weight_bytes(), static_cast<int64_t>(all.size()) * (per_expert + 4 * scales));
    EXPECT_EQ((*plain)->weight_bytes(), static_cast<int64_t>(all.size()) * per_expert * 2);

    const int64_t H = c.hidden_size, m = 5;
    std::vector<float> x(static_cast<std::size_t>(m * H));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.013f * static_cast<float>(i % 89) - 0.5f;
    const std::vector<float> ones(m, 1.0f);
    double worst = 0;
    for (const ExpertRef& r : all) {
      std::vector<float> yq(x.size()), yp(x.size()), local(x.size(), 0.0f);
      ASSERT_TRUE((*q)->run(r.layer, r.expert, x.data(), m, yq.data()).ok());
      ASSERT_TRUE((*plain)->run(r.layer, r.expert, x.data(), m, yp.data()).ok());
      const std::vector<int32_t> ids(m, r.expert);
      ASSERT_TRUE((*model)
                      ->local_experts()
                      .compute(r.layer, x.data(), m, ids.data(), ones.data(), 1, local.data())
                      .ok());
      ASSERT_EQ(yq, local) << name << " layer " << r.layer << " expert " << r.expert;
      worst = std::max(worst, relative_error(yq, yp));
    }
    std::printf("[ quantization ] %s int8 expert worst relative error %.5f\n", name, worst);
    EXPECT_LT(worst, kInt8ExpertBound) << name;

    // Released and added again: quantized afresh, the same bits.
    std::vector<float> before(x.size()), after(x.size());
    ASSERT_TRUE((*q)->run(all[0].layer, all[0].expert, x.data(), m, before.data()).ok());
    const std::vector<ExpertRef> first = {all[0]};
    (*q)->release(first);
    EXPECT_FALSE((*q)->holds(all[0].layer, all[0].expert));
    ASSERT_TRUE((*q)->add(first).ok());
    ASSERT_TRUE((*q)->run(all[0].layer, all[0].expert, x.data(), m, after.data()).ok());
    EXPECT_EQ(before, after);
  }
}

}  // namespace
}  // namespace moemesh
