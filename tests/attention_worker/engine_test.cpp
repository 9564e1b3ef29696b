// The engine on a stored fixture model: many requests at once, cancellation, n > 1, errors, and
// that every sequence ends with exactly one final delta.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "attention_worker/engine.h"

namespace moemesh {
namespace {

const char* kModel = MOEMESH_SOURCE_DIR "/tests/fixtures/models/olmoe-tiny";

// Collects deltas per (request, sequence) from the engine thread.
class Collector {
 public:
  // With a gate, the engine thread blocks in the sink after `gate` tokens of sequence 0 until
  // release() is called: the test then knows exactly where the engine stands.
  explicit Collector(std::size_t gate = 0) : gate_(gate) {}
  void release() {
    std::lock_guard<std::mutex> lock(mu_);
    released_ = true;
    cv_.notify_all();
  }
  Engine::Sink sink() {
    return [this](proto::SequenceDelta d) {
      std::unique_lock<std::mutex> lock(mu_);
      auto& seq = seqs_[{d.request_id(), d.index()}];
      for (const auto& t : d.tokens()) seq.tokens.push_back(t.id());
      if (!d.finish_reason().empty()) {
        ++seq.finals;
        seq.reason = d.finish_reason();
        seq.error = d.error();
      }
      cv_.notify_all();
      if (gate_ > 0 && d.index() == 0 && seq.tokens.size() == gate_)
        cv_.wait(lock, [&] { return released_; });
    };
  }
  struct Seq {
    std::vector<int32_t> tokens;
    int finals = 0;
    std::string reason;
    std::string error;
  };
  // Waits until `n` sequences have finished.
  bool wait_finished(std::size_t n, std::chrono::seconds timeout = std::chrono::seconds(60)) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] {
      std::size_t done = 0;
      for (auto& [k, s] : seqs_) done += s.finals > 0 ? 1 : 0;
      return done >= n;
    });
  }
  bool wait_tokens(const std::string& id, std::size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(60), [&] {
      return seqs_[{id, 0}].tokens.size() >= n;
    });
  }
  Seq get(const std::string& id, int index = 0) {
    std::lock_guard<std::mutex> lock(mu_);
    return seqs_[{id, index}];
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::pair<std::string, int>, Seq> seqs_;
  std::size_t gate_ = 0;
  bool released_ = false;
};

std::string name(const char* prefix, int i) {
  std::string s = prefix;
  s += std::to_string(i);
  return s;
}

std::unique_ptr<Engine> start_engine(EngineOptions options = {}) {
  Expected<std::unique_ptr<Model>> m = Model::load(kModel);
  EXPECT_TRUE(m.ok());
  Expected<std::unique_ptr<Engine>> e = Engine::start(std::move(*m), options);
  EXPECT_TRUE(e.ok()) << (e.ok() ? "" : e.error().message());
  return e.ok() ? std::move(*e) : nullptr;
}

proto::GenerateRequest request(const std::string& id, std::vector<int32_t> prompt,
                               int64_t max_tokens, float temperature = 0.0f, int n = 1) {
  proto::GenerateRequest r;
  r.set_request_id(id);
  for (int32_t t : prompt) r.add_prompt_ids(t);
  SamplingParams p;
  p.temperature = temperature;
  p.max_tokens = max_tokens;
  p.ignore_eos = true;
  if (temperature > 0) p.seed = 42;
  *r.mutable_sampling() = to_proto(p);
  r.set_n(n);
  return r;
}

std::vector<int32_t> reference_output() {
  std::ifstream in(std::string(kModel) + "/reference.json");
  return nlohmann::json::parse(in).at("output_ids").get<std::vector<int32_t>>();
}
std::vector<int32_t> reference_prompt() {
  std::ifstream in(std::string(kModel) + "/reference.json");
  return nlohmann::json::parse(in).at("prompt_ids").get<std::vector<int32_t>>();
}

TEST(Engine, ConcurrentRequestsEachMatchTheReference) {
  Collector c;  // declared first: it must outlive the engine, which calls it until it stops
  auto engine = start_engine();
  for (int i = 0; i < 6; ++i)
    ASSERT_TRUE(engine->submit(request(name("r", i), reference_prompt(), 16), c.sink()).ok());
  ASSERT_TRUE(c.wait_finished(6));
  for (int i = 0; i < 6; ++i) {
    auto s = c.get(name("r", i));
    EXPECT_EQ(s.tokens, reference_output());
    EXPECT_EQ(s.finals, 1);
    EXPECT_EQ(s.reason, "length");
  }
  const proto::EngineStats st = engine->stats();
  EXPECT_EQ(st.generation_tokens_total(), 6u * 16u);
  EXPECT_EQ(st.prompt_tokens_total(), 6u * reference_prompt().size());
}

TEST(Engine, CancelStopsAtOnceAndFreesTheCache) {
  Collector c(/*gate=*/3);
  auto engine = start_engine();
  ASSERT_TRUE(engine->submit(request("long", {1, 2, 3}, 200), c.sink()).ok());
  ASSERT_TRUE(c.wait_tokens("long", 3));
  engine->cancel("long");  // queued while the engine waits in the sink after token 3
  c.release();
  ASSERT_TRUE(c.wait_finished(1));
  auto s = c.get("long");
  EXPECT_EQ(s.reason, "abort");
  EXPECT_EQ(s.finals, 1);
  EXPECT_EQ(s.tokens.size(), 3u);  // not one token after the cancel
  // The loop publishes its state after each step.
  for (int i = 0; i < 100 && engine->stats().running() > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(engine->stats().running(), 0);
  EXPECT_EQ(engine->stats().kv_cache_usage(), 0.0);
  EXPECT_EQ(engine->stats().requests_aborted_total(), 1u);
}

TEST(Engine, SeveralSequencesPerRequest) {
  Collector c;  // declared first: they must outlive the engine, which calls them until it stops
  Collector c2;
  auto engine = start_engine();
  ASSERT_TRUE(engine->submit(request("n3", {1, 5, 9}, 10, 1.0f, 3), c.sink()).ok());
  ASSERT_TRUE(c.wait_finished(3));
  std::set<std::vector<int32_t>> distinct;
  for (int i = 0; i < 3; ++i) {
    auto s = c.get("n3", i);
    EXPECT_EQ(s.tokens.size(), 10u);
    distinct.insert(s.tokens);
  }
  EXPECT_GT(distinct.size(), 1u);  // seeds 42, 43, 44
  // Same request again: the same tokens (seeded).
  Collector& again = c2;
  ASSERT_TRUE(engine->submit(request("n3", {1, 5, 9}, 10, 1.0f, 3), again.sink()).ok());
  ASSERT_TRUE(again.wait_finished(3));
  for (int i = 0; i < 3; ++i) EXPECT_EQ(again.get("n3", i).tokens, c.get("n3", i).tokens);
}

TEST(Engine, CancellingOneSequenceKeepsTheOthers) {
  Collector c(/*gate=*/1);  // the engine waits after the first token of sequence 0
  auto engine = start_engine();
  ASSERT_TRUE(engine->submit(request("pair", {1, 2}, 60, 0.0f, 2), c.sink()).ok());
  ASSERT_TRUE(c.wait_tokens("pair", 1));
  engine->cancel("pair", 1);
  c.release();
  ASSERT_TRUE(c.wait_finished(2));
  EXPECT_EQ(c.get("pair", 1).reason, "abort");
  EXPECT_EQ(c.get("pair", 0).reason, "length");
  EXPECT_EQ(c.get("pair", 0).tokens.size(), 60u);
}

TEST(Engine, InvalidRequestsAreRefusedUpFront) {
  Collector c;  // declared first: it must outlive the engine, which calls it until it stops
  auto engine = start_engine();
  Status s = engine->submit(request("big", {1, 2, 3}, 1 << 20), c.sink());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message().find("maximum context length is"), std::string::npos);
  s = engine->submit(request("oob", {1, 99999}, 4), c.sink());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message().find("99999"), std::string::npos);
  s = engine->submit(request("empty", {}, 4), c.sink());
  EXPECT_FALSE(s.ok());
  proto::GenerateRequest bad = request("temp", {1}, 4);
  bad.mutable_sampling()->set_temperature(-1);
  EXPECT_FALSE(engine->submit(bad, c.sink()).ok());
  EXPECT_EQ(engine->stats().waiting(), 0);
}

TEST(Engine, BadOptionsAreRefusedAtStart) {
  auto start_with = [](EngineOptions o) {
    Expected<std::unique_ptr<Model>> m = Model::load(kModel);
    EXPECT_TRUE(m.ok());
    return Engine::start(std::move(*m), o);
  };
  EngineOptions o;
  o.kv_cache_dtype = "int4";
  auto e = start_with(o);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.error().message().find("'int4' is not one of auto, bf16, fp8, f32"),
            std::string::npos)
      << e.error().message();
  o = EngineOptions{};
  o.block_size = 0;
  e = start_with(o);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.error().message().find("block size"), std::string::npos) << e.error().message();
  o = EngineOptions{};
  o.max_num_batched_tokens = 0;
  e = start_with(o);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.error().message().find("max_num_batched_tokens"), std::string::npos);
}

TEST(Engine, RequestsBeyondTheCacheWaitTheirTurn) {
  EngineOptions o;
  o.kv_cache_tokens = 40;  // room for two sequences of 20 at a time
  Collector c;
  auto engine = start_engine(o);
  for (int i = 0; i < 5; ++i)
    ASSERT_TRUE(engine->submit(request(name("q", i), {1, 2, 3, 4}, 16), c.sink()).ok());
  ASSERT_TRUE(c.wait_finished(5));
  for (int i = 0; i < 5; ++i) EXPECT_EQ(c.get(name("q", i)).tokens.size(), 16u);
  // A request larger than the whole cache is refused, not queued forever.
  EXPECT_FALSE(engine->submit(request("huge", {1, 2, 3}, 60), c.sink()).ok());
}

// Outputs of requests run one at a time on an engine with room to spare: the reference for the
// scheduler tests below.
std::map<std::string, std::vector<int32_t>> alone(const std::vector<proto::GenerateRequest>& reqs) {
  std::map<std::string, std::vector<int32_t>> out;
  Collector c;
  EngineOptions o;
  o.prefix_caching = false;
  auto engine = start_engine(o);
  for (std::size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_TRUE(engine->submit(reqs[i], c.sink()).ok());
    EXPECT_TRUE(c.wait_finished(i + 1));
    out[reqs[i].request_id()] = c.get(reqs[i].request_id()).tokens;
  }
  return out;
}

TEST(EngineScheduler, ChunkedPrefillGivesTheSameTokens) {
  Collector c;
  EngineOptions o;
  o.max_num_batched_tokens = 3;  // the 8-token prompt takes three steps
  auto engine = start_engine(o);
  const std::vector<int32_t> expected = reference_output();
  ASSERT_TRUE(
      engine
          ->submit(request("chunked", reference_prompt(), static_cast<int64_t>(expected.size())),
                   c.sink())
          .ok());
  ASSERT_TRUE(c.wait_finished(1));
  EXPECT_EQ(c.get("chunked").tokens, expected);
}

TEST(EngineScheduler, ChunkedPrefillRunsBesideDecoding) {
  std::vector<proto::GenerateRequest> reqs;
  for (int i = 0; i < 4; ++i) {
    std::vector<int32_t> prompt;
    for (int t = 0; t < 10 + 7 * i; ++t) prompt.push_back((t * 7 + i) % 200 + 1);
    reqs.push_back(request(name("mix", i), prompt, 12));
  }
  const auto expected = alone(reqs);
  Collector c;
  EngineOptions o;
  o.max_num_batched_tokens = 6;  // decode tokens and pieces of prompts share every step
  auto engine = start_engine(o);
  for (const auto& r : reqs) ASSERT_TRUE(engine->submit(r, c.sink()).ok());
  ASSERT_TRUE(c.wait_finished(reqs.size()));
  for (const auto& r : reqs) EXPECT_EQ(c.get(r.request_id()).tokens, expected.at(r.request_id()));
}

TEST(EngineScheduler, AFullCachePreemptsAndFinishesEveryRequest) {
  std::vector<proto::GenerateRequest> reqs;
  for (int i = 0; i < 6; ++i)
    reqs.push_back(request(name("p", i), {1 + i, 2, 3, 4, 5, 6, 7, 8}, 30));
  const auto expected = alone(reqs);
  Collector c;
  EngineOptions o;
  o.kv_cache_tokens = 96;  // 6 blocks of 16; each request grows to 38 tokens (3 blocks)
  o.prefix_caching = false;
  auto engine = start_engine(o);
  for (const auto& r : reqs) ASSERT_TRUE(engine->submit(r, c.sink()).ok());
  ASSERT_TRUE(c.wait_finished(reqs.size()));
  for (const auto& r : reqs) {
    const auto got = c.get(r.request_id());
    EXPECT_EQ(got.reason, "length") << r.request_id() << " " << got.error;
    EXPECT_EQ(got.finals, 1);
    EXPECT_EQ(got.tokens, expected.at(r.request_id())) << r.request_id();
  }
  EXPECT_GT(engine->stats().preemptions_total(), 0u);
  EXPECT_EQ(engine->stats().requests_failed_total(), 0u);
  for (int i = 0; i < 100 && engine->stats().kv_cache_usage() > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(engine->stats().kv_cache_usage(), 0.0);
}

TEST(EngineScheduler, PreemptedSequencesOfOneRequestFinishToo) {
  Collector c;
  EngineOptions o;
  o.kv_cache_tokens = 64;  // 4 blocks: three sequences of 2-3 blocks cannot all run at once
  o.prefix_caching = false;
  auto engine = start_engine(o);
  ASSERT_TRUE(engine->submit(request("n3", {1, 5, 9, 11}, 30, 1.0f, 3), c.sink()).ok());
  ASSERT_TRUE(c.wait_finished(3));
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(c.get("n3", i).reason, "length") << c.get("n3", i).error;
    EXPECT_EQ(c.get("n3", i).tokens.size(), 30u);
  }
}

TEST(EngineScheduler, PrefixCachingReusesARepeatedPrompt) {
  Collector c;
  EngineOptions o;
  o.block_size = 4;
  auto engine = start_engine(o);
  std::vector<int32_t> prompt;
  for (int t = 0; t < 21; ++t) prompt.push_back(t * 3 % 250 + 1);
  ASSERT_TRUE(engine->submit(request("first", prompt, 8), c.sink()).ok());
  ASSERT_TRUE(c.wait_finished(1));
  ASSERT_TRUE(engine->submit(request("second", prompt, 8), c.sink()).ok());
  ASSERT_TRUE(c.wait_finished(2));
  EXPECT_EQ(c.get("second").tokens, c.get("first").tokens);
  for (int i = 0; i < 100 && engine->stats().prefix_cache_hits_total() == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(engine->stats().prefix_cache_hits_total(), 20u);  // 5 full blocks of 4
  EXPECT_EQ(engine->stats().prefix_cache_queries_total(), 42u);
}

TEST(EngineScheduler, AdmissionIsBoundedByMaxNumSeqs) {
  Collector c(/*gate=*/2);
  EngineOptions o;
  o.max_num_seqs = 2;
  auto engine = start_engine(o);
  for (int i = 0; i < 4; ++i)
    ASSERT_TRUE(engine->submit(request(name("s", i), {1, 2, 3}, 20), c.sink()).ok());
  ASSERT_TRUE(c.wait_tokens("s0", 2));
  // The engine waits in the sink: two sequences run, two requests wait.
  EXPECT_LE(engine->stats().running(), 2);
  c.release();
  ASSERT_TRUE(c.wait_finished(4));
  for (int i = 0; i < 4; ++i) EXPECT_EQ(c.get(name("s", i)).tokens.size(), 20u);
}

TEST(Engine, ShutdownAbortsWhatRuns) {
  Collector c(/*gate=*/2);
  {
    auto engine = start_engine();
    ASSERT_TRUE(engine->submit(request("a", {1, 2}, 200), c.sink()).ok());
    ASSERT_TRUE(engine->submit(request("b", {1, 2}, 200), c.sink()).ok());
    ASSERT_TRUE(c.wait_tokens("a", 2));
    std::thread releaser([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      c.release();
    });
    engine.reset();  // stops while the engine waits in the sink
    releaser.join();
  }
  EXPECT_EQ(c.get("a").reason, "abort");
  EXPECT_EQ(c.get("b").reason, "abort");
  EXPECT_EQ(c.get("a").finals, 1);
}

}  // namespace
}  // namespace moemesh
