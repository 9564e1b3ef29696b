// ExpertWorker: an expert shard served over the data plane. Driven by DispatchClients in the same
// process (UCX over TCP loopback); results are checked against a local ExpertShard. The batch
// algorithm (several senders in one batch, capacity) is also checked on hand-made batches.
#include "expert_worker/expert_worker.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/expert_shard.h"
#include "expert_worker/detail/batch_compute.h"

namespace moemesh {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

constexpr float kTolerance = 1e-5f;

fs::path fixture(const std::string& name) {
  return fs::path(MOEMESH_SOURCE_DIR) / "tests/fixtures/models" / name;
}

transport::DataPlaneOptions data_plane() {
  transport::DataPlaneOptions o;
  o.transports = "tcp";
  return o;
}

proto::Assignment assignment(const std::vector<ExpertRef>& refs, uint64_t version = 1) {
  proto::Assignment a;
  a.set_version(version);
  for (const ExpertRef& r : refs) {
    a.mutable_experts()->add_layer(r.layer);
    a.mutable_experts()->add_expert(r.expert);
  }
  return a;
}

std::vector<float> random_rows(int64_t rows, int64_t hidden, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(static_cast<std::size_t>(rows * hidden));
  for (float& f : v) f = u(rng);
  return v;
}

// One dispatch as a client sends it: rows of x, [n, slots] expert ids and gate weights.
struct Batch {
  int32_t layer = 0;
  int32_t slots = 2;
  std::vector<float> x;
  std::vector<int32_t> experts;
  std::vector<float> weights;
  int64_t n() const { return static_cast<int64_t>(experts.size()) / slots; }
};

// sum over slots of w * E(x) per token, from a local shard, for the slots not `rejected`.
std::vector<float> reference(ExpertShard& shard, const Batch& b,
                             const std::vector<uint8_t>& rejected = {}) {
  const int64_t H = shard.config().hidden_size;
  std::vector<float> out(static_cast<std::size_t>(b.n() * H), 0.0f), y(H);
  for (int64_t t = 0; t < b.n(); ++t)
    for (int32_t j = 0; j < b.slots; ++j) {
      const int64_t i = t * b.slots + j;
      if (b.experts[i] < 0 || (!rejected.empty() && rejected[i])) continue;
      Status s = shard.run(b.layer, b.experts[i], b.x.data() + t * H, 1, y.data());
      EXPECT_TRUE(s.ok()) << s.error().message();
      for (int64_t d = 0; d < H; ++d) out[t * H + d] += b.weights[i] * y[d];
    }
  return out;
}

struct Answer {
  std::vector<float> partial;
  std::vector<uint8_t> rejected;
  std::string error;
  bool replied = false;
};

class ExpertWorkerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fixture("qwen2moe-tiny");  // layers 0 and 2 are MoE, 6 experts, top-2, hidden 48
    Expected<std::unique_ptr<ExpertShard>> all =
        ExpertShard::load(dir_, all_experts(), {.threads = 1});
    ASSERT_TRUE(all.ok()) << all.error().message();
    local_ = std::move(*all);
    hidden_ = local_->config().hidden_size;
  }

  std::vector<ExpertRef> all_experts() const {
    std::vector<ExpertRef> v;
    for (int32_t l : {0, 2})
      for (int32_t e = 0; e < 6; ++e) v.push_back({l, e});
    return v;
  }

  std::unique_ptr<ExpertWorker> start_worker(double capacity_factor = 0, double window = 60) {
    ExpertWorkerOptions o;
    o.threads = 1;
    o.data_plane = data_plane();
    o.capacity_factor = capacity_factor;
    o.window_seconds = window;
    Expected<std::unique_ptr<ExpertWorker>> w = ExpertWorker::start(dir_, o);
    EXPECT_TRUE(w.ok()) << w.error().message();
    return w.ok() ? std::move(*w) : nullptr;
  }

  std::unique_ptr<transport::DispatchClient> client(const ExpertWorker& worker, int& peer) {
    Expected<std::unique_ptr<transport::DispatchClient>> c =
        transport::DispatchClient::create(data_plane());
    EXPECT_TRUE(c.ok()) << c.error().message();
    if (!c) return nullptr;
    Expected<int> p = (*c)->connect(worker.data_address());
    EXPECT_TRUE(p.ok()) << p.error().message();
    peer = p.ok() ? *p : -1;
    return std::move(*c);
  }

  // Sends `b` (all its rows) and waits for the reply.
  Answer roundtrip(transport::DispatchClient& c, int peer, const Batch& b,
                   int64_t step_tokens = 0) {
    std::vector<int32_t> tokens(static_cast<std::size_t>(b.n()));
    for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i);
    Status s = c.send(peer, 1, ++step_, b.layer, 0, step_tokens > 0 ? step_tokens : b.n(),
                      b.x.data(), hidden_, tokens, b.experts.data(), b.weights.data(), b.slots);
    EXPECT_TRUE(s.ok()) << s.error().message();
    Answer a;
    const std::vector<int> late =
        c.wait(Clock::now() + std::chrono::seconds(10), [&](const transport::Reply& r) {
          a.replied = true;
          a.error = std::string(r.error);
          if (r.error.empty()) {
            a.partial.assign(r.partial, r.partial + r.n_tokens * r.hidden);
            a.rejected.assign(r.rejected, r.rejected + r.n_tokens * r.slots);
          }
        });
    EXPECT_TRUE(late.empty());
    return a;
  }

  Batch make_batch(int32_t layer, const std::vector<int32_t>& experts, uint32_t seed) {
    Batch b;
    b.layer = layer;
    b.experts = experts;
    b.x = random_rows(b.n(), hidden_, seed);
    b.weights = random_rows(b.n(), b.slots, seed + 1);
    for (float& w : b.weights) w = std::abs(w);
    return b;
  }

  static const proto::ExpertCounters* counters(const proto::ExpertWorkerStats& s, int32_t layer,
                                               int32_t expert) {
    for (const proto::ExpertCounters& c : s.experts())
      if (c.layer() == layer && c.expert() == expert) return &c;
    return nullptr;
  }

  fs::path dir_;
  std::unique_ptr<ExpertShard> local_;
  int64_t hidden_ = 0;
  uint64_t step_ = 0;
};

float max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  float d = 0;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

TEST_F(ExpertWorkerTest, RepliesAreGateWeightedExpertOutputs) {
  auto worker = start_worker();
  ASSERT_TRUE(worker);
  EXPECT_EQ(worker->config().num_experts, 6);
  ASSERT_TRUE(worker->assign(assignment(all_experts())).ok());
  int peer = -1;
  auto c = client(*worker, peer);
  ASSERT_TRUE(c);
  // Tokens with two experts each, one with only one slot for this worker (-1), both layers.
  for (int32_t layer : {0, 2}) {
    Batch b = make_batch(layer, {0, 3, 5, 1, 2, -1, 4, 0, 3, 5}, 7 + layer);
    Answer a = roundtrip(*c, peer, b);
    ASSERT_TRUE(a.replied);
    ASSERT_EQ(a.error, "");
    EXPECT_LE(max_diff(a.partial, reference(*local_, b)), kTolerance);
    EXPECT_EQ(std::count(a.rejected.begin(), a.rejected.end(), 1), 0);
  }
  const proto::ExpertWorkerStats s = worker->stats();
  EXPECT_EQ(s.dispatches_total(), 2u);
  EXPECT_EQ(s.replies_total(), 2u);
  EXPECT_EQ(s.errors_total(), 0u);
  EXPECT_GT(s.bytes_in(), 0u);
  EXPECT_GT(s.bytes_out(), 0u);
  EXPECT_GT(s.weight_bytes(), 0);
  EXPECT_EQ(s.experts_size(), 12);  // every assigned expert is listed
  ASSERT_NE(counters(s, 0, 0), nullptr);
  EXPECT_EQ(counters(s, 0, 0)->tokens_total(), 2u);
  EXPECT_EQ(counters(s, 0, 1)->tokens_total(), 1u);
  EXPECT_EQ(counters(s, 0, 3)->tokens_total(), 2u);
  EXPECT_EQ(counters(s, 2, 5)->tokens_total(), 2u);
  EXPECT_EQ(counters(s, 2, 4)->tokens_total(), 1u);
}

TEST_F(ExpertWorkerTest, TwoClientsAreServedAndCounted) {
  auto worker = start_worker();
  ASSERT_TRUE(worker);
  ASSERT_TRUE(worker->assign(assignment({{0, 2}, {0, 4}})).ok());
  int p1 = -1, p2 = -1;
  auto c1 = client(*worker, p1);
  auto c2 = client(*worker, p2);
  ASSERT_TRUE(c1 && c2);
  Batch b1 = make_batch(0, {2, 4, 4, -1, 2, -1}, 11);
  Batch b2 = make_batch(0, {4, 2, -1, 4}, 12);
  Answer a1 = roundtrip(*c1, p1, b1);
  Answer a2 = roundtrip(*c2, p2, b2);
  ASSERT_EQ(a1.error, "");
  ASSERT_EQ(a2.error, "");
  EXPECT_LE(max_diff(a1.partial, reference(*local_, b1)), kTolerance);
  EXPECT_LE(max_diff(a2.partial, reference(*local_, b2)), kTolerance);
  const proto::ExpertWorkerStats s = worker->stats();
  EXPECT_EQ(counters(s, 0, 2)->tokens_total(), 3u);
  EXPECT_EQ(counters(s, 0, 4)->tokens_total(), 4u);
  EXPECT_GE(counters(s, 0, 4)->queue_seconds(), 0.0);
  EXPECT_GT(counters(s, 0, 4)->compute_seconds(), 0.0);
}

TEST_F(ExpertWorkerTest, UnassignedExpertGetsAnErrorNamingIt) {
  auto worker = start_worker();
  ASSERT_TRUE(worker);
  ASSERT_TRUE(worker->assign(assignment({{0, 0}, {0, 2}})).ok());
  int peer = -1;
  auto c = client(*worker, peer);
  ASSERT_TRUE(c);
  Answer a = roundtrip(*c, peer, make_batch(0, {0, 2, 2, 5}, 3));
  ASSERT_TRUE(a.replied);
  EXPECT_NE(a.error.find("expert 5 of layer 0 is not held"), std::string::npos) << a.error;
  // A dense layer is refused by name too; the worker keeps serving what it holds.
  a = roundtrip(*c, peer, make_batch(1, {0, 2}, 4));
  EXPECT_NE(a.error.find("layer 1 has no routed experts"), std::string::npos) << a.error;
  // Assigning more keeps what is held; the new expert is served.
  ASSERT_TRUE(worker->assign(assignment({{0, 5}}, 2)).ok());
  Batch b = make_batch(0, {0, 2, 2, 5}, 3);
  a = roundtrip(*c, peer, b);
  ASSERT_EQ(a.error, "");
  EXPECT_LE(max_diff(a.partial, reference(*local_, b)), kTolerance);
  EXPECT_EQ(worker->stats().errors_total(), 2u);
}

TEST_F(ExpertWorkerTest, BadAssignmentsBindNothing) {
  auto worker = start_worker();
  ASSERT_TRUE(worker);
  Status s = worker->assign(assignment({{0, 1}, {1, 0}}));  // layer 1 is dense
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message().find("layer 1"), std::string::npos) << s.error().message();
  proto::Assignment a = assignment({{0, 1}});
  a.mutable_experts()->add_layer(2);  // layers and experts of different lengths
  s = worker->assign(a);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message().find("pair up"), std::string::npos) << s.error().message();
  EXPECT_EQ(worker->stats().weight_bytes(), 0);
}

TEST_F(ExpertWorkerTest, CapacityFactorRejectsInArrivalOrderAndCountsOverflows) {
  auto worker = start_worker(/*capacity_factor=*/1.0);
  ASSERT_TRUE(worker);
  ASSERT_TRUE(worker->assign(assignment(all_experts())).ok());
  int peer = -1;
  auto c = client(*worker, peer);
  ASSERT_TRUE(c);
  // 12 tokens, every one on experts 1 and 4: capacity = ceil(1.0 * 12 * 2 / 6) = 4 per expert.
  std::vector<int32_t> ids;
  for (int t = 0; t < 12; ++t) ids.insert(ids.end(), {1, 4});
  Batch b = make_batch(2, ids, 21);
  Answer a = roundtrip(*c, peer, b);
  ASSERT_EQ(a.error, "");
  std::vector<uint8_t> expected(ids.size(), 0);
  for (std::size_t i = 8; i < ids.size(); ++i) expected[i] = 1;  // tokens 4.. on both slots
  EXPECT_EQ(a.rejected, expected);
  EXPECT_LE(max_diff(a.partial, reference(*local_, b, expected)), kTolerance);
  proto::ExpertWorkerStats s = worker->stats();
  EXPECT_EQ(counters(s, 2, 1)->overflows_total(), 8u);
  EXPECT_EQ(counters(s, 2, 4)->overflows_total(), 8u);
  EXPECT_EQ(counters(s, 2, 1)->tokens_total(), 4u);
  EXPECT_DOUBLE_EQ(s.capacity_factor(), 1.0);

  // A larger step (step_tokens counts the sender's whole step) raises the capacity: 24 * 2 / 6.
  a = roundtrip(*c, peer, b, /*step_tokens=*/24);
  EXPECT_EQ(std::count(a.rejected.begin(), a.rejected.end(), 1), 8 * 2 - 4 * 2);
  worker->set_capacity_factor(0);  // no limit
  a = roundtrip(*c, peer, b);
  EXPECT_EQ(std::count(a.rejected.begin(), a.rejected.end(), 1), 0);
  EXPECT_LE(max_diff(a.partial, reference(*local_, b)), kTolerance);
  s = worker->stats();
  EXPECT_EQ(counters(s, 2, 1)->overflows_total(), 8u + 4u);
  EXPECT_EQ(counters(s, 2, 1)->tokens_total(), 4u + 8u + 12u);
}

TEST_F(ExpertWorkerTest, WindowForgetsOldTokens) {
  auto worker = start_worker(0, /*window=*/0.3);
  ASSERT_TRUE(worker);
  ASSERT_TRUE(worker->assign(assignment({{0, 3}})).ok());
  int peer = -1;
  auto c = client(*worker, peer);
  ASSERT_TRUE(c);
  ASSERT_EQ(roundtrip(*c, peer, make_batch(0, {3, -1, -1, 3, 3, -1}, 5)).error, "");
  proto::ExpertWorkerStats s = worker->stats();
  EXPECT_DOUBLE_EQ(s.window_seconds(), 0.3);
  EXPECT_EQ(counters(s, 0, 3)->tokens_window(), 3u);
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  ASSERT_EQ(roundtrip(*c, peer, make_batch(0, {3, -1}, 6)).error, "");
  s = worker->stats();
  EXPECT_EQ(counters(s, 0, 3)->tokens_window(), 1u);
  EXPECT_EQ(counters(s, 0, 3)->tokens_total(), 4u);
  EXPECT_GT(s.uptime_seconds(), 0.3);
  EXPECT_GT(s.busy_seconds(), 0.0);
}

TEST_F(ExpertWorkerTest, StartRefusesBadOptionsAndDirectories) {
  ExpertWorkerOptions o;
  o.data_plane = data_plane();
  o.window_seconds = 0;
  Expected<std::unique_ptr<ExpertWorker>> w = ExpertWorker::start(dir_, o);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.error().message().find("window_seconds"), std::string::npos);
  o.window_seconds = 60;
  w = ExpertWorker::start(dir_ / "missing", o);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.error().message().find("missing"), std::string::npos) << w.error().message();
}

// The batch algorithm on hand-made dispatches: two senders in ONE batch share one run per expert,
// and capacity counts over both in arrival order.
struct FakeDispatch {
  explicit FakeDispatch(Batch batch) : b(std::move(batch)) {}
  Batch b;
  int64_t step_tokens = 0;
  std::vector<float> partial;
  std::vector<uint8_t> rejected;
  std::string error;
  transport::Dispatch view(int64_t hidden) {
    partial.assign(static_cast<std::size_t>(b.n() * hidden), 0.0f);
    rejected.assign(b.experts.size(), 0);
    transport::Dispatch d;
    d.layer = b.layer;
    d.n_tokens = b.n();
    d.slots = b.slots;
    d.step_tokens = step_tokens > 0 ? step_tokens : b.n();
    d.hidden = hidden;
    d.x = b.x.data();
    d.experts = b.experts.data();
    d.weights = b.weights.data();
    d.partial = partial.data();
    d.rejected = rejected.data();
    d.error = &error;
    d.received = Clock::now();
    return d;
  }
  // As a bf16 wire's message reaches a worker with bf16 views: x as bf16 bits (b.x rounded to
  // bf16 first, so that b.x holds the values sent), partial sums as bf16.
  std::vector<uint16_t> x16, partial16;
  transport::Dispatch view_bf16(int64_t hidden) {
    x16.resize(b.x.size());
    transport::f32_to_bf16(b.x.data(), x16.data(), b.x.size());
    transport::bf16_to_f32(x16.data(), b.x.data(), b.x.size());
    transport::Dispatch d = view(hidden);
    partial16.assign(partial.size(), 0xFFFF);
    d.x = nullptr;
    d.x_bf16 = x16.data();
    d.partial = nullptr;
    d.partial_bf16 = partial16.data();
    return d;
  }
};

TEST_F(ExpertWorkerTest, OneBatchRunsEachExpertOnceOverAllSenders) {
  detail::BatchCompute compute(local_->config());
  FakeDispatch f1{make_batch(0, {1, 3, 3, -1, 1, 3}, 31)};
  FakeDispatch f2{make_batch(2, {0, 1}, 32)};
  FakeDispatch f3{make_batch(0, {3, 1, -1, 1}, 33)};
  std::vector<transport::Dispatch> batch = {f1.view(hidden_), f2.view(hidden_), f3.view(hidden_)};
  std::vector<detail::ExpertRun> runs;
  compute.run(batch, *local_, 0, runs);
  EXPECT_EQ(f1.error + f2.error + f3.error, "");
  // One run per (layer, expert) named, layers ascending, experts ascending.
  ASSERT_EQ(runs.size(), 4u);
  EXPECT_EQ(runs[0].ref, (ExpertRef{0, 1}));
  EXPECT_EQ(runs[0].tokens, 4u);  // 2 from f1, 2 from f3
  EXPECT_EQ(runs[1].ref, (ExpertRef{0, 3}));
  EXPECT_EQ(runs[1].tokens, 4u);
  EXPECT_EQ(runs[2].ref, (ExpertRef{2, 0}));
  EXPECT_EQ(runs[3].ref, (ExpertRef{2, 1}));
  EXPECT_LE(max_diff(f1.partial, reference(*local_, f1.b)), kTolerance);
  EXPECT_LE(max_diff(f2.partial, reference(*local_, f2.b)), kTolerance);
  EXPECT_LE(max_diff(f3.partial, reference(*local_, f3.b)), kTolerance);

  // Capacity over the batch: layer 0 has step_tokens 3 + 2 = 5 tokens * 2 slots; cf 1 gives
  // ceil(10 / 6) = 2 per expert. In arrival order expert 1 is named by f1 t0, f1 t2, f3 t0, f3 t1
  // (f3's two are rejected) and expert 3 by f1 t0, f1 t1, f1 t2, f3 t0 (the last two rejected).
  batch = {f1.view(hidden_), f3.view(hidden_)};
  runs.clear();
  compute.run(batch, *local_, 1.0, runs);
  EXPECT_EQ(f1.rejected, (std::vector<uint8_t>{0, 0, 0, 0, 0, 1}));
  EXPECT_EQ(f3.rejected, (std::vector<uint8_t>{1, 1, 0, 1}));
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_EQ(runs[0].overflows, 2u);
  EXPECT_EQ(runs[0].tokens, 2u);
  EXPECT_EQ(runs[1].overflows, 2u);
  EXPECT_LE(max_diff(f1.partial, reference(*local_, f1.b, f1.rejected)), kTolerance);
  EXPECT_LE(max_diff(f3.partial, std::vector<float>(f3.partial.size(), 0.0f)), 0.0f);
}

// bf16 views of a bf16 wire (as `moemesh expert` runs): a layer whose rows all arrived as bf16 is
// gathered as bf16 and computed by ExpertShard::run_layer_bf16 from those bits, and each
// dispatch's f32 sums are rounded to bf16 once: the same bits as the same rows sent as f32 and
// their f32 sums rounded. A layer that mixes a bf16 dispatch with an f32 one takes the f32 path,
// with the same results.
TEST_F(ExpertWorkerTest, Bf16RowsAreComputedAsTheyArrive) {
  detail::BatchCompute compute(local_->config());
  FakeDispatch b1{make_batch(0, {1, 3, 3, -1, 1, 3}, 41)}, b2{make_batch(2, {0, 1}, 42)};
  FakeDispatch b3{make_batch(0, {3, 1, -1, 1}, 43)};
  std::vector<transport::Dispatch> batch = {b1.view_bf16(hidden_), b2.view_bf16(hidden_),
                                            b3.view_bf16(hidden_)};
  std::vector<detail::ExpertRun> runs;
  compute.run(batch, *local_, 0, runs);
  EXPECT_EQ(b1.error + b2.error + b3.error, "");

  // The same rows as f32 (b.x holds the bf16 values now), their sums rounded to bf16.
  FakeDispatch f1{b1.b}, f2{b2.b}, f3{b3.b};
  batch = {f1.view(hidden_), f2.view(hidden_), f3.view(hidden_)};
  compute.run(batch, *local_, 0, runs);
  for (auto [bf, f] : {std::pair{&b1, &f1}, {&b2, &f2}, {&b3, &f3}}) {
    std::vector<uint16_t> want(f->partial.size());
    transport::f32_to_bf16(f->partial.data(), want.data(), want.size());
    EXPECT_EQ(bf->partial16, want);
    EXPECT_LE(max_diff(f->partial, reference(*local_, f->b)), kTolerance);
  }

  // Layer 0 from a bf16 dispatch and an f32 one in one batch.
  FakeDispatch m1{b1.b}, m3{b3.b};
  batch = {m1.view_bf16(hidden_), m3.view(hidden_)};
  compute.run(batch, *local_, 0, runs);
  EXPECT_EQ(m1.error + m3.error, "");
  EXPECT_EQ(m1.partial16, b1.partial16);
  EXPECT_EQ(m3.partial, f3.partial);
}

}  // namespace
}  // namespace moemesh
