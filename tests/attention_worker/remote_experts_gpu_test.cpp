// RemoteExperts under a model on the GPU: the MoE layer's input rows go to the data plane from
// device memory (ExpertBackend::start_device, DeviceRows, DispatchClient::send_payload) where the
// data plane takes it, and the logits equal those of rows staged through host memory, in f32 and
// bf16 on the wire. The expert workers are DispatchServers whose handler computes with a CPU
// ExpertShard. Two builds: attention_emulated_test against the emulated GPU (tests/cuda_emulator,
// whose device memory is host memory and goes to UCX as such), on every machine; and
// attention_cuda_test against the real one, where the device path needs a UCX that takes CUDA
// memory (scripts/gpu-check runs it with the CUDA-enabled UCX of its bundle) and skips otherwise.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "attention_worker/remote_experts.h"
#include "core/expert_shard.h"
#include "core/model.h"
#include "kernels/cuda/cuda_kernels.h"
#include "tests/core/expert_shard_helpers.h"
#include "tests/kernels/cuda_test_util.h"
#include "transport/data_plane.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;

using test::fixture;

// UCX_TLS of every data-plane side here. On a real GPU UCX moves CUDA memory only with a CUDA
// transport among its selected ones (cuda_copy; a UCX without it warns and ignores the name).
std::string transports() {
  return kernels::cuda::device_memory_is_host() ? "tcp" : "tcp,cuda_copy";
}

std::vector<int32_t> prompt_of(const std::string& name) {
  std::ifstream in(fixture(name) / "reference.json");
  return nlohmann::json::parse(in).at("prompt_ids").get<std::vector<int32_t>>();
}

// An expert worker: every expert of the checkpoint in a CPU shard, behind a data-plane server.
struct Worker {
  std::unique_ptr<ExpertShard> shard;
  std::unique_ptr<transport::DispatchServer> server;
  int64_t hidden = 0;
  std::atomic<int64_t> dispatches{0};

  explicit Worker(const fs::path& dir, const ModelConfig& c) : hidden(c.hidden_size) {
    std::vector<ExpertRef> all;
    for (int32_t l = 0; l < c.num_layers; ++l)
      if (c.layer_is_moe[static_cast<std::size_t>(l)])
        for (int32_t e = 0; e < c.num_experts; ++e) all.push_back({l, e});
    auto s = ExpertShard::load(dir, all);
    EXPECT_TRUE(s) << s.error().message();
    shard = std::move(*s);
    transport::DataPlaneOptions o;
    o.transports = transports();
    auto started = transport::DispatchServer::start(
        o, [this](std::span<transport::Dispatch> batch) { handle(batch); });
    EXPECT_TRUE(started) << started.error().message();
    server = std::move(*started);
  }

  void handle(std::span<transport::Dispatch> batch) {
    std::vector<float> y(static_cast<std::size_t>(hidden));
    for (transport::Dispatch& d : batch) {
      ++dispatches;
      for (int64_t t = 0; t < d.n_tokens; ++t)
        for (int32_t j = 0; j < d.slots; ++j) {
          const int32_t e = d.experts[t * d.slots + j];
          if (e < 0) continue;
          if (Status s = shard->run(d.layer, e, d.x + t * hidden, 1, y.data()); !s) {
            *d.error = s.error().message();
            return;
          }
          const float w = d.weights[t * d.slots + j];
          for (int64_t i = 0; i < hidden; ++i) d.partial[t * hidden + i] += w * y[i];
        }
    }
  }
};

struct Result {
  std::vector<float> logits;
  proto::DispatchStats stats;
};

// The fixture's prompt and 4 greedy steps through an attention-only model on the (emulated) GPU
// whose experts are the worker's.
Result run(const std::string& name, Worker& worker, bool device_rows, transport::WireDtype dtype) {
  Result out;
  ModelOptions mo;
  mo.device = "cuda:0";
  mo.gpu_kv_cache_bytes = 8 << 20;
  mo.routed_experts = false;
  auto model = Model::load(fixture(name), mo);
  EXPECT_TRUE(model) << model.error().message();
  if (!model) return out;
  RemoteExpertsOptions ro;
  ro.data_plane.transports = transports();
  ro.data_plane.dtype = dtype;
  ro.device_rows = device_rows;
  ro.timeout = std::chrono::milliseconds(5000);
  auto remote = RemoteExperts::create((*model)->config(), ro);
  EXPECT_TRUE(remote) << remote.error().message();
  const ModelConfig& c = (*model)->config();
  proto::Placement p;
  p.set_version(1);
  proto::ExpertWorkerAddress* a = p.add_workers();
  a->set_worker_id(1);
  a->set_name("expert-1");
  a->set_data_address(worker.server->address());
  for (int32_t l = 0; l < c.num_layers; ++l) {
    if (!c.layer_is_moe[static_cast<std::size_t>(l)]) continue;
    proto::LayerPlacement* lp = p.add_layers();
    lp->set_layer(l);
    for (int32_t e = 0; e < c.num_experts; ++e) lp->add_experts()->add_workers(1);
  }
  (*remote)->set_placement(p);
  (*model)->set_expert_backend(remote->get());
  KVCache cache = (*model)->new_cache(64);
  std::vector<float> logits;
  std::vector<int32_t> tokens = prompt_of(name);
  for (int step = 0; step < 5; ++step) {
    auto s = (*model)->forward(cache, tokens, Logits::All, logits);
    EXPECT_TRUE(s) << s.error().message();
    if (!s) break;
    out.logits.insert(out.logits.end(), logits.begin(), logits.end());
    const auto last = logits.end() - c.vocab_size;
    tokens = {static_cast<int32_t>(std::max_element(last, logits.end()) - last)};
  }
  (*model)->set_expert_backend(nullptr);
  out.stats = (*remote)->stats();
  return out;
}

// Whether rows in this build's device memory go to UCX as they are: always on the emulated GPU
// (host memory), on a real one where UCX takes CUDA memory.
bool device_rows_expected() {
  if (kernels::cuda::device_memory_is_host()) return true;
  transport::DataPlaneOptions o;
  o.transports = transports();
  auto c = transport::DispatchClient::create(o);
  return c && (*c)->cuda_memory();
}

TEST(RemoteExpertsOnGpu, RowsSentFromDeviceMemoryGiveTheStagedResult) {
  MOEMESH_REQUIRE_GPU();
  const bool expected = device_rows_expected();
  // deepseek-v3-bf16: latent attention and the grouped router in front of the remote experts.
  for (const char* name : {"qwen2moe-bf16", "mixtral-tiny", "deepseek-v3-bf16"}) {
    const ModelConfig c = *load_model_config(fixture(name));
    Worker worker(fixture(name), c);
    ASSERT_TRUE(worker.server);
    for (transport::WireDtype dtype : {transport::WireDtype::F32, transport::WireDtype::BF16}) {
      const Result staged = run(name, worker, false, dtype);
      const Result device = run(name, worker, true, dtype);
      ASSERT_FALSE(staged.logits.empty());
      EXPECT_EQ(device.logits, staged.logits) << name;  // the same bytes on the wire
      EXPECT_EQ(staged.stats.device_dispatches_total(), 0u);
      EXPECT_EQ(device.stats.timeouts_total() + device.stats.failed_steps_total(), 0u);
      if (!expected) {  // staged both times
        EXPECT_EQ(device.stats.device_dispatches_total(), 0u);
        continue;
      }
      EXPECT_GT(device.stats.device_dispatches_total(), 0u) << name;
      EXPECT_EQ(device.stats.device_dispatches_total(), device.stats.dispatches_total());
    }
  }
  if (!expected)
    GTEST_SKIP() << "this UCX does not take CUDA memory: the rows were staged "
                    "both times; scripts/gpu-check runs this with a CUDA-enabled UCX";
}

// The rows sent from device memory where UCX takes them, else staged; the experts computed by the
// model itself: remote and local agree (f32 wire).
TEST(RemoteExpertsOnGpu, DeviceRowsMatchTheModelsOwnExperts) {
  MOEMESH_REQUIRE_GPU();
  const std::string name = "qwen3moe-tiny";
  const ModelConfig c = *load_model_config(fixture(name));
  Worker worker(fixture(name), c);
  ASSERT_TRUE(worker.server);
  const Result device = run(name, worker, true, transport::WireDtype::F32);
  ModelOptions mo;
  mo.device = "cuda:0";
  mo.gpu_kv_cache_bytes = 8 << 20;
  auto full = Model::load(fixture(name), mo);
  ASSERT_TRUE(full) << full.error().message();
  KVCache cache = (*full)->new_cache(64);
  std::vector<float> want, logits;
  std::vector<int32_t> tokens = prompt_of(name);
  for (int step = 0; step < 5; ++step) {
    ASSERT_TRUE((*full)->forward(cache, tokens, Logits::All, logits));
    want.insert(want.end(), logits.begin(), logits.end());
    const auto last = logits.end() - c.vocab_size;
    tokens = {static_cast<int32_t>(std::max_element(last, logits.end()) - last)};
  }
  ASSERT_EQ(device.logits.size(), want.size());
  // The GPU's own experts run on bf16 operands, the worker's on the CPU in f32.
  EXPECT_LT(kernels::cuda::testing::rel_error(device.logits, want), 3e-2);
  EXPECT_GT(worker.dispatches.load(), 0);
}

}  // namespace
}  // namespace moemesh
