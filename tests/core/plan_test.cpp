// The planner of `moemesh plan`: parameter counts against published figures and against the
// tensors of the tiny checkpoints, KV bytes, GPU layouts, and clear errors.
#include "core/plan.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "core/checkpoint.h"

namespace moemesh::plan {
namespace {

const std::filesystem::path kConfigs =
    std::filesystem::path(MOEMESH_SOURCE_DIR) / "tests" / "fixtures" / "configs";
const std::filesystem::path kModels =
    std::filesystem::path(MOEMESH_SOURCE_DIR) / "tests" / "fixtures" / "models";

PlanModel load(const std::string& name) {
  Expected<PlanModel> m = load_plan_model(kConfigs / name / "config.json");
  EXPECT_TRUE(m.ok()) << (m.ok() ? "" : m.error().message());
  return m.ok() ? *m : PlanModel{};
}

PlanOptions options(std::string_view gpu, WeightDType dtype, int64_t context, int64_t batch) {
  PlanOptions o;
  Expected<GpuSpec> g = find_gpu(gpu);
  EXPECT_TRUE(g.ok());
  if (g.ok()) o.gpu = *g;
  o.dtype = dtype;
  o.context = context;
  o.batch = batch;
  return o;
}

int gpus_for(const PlanModel& m, const PlanOptions& o) {
  Expected<Plan> p = make_plan(m, o);
  EXPECT_TRUE(p.ok()) << (p.ok() ? "" : p.error().message());
  if (!p.ok()) return -1;
  EXPECT_TRUE(p->fits);
  return p->layout.gpus;
}

struct Published {
  const char* fixture;
  double total;                    // parameters as published by the model's authors
  double active;                   // per token
  bool active_without_embeddings;  // the publisher's active figure leaves out embedding and head
};

class PublishedFigures : public ::testing::TestWithParam<Published> {};

TEST_P(PublishedFigures, TotalAndActiveWithinFivePercent) {
  const Published& want = GetParam();
  const PlanModel m = load(want.fixture);
  const ParamCounts c = count_params(m);
  const double active =
      static_cast<double>(want.active_without_embeddings ? c.active_non_embedding : c.active);
  EXPECT_NEAR(static_cast<double>(c.total) / want.total, 1.0, 0.05)
      << want.fixture << ": total " << c.total;
  EXPECT_NEAR(active / want.active, 1.0, 0.05) << want.fixture << ": active " << active;
  EXPECT_LT(c.active, c.total);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, PublishedFigures,
                         ::testing::Values(Published{"mixtral-8x7b", 46.7e9, 12.9e9, false},
                                           Published{"mixtral-8x22b", 141e9, 39e9, false},
                                           Published{"deepseek-v3", 671e9, 37e9, false},
                                           Published{"deepseek-moe-16b", 16.4e9, 2.8e9, false},
                                           Published{"qwen2-57b-a14b", 57.4e9, 14e9, false},
                                           Published{"qwen1.5-moe-a2.7b", 14.3e9, 2.7e9, false},
                                           Published{"dbrx", 132e9, 36e9, false},
                                           Published{"kimi-k2", 1.04e12, 32e9, false},
                                           Published{"glm-4.5", 355e9, 32e9, true},
                                           Published{"glm-4.5-air", 106e9, 12e9, true}),
                         [](const ::testing::TestParamInfo<Published>& i) {
                           std::string n = i.param.fixture;
                           for (char& ch : n)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

TEST(PlanParams, ExactOnEveryTinyCheckpoint) {
  int checked = 0;
  for (const auto& dir : std::filesystem::directory_iterator(kModels)) {
    if (!std::filesystem::exists(dir.path() / "config.json")) continue;
    Expected<std::shared_ptr<const Checkpoint>> ck = Checkpoint::open(dir.path());
    ASSERT_TRUE(ck.ok()) << ck.error().message();
    int64_t stored = 0;
    for (const std::string& name : (*ck)->names()) {
      // FP8 block scales (weight_scale_inv) are not parameters.
      if (name.ends_with("_scale_inv")) continue;
      Expected<TensorView> t = (*ck)->tensor(name);
      ASSERT_TRUE(t.ok()) << t.error().message();
      stored += t->numel();
    }
    Expected<PlanModel> m = load_plan_model(dir.path() / "config.json");
    ASSERT_TRUE(m.ok()) << m.error().message();
    EXPECT_EQ(count_params(*m).total, stored) << dir.path();
    // The header-only count of the CLI agrees.
    Expected<std::optional<CheckpointTotals>> totals = count_checkpoint(dir.path());
    ASSERT_TRUE(totals.ok()) << totals.error().message();
    ASSERT_TRUE(totals->has_value());
    EXPECT_EQ((*totals)->params, stored) << dir.path();
    ++checked;
  }
  EXPECT_GE(checked, 5);
}

TEST(PlanParams, DeepSeekV3MtpIsReportedApartFromTheTotal) {
  const ParamCounts c = count_params(load("deepseek-v3"));
  // One MTP layer: a MoE decoder layer (~11.7B) plus its projections and norms.
  EXPECT_NEAR(static_cast<double>(c.mtp) / 11.7e9, 1.0, 0.05) << c.mtp;
  EXPECT_EQ(c.mtp_checkpoint_extra, 2 * int64_t{129280} * 7168);
  // The published checkpoint: 685B = 671B of the model + 14B of the MTP module.
  EXPECT_NEAR(static_cast<double>(c.total + c.mtp + c.mtp_checkpoint_extra) / 685e9, 1.0, 0.01);
  EXPECT_EQ(count_params(load("kimi-k2")).mtp, 0);
}

TEST(PlanParams, LayerKindsFollowTheConfig) {
  const PlanModel v3 = load("deepseek-v3");
  EXPECT_TRUE(v3.mla);
  EXPECT_EQ(v3.num_dense_layers, 3);
  EXPECT_EQ(v3.num_moe_layers, 58);
  const PlanModel ds = load("deepseek-moe-16b");
  EXPECT_FALSE(ds.mla);
  EXPECT_EQ(ds.num_dense_layers, 1);
  EXPECT_EQ(ds.shared_intermediate_size, 2 * 1408);
  const PlanModel dbrx = load("dbrx");  // nested attn_config / ffn_config
  EXPECT_EQ(dbrx.num_experts, 16);
  EXPECT_EQ(dbrx.top_k, 4);
  EXPECT_EQ(dbrx.num_kv_heads, 8);
  EXPECT_EQ(dbrx.moe_intermediate_size, 10752);
  const PlanModel kimi = load("kimi-k2");
  EXPECT_EQ(kimi.family, "deepseek_v3");
  EXPECT_EQ(kimi.num_experts, 384);
}

TEST(PlanKv, MlaBytesPerTokenForDeepSeekV3) {
  const PlanModel m = load("deepseek-v3");
  EXPECT_EQ(kv_bytes_per_token(m, KvDType::BF16), (512 + 64) * 61 * 2);
  EXPECT_EQ(kv_bytes_per_token(m, KvDType::FP8), (512 + 64) * 61);
}

TEST(PlanKv, GqaBytesPerTokenForMixtral) {
  EXPECT_EQ(kv_bytes_per_token(load("mixtral-8x7b"), KvDType::BF16), 2 * 8 * 128 * 32 * 2);
}

TEST(PlanBytes, QuantizedDtypesShrinkTheWeights) {
  const PlanModel m = load("deepseek-v3");
  const int64_t bf16 = weight_bytes(m, WeightDType::BF16);
  EXPECT_EQ(bf16, 2 * count_params(m).total);
  EXPECT_EQ(weight_bytes(m, WeightDType::FP16), bf16);
  const int64_t fp8 = weight_bytes(m, WeightDType::FP8);
  const int64_t int8 = weight_bytes(m, WeightDType::INT8);
  const int64_t int4 = weight_bytes(m, WeightDType::INT4);
  EXPECT_LT(fp8, bf16 * 0.51);
  EXPECT_GT(fp8, bf16 * 0.5);  // embeddings stay 16-bit, plus the block scales
  EXPECT_GT(int8, bf16 * 0.5);
  EXPECT_LT(int4, fp8 * 0.52);
  // One 256x256 matrix: fp8 holds 4 block scales, int8 256 row scales, int4 256x2 group scales.
  const TensorGroup t{"w", Part::Attention, 256, 256, 1, true};
  EXPECT_EQ(tensor_bytes(t, WeightDType::FP8), 256 * 256 + 4 * 4);
  EXPECT_EQ(tensor_bytes(t, WeightDType::INT8), 256 * 256 + 256 * 4);
  EXPECT_EQ(tensor_bytes(t, WeightDType::INT4), 256 * 256 / 2 + 256 * 2 * 2);
  const TensorGroup norm{"n", Part::Norm, 256, 1, 1, false};
  EXPECT_EQ(tensor_bytes(norm, WeightDType::INT4), 512);
}

TEST(PlanLayout, GpuCountGrowsWithContextAndBatch) {
  const PlanModel m = load("mixtral-8x7b");
  int previous = 0;
  for (const auto& [context, batch] : std::vector<std::pair<int64_t, int64_t>>{
           {4096, 1}, {32768, 16}, {32768, 64}, {32768, 256}}) {
    const int n = gpus_for(m, options("H100-80", WeightDType::BF16, context, batch));
    EXPECT_GE(n, previous) << context << " x " << batch;
    previous = n;
  }
  EXPECT_EQ(gpus_for(m, options("H100-80", WeightDType::BF16, 4096, 1)), 2);
  EXPECT_GT(previous, 8);  // 256 sequences of 32k tokens need more than a node
  // The batch alone also grows it.
  EXPECT_LT(gpus_for(m, options("H100-80", WeightDType::BF16, 8192, 1)),
            gpus_for(m, options("H100-80", WeightDType::BF16, 8192, 512)));
}

TEST(PlanLayout, Fp8NeedsFewerGpusThanBf16ForDeepSeekV3) {
  const PlanModel m = load("deepseek-v3");
  const int bf16 = gpus_for(m, options("H100-80", WeightDType::BF16, 8192, 1));
  const int fp8 = gpus_for(m, options("H100-80", WeightDType::FP8, 8192, 1));
  EXPECT_LT(fp8, bf16);
  // Two p5 nodes in fp8, as the serving guides recommend: TP 8 x PP 2 with EP over the 8 GPUs.
  Expected<Plan> p = make_plan(m, options("p5", WeightDType::FP8, 8192, 1));
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->layout.gpus, 16);
  EXPECT_EQ(p->layout.nodes, 2);
  EXPECT_EQ(p->layout.tp, 8);
  EXPECT_EQ(p->layout.pp, 2);
  EXPECT_EQ(p->layout.ep, 8);
  EXPECT_EQ(p->layout.experts_per_gpu, 32);
  EXPECT_LE(p->per_gpu.used(), p->per_gpu.capacity);
}

TEST(PlanLayout, TensorParallelDividesTheHeads) {
  // Qwen2-57B-A14B has 28 heads: 8 GPUs are TP 4 x PP 2.
  const PlanModel m = load("qwen2-57b-a14b");
  Expected<Plan> p = make_plan(m, options("A100-40", WeightDType::BF16, 32768, 8));
  ASSERT_TRUE(p.ok());
  ASSERT_TRUE(p->fits);
  EXPECT_EQ(28 % p->layout.tp, 0);
  EXPECT_EQ(p->layout.tp * p->layout.pp, p->layout.gpus);
}

TEST(PlanLayout, SmallModelFitsOneGpu) {
  const PlanModel m = load("qwen1.5-moe-a2.7b");
  Expected<Plan> p = make_plan(m, options("A100-80", WeightDType::BF16, 4096, 1));
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->layout.gpus, 1);
  EXPECT_EQ(p->per_gpu.weights, weight_bytes(m, WeightDType::BF16));
  EXPECT_EQ(p->per_gpu.kv_cache, kv_bytes_per_token(m, KvDType::BF16) * 4096);
}

TEST(PlanGpu, NamesAreCaseInsensitiveWithAliases) {
  Expected<GpuSpec> h100 = find_gpu("h100");
  ASSERT_TRUE(h100.ok());
  EXPECT_EQ(h100->name, "H100-80");
  Expected<GpuSpec> a100 = find_gpu("A100");
  ASSERT_TRUE(a100.ok());
  EXPECT_EQ(a100->name, "A100-80");
  Expected<GpuSpec> p5 = find_gpu("P5.48xlarge");
  ASSERT_TRUE(p5.ok());
  EXPECT_EQ(p5->gpu, "H100-80");
  EXPECT_TRUE(p5->instance);
  Expected<GpuSpec> p4d = find_gpu("p4d");
  ASSERT_TRUE(p4d.ok());
  EXPECT_EQ(p4d->gpu, "A100-40");
  Expected<GpuSpec> h200 = find_gpu("H200");
  ASSERT_TRUE(h200.ok());
  EXPECT_GT(h200->memory_bytes, int64_t{140} << 30);
}

TEST(PlanErrors, UnknownGpuListsTheKnownOnes) {
  Expected<GpuSpec> g = find_gpu("V100");
  ASSERT_FALSE(g.ok());
  EXPECT_NE(g.error().message().find("V100"), std::string::npos);
  EXPECT_NE(g.error().message().find("H100-80"), std::string::npos);
  EXPECT_NE(g.error().message().find("p5en"), std::string::npos);
}

TEST(PlanErrors, UnknownDtypeNamesTheFlag) {
  Expected<WeightDType> d = parse_weight_dtype("fp4", "--dtype");
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.error().message().find("--dtype"), std::string::npos);
  EXPECT_NE(d.error().message().find("int4"), std::string::npos);
  EXPECT_FALSE(parse_kv_dtype("int4", "--kv-dtype").ok());
  EXPECT_TRUE(parse_weight_dtype("FP8", "--dtype").ok());
}

TEST(PlanErrors, UnknownModelTypeNamesTheSupportedOnes) {
  Expected<PlanModel> m = parse_plan_model(R"({"model_type": "gpt2"})", "x/config.json");
  ASSERT_FALSE(m.ok());
  const std::string& msg = m.error().message();
  EXPECT_NE(msg.find("x/config.json"), std::string::npos);
  EXPECT_NE(msg.find("gpt2"), std::string::npos);
  EXPECT_NE(msg.find("deepseek_v3"), std::string::npos);
  EXPECT_NE(msg.find("dbrx"), std::string::npos);
}

TEST(PlanErrors, BadFieldsAreNamed) {
  Expected<PlanModel> a =
      parse_plan_model(R"({"model_type": "mixtral", "hidden_size": "big"})", "c.json");
  ASSERT_FALSE(a.ok());
  EXPECT_NE(a.error().message().find("hidden_size"), std::string::npos);
  Expected<PlanModel> b =
      parse_plan_model(R"({"model_type": "dbrx", "ffn_config": {"moe_num_experts": 0}})", "c.json");
  ASSERT_FALSE(b.ok());
  EXPECT_NE(b.error().message().find("ffn_config.moe_num_experts"), std::string::npos);
  Expected<PlanModel> c = parse_plan_model(
      R"({"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 5})", "c.json");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.error().message().find("num_experts_per_tok"), std::string::npos);
  EXPECT_FALSE(parse_plan_model("{", "c.json").ok());
  EXPECT_FALSE(load_plan_model(kConfigs / "no-such" / "config.json").ok());
  const PlanModel m = load("mixtral-8x7b");
  EXPECT_FALSE(make_plan(m, options("H100", WeightDType::BF16, 0, 1)).ok());
}

// Found by tests/fuzz (model_config): a layer step of 0 divided by zero after the error was noted.
TEST(PlanErrors, ZeroLayerStepIsAnErrorNotADivisionByZero) {
  for (const char* config : {R"({"model_type": "deepseek_v3", "moe_layer_freq": 0})",
                             R"({"model_type": "qwen2_moe", "decoder_sparse_step": 0})",
                             R"({"model_type": "qwen3_moe", "decoder_sparse_step": -3})"}) {
    Expected<PlanModel> m = parse_plan_model(config, "c.json");
    ASSERT_FALSE(m.ok()) << config;
    EXPECT_NE(m.error().message().find("c.json"), std::string::npos);
  }
}

TEST(PlanDefaults, MissingFieldsTakeTheTransformersDefaults) {
  // DeepseekV3Config's defaults are DeepSeek-V3 itself (without the MTP layer).
  Expected<PlanModel> m = parse_plan_model(R"({"model_type": "deepseek_v3"})", "c.json");
  ASSERT_TRUE(m.ok()) << m.error().message();
  EXPECT_EQ(count_params(*m).total, count_params(load("deepseek-v3")).total);
  // MixtralConfig's defaults are Mixtral 8x7B.
  Expected<PlanModel> x = parse_plan_model(R"({"model_type": "mixtral"})", "c.json");
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(count_params(*x).total, count_params(load("mixtral-8x7b")).total);
  // q_lora_rank null: queries are projected directly (DeepSeek-V2-Lite).
  Expected<PlanModel> lite = parse_plan_model(
      R"({"model_type": "deepseek_v2", "q_lora_rank": null, "num_experts_per_tok": 6})", "c.json");
  ASSERT_TRUE(lite.ok()) << lite.error().message();
  EXPECT_EQ(lite->q_lora_rank, 0);
  // A dense family.
  Expected<PlanModel> llama = parse_plan_model(R"({"model_type": "llama"})", "c.json");
  ASSERT_TRUE(llama.ok());
  EXPECT_EQ(count_params(*llama).active, count_params(*llama).total);
  EXPECT_NEAR(static_cast<double>(count_params(*llama).total) / 6.74e9, 1.0, 0.01);
}

}  // namespace
}  // namespace moemesh::plan
