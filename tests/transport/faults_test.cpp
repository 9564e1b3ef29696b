// Header seals and fault injection of the data plane. The spec parser and the seals are tested in
// every build; the injected faults need a build configured with -DMOEMESH_FAULT_INJECTION=ON (the
// sanitizer builds of scripts/sanitize) and are skipped elsewhere.
#include <gtest/gtest.h>

#include <string>
#include <thread>

#include "proto/dataplane.pb.h"
#include "tests/transport/test_util.h"
#include "transport/detail/faults.h"

namespace moemesh::transport::testing {
namespace {

using detail::FaultInjector;
using detail::FaultPoint;

std::unique_ptr<FaultInjector> parse_ok(const std::string& spec) {
  auto f = FaultInjector::parse(spec);
  EXPECT_TRUE(f.ok()) << spec << ": " << f.error().message();
  return f.ok() ? std::move(*f) : nullptr;
}

TEST(transportFaults, SpecSelectsTheNthEveryNthOrRandomMessages) {
  auto f = parse_ok("reply.drop@2,5; dispatch.corrupt@every:3 ;reply.delay=20ms@5;seed=3");
  ASSERT_TRUE(f);
  EXPECT_TRUE(f->has(FaultPoint::Reply));
  EXPECT_TRUE(f->has(FaultPoint::Dispatch));
  EXPECT_FALSE(f->has(FaultPoint::Expert));
  std::vector<int> dropped, delayed, corrupted;
  for (int i = 1; i <= 9; ++i) {
    const auto r = f->next(FaultPoint::Reply);
    if (r.drop) dropped.push_back(i);
    if (r.delay.count() > 0) delayed.push_back(i);
    if (f->next(FaultPoint::Dispatch).corrupt) corrupted.push_back(i);
  }
  EXPECT_EQ(dropped, (std::vector<int>{2, 5}));
  EXPECT_EQ(delayed, (std::vector<int>{5}));
  EXPECT_EQ(corrupted, (std::vector<int>{3, 6, 9}));
  EXPECT_EQ(f->counts().drops, 2u);
  EXPECT_EQ(f->counts().delays, 1u);
  EXPECT_EQ(f->counts().corruptions, 3u);
  EXPECT_EQ(f->counts().stalls, 0u);

  // p:X draws from a seeded generator: the same seed picks the same messages.
  auto pick = [](const std::string& spec) {
    auto g = FaultInjector::parse(spec);
    std::vector<int> hits;
    for (int i = 0; i < 200; ++i)
      if (g.ok() && (*g)->next(FaultPoint::Expert).delay.count() > 0) hits.push_back(i);
    return hits;
  };
  const auto a = pick("expert.stall=1s@p:0.25;seed=11");
  EXPECT_EQ(a, pick("expert.stall=1s@p:0.25;seed=11"));
  EXPECT_NE(a, pick("expert.stall=1s@p:0.25;seed=12"));
  EXPECT_GT(a.size(), 25u);
  EXPECT_LT(a.size(), 80u);
  EXPECT_TRUE(pick("expert.stall=1s@p:0").empty());
}

TEST(transportFaults, NamePrefixedRulesApplyOnlyToThatNode) {
  const char* spec = "expert-0/reply.drop@1; expert-1/reply.delay=5ms@1; reply.corrupt@1";
  auto e0 = parse_ok(std::string(spec));  // no node name: only the unprefixed rule
  ASSERT_TRUE(e0);
  auto a = e0->next(FaultPoint::Reply);
  EXPECT_TRUE(a.corrupt && !a.drop && a.delay.count() == 0);
  auto e1 = FaultInjector::parse(spec, "expert-1");
  ASSERT_TRUE(e1.ok() && *e1);
  a = (*e1)->next(FaultPoint::Reply);
  EXPECT_TRUE(a.corrupt && !a.drop && a.delay.count() == 5);
  auto other = FaultInjector::parse("expert-0/reply.drop@1", "attention-0");
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(*other, nullptr);  // no rule for this node
  EXPECT_FALSE(FaultInjector::parse("expert-0/reply.explode@1", "attention-0").ok());
}

TEST(transportFaults, BadSpecsAreRefusedNamingTheRule) {
  for (const char* spec :
       {"reply.drop", "reply.explode@1", "network.drop@1", "reply.delay@1", "reply.drop=5ms@1",
        "expert.drop@1", "dispatch.stall=1s@1", "reply.drop@0", "reply.drop@every:0",
        "reply.drop@p:1.5", "reply.drop@x", "reply.delay=fast@1", "seed=abc"}) {
    auto f = FaultInjector::parse(spec);
    ASSERT_FALSE(f.ok()) << spec;
    EXPECT_NE(f.error().message().find("POINT.KIND"), std::string::npos) << f.error().message();
  }
  auto empty = FaultInjector::parse(" ; ");
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(*empty, nullptr);
}

TEST(transportFaults, SealCatchesEveryFlippedBitOfTheHeader) {
  proto::DispatchHeader h;
  h.set_version(detail::kWireVersion);
  h.set_layer(3);
  h.set_n_tokens(17);
  h.set_seq(99);
  std::string wire;
  detail::serialize_into(h, wire);
  const size_t body = wire.size();
  detail::seal_header(wire);
  ASSERT_EQ(wire.size(), body + detail::kHeaderSealBytes);
  const detail::Unsealed ok = detail::unseal_header(wire.data(), wire.size());
  EXPECT_TRUE(ok.intact);
  EXPECT_EQ(ok.body, body);
  for (uint64_t salt = 0; salt < 64; ++salt) {
    std::string bad = wire;
    detail::corrupt_header(bad, salt);
    ASSERT_NE(bad, wire);
    EXPECT_EQ(bad.substr(body), wire.substr(body)) << "the seal itself is left alone";
    EXPECT_FALSE(detail::unseal_header(bad.data(), bad.size()).intact) << salt;
  }
  EXPECT_EQ(detail::unseal_header(wire.data(), 3).body, 0u);
}

class Injected : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fault_injection_available())
      GTEST_SKIP() << "fault injection is not built (configure with -DMOEMESH_FAULT_INJECTION=ON)";
  }
  static DataPlaneOptions options(const std::string& faults) {
    DataPlaneOptions o;
    o.transports = "tcp";
    o.faults = faults;
    return o;
  }
  // One dispatch of layer 1, its replies collected until the deadline; returns the missing peers.
  std::vector<int> round(DispatchClient& client, int peer, std::vector<std::string>* errors,
                         int* answered, std::chrono::milliseconds deadline = 2s) {
    static const Batch b = make_batch(3, 64, 2, 5);
    EXPECT_TRUE(send_batch(client, peer, b, /*layer=*/1, /*epoch=*/1, ++step_).ok());
    return client.wait(Clock::now() + deadline, [&](const Reply& r) {
      if (!r.error.empty())
        errors->emplace_back(r.error);
      else
        ++*answered;
    });
  }
  uint64_t step_ = 0;
};

TEST_F(Injected, DroppedDispatchAndReplyTimeOutAndAreCounted) {
  auto server = start_server(options("reply.drop@2"), reference_handler);
  auto client = make_client(options("dispatch.drop@1"));
  ASSERT_TRUE(server && client);
  const int p = client->connect(server->address()).value();
  std::vector<std::string> errors;
  int answered = 0;
  const auto t0 = Clock::now();
  EXPECT_EQ(round(*client, p, &errors, &answered, 200ms), std::vector<int>{p});  // dispatch lost
  EXPECT_LT(Clock::now() - t0, 1s);
  EXPECT_EQ(round(*client, p, &errors, &answered), std::vector<int>{});  // the server's 1st reply
  EXPECT_EQ(round(*client, p, &errors, &answered, 200ms), std::vector<int>{p});  // 2nd dropped
  EXPECT_EQ(round(*client, p, &errors, &answered), std::vector<int>{});
  EXPECT_TRUE(errors.empty());
  EXPECT_EQ(answered, 2);
  EXPECT_EQ(client->stats().faults.drops, 1u);
  EXPECT_EQ(client->stats().timeouts, 2u);
  EXPECT_EQ(server->stats().faults.drops, 1u);
  EXPECT_EQ(server->stats().dispatches, 3u);
  EXPECT_EQ(server->stats().replies, 2u);
}

TEST_F(Injected, CorruptedHeadersBecomeErrorRepliesOnBothSides) {
  auto server = start_server(options("reply.corrupt@2"), reference_handler);
  auto client = make_client(options("dispatch.corrupt@1"));
  ASSERT_TRUE(server && client);
  const int p = client->connect(server->address()).value();
  std::vector<std::string> errors;
  int answered = 0;
  // 1: the server sees a bad seal: an error reply, or nothing when the header no longer parses;
  // 2: the client sees one: an error reply, or a reply it drops when it no longer names the
  // dispatch; 3: clean. Never a reply used as if nothing happened.
  auto expect_refused = [&](const std::vector<int>& missing, const char* text) {
    if (missing.empty()) {
      ASSERT_EQ(errors.size(), 1u);
      EXPECT_NE(errors[0].find(text), std::string::npos) << errors[0];
    } else {
      EXPECT_TRUE(errors.empty());
    }
    errors.clear();
  };
  expect_refused(round(*client, p, &errors, &answered, 300ms), "header checksum does not match");
  EXPECT_EQ(server->stats().checksum_failures, 1u);
  EXPECT_EQ(answered, 0);
  expect_refused(round(*client, p, &errors, &answered, 300ms),
                 "reply refused: its header checksum");
  EXPECT_EQ(client->stats().checksum_failures, 1u);
  EXPECT_EQ(answered, 0);
  EXPECT_TRUE(round(*client, p, &errors, &answered).empty());
  EXPECT_EQ(answered, 1);
  EXPECT_EQ(client->stats().faults.corruptions, 1u);
  EXPECT_EQ(server->stats().faults.corruptions, 1u);
}

TEST_F(Injected, DelaysAndStallsWithinTheDeadlineOnlyCostTime) {
  auto server = start_server(options("reply.delay=60ms@1;expert.stall=60ms@2"), reference_handler);
  auto client = make_client(options("dispatch.delay=60ms@3"));
  ASSERT_TRUE(server && client);
  const int p = client->connect(server->address()).value();
  std::vector<std::string> errors;
  int answered = 0;
  for (int i = 0; i < 3; ++i) {
    const auto t0 = Clock::now();
    EXPECT_TRUE(round(*client, p, &errors, &answered).empty());
    EXPECT_GE(Clock::now() - t0, 55ms) << "round " << i;
  }
  EXPECT_EQ(answered, 3);
  EXPECT_TRUE(errors.empty());
  EXPECT_EQ(server->stats().faults.delays, 1u);
  EXPECT_EQ(server->stats().faults.stalls, 1u);
  EXPECT_EQ(client->stats().faults.delays, 1u);

  // A stall past the deadline: the round times out by its deadline; the reply is late.
  auto slow = start_server(options("expert.stall=400ms@1"), reference_handler);
  ASSERT_TRUE(slow);
  const int q = client->connect(slow->address()).value();
  const auto t0 = Clock::now();
  EXPECT_EQ(round(*client, q, &errors, &answered, 100ms), std::vector<int>{q});
  EXPECT_LT(Clock::now() - t0, 350ms);
  std::this_thread::sleep_for(500ms);
  EXPECT_TRUE(round(*client, q, &errors, &answered).empty());
  EXPECT_EQ(client->stats().late_replies, 1u);
  EXPECT_EQ(answered, 4);
}

TEST(transportFaults, BuildWithoutFaultInjectionRefusesASpec) {
  if (fault_injection_available()) GTEST_SKIP() << "this build injects faults";
  DataPlaneOptions o;
  o.transports = "tcp";
  o.faults = "reply.drop@1";
  auto server = DispatchServer::start(o, reference_handler);
  ASSERT_FALSE(server.ok());
  EXPECT_NE(server.error().message().find("-DMOEMESH_FAULT_INJECTION=ON"), std::string::npos)
      << server.error().message();
  auto client = DispatchClient::create(o);
  ASSERT_FALSE(client.ok());
  EXPECT_NE(client.error().message().find("MOEMESH_FAULTS"), std::string::npos);
}

}  // namespace
}  // namespace moemesh::transport::testing
