// FP8 weights on the GPU: an FP8 checkpoint's experts and dense layers (and those of
// --quantization fp8) stay FP8 on the device, in the model's grouped GEMM, its dense layers and
// in a GPU expert shard, where their shapes suit the FP8 kernels; elsewhere they go up as bf16.
// The checkpoints are written here: qwen3_moe with hidden 64 and experts 256 wide (128 per rank
// with two ranks), in bf16, with the same weights' experts block-quantized to FP8, and with every
// matrix --quantization fp8 quantizes in FP8 (kernels::quantize_fp8_e4m3, the quantizer of
// --quantization fp8, so all hold the same codes). Skips where no GPU is present.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/expert_shard.h"
#include "core/model.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cuda/cuda_kernels.h"
#include "tests/core/test_checkpoint_writer.h"
#include "tests/kernels/cuda_test_util.h"

namespace moemesh {
namespace {

using kernels::cuda::testing::rel_error;

constexpr int64_t kHidden = 64, kInter = 256, kExperts = 4, kLayers = 2, kVocab = 96;
constexpr int64_t kHeads = 4, kKvHeads = 2, kHeadDim = 16;

// Deterministic values in [-scale, scale).
std::vector<float> values(int64_t n, uint32_t seed, float scale) {
  std::vector<float> v(static_cast<std::size_t>(n));
  uint32_t s = seed * 2654435761u + 12345u;
  for (float& x : v) {
    s = s * 1664525u + 1013904223u;
    x = scale * (static_cast<float>(s >> 8) / static_cast<float>(1u << 23) - 1.0f);
  }
  return v;
}

std::vector<uint16_t> bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = kernels::f32_to_bf16(v[i]);
  return out;
}

// Which matrices a checkpoint holds in FP8.
enum class Fp8 { None, Experts, All };

// Writes the checkpoint to `dir`: every matrix bf16, or the routed experts (Fp8::Experts) or all
// the matrices --quantization fp8 quantizes (Fp8::All: also attention) as F8_E4M3 codes plus F32
// weight_scale_inv blocks of the same bf16 values.
void write_checkpoint(const std::filesystem::path& dir, Fp8 fp8, int64_t inter) {
  const bool fp8_experts = fp8 != Fp8::None;
  nlohmann::json config = {{"architectures", {"Qwen3MoeForCausalLM"}},
                           {"model_type", "qwen3_moe"},
                           {"hidden_size", kHidden},
                           {"intermediate_size", 128},
                           {"moe_intermediate_size", inter},
                           {"num_hidden_layers", kLayers},
                           {"num_attention_heads", kHeads},
                           {"num_key_value_heads", kKvHeads},
                           {"head_dim", kHeadDim},
                           {"num_experts", kExperts},
                           {"num_experts_per_tok", 2},
                           {"norm_topk_prob", true},
                           {"decoder_sparse_step", 1},
                           {"mlp_only_layers", nlohmann::json::array()},
                           {"max_position_embeddings", 256},
                           {"rms_norm_eps", 1e-6},
                           {"rope_theta", 1000000.0},
                           {"tie_word_embeddings", false},
                           {"vocab_size", kVocab},
                           {"bos_token_id", 1},
                           {"eos_token_id", 2},
                           {"hidden_act", "silu"},
                           {"attention_bias", false}};
  if (fp8_experts)
    config["quantization_config"] = {{"quant_method", "fp8"},
                                     {"fmt", "e4m3"},
                                     {"activation_scheme", "dynamic"},
                                     {"weight_block_size", {128, 128}}};
  test::write_file(dir / "config.json", config.dump(2));

  test::SafetensorsWriter w;
  uint32_t seed = 1;
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols, float scale,
                    bool quantized) {
    const std::vector<uint16_t> bits = bf16(values(rows * cols, seed++, scale));
    if (!quantized) return w.bf16_bits(name, {rows, cols}, bits), void();
    const kernels::WeightView view{bits.data(), kernels::DType::BF16, rows, cols};
    std::string codes(static_cast<std::size_t>(rows * cols), '\0');
    std::vector<float> scales(
        static_cast<std::size_t>(kernels::fp8_blocks(rows) * kernels::fp8_blocks(cols)));
    kernels::quantize_fp8_e4m3(view, reinterpret_cast<uint8_t*>(codes.data()), scales.data(),
                               nullptr);
    w.raw(name, "F8_E4M3", {rows, cols}, codes);
    w.f32(name + "_scale_inv", {kernels::fp8_blocks(rows), kernels::fp8_blocks(cols)}, scales);
  };
  auto ones = [&](const std::string& name, int64_t n) {
    w.f32(name, {n}, std::vector<float>(static_cast<std::size_t>(n), 1.0f));
  };
  auto expert_matrix = [&](const std::string& name, int64_t rows, int64_t cols) {
    matrix(name, rows, cols, 0.08f, fp8_experts);
  };
  const bool dense = fp8 == Fp8::All;
  matrix("model.embed_tokens.weight", kVocab, kHidden, 1.0f, false);
  for (int64_t l = 0; l < kLayers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    ones(p + "input_layernorm.weight", kHidden);
    ones(p + "post_attention_layernorm.weight", kHidden);
    matrix(p + "self_attn.q_proj.weight", kHeads * kHeadDim, kHidden, 0.15f, dense);
    matrix(p + "self_attn.k_proj.weight", kKvHeads * kHeadDim, kHidden, 0.15f, dense);
    matrix(p + "self_attn.v_proj.weight", kKvHeads * kHeadDim, kHidden, 0.15f, dense);
    matrix(p + "self_attn.o_proj.weight", kHidden, kHeads * kHeadDim, 0.15f, dense);
    ones(p + "self_attn.q_norm.weight", kHeadDim);
    ones(p + "self_attn.k_norm.weight", kHeadDim);
    matrix(p + "mlp.gate.weight", kExperts, kHidden, 0.3f, false);
    for (int64_t e = 0; e < kExperts; ++e) {
      const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
      expert_matrix(x + "gate_proj.weight", inter, kHidden);
      expert_matrix(x + "up_proj.weight", inter, kHidden);
      expert_matrix(x + "down_proj.weight", kHidden, inter);
    }
  }
  ones("model.norm.weight", kHidden);
  matrix("lm_head.weight", kVocab, kHidden, 0.3f, false);
  w.write(dir / "model.safetensors");
}

struct Checkpoints {
  test::ScopedTempDir dir;
  std::filesystem::path bf16 = dir / "bf16", fp8 = dir / "fp8", fp8_all = dir / "fp8-all";
  explicit Checkpoints(int64_t inter = kInter) {
    for (auto [path, kind] :
         {std::pair{bf16, Fp8::None}, {fp8, Fp8::Experts}, {fp8_all, Fp8::All}}) {
      std::filesystem::create_directories(path);
      write_checkpoint(path, kind, inter);
    }
  }
};

const std::vector<int32_t> kPrompt = {1, 17, 42, 5, 77, 9, 63, 30, 11, 88, 4, 51, 26};

ModelOptions gpu_options(int ranks = 1, const char* quantization = "none") {
  ModelOptions o;
  o.device = "cuda:0";
  o.gpu_kv_cache_bytes = 16 << 20;
  o.tensor_parallel_size = ranks;
  o.tensor_parallel_collective = ranks > 1 ? "one-gpu" : "auto";
  o.quantization = quantization;
  return o;
}

// Prompt logits at every position, then 6 greedy decode steps' logits.
std::vector<float> run(Model& m) {
  KVCache cache = m.new_cache(64);
  std::vector<float> all, logits;
  auto s = m.forward(cache, kPrompt, Logits::All, logits);
  EXPECT_TRUE(s) << s.error().message();
  all = logits;
  const int64_t V = m.config().vocab_size;
  for (int step = 0; step < 6; ++step) {
    const auto last = logits.end() - V;
    const auto next = static_cast<int32_t>(std::max_element(last, logits.end()) - last);
    const std::vector<int32_t> one = {next};
    s = m.forward(cache, one, Logits::Last, logits);
    EXPECT_TRUE(s) << s.error().message();
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

int64_t described(const Model& m, const std::string& key) {
  const std::string d = m.device_description();
  const auto at = d.find(key + "=");
  return at == std::string::npos ? -1 : std::stoll(d.substr(at + key.size() + 1));
}
int64_t fp8_layers(const Model& m) {
  return described(m, "fp8_expert_layers");
}
int64_t fp8_dense(const Model& m) {
  return described(m, "fp8_dense");
}

// The FP8 checkpoint's experts stay FP8 on the GPU (every MoE layer, under half the expert bytes
// of bf16) and the logits follow the CPU's on the same FP8 weights as closely as bf16 weights
// follow the CPU's (3% of their norm: bf16 activations and operands on the GPU).
TEST(CudaFp8Experts, AnFp8CheckpointStaysFp8AndMatchesTheCpu) {
  MOEMESH_REQUIRE_GPU();
  Checkpoints ck;
  auto cpu = Model::load(ck.fp8);
  ASSERT_TRUE(cpu) << cpu.error().message();
  auto gpu = Model::load(ck.fp8, gpu_options());
  ASSERT_TRUE(gpu) << gpu.error().message();
  EXPECT_EQ(fp8_layers(**gpu), kLayers) << (*gpu)->device_description();
  const double err = rel_error(run(**gpu), run(**cpu));
  std::printf("[ fp8 experts ] gpu vs cpu logits relative error %.5f\n", err);
  EXPECT_LT(err, 3e-2);

  auto plain = Model::load(ck.bf16, gpu_options());
  ASSERT_TRUE(plain) << plain.error().message();
  EXPECT_EQ(fp8_layers(**plain), 0) << (*plain)->device_description();
}

// --quantization fp8 on a GPU quantizes what it quantizes on the CPU (the experts and the
// attention's projections) to the codes an FP8 checkpoint of the same weights holds: the same
// logits as that checkpoint.
TEST(CudaFp8Experts, QuantizationAtLoadEqualsTheFp8Checkpoint) {
  MOEMESH_REQUIRE_GPU();
  Checkpoints ck;
  auto at_load = Model::load(ck.bf16, gpu_options(1, "fp8"));
  ASSERT_TRUE(at_load) << at_load.error().message();
  EXPECT_EQ(fp8_layers(**at_load), kLayers) << (*at_load)->device_description();
  EXPECT_EQ(fp8_dense(**at_load), 4 * kLayers) << (*at_load)->device_description();
  auto stored = Model::load(ck.fp8_all, gpu_options());
  ASSERT_TRUE(stored) << stored.error().message();
  EXPECT_LT(rel_error(run(**at_load), run(**stored)), 1e-6);

  ModelOptions int8 = gpu_options(1, "int8");
  auto refused = Model::load(ck.bf16, int8);
  ASSERT_FALSE(refused);
  EXPECT_TRUE(test::Contains(refused.error().message(), "on a GPU use fp8"));
}

// Two ranks hold 128 of each expert's 256 features: still whole scale blocks, so FP8, and the
// same logits as one rank.
TEST(CudaFp8Experts, TensorParallelShardsKeepWholeScaleBlocks) {
  MOEMESH_REQUIRE_GPU();
  Checkpoints ck;
  auto one = Model::load(ck.fp8, gpu_options());
  ASSERT_TRUE(one) << one.error().message();
  auto two = Model::load(ck.fp8, gpu_options(2));
  ASSERT_TRUE(two) << two.error().message();
  EXPECT_EQ(fp8_layers(**two), kLayers) << (*two)->device_description();
  EXPECT_LT(rel_error(run(**two), run(**one)), 1e-2);
}

// Experts 192 wide end inside a scale block: they go up as bf16 (every FP8 value is exact in
// bf16) and still match the CPU; so does a GPU expert shard of them.
TEST(CudaFp8Experts, ShapesTheFp8KernelDoesNotTakeGoUpAsBf16) {
  MOEMESH_REQUIRE_GPU();
  Checkpoints ck(192);
  auto cpu = Model::load(ck.fp8);
  ASSERT_TRUE(cpu) << cpu.error().message();
  auto gpu = Model::load(ck.fp8, gpu_options());
  ASSERT_TRUE(gpu) << gpu.error().message();
  EXPECT_EQ(fp8_layers(**gpu), 0) << (*gpu)->device_description();
  EXPECT_LT(rel_error(run(**gpu), run(**cpu)), 3e-2);
  const std::vector<ExpertRef> refs = {{1, 1}};
  ExpertShardOptions o;
  o.device = "cuda:0";
  auto shard = ExpertShard::load(ck.fp8, refs, o);
  ASSERT_TRUE(shard) << shard.error().message();
  EXPECT_TRUE(test::Contains((*shard)->device_description(), "fp8_experts=0"));
  auto cpu_shard = ExpertShard::load(ck.fp8, refs);
  ASSERT_TRUE(cpu_shard) << cpu_shard.error().message();
  std::vector<float> x(static_cast<std::size_t>(3 * kHidden), 0.25f), yc(x.size()), yg(x.size());
  ASSERT_TRUE((*cpu_shard)->run(1, 1, x.data(), 3, yc.data()));
  ASSERT_TRUE((*shard)->run(1, 1, x.data(), 3, yg.data()));
  EXPECT_LT(rel_error(yg, yc), 2e-2);
}

// A GPU expert shard keeps FP8 experts in FP8 and computes what the CPU shard computes.
TEST(CudaFp8Experts, AnExpertShardOnTheGpuKeepsThemFp8) {
  MOEMESH_REQUIRE_GPU();
  Checkpoints ck;
  const std::vector<ExpertRef> refs = {{0, 0}, {0, 3}, {1, 2}};
  auto cpu = ExpertShard::load(ck.fp8, refs);
  ASSERT_TRUE(cpu) << cpu.error().message();
  ExpertShardOptions o;
  o.device = "cuda:0";
  auto gpu = ExpertShard::load(ck.fp8, refs, o);
  ASSERT_TRUE(gpu) << gpu.error().message();
  EXPECT_TRUE(test::Contains((*gpu)->device_description(), "fp8_experts=3"));
  ExpertShardOptions q = o;
  q.quantization = "fp8";
  auto at_load = ExpertShard::load(ck.bf16, refs, q);
  ASSERT_TRUE(at_load) << at_load.error().message();
  EXPECT_TRUE(test::Contains((*at_load)->device_description(), "fp8_experts=3"));
  for (int64_t m : {1, 7, 70}) {
    std::vector<float> x(static_cast<std::size_t>(m * kHidden));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
    std::vector<float> yc(x.size()), yg(x.size(), NAN), yq(x.size(), NAN);
    for (const ExpertRef& r : refs) {
      ASSERT_TRUE((*cpu)->run(r.layer, r.expert, x.data(), m, yc.data()));
      auto s = (*gpu)->run(r.layer, r.expert, x.data(), m, yg.data());
      ASSERT_TRUE(s) << s.error().message();
      EXPECT_LT(rel_error(yg, yc), 2e-2) << "m=" << m;
      s = (*at_load)->run(r.layer, r.expert, x.data(), m, yq.data());
      ASSERT_TRUE(s) << s.error().message();
      EXPECT_LT(rel_error(yq, yg), 1e-6) << "m=" << m;
    }
  }
}

// FP8 experts of a layer at once (run_layer: the FP8 grouped GEMM over every group).
TEST(CudaFp8Experts, RunLayerOfFp8ExpertsMatchesTheCpu) {
  MOEMESH_REQUIRE_GPU();
  Checkpoints ck;
  const std::vector<ExpertRef> refs = {{0, 0}, {0, 1}, {0, 3}};
  auto cpu = ExpertShard::load(ck.fp8, refs);
  ASSERT_TRUE(cpu) << cpu.error().message();
  ExpertShardOptions o;
  o.device = "cuda:0";
  auto gpu = ExpertShard::load(ck.fp8, refs, o);
  ASSERT_TRUE(gpu) << gpu.error().message();
  EXPECT_TRUE(test::Contains((*gpu)->device_description(), "fp8_experts=3"));
  const std::vector<ExpertRows> groups = {{3, 0, 4}, {0, 4, 9}, {1, 13, 2}};
  const int64_t total = 15;
  std::vector<float> x(static_cast<std::size_t>(total * kHidden));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.29f * static_cast<float>(i));
  std::vector<float> yc(x.size(), NAN), yg(x.size(), NAN);
  ASSERT_TRUE((*cpu)->run_layer(0, groups, x.data(), total, yc.data()));
  auto s = (*gpu)->run_layer(0, groups, x.data(), total, yg.data());
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_LT(rel_error(yg, yc), 2e-2);
}

// Prompt logits at every position for a prompt of n tokens, from a fresh cache.
std::vector<float> prompt_logits(Model& m, int64_t n) {
  std::vector<int32_t> prompt(static_cast<std::size_t>(n));
  for (int64_t i = 0; i < n; ++i) prompt[static_cast<std::size_t>(i)] = (i * 37 + 5) % kVocab;
  KVCache cache = m.new_cache(n);
  std::vector<float> logits;
  auto s = m.forward(cache, prompt, Logits::All, logits);
  EXPECT_TRUE(s) << s.error().message();
  return logits;
}

// An FP8 checkpoint's attention projections stay FP8 on the GPU (q, k, v and o of every layer)
// and give the CPU's logits on the same weights, through both ways of multiplying by them: decode
// steps (a few rows: each code read once) and prompts of 13 and 150 tokens (a bf16 copy of the
// weights and cuBLAS). The weights take less room than the bf16 checkpoint's.
TEST(CudaFp8Dense, AttentionStaysFp8AndMatchesTheCpu) {
  MOEMESH_REQUIRE_GPU();
  Checkpoints ck;
  auto cpu = Model::load(ck.fp8_all);
  ASSERT_TRUE(cpu) << cpu.error().message();
  auto gpu = Model::load(ck.fp8_all, gpu_options());
  ASSERT_TRUE(gpu) << gpu.error().message();
  EXPECT_EQ(fp8_dense(**gpu), 4 * kLayers) << (*gpu)->device_description();
  EXPECT_EQ(fp8_layers(**gpu), kLayers);
  const double err = rel_error(run(**gpu), run(**cpu));
  std::printf("[ fp8 dense ] gpu vs cpu logits relative error %.5f\n", err);
  EXPECT_LT(err, 3e-2);
  EXPECT_LT(rel_error(prompt_logits(**gpu, 150), prompt_logits(**cpu, 150)), 3e-2);

  // Against the checkpoint whose attention is bf16: one byte less a weight, plus a scale per
  // 128x128 block (one per matrix here).
  auto experts_only = Model::load(ck.fp8, gpu_options());
  ASSERT_TRUE(experts_only) << experts_only.error().message();
  EXPECT_EQ(fp8_dense(**experts_only), 0);
  const int64_t weights = (2 * kHeads + 2 * kKvHeads) * kHeadDim * kHidden;  // q, k, v, o
  EXPECT_EQ((*experts_only)->device_weight_bytes() - (*gpu)->device_weight_bytes(),
            kLayers * (weights - 4 * 4));
}

// Two ranks hold 32 of q's 64 rows each: not whole scale blocks, so q, k and v go up as bf16 (o's
// columns likewise), and the sharded model still computes what one rank computes.
TEST(CudaFp8Dense, SharesThatSplitScaleBlocksGoUpAsBf16) {
  MOEMESH_REQUIRE_GPU();
  Checkpoints ck;
  auto one = Model::load(ck.fp8_all, gpu_options());
  ASSERT_TRUE(one) << one.error().message();
  auto two = Model::load(ck.fp8_all, gpu_options(2));
  ASSERT_TRUE(two) << two.error().message();
  EXPECT_EQ(fp8_dense(**two), 0) << (*two)->device_description();
  EXPECT_LT(rel_error(run(**two), run(**one)), 2e-2);
}

}  // namespace
}  // namespace moemesh
