// Test helpers for the split of a model into an attention part and expert shards: the stored
// fixtures, a checkpoint rewriter (fused experts, split directories), and ShardBackend, an
// asynchronous ExpertBackend over ExpertShards, as an attention worker would use remote shards.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/checkpoint.h"
#include "core/expert_shard.h"
#include "core/model.h"
#include "tests/core/test_checkpoint_writer.h"

namespace moemesh::test {

// The repository root: $MOEMESH_SOURCE_DIR when set (binaries run from another checkout, as
// scripts/gpu-check --no-build does), else the one the test was built from.
inline std::filesystem::path source_dir() {
  if (const char* env = std::getenv("MOEMESH_SOURCE_DIR"); env && *env) return env;
  return MOEMESH_SOURCE_DIR;
}

inline std::filesystem::path fixture(const std::string& name) {
  return source_dir() / "tests/fixtures/models" / name;
}

inline std::vector<int32_t> fixture_prompt(const std::string& name) {
  std::ifstream in(fixture(name) / "reference.json");
  return nlohmann::json::parse(in).at("prompt_ids").get<std::vector<int32_t>>();
}

// Every routed expert of every MoE layer whose id % 2 == parity.
inline std::vector<ExpertRef> experts_with_parity(const ModelConfig& c, int parity) {
  std::vector<ExpertRef> out;
  for (int32_t l = 0; l < c.num_layers; ++l)
    if (c.layer_is_moe[l])
      for (int32_t e = parity; e < c.num_experts; e += 2) out.push_back({l, e});
  return out;
}

// Whether a tensor name belongs to a routed expert ("...experts.3.w1.weight", fused
// "...experts.gate_up_proj"), as opposed to the router, a shared expert or anything else.
inline bool is_routed_expert_tensor(const std::string& name) {
  return name.find(".experts.") != std::string::npos;
}

// Rewrites the checkpoint in `src` into `dst` (config files copied): only the tensors `keep`
// accepts, and with fuse_experts the routed experts of each MoE layer as fused
// experts.gate_up_proj [E, 2 * inter, hidden] and experts.down_proj [E, hidden, inter] tensors;
// `edit` may break the result before it is written.
inline void rewrite_checkpoint(const std::filesystem::path& src, const std::filesystem::path& dst,
                               const std::function<bool(const std::string&)>& keep,
                               bool fuse_experts = false,
                               const std::function<void(SafetensorsWriter&)>& edit = {}) {
  for (const char* f : {"config.json", "generation_config.json"})
    if (std::filesystem::exists(src / f))
      std::filesystem::copy_file(src / f, dst / f,
                                 std::filesystem::copy_options::overwrite_existing);
  Expected<std::shared_ptr<const Checkpoint>> ckpt = Checkpoint::open(src);
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().message();
  Expected<ModelConfig> config = load_model_config(src);
  ASSERT_TRUE(config.ok()) << config.error().message();
  auto bytes = [&](const std::string& name) {
    Expected<TensorView> t = (*ckpt)->tensor(name);
    EXPECT_TRUE(t.ok()) << name;
    if (!t) return std::string();
    const auto size = static_cast<std::size_t>(t->numel()) * kernels::dtype_size(t->dtype);
    return std::string(static_cast<const char*>(t->data), size);
  };
  SafetensorsWriter w;
  for (const std::string& name : (*ckpt)->names()) {
    if (!keep(name) || (fuse_experts && is_routed_expert_tensor(name))) continue;
    Expected<TensorView> t = (*ckpt)->tensor(name);
    ASSERT_TRUE(t.ok()) << t.error().message();
    w.raw(name, kernels::dtype_name(t->dtype), t->shape, bytes(name));
  }
  if (fuse_experts) {
    const ModelConfig& c = *config;
    ASSERT_NE(c.arch, Arch::Mixtral) << "fusing is written for the gate_proj/up_proj naming";
    for (int64_t l = 0; l < c.num_layers; ++l) {
      if (!c.layer_is_moe[l]) continue;
      const std::string p = "model.layers." + std::to_string(l) + ".mlp.experts.";
      if (!keep(p + "gate_up_proj")) continue;
      std::string gate_up, down;
      for (int64_t e = 0; e < c.num_experts; ++e) {
        const std::string x = p + std::to_string(e) + ".";
        gate_up += bytes(x + "gate_proj.weight") + bytes(x + "up_proj.weight");
        down += bytes(x + "down_proj.weight");
      }
      const int64_t E = c.num_experts, H = c.hidden_size, I = c.moe_intermediate_size;
      const std::string expert_dtype =
          kernels::dtype_name((*ckpt)->tensor(p + "0.gate_proj.weight")->dtype);
      w.raw(p + "gate_up_proj", expert_dtype, {E, 2 * I, H}, gate_up);
      w.raw(p + "down_proj", expert_dtype, {E, H, I}, down);
    }
  }
  if (edit) edit(w);
  w.write(dst / "model.safetensors");
}

// Routed experts computed by ExpertShards, as an attention worker computes them remotely: for
// each shard, its held experts of the layer in ascending id, each run over the tokens routed to
// it and scaled by their router weights into the shard's partial sum; then out += each shard's
// partial sum in shard order. start() runs that on another thread (the "network"), finish() waits
// and adds into out, and records whether the model touched `out` in between.
class ShardBackend : public ExpertBackend {
 public:
  explicit ShardBackend(std::vector<ExpertShard*> shards) : shards_(std::move(shards)) {}
  ~ShardBackend() override {
    if (pending_.valid()) pending_.wait();
  }

  Status compute(int64_t layer, const float* x, int64_t n, const int32_t* ids, const float* weights,
                 int64_t top_k, float* out) override {
    ++computes;
    const int64_t H = shards_.front()->config().hidden_size;
    const auto l = static_cast<int32_t>(layer);
    // Every slot must be served by some shard.
    for (int64_t i = 0; i < n * top_k; ++i) {
      bool held = false;
      for (ExpertShard* shard : shards_) held = held || shard->holds(l, ids[i]);
      if (!held) return Error("no shard holds expert " + std::to_string(ids[i]));
    }
    std::vector<float> partial, gathered, y;
    for (ExpertShard* shard : shards_) {
      partial.assign(static_cast<std::size_t>(n * H), 0.0f);
      for (int32_t e = 0; e < shard->config().num_experts; ++e) {
        if (!shard->holds(l, e)) continue;
        std::vector<int64_t> slots;
        for (int64_t i = 0; i < n * top_k; ++i)
          if (ids[i] == e) slots.push_back(i);
        if (slots.empty()) continue;
        const auto m = static_cast<int64_t>(slots.size());
        gathered.resize(static_cast<std::size_t>(m * H));
        y.resize(gathered.size());
        for (int64_t r = 0; r < m; ++r)
          std::copy_n(x + slots[r] / top_k * H, H, gathered.begin() + r * H);
        if (Status s = shard->run(l, e, gathered.data(), m, y.data()); !s) return s;
        for (int64_t r = 0; r < m; ++r)
          for (int64_t d = 0; d < H; ++d)
            partial[slots[r] / top_k * H + d] += weights[slots[r]] * y[r * H + d];
      }
      for (std::size_t i = 0; i < partial.size(); ++i) out[i] += partial[i];
    }
    return {};
  }

  Status start(int64_t layer, const float* x, int64_t n, const int32_t* ids, const float* weights,
               int64_t top_k, float* out) override {
    const int64_t H = shards_.front()->config().hidden_size;
    out_ = out;
    before_.assign(out, out + n * H);
    result_.assign(before_.size(), 0.0f);
    pending_ = std::async(std::launch::async, [=, this] {
      return compute(layer, x, n, ids, weights, top_k, result_.data());
    });
    return {};
  }

  Status finish() override {
    if (!pending_.valid()) return Error("finish() without start()");
    Status s = pending_.get();
    if (!std::equal(before_.begin(), before_.end(), out_)) out_touched = true;
    if (!s) return s;
    for (std::size_t i = 0; i < result_.size(); ++i) out_[i] += result_[i];
    return {};
  }

  int computes = 0;
  bool out_touched = false;

 private:
  std::vector<ExpertShard*> shards_;
  std::future<Status> pending_;
  float* out_ = nullptr;
  std::vector<float> before_, result_;
};

inline float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  float d = 0;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

// ||a - b|| / ||b||.
inline double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

inline int32_t argmax(const float* v, int64_t n) {
  return static_cast<int32_t>(std::max_element(v, v + n) - v);
}

}  // namespace moemesh::test
