// RemoteExperts: an attention-only model whose routed experts are computed by ExpertWorkers in the
// same process over the data plane (UCX over TCP loopback) must give the full local model's greedy
// tokens and logits; lost workers are rerouted around (replicas) or fail the step with a clear
// error (no replica) until a placement brings the experts back; workers over capacity drop slots.
#include "attention_worker/remote_experts.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "core/model.h"
#include "expert_worker/expert_worker.h"

namespace moemesh {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

constexpr float kTolerance = 1e-4f;
constexpr std::chrono::milliseconds kTimeout{500};

fs::path fixture(const std::string& name) {
  return fs::path(MOEMESH_SOURCE_DIR) / "tests/fixtures/models" / name;
}

std::vector<int32_t> prompt_of(const std::string& name) {
  std::ifstream in(fixture(name) / "reference.json");
  return nlohmann::json::parse(in).at("prompt_ids").get<std::vector<int32_t>>();
}

// What every worker and client of a test uses (tests that change it put it back).
transport::DataPlaneOptions& data_plane_options() {
  static transport::DataPlaneOptions o = [] {
    transport::DataPlaneOptions d;
    d.transports = "tcp";
    return d;
  }();
  return o;
}
transport::DataPlaneOptions data_plane() {
  return data_plane_options();
}

std::unique_ptr<Model> load_model(const fs::path& dir, bool routed_experts) {
  Expected<std::unique_ptr<Model>> m =
      Model::load(dir, {.threads = 1, .routed_experts = routed_experts});
  EXPECT_TRUE(m.ok()) << m.error().message();
  return m.ok() ? std::move(*m) : nullptr;
}

int32_t argmax_last(const std::vector<float>& logits, int64_t vocab) {
  const float* row = logits.data() + logits.size() - vocab;
  return static_cast<int32_t>(std::max_element(row, row + vocab) - row);
}

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  float d = 0;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

// Which worker ids hold (layer, expert).
using Holders = std::function<std::vector<int32_t>(int32_t layer, int32_t expert)>;

// Expert workers in this process, with ids 1, 2, ...; null once destroyed.
class Cluster {
 public:
  Cluster(fs::path dir, const ModelConfig& config) : dir_(std::move(dir)), config_(config) {}

  ExpertWorker* start(double capacity_factor = 0) {
    ExpertWorkerOptions o;
    o.threads = 1;
    o.data_plane = data_plane();
    o.capacity_factor = capacity_factor;
    Expected<std::unique_ptr<ExpertWorker>> w = ExpertWorker::start(dir_, o);
    EXPECT_TRUE(w.ok()) << w.error().message();
    workers_.push_back(w.ok() ? std::move(*w) : nullptr);
    return workers_.back().get();
  }
  void destroy(int32_t id) { workers_[id - 1].reset(); }
  ExpertWorker* worker(int32_t id) { return workers_[id - 1].get(); }
  // A worker id served by something else (a stalled server): named in placements, never assigned.
  void add_foreign(int32_t id, std::string address) {
    foreign_.emplace_back(id, std::move(address));
  }

  // Assigns each live worker of `ids` its experts and returns the placement naming them.
  proto::Placement place(uint64_t version, const std::vector<int32_t>& ids,
                         const Holders& holders) {
    proto::Placement p;
    p.set_version(version);
    std::vector<proto::Assignment> assignments(ids.size());
    for (int32_t id : ids) {
      proto::ExpertWorkerAddress* a = p.add_workers();
      a->set_worker_id(id);
      a->set_name("expert-" + std::to_string(id));
      const auto f = std::find_if(foreign_.begin(), foreign_.end(),
                                  [&](const auto& entry) { return entry.first == id; });
      a->set_data_address(f != foreign_.end() ? f->second : worker(id)->data_address());
    }
    for (int32_t l = 0; l < config_.num_layers; ++l) {
      if (!config_.layer_is_moe[l]) continue;
      proto::LayerPlacement* lp = p.add_layers();
      lp->set_layer(l);
      for (int32_t e = 0; e < config_.num_experts; ++e) {
        proto::ExpertReplicas* r = lp->add_experts();
        for (int32_t id : holders(l, e)) {
          const auto at = std::find(ids.begin(), ids.end(), id) - ids.begin();
          if (at == static_cast<std::ptrdiff_t>(ids.size())) continue;
          r->add_workers(id);
          assignments[at].mutable_experts()->add_layer(l);
          assignments[at].mutable_experts()->add_expert(e);
        }
      }
    }
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (ExpertWorker* w =
              ids[i] <= static_cast<int32_t>(workers_.size()) ? worker(ids[i]) : nullptr;
          w == nullptr)
        continue;
      assignments[i].set_version(version);
      Status s = worker(ids[i])->assign(assignments[i]);
      EXPECT_TRUE(s.ok()) << s.error().message();
    }
    return p;
  }

 private:
  fs::path dir_;
  const ModelConfig& config_;
  std::vector<std::unique_ptr<ExpertWorker>> workers_;
  std::vector<std::pair<int32_t, std::string>> foreign_;
};

// Even expert ids on worker 1, odd ones on worker 2 (or on `odd` instead).
Holders split(int32_t odd = 2) {
  return [odd](int32_t, int32_t e) { return std::vector<int32_t>{e % 2 == 0 ? 1 : odd}; };
}
Holders everywhere(std::vector<int32_t> ids) {
  return [ids](int32_t, int32_t) { return ids; };
}

// A full local model (the reference) and an attention-only one over RemoteExperts.
class RemoteExpertsTest : public ::testing::Test {
 protected:
  void open(const std::string& name) {
    dir_ = fixture(name);
    prompt_ = prompt_of(name);
    full_ = load_model(dir_, true);
    attention_ = load_model(dir_, false);
    ASSERT_TRUE(full_ && attention_);
    vocab_ = full_->config().vocab_size;
    RemoteExpertsOptions o;
    o.data_plane = data_plane();
    o.timeout = kTimeout;
    Expected<std::unique_ptr<RemoteExperts>> r = RemoteExperts::create(attention_->config(), o);
    ASSERT_TRUE(r.ok()) << r.error().message();
    remote_ = std::move(*r);
    attention_->set_expert_backend(remote_.get());
    cluster_ = std::make_unique<Cluster>(dir_, attention_->config());
    full_cache_ = full_->new_cache(64);
    cache_ = attention_->new_cache(64);
  }

  // Runs `tokens` through both models; expects the same logits and returns the greedy next token.
  int32_t step(const std::vector<int32_t>& tokens) {
    std::vector<float> want, got;
    Status s = full_->forward(full_cache_, tokens, Logits::All, want);
    EXPECT_TRUE(s.ok()) << s.error().message();
    s = attention_->forward(cache_, tokens, Logits::All, got);
    EXPECT_TRUE(s.ok()) << s.error().message();
    if (!s) return -1;
    EXPECT_LE(max_abs_diff(want, got), kTolerance);
    const int32_t next = argmax_last(want, vocab_);
    EXPECT_EQ(argmax_last(got, vocab_), next);
    return next;
  }

  void TearDown() override {
    if (attention_) attention_->set_expert_backend(nullptr);
  }

  fs::path dir_;
  std::vector<int32_t> prompt_;
  std::unique_ptr<Model> full_, attention_;
  std::unique_ptr<RemoteExperts> remote_;
  std::unique_ptr<Cluster> cluster_;
  KVCache full_cache_, cache_;
  int64_t vocab_ = 0;
};

class RemoteExpertsParity : public RemoteExpertsTest,
                            public ::testing::WithParamInterface<std::string> {};

TEST_P(RemoteExpertsParity, TwoWorkersGiveTheLocalModelsTokensAndLogits) {
  open(GetParam());
  ASSERT_TRUE(cluster_->start() && cluster_->start());
  remote_->set_placement(cluster_->place(1, {1, 2}, split()));
  EXPECT_EQ(remote_->placement_version(), 1u);
  int32_t next = step(prompt_);
  for (int i = 0; i < 4 && next >= 0; ++i) next = step({next});
  const proto::DispatchStats s = remote_->stats();
  EXPECT_GT(s.dispatches_total(), 0u);
  EXPECT_EQ(s.timeouts_total(), 0u);
  EXPECT_EQ(s.rerouted_slots_total(), 0u);
  EXPECT_EQ(s.dropped_slots_total(), 0u);
  EXPECT_EQ(s.failed_steps_total(), 0u);
  EXPECT_EQ(s.placement_version(), 1u);
  // Both workers computed something.
  EXPECT_GT(cluster_->worker(1)->stats().dispatches_total(), 0u);
  EXPECT_GT(cluster_->worker(2)->stats().dispatches_total(), 0u);
}

// qwen2moe has a shared expert (computed on the attention side while the experts run remotely).
INSTANTIATE_TEST_SUITE_P(Fixtures, RemoteExpertsParity,
                         ::testing::Values("qwen2moe-tiny", "mixtral-tiny", "olmoe-tiny",
                                           "qwen3moe-tiny"),
                         [](const auto& param_info) {
                           std::string n = param_info.param;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

TEST_F(RemoteExpertsTest, NoPlacementFailsWithAClearError) {
  open("qwen2moe-tiny");
  std::vector<float> logits;
  Status s = attention_->forward(cache_, prompt_, Logits::Last, logits);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message().find("no expert placement has been set"), std::string::npos)
      << s.error().message();
  EXPECT_EQ(cache_.length(), 0);
}

TEST_F(RemoteExpertsTest, ReplicasSurviveALostWorker) {
  open("qwen2moe-tiny");
  ASSERT_TRUE(cluster_->start() && cluster_->start());
  remote_->set_placement(cluster_->place(1, {1, 2}, everywhere({1, 2})));
  int32_t next = step(prompt_);
  next = step({next});
  EXPECT_GT(cluster_->worker(1)->stats().dispatches_total(), 0u);
  EXPECT_GT(cluster_->worker(2)->stats().dispatches_total(), 0u);

  cluster_->destroy(1);
  for (int i = 0; i < 3 && next >= 0; ++i) next = step({next});
  proto::DispatchStats s = remote_->stats();
  EXPECT_GT(s.rerouted_slots_total(), 0u);
  EXPECT_EQ(s.failed_steps_total(), 0u);

  // The router's next placement leaves the lost worker out.
  remote_->set_placement(cluster_->place(2, {2}, everywhere({2})));
  const uint64_t rerouted = s.rerouted_slots_total();
  for (int i = 0; i < 3 && next >= 0; ++i) next = step({next});
  s = remote_->stats();
  EXPECT_EQ(s.rerouted_slots_total(), rerouted);
  EXPECT_EQ(s.placement_version(), 2u);
  EXPECT_EQ(s.failed_steps_total(), 0u);
}

TEST_F(RemoteExpertsTest, LostWorkerWithoutReplicaFailsTheStepUntilANewPlacement) {
  open("qwen2moe-tiny");
  ASSERT_TRUE(cluster_->start() && cluster_->start());
  remote_->set_placement(cluster_->place(1, {1, 2}, split()));
  const int32_t next = step(prompt_);
  ASSERT_GE(next, 0);

  cluster_->destroy(2);
  // The prompt again (a new sequence): its 8 tokens surely route some slots to odd experts.
  KVCache other = attention_->new_cache(64);
  std::vector<float> logits;
  const Clock::time_point begin = Clock::now();
  Status s = attention_->forward(other, prompt_, Logits::Last, logits);
  const double seconds = std::chrono::duration<double>(Clock::now() - begin).count();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message().find("expert worker 2 (expert-2)"), std::string::npos)
      << s.error().message();
  EXPECT_NE(s.error().message().find("no other live copy"), std::string::npos)
      << s.error().message();
  EXPECT_LT(seconds, 5.0);  // about the dispatch timeout, not UCX's keepalive
  EXPECT_EQ(other.length(), 0);

  // Until a new placement, the experts of the lost worker have no live copy: the step fails at
  // once when UCX has seen the endpoint fail, else after the last-resort try of the silent worker.
  const Clock::time_point again = Clock::now();
  s = attention_->forward(other, prompt_, Logits::Last, logits);
  ASSERT_FALSE(s.ok());
  const std::string& m = s.error().message();
  EXPECT_TRUE(m.find("has no live copy (placement version 1)") != std::string::npos ||
              m.find("expert worker 2 (expert-2)") != std::string::npos)
      << m;
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - again).count(), 5.0);
  EXPECT_EQ(remote_->stats().failed_steps_total(), 2u);

  // A new worker takes the odd experts; the model works again and matches the local model.
  ASSERT_TRUE(cluster_->start());
  remote_->set_placement(cluster_->place(2, {1, 3}, split(3)));
  int32_t token = step({next});
  for (int i = 0; i < 2 && token >= 0; ++i) token = step({token});
  EXPECT_GT(cluster_->worker(3)->stats().dispatches_total(), 0u);
}

// A data-plane server that answers nothing while `stalled` (a hung expert worker).
struct StalledServer {
  StalledServer() {
    Expected<std::unique_ptr<transport::DispatchServer>> s =
        transport::DispatchServer::start(data_plane(), [this](std::span<transport::Dispatch>) {
          while (stalled.load()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
        });
    EXPECT_TRUE(s.ok()) << s.error().message();
    if (s) server = std::move(*s);
  }
  ~StalledServer() {
    stalled = false;
    server.reset();
  }
  std::atomic<bool> stalled{true};
  std::unique_ptr<transport::DispatchServer> server;
};

TEST_F(RemoteExpertsTest, WorkerThatDoesNotAnswerIsReroutedAroundOrFailsTheStep) {
  open("qwen2moe-tiny");
  StalledServer stalled;
  ASSERT_TRUE(stalled.server);
  ASSERT_TRUE(cluster_->start());
  cluster_->add_foreign(2, stalled.server->address());
  // Every expert on worker 1 and on the stalled worker 2: its slots time out and go to worker 1.
  remote_->set_placement(cluster_->place(1, {1, 2}, everywhere({1, 2})));
  int32_t next = step(prompt_);
  proto::DispatchStats s = remote_->stats();
  EXPECT_GE(s.timeouts_total(), 1u);
  EXPECT_GT(s.rerouted_slots_total(), 0u);
  // Worker 2 is lost now: the next steps do not wait for it.
  const Clock::time_point begin = Clock::now();
  next = step({next});
  EXPECT_LT(Clock::now() - begin, kTimeout);
  EXPECT_EQ(remote_->stats().timeouts_total(), s.timeouts_total());

  // Odd experts only on the stalled worker (listed again: it gets another chance): the step fails
  // after the timeout, naming the worker and the timeout, and the cache is unchanged.
  remote_->set_placement(cluster_->place(2, {1, 2}, split()));
  std::vector<float> logits;
  const int64_t length = cache_.length();
  Status st = attention_->forward(cache_, std::vector<int32_t>{next}, Logits::Last, logits);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.error().message().find("expert worker 2 (expert-2)"), std::string::npos)
      << st.error().message();
  EXPECT_NE(st.error().message().find("did not answer within 500 ms"), std::string::npos)
      << st.error().message();
  EXPECT_EQ(cache_.length(), length);
  EXPECT_EQ(remote_->stats().failed_steps_total(), 1u);
}

// A worker that timed out once (a stall, a lost message) is not masked for good: after its
// back-off it is connected again and gets dispatches, without a new placement.
TEST_F(RemoteExpertsTest, LostWorkerIsTriedAgainAfterItsBackOff) {
  open("qwen2moe-tiny");
  StalledServer stalled;
  ASSERT_TRUE(stalled.server);
  ASSERT_TRUE(cluster_->start());
  cluster_->add_foreign(2, stalled.server->address());
  remote_->set_placement(cluster_->place(1, {1, 2}, everywhere({1, 2})));
  int32_t next = step(prompt_);
  EXPECT_GE(remote_->stats().timeouts_total(), 1u);
  const uint64_t seen = stalled.server->stats().dispatches;
  stalled.stalled = false;  // it recovers (and answers zeros: only the dispatches count here)
  next = step({next});      // within the back-off: not tried
  EXPECT_EQ(stalled.server->stats().dispatches, seen);
  EXPECT_EQ(remote_->stats().worker_retries_total(), 0u);
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  std::vector<float> logits;  // worker 2's zeros make these wrong: only the dispatches count
  Status st = attention_->forward(cache_, std::vector<int32_t>{next}, Logits::Last, logits);
  EXPECT_TRUE(st.ok()) << st.error().message();
  EXPECT_EQ(remote_->stats().worker_retries_total(), 1u);
  EXPECT_GT(stalled.server->stats().dispatches, seen);
  EXPECT_EQ(remote_->stats().placement_version(), 1u);
}

// Without another copy, a worker that was only silent (its endpoint did not fail) is still tried
// during its back-off: a lost message or a short stall fails one step, not every step.
TEST_F(RemoteExpertsTest, SilentWorkerWithoutReplicaIsTheLastResortDuringItsBackOff) {
  open("qwen2moe-tiny");
  StalledServer stalled;
  ASSERT_TRUE(stalled.server);
  ASSERT_TRUE(cluster_->start());
  cluster_->add_foreign(2, stalled.server->address());
  remote_->set_placement(cluster_->place(1, {1, 2}, split()));
  std::vector<float> logits;
  Status st = attention_->forward(cache_, prompt_, Logits::Last, logits);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.error().message().find("did not answer within 500 ms"), std::string::npos)
      << st.error().message();
  const uint64_t seen = stalled.server->stats().dispatches;
  stalled.stalled = false;  // it recovers (and answers zeros: only the outcome counts here)
  KVCache other = attention_->new_cache(64);
  st = attention_->forward(other, prompt_, Logits::Last, logits);
  EXPECT_TRUE(st.ok()) << st.error().message();
  EXPECT_GT(stalled.server->stats().dispatches, seen);
  EXPECT_EQ(remote_->stats().failed_steps_total(), 1u);
  EXPECT_EQ(remote_->stats().worker_retries_total(), 0u);
}

TEST_F(RemoteExpertsTest, CapacityWithoutReplicasDropsSlotsAndStillAnswers) {
  open("qwen2moe-tiny");
  ASSERT_TRUE(cluster_->start(0.5) && cluster_->start(0.5));
  remote_->set_placement(cluster_->place(1, {1, 2}, split()));
  // 8 tokens x 2 slots over 6 experts: some expert gets 3 or more slots, over ceil(0.5 * 16 / 6).
  std::vector<float> logits;
  Status s = attention_->forward(cache_, prompt_, Logits::All, logits);
  ASSERT_TRUE(s.ok()) << s.error().message();
  EXPECT_TRUE(std::all_of(logits.begin(), logits.end(), [](float v) { return std::isfinite(v); }));
  const proto::DispatchStats st = remote_->stats();
  EXPECT_GT(st.dropped_slots_total(), 0u);
  EXPECT_EQ(st.rerouted_slots_total(), 0u);
  EXPECT_EQ(st.failed_steps_total(), 0u);
  uint64_t drops = 0;
  for (const proto::ExpertCounters& c : st.drops()) drops += c.drops_total();
  EXPECT_EQ(drops, st.dropped_slots_total());
  uint64_t overflows = 0;
  for (int32_t id : {1, 2}) {
    const proto::ExpertWorkerStats ws = cluster_->worker(id)->stats();
    for (const proto::ExpertCounters& c : ws.experts()) overflows += c.overflows_total();
  }
  EXPECT_EQ(overflows, st.dropped_slots_total());
}

TEST_F(RemoteExpertsTest, CapacityWithReplicasReroutesFirst) {
  open("qwen2moe-tiny");
  // Capacity ceil(0.2 * 16 / 6) = 1 per expert and worker: an expert with 3 or more slots has 2 on
  // one worker, and the one rejected there goes to the other.
  ASSERT_TRUE(cluster_->start(0.2) && cluster_->start(0.2));
  remote_->set_placement(cluster_->place(1, {1, 2}, everywhere({1, 2})));
  std::vector<float> logits;
  Status s = attention_->forward(cache_, prompt_, Logits::All, logits);
  ASSERT_TRUE(s.ok()) << s.error().message();
  const proto::DispatchStats st = remote_->stats();
  EXPECT_GT(st.rerouted_slots_total(), 0u);
  EXPECT_EQ(st.failed_steps_total(), 0u);
}

// A bf16 wire: hidden states and partial sums rounded to bf16 on the way, so logits stay near
// the local model's, and bf16 views (bits handed over unconverted, as the role processes run)
// give exactly what f32 views of the same wire give.
TEST_F(RemoteExpertsTest, Bf16WireGivesTheSameLogitsWithAndWithoutBf16Views) {
  const transport::DataPlaneOptions saved = data_plane_options();
  std::vector<std::vector<float>> runs[2];
  std::vector<float> local;
  for (const bool views : {false, true}) {
    data_plane_options().dtype = transport::WireDtype::BF16;
    data_plane_options().bf16_views = views;
    open("qwen2moe-tiny");
    ASSERT_TRUE(cluster_->start() && cluster_->start());
    remote_->set_placement(cluster_->place(1, {1, 2}, split()));
    std::vector<int32_t> tokens = prompt_;
    for (int i = 0; i < 3; ++i) {
      std::vector<float> got;
      Status s = attention_->forward(cache_, tokens, Logits::All, got);
      ASSERT_TRUE(s.ok()) << s.error().message();
      if (!views) {  // the local model, fed the same tokens
        s = full_->forward(full_cache_, tokens, Logits::All, local);
        ASSERT_TRUE(s.ok()) << s.error().message();
        const float d = max_abs_diff(local, got);
        EXPECT_GT(d, 0.0f) << "a bf16 wire that rounds nothing";
        EXPECT_LT(d, 0.05f) << "step " << i;
      }
      runs[views].push_back(got);
      tokens = {argmax_last(got, vocab_)};
    }
    EXPECT_EQ(remote_->stats().failed_steps_total(), 0u);
    attention_->set_expert_backend(nullptr);
  }
  data_plane_options() = saved;
  ASSERT_EQ(runs[0].size(), runs[1].size());
  for (std::size_t i = 0; i < runs[0].size(); ++i)
    EXPECT_EQ(runs[0][i], runs[1][i]) << "step " << i;
}

// Rows laid out by the model where they are (RemoteExperts::start_device): host memory here, one
// buffer per slot, rewritten in place when big enough (as the GPU forward pass reuses its
// buffers) and grown otherwise (freeing the old one). Every row value is `value`.
struct SlotRows : DeviceRows {
  int64_t hidden = 0;
  float value = 0.0f;
  std::vector<int> slots;  // asked for, in order
  std::vector<std::vector<char>> buffers;
  Expected<const void*> assemble(int slot, const void* head, std::size_t head_bytes,
                                 std::span<const int32_t> tokens, bool bf16) override {
    EXPECT_FALSE(bf16);
    slots.push_back(slot);
    if (buffers.size() <= static_cast<std::size_t>(slot)) buffers.resize(slot + 1);
    std::vector<char>& b = buffers[static_cast<std::size_t>(slot)];
    const std::size_t bytes = head_bytes + tokens.size() * static_cast<std::size_t>(hidden) * 4;
    if (b.size() < bytes) b = std::vector<char>(bytes);
    std::memcpy(b.data(), head, head_bytes);
    std::fill_n(reinterpret_cast<float*>(b.data() + head_bytes),
                tokens.size() * static_cast<std::size_t>(hidden), value);
    return static_cast<const void*>(b.data());
  }
  bool cuda_memory() const override { return false; }
};

// A message the data plane may still be reading is not rewritten: a worker that stalls leaves a
// large (rendezvous) message in flight after its round timed out, and the next message to it goes
// to another buffer; each arrives whole once the worker reads again.
TEST(RemoteExpertsDeviceRows, AMessageInFlightIsNotRewritten) {
  ModelConfig c;
  c.hidden_size = 2048;
  c.num_layers = 3;
  c.layer_is_moe = {true, true, true};
  c.num_experts = 2;
  c.top_k = 1;
  std::atomic<bool> first{true};
  std::atomic<int> seen[3] = {0, 0, 0};
  std::atomic<int64_t> bad[3] = {0, 0, 0};
  auto server =
      transport::DispatchServer::start(data_plane(), [&](std::span<transport::Dispatch> batch) {
        for (transport::Dispatch& d : batch) {
          // The first message stalls the worker: it reads nothing for 1.5 s.
          if (first.exchange(false)) std::this_thread::sleep_for(std::chrono::milliseconds(1500));
          const float want = static_cast<float>(d.layer + 1);
          for (int64_t i = 0; i < d.n_tokens * d.hidden; ++i) bad[d.layer] += d.x[i] != want;
          ++seen[d.layer];
        }
      });
  ASSERT_TRUE(server) << server.error().message();
  RemoteExpertsOptions o;
  o.data_plane = data_plane();
  o.timeout = std::chrono::milliseconds(300);
  auto remote = RemoteExperts::create(c, o);
  ASSERT_TRUE(remote) << remote.error().message();
  ASSERT_TRUE((*remote)->takes_device_rows(false));
  proto::Placement p;
  p.set_version(1);
  proto::ExpertWorkerAddress* a = p.add_workers();
  a->set_worker_id(1);
  a->set_name("expert-1");
  a->set_data_address((*server)->address());
  for (int32_t l = 0; l < 3; ++l) {
    proto::LayerPlacement* lp = p.add_layers();
    lp->set_layer(l);
    for (int e = 0; e < 2; ++e) lp->add_experts()->add_workers(1);
  }
  (*remote)->set_placement(p);

  SlotRows rows;
  rows.hidden = c.hidden_size;
  // Layer l's rows are all l + 1. One token stalls the worker; then 1024 tokens (8 MiB:
  // rendezvous, which waits for the worker) twice. Each round times out.
  auto round = [&](int64_t layer, int64_t n) {
    rows.value = static_cast<float>(layer + 1);
    const std::vector<int32_t> ids(static_cast<std::size_t>(n), 0);
    const std::vector<float> w(static_cast<std::size_t>(n), 1.0f);
    std::vector<float> out(static_cast<std::size_t>(n * c.hidden_size));
    Status s = (*remote)->start_device(layer, rows, n, ids.data(), w.data(), 1, out.data());
    return s ? (*remote)->finish() : s;
  };
  EXPECT_FALSE(round(0, 1));
  EXPECT_FALSE(round(1, 1024));
  EXPECT_FALSE(round(2, 1024));
  // The first message had been read: its buffer took the second; the second was still in
  // flight: the third took another buffer.
  EXPECT_EQ(rows.slots, (std::vector<int>{0, 0, 1}));

  // Once the worker reads again, both large messages arrive as they were sent (small rounds keep
  // the client's sends moving).
  const auto deadline = Clock::now() + std::chrono::seconds(15);
  while ((seen[1] == 0 || seen[2] == 0) && Clock::now() < deadline) (void)round(0, 1);
  EXPECT_EQ(seen[1].load(), 1);
  EXPECT_EQ(seen[2].load(), 1);
  EXPECT_EQ(bad[1].load(), 0);
  EXPECT_EQ(bad[2].load(), 0);
  EXPECT_EQ(bad[0].load(), 0);
  EXPECT_GT((*remote)->stats().device_dispatches_total(), 3u);
}

}  // namespace
}  // namespace moemesh
