// Dispatch/combine round trips between a DispatchClient and DispatchServers in one process, over
// TCP and shared memory, f32 and bf16 wire, eager and rendezvous sizes.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <ostream>
#include <stdexcept>
#include <thread>

#include "tests/transport/test_util.h"
#include "transport/detail/auth.h"

namespace moemesh::transport::testing {
namespace {

struct RoundTripCase {
  std::string transports;
  WireDtype dtype;
  int64_t n_tokens;
};

void PrintTo(const RoundTripCase& c, std::ostream* os) {
  *os << c.transports << " " << detail::dtype_name(c.dtype) << " " << c.n_tokens << " tokens";
}

std::string case_name(const ::testing::TestParamInfo<RoundTripCase>& info) {
  return info.param.transports + "_" + detail::dtype_name(info.param.dtype) + "_" +
         std::to_string(info.param.n_tokens) + "tokens";
}

class RoundTrip : public ::testing::TestWithParam<RoundTripCase> {};

// 1 token is an eager message, 256 tokens of hidden 2048 (1-2 MiB) go by rendezvous.
TEST_P(RoundTrip, ReplyIsExactAndStatsAddUp) {
  const RoundTripCase& c = GetParam();
  DataPlaneOptions o;
  o.transports = c.transports;
  o.dtype = c.dtype;
  auto server = start_server(o);
  auto client = make_client(o);
  ASSERT_TRUE(server && client);
  auto peer = client->connect(server->address());
  ASSERT_TRUE(peer.ok()) << peer.error().message();

  const Batch b = make_batch(c.n_tokens, 2048, 4, 11);
  ASSERT_TRUE(send_batch(*client, *peer, b, /*layer=*/3).ok());
  int replies = 0;
  const auto missing = client->wait(Clock::now() + 5s, [&](const Reply& r) {
    ++replies;
    EXPECT_EQ(r.peer, *peer);
    EXPECT_EQ(r.layer, 3);
    expect_reply_matches(r, b, c.dtype);
  });
  EXPECT_TRUE(missing.empty());
  EXPECT_EQ(replies, 1);

  const ClientStats cs = client->stats();
  EXPECT_EQ(cs.dispatches, 1u);
  EXPECT_EQ(cs.replies, 1u);
  EXPECT_EQ(cs.timeouts, 0u);
  EXPECT_EQ(cs.late_replies, 0u);
  const size_t dsize = detail::dtype_size(c.dtype);
  EXPECT_EQ(cs.bytes_out, static_cast<uint64_t>(c.n_tokens * (4 * 8 + 2048 * dsize)));
  EXPECT_EQ(cs.bytes_in, static_cast<uint64_t>(c.n_tokens * (4 + 2048 * dsize)));
  const ServerStats ss = server->stats();
  EXPECT_EQ(ss.dispatches, 1u);
  EXPECT_EQ(ss.replies, 1u);
  EXPECT_EQ(ss.bytes_in, cs.bytes_out);
  EXPECT_EQ(ss.bytes_out, cs.bytes_in);
  EXPECT_EQ(ss.errors, 0u);
}

std::vector<RoundTripCase> round_trip_cases() {
  std::vector<RoundTripCase> cases;
  for (const std::string& t : test_transports())
    for (WireDtype d : {WireDtype::F32, WireDtype::BF16})
      for (int64_t n : {1, 256}) cases.push_back({t, d, n});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(transport, RoundTrip, ::testing::ValuesIn(round_trip_cases()), case_name);

class Transport : public ::testing::TestWithParam<std::string> {
 protected:
  DataPlaneOptions options() const {
    DataPlaneOptions o;
    o.transports = GetParam();
    return o;
  }
};

TEST_P(Transport, TwoServersAnswerInOneWait) {
  auto a = start_server(options());
  auto b = start_server(options());
  auto client = make_client(options());
  ASSERT_TRUE(a && b && client);
  const int pa = client->connect(a->address()).value();
  const int pb = client->connect(b->address()).value();
  EXPECT_NE(pa, pb);
  EXPECT_EQ(client->connect(a->address()).value(), pa);  // same address, same index

  const Batch ba = make_batch(3, 512, 2, 1), bb = make_batch(40, 512, 2, 2);
  ASSERT_TRUE(send_batch(*client, pa, ba, 0).ok());
  ASSERT_TRUE(send_batch(*client, pb, bb, 0).ok());
  ASSERT_TRUE(send_batch(*client, pb, ba, 1).ok());
  std::map<std::pair<int, int>, int> seen;
  const auto missing = client->wait(Clock::now() + 5s, [&](const Reply& r) {
    ++seen[{r.peer, r.layer}];
    const Batch& want = (r.peer == pb && r.layer == 0) ? bb : ba;
    expect_reply_matches(r, want, WireDtype::F32);
  });
  EXPECT_TRUE(missing.empty());
  EXPECT_EQ(seen.size(), 3u);
  EXPECT_EQ((seen[{pa, 0}]), 1);
  EXPECT_EQ((seen[{pb, 0}]), 1);
  EXPECT_EQ((seen[{pb, 1}]), 1);
}

// Reply buffers are reused (and zeroed while the server is idle): a handler that writes only
// some rows must see zeros everywhere else, also after larger messages filled the buffers.
TEST_P(Transport, ReusedReplyBuffersStartAtZero) {
  auto server = start_server(options(), [](std::span<Dispatch> batch) {
    for (Dispatch& d : batch) {
      for (int64_t i = 0; i < d.n_tokens * d.hidden; ++i)
        if (d.partial[i] != 0.0f) *d.error = "partial not zero at " + std::to_string(i);
      for (int64_t i = 0; i < d.n_tokens * d.slots; ++i)
        if (d.rejected[i] != 0) *d.error = "rejected not zero at " + std::to_string(i);
      if (!d.error->empty()) continue;
      // Layer 0: fill everything; layer 1: write row 0 only.
      const int64_t rows = d.layer == 0 ? d.n_tokens : 1;
      for (int64_t i = 0; i < rows * d.hidden; ++i) d.partial[i] = 1.0f + static_cast<float>(i);
      for (int64_t i = 0; i < rows * d.slots; ++i) d.rejected[i] = 1;
    }
  });
  auto client = make_client(options());
  ASSERT_TRUE(server && client);
  const int p = client->connect(server->address()).value();
  const Batch big = make_batch(128, 1024, 2, 11), small = make_batch(9, 256, 2, 12);
  for (int round = 0; round < 6; ++round) {
    const Batch& b = round % 2 == 0 ? big : small;
    ASSERT_TRUE(send_batch(*client, p, b, round % 2 == 0 ? 0 : 1).ok());
    int replies = 0;
    const auto missing = client->wait(Clock::now() + 5s, [&](const Reply& r) {
      ++replies;
      ASSERT_TRUE(r.error.empty()) << "round " << round << ": " << r.error;
      if (r.layer != 1) return;
      for (int64_t i = r.hidden; i < r.n_tokens * r.hidden; ++i)
        ASSERT_EQ(r.partial[i], 0.0f) << "round " << round << " at " << i;
      for (int64_t i = r.slots; i < r.n_tokens * r.slots; ++i)
        ASSERT_EQ(r.rejected[i], 0) << "round " << round << " at " << i;
    });
    EXPECT_TRUE(missing.empty());
    EXPECT_EQ(replies, 1);
  }
}

TEST_P(Transport, HandlerErrorReachesTheClient) {
  auto server = start_server(options(), [](std::span<Dispatch> batch) {
    for (Dispatch& d : batch) {
      if (d.layer == 5) *d.error = "expert 3 of layer 5 is not loaded here";
      if (d.layer == 6) throw std::runtime_error("out of memory");
    }
  });
  auto client = make_client(options());
  ASSERT_TRUE(server && client);
  const int p = client->connect(server->address()).value();
  const Batch b = make_batch(2, 64, 2, 3);
  ASSERT_TRUE(send_batch(*client, p, b, 5).ok());
  ASSERT_TRUE(send_batch(*client, p, b, 6).ok());
  std::map<int, std::string> errors;
  const auto missing = client->wait(Clock::now() + 5s, [&](const Reply& r) {
    errors[r.layer] = std::string(r.error);
    EXPECT_EQ(r.partial, nullptr);
  });
  EXPECT_TRUE(missing.empty());
  EXPECT_EQ(errors[5], "expert 3 of layer 5 is not loaded here");
  EXPECT_NE(errors[6].find("out of memory"), std::string::npos) << errors[6];
  EXPECT_EQ(server->stats().errors, 2u);
  EXPECT_EQ(client->stats().replies, 2u);
}

// Many rounds of the same shape: after warm-up the pools stop growing. Allocating per message
// would add at least 2 buffers per round on each side (60 over the measured rounds); a pool may
// still gain an entry or two late, when a reply's completion happens to overlap the next round
// for the first time (timing on a loaded machine), hence the small allowance.
TEST_P(Transport, SteadyStateAllocatesNoBuffers) {
  auto server = start_server(options());
  DataPlaneOptions o = options();
  o.dtype = WireDtype::BF16;
  auto client = make_client(o);
  ASSERT_TRUE(server && client);
  const int p = client->connect(server->address()).value();
  const Batch small = make_batch(2, 1024, 2, 4), large = make_batch(64, 1024, 2, 5);
  auto round = [&](uint64_t step) {
    ASSERT_TRUE(send_batch(*client, p, small, 0, 1, step).ok());
    ASSERT_TRUE(send_batch(*client, p, large, 1, 1, step).ok());
    int replies = 0;
    EXPECT_TRUE(client->wait(Clock::now() + 5s, [&](const Reply&) { ++replies; }).empty());
    EXPECT_EQ(replies, 2);
  };
  for (uint64_t s = 0; s < 10; ++s) round(s);
  const uint64_t client_buffers = client->stats().buffers;
  const uint64_t server_buffers = server->stats().buffers;
  for (uint64_t s = 10; s < 40; ++s) round(s);
  EXPECT_LE(client->stats().buffers - client_buffers, 10u);
  EXPECT_LE(server->stats().buffers - server_buffers, 10u);
  EXPECT_EQ(client->stats().replies, 80u);
}

// x may change as soon as wait() returns, even when a dispatch is still on its way: over shared
// memory and tcp UCX packs the rows from x while it sends, so a round that ends first (here the
// server stalls in its handler while 8 MiB wait to be received) copies the rows it still needs. The
// server must get the rows as they were when sent.
TEST_P(Transport, XMayChangeOnceWaitReturnsWithADispatchInFlight) {
  const Batch stall = make_batch(1, 64, 2, 11);
  const Batch big = make_batch(1024, 2048, 2, 12);  // 8 MiB of f32: more than UCX's buffers hold
  std::atomic<bool> big_seen{false};
  std::atomic<int64_t> big_mismatches{-1};
  auto server = start_server(options(), [&](std::span<Dispatch> batch) {
    for (Dispatch& d : batch) {
      if (d.layer == 0) std::this_thread::sleep_for(500ms);
      if (d.layer != 1) continue;
      int64_t bad = 0;
      for (int64_t t = 0; t < d.n_tokens; ++t) {
        const float* want = &big.x[static_cast<size_t>(big.tokens[t] * big.hidden)];
        for (int64_t j = 0; j < d.hidden; ++j) bad += d.x[t * d.hidden + j] != want[j];
      }
      big_mismatches = bad;
      big_seen = true;
    }
  });
  auto client = make_client(options());
  ASSERT_TRUE(server && client);
  const int p = client->connect(server->address()).value();
  Batch mutable_big = big;  // the array the client sends from, overwritten below
  ASSERT_TRUE(send_batch(*client, p, stall, 0).ok());
  ASSERT_TRUE(send_batch(*client, p, mutable_big, 1).ok());
  const uint64_t buffers = client->stats().buffers;
  EXPECT_EQ(client->wait(Clock::now() + 100ms, nullptr), std::vector<int>{p});
  if (options().transports == "sm") {  // the rows it still needed were copied
    EXPECT_GT(client->stats().buffers, buffers);
  }
  std::fill(mutable_big.x.begin(), mutable_big.x.end(), -7.0f);
  const auto deadline = Clock::now() + 10s;
  while (!big_seen && Clock::now() < deadline) client->wait(Clock::now() + 20ms, nullptr);
  ASSERT_TRUE(big_seen) << "the 8 MiB dispatch never reached the handler";
  EXPECT_EQ(big_mismatches.load(), 0);
}

// A payload the caller laid out itself (send_payload(): how an attention worker on a GPU sends
// from device memory) gets the same reply as the same rows through send(), in both wire dtypes,
// eager and rendezvous sizes.
TEST_P(Transport, APayloadLaidOutByTheCallerGetsTheReplyOfTheSameRows) {
  for (WireDtype dtype : {WireDtype::F32, WireDtype::BF16}) {
    DataPlaneOptions o = options();
    o.dtype = dtype;
    auto server = start_server(o);
    auto client = make_client(o);
    ASSERT_TRUE(server && client);
    const int p = client->connect(server->address()).value();
    EXPECT_FALSE(client->cuda_memory());  // this UCX has no CUDA support
    for (int64_t n : {1, 200}) {
      const Batch b = make_batch(n, 1024, 3, 21);
      const auto layout = dispatch_payload_layout(n, b.slots, b.hidden, dtype);
      ASSERT_TRUE(layout);
      EXPECT_EQ(layout->x, static_cast<size_t>(n * b.slots * 8));
      std::vector<std::byte> payload(layout->total);
      std::memcpy(payload.data() + layout->experts, b.experts.data(), b.experts.size() * 4);
      std::memcpy(payload.data() + layout->weights, b.weights.data(), b.weights.size() * 4);
      for (int64_t t = 0; t < n; ++t) {
        const float* row = &b.x[static_cast<size_t>(b.tokens[t] * b.hidden)];
        std::byte* dst = payload.data() + layout->x +
                         static_cast<size_t>(t * b.hidden) * detail::dtype_size(dtype);
        if (dtype == WireDtype::F32)
          std::memcpy(dst, row, static_cast<size_t>(b.hidden) * 4);
        else
          f32_to_bf16(row, reinterpret_cast<uint16_t*>(dst), static_cast<size_t>(b.hidden));
      }
      ASSERT_TRUE(client->send_payload(p, 1, 1, 2, 0, n, n, b.slots, b.hidden, payload.data(),
                                       PayloadMemory::Host));
      int replies = 0;
      EXPECT_TRUE(client
                      ->wait(Clock::now() + 5s,
                             [&](const Reply& r) {
                               ++replies;
                               expect_reply_matches(r, b, dtype);
                             })
                      .empty());
      EXPECT_EQ(replies, 1);
    }
    // Device memory only where UCX takes it.
    const Batch b = make_batch(1, 64, 1, 1);
    std::vector<std::byte> payload(dispatch_payload_layout(1, 1, 64, dtype)->total);
    const Status refused =
        client->send_payload(p, 1, 2, 0, 0, 1, 1, 1, 64, payload.data(), PayloadMemory::Cuda);
    ASSERT_FALSE(refused);
    EXPECT_NE(refused.error().message().find("does not take CUDA device memory"),
              std::string::npos);
    EXPECT_FALSE(client->send_payload(p, 1, 2, 0, 0, 1, 1, 1, 64, nullptr, PayloadMemory::Host));
    EXPECT_FALSE(
        client->send_payload(p + 7, 1, 2, 0, 0, 1, 1, 1, 64, payload.data(), PayloadMemory::Host));
    EXPECT_EQ(client->stats().dispatches, 2u);
  }
}

// A payload whose dispatch is still in flight when its wait() ends (its server stalls) stays
// the server's to read until payload_in_flight() says it is done; overwritten only then, it
// reaches the server whole.
TEST_P(Transport, APayloadIsInFlightUntilItsSendCompletes) {
  std::atomic<int> big_seen{0};
  std::atomic<int64_t> bad_rows{0};
  auto server = start_server(options(), [&](std::span<Dispatch> batch) {
    for (Dispatch& d : batch) {
      if (d.layer == 0) std::this_thread::sleep_for(500ms);
      if (d.layer != 1) continue;
      ++big_seen;
      for (int64_t i = 0; i < d.n_tokens * d.hidden; ++i) bad_rows += d.x[i] != 0.5f;
    }
  });
  auto client = make_client(options());
  ASSERT_TRUE(server && client);
  const int p = client->connect(server->address()).value();
  const Batch stall = make_batch(1, 64, 2, 11);
  ASSERT_TRUE(send_batch(*client, p, stall, 0).ok());
  const int64_t n = 1024, hidden = 2048;  // 8 MiB: rendezvous
  const auto layout = dispatch_payload_layout(n, 1, hidden, WireDtype::F32);
  std::vector<float> payload(layout->total / 4, 0.5f);
  std::fill_n(reinterpret_cast<int32_t*>(payload.data()), n, 0);
  EXPECT_FALSE(client->payload_in_flight(payload.data()));
  ASSERT_TRUE(
      client->send_payload(p, 1, 1, 1, 0, n, n, 1, hidden, payload.data(), PayloadMemory::Host));
  EXPECT_EQ(client->wait(Clock::now() + 100ms, nullptr), std::vector<int>{p});
  const auto deadline = Clock::now() + 5s;
  while (client->payload_in_flight(payload.data()) && Clock::now() < deadline)
    client->wait(Clock::now() + 10ms, nullptr);
  ASSERT_FALSE(client->payload_in_flight(payload.data()));
  std::fill(payload.begin() + static_cast<std::ptrdiff_t>(layout->x / 4), payload.end(), -7.0f);
  while (big_seen.load() == 0 && Clock::now() < deadline)
    client->wait(Clock::now() + 10ms, nullptr);
  EXPECT_EQ(big_seen.load(), 1);
  EXPECT_EQ(bad_rows.load(), 0);
  EXPECT_EQ(round_trip(*client, p, make_batch(3, 64, 2, 5), [](const Reply&) {}), 1);
}

// The server hands the handler every dispatch complete at that moment, from several senders.
TEST_P(Transport, HandlerSeesDispatchesOfSeveralClients) {
  std::atomic<int> calls{0}, dispatches{0};
  auto server = start_server(options(), [&](std::span<Dispatch> batch) {
    ++calls;
    dispatches += static_cast<int>(batch.size());
    reference_handler(batch);
  });
  auto c1 = make_client(options());
  auto c2 = make_client(options());
  ASSERT_TRUE(server && c1 && c2);
  const int p1 = c1->connect(server->address()).value();
  const int p2 = c2->connect(server->address()).value();
  const Batch b = make_batch(4, 256, 2, 6);
  for (int layer = 0; layer < 3; ++layer) {
    ASSERT_TRUE(send_batch(*c1, p1, b, layer).ok());
    ASSERT_TRUE(send_batch(*c2, p2, b, layer).ok());
  }
  int replies = 0;
  auto count = [&](const Reply& r) {
    ++replies;
    expect_reply_matches(r, b, WireDtype::F32);
  };
  EXPECT_TRUE(c1->wait(Clock::now() + 5s, count).empty());
  EXPECT_TRUE(c2->wait(Clock::now() + 5s, count).empty());
  EXPECT_EQ(replies, 6);
  EXPECT_EQ(dispatches.load(), 6);
  EXPECT_LE(calls.load(), 6);
}

// After traffic stops the server thread sleeps on its event fd instead of spinning, and it still
// notices the stop flag promptly.
TEST_P(Transport, IdleServerSleepsAndStopsPromptly) {
  auto server = start_server(options());
  auto client = make_client(options());
  ASSERT_TRUE(server && client);
  const int p = client->connect(server->address()).value();
  const Batch b = make_batch(1, 64, 1, 1);
  ASSERT_TRUE(send_batch(*client, p, b, 0).ok());
  ASSERT_TRUE(client->wait(Clock::now() + 5s, nullptr).empty());
  std::this_thread::sleep_for(50ms);  // past the busy-poll window

  auto cpu_seconds = [] {
    rusage u{};
    getrusage(RUSAGE_SELF, &u);
    return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
           double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
  };
  const double cpu0 = cpu_seconds();
  std::this_thread::sleep_for(500ms);
  EXPECT_LT(cpu_seconds() - cpu0, 0.1) << "an idle server should not burn a core";

  const auto t0 = Clock::now();
  server.reset();
  EXPECT_LT(Clock::now() - t0, 500ms);
}

INSTANTIATE_TEST_SUITE_P(transport, Transport, ::testing::ValuesIn(test_transports()));

}  // namespace
}  // namespace moemesh::transport::testing

// Data-plane authentication (transport/detail/auth.h): the cluster token gates the expert
// workers. A dispatch from a client without the server's token is refused with an error reply
// before the handler sees it, counted, and the server keeps serving clients that have it.
namespace moemesh::transport::testing {
namespace {

DataPlaneOptions with_token(const std::string& transports, const std::string& token) {
  DataPlaneOptions o;
  o.transports = transports;
  o.token = token;
  return o;
}

// One round of one dispatch; returns the reply's error ("" when it was served, and checks it).
std::string round_trip(DispatchClient& c, int peer, const Batch& b) {
  EXPECT_TRUE(send_batch(c, peer, b, /*layer=*/1).ok());
  std::string error = "no reply";
  const auto missing = c.wait(Clock::now() + 5s, [&](const Reply& r) {
    error = std::string(r.error);
    if (r.error.empty()) expect_reply_matches(r, b, WireDtype::F32);
  });
  EXPECT_TRUE(missing.empty());
  return error;
}

class Auth : public ::testing::TestWithParam<std::string> {};

TEST_P(Auth, WrongOrMissingTokenIsRefusedRightTokenIsServed) {
  std::atomic<int> handled{0};
  auto server = start_server(with_token(GetParam(), "cluster-secret"), [&](std::span<Dispatch> b) {
    handled += static_cast<int>(b.size());
    reference_handler(b);
  });
  auto right = make_client(with_token(GetParam(), "cluster-secret"));
  auto wrong = make_client(with_token(GetParam(), "cluster-secreT"));
  auto none = make_client(with_token(GetParam(), ""));
  ASSERT_TRUE(server && right && wrong && none);
  auto p_right = right->connect(server->address());
  auto p_wrong = wrong->connect(server->address());
  auto p_none = none->connect(server->address());
  ASSERT_TRUE(p_right.ok() && p_wrong.ok() && p_none.ok());

  // Eager (1 token) and rendezvous (256 tokens of hidden 2048) sizes.
  for (int64_t n : {1, 256}) {
    const Batch b = make_batch(n, 2048, 4, 5);
    const std::string refused_wrong = round_trip(*wrong, *p_wrong, b);
    EXPECT_NE(refused_wrong.find("authentication"), std::string::npos) << refused_wrong;
    EXPECT_NE(refused_wrong.find("--cluster-token"), std::string::npos) << refused_wrong;
    const std::string refused_none = round_trip(*none, *p_none, b);
    EXPECT_NE(refused_none.find("authentication"), std::string::npos) << refused_none;
    EXPECT_EQ(round_trip(*right, *p_right, b), "");  // still served after the refusals
  }
  EXPECT_EQ(handled.load(), 2);  // only the right client's dispatches reached the handler
  const ServerStats ss = server->stats();
  EXPECT_EQ(ss.auth_failures, 4u);
  EXPECT_EQ(ss.dispatches, 2u);
  EXPECT_GE(ss.errors, 4u);
  EXPECT_EQ(right->stats().auth_failures, 0u);
  // A refusal goes out unsigned: the refused client cannot verify it either, and says so.
  EXPECT_EQ(wrong->stats().auth_failures, 2u);
}

// A client with a token does not use a reply it cannot verify (a server without the token).
TEST_P(Auth, UnsignedReplyIsNotUsed) {
  auto server = start_server(with_token(GetParam(), ""));
  auto client = make_client(with_token(GetParam(), "cluster-secret"));
  ASSERT_TRUE(server && client);
  auto peer = client->connect(server->address());
  ASSERT_TRUE(peer.ok());
  const std::string error = round_trip(*client, *peer, make_batch(3, 64, 2, 9));
  EXPECT_NE(error.find("reply refused"), std::string::npos) << error;
  EXPECT_EQ(client->stats().auth_failures, 1u);
}

INSTANTIATE_TEST_SUITE_P(Transports, Auth, ::testing::ValuesIn(test_transports()));

// RFC 4231 test cases 1, 2 and 6 (a key longer than the block).
TEST(HeaderAuth, HmacSha256MatchesRfc4231) {
  auto hex = [](const std::array<unsigned char, detail::kAuthTagBytes>& t) {
    std::string s;
    char b[3];
    for (unsigned char c : t) {
      std::snprintf(b, sizeof b, "%02x", c);
      s += b;
    }
    return s;
  };
  const std::string data1 = "Hi There";
  EXPECT_EQ(hex(detail::HmacSha256(std::string(20, '\x0b')).tag(data1.data(), data1.size())),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
  const std::string data2 = "what do ya want for nothing?";
  EXPECT_EQ(hex(detail::HmacSha256("Jefe").tag(data2.data(), data2.size())),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  const std::string data6 = "Test Using Larger Than Block-Size Key - Hash Key First";
  EXPECT_EQ(hex(detail::HmacSha256(std::string(131, '\xaa')).tag(data6.data(), data6.size())),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
}

// The tag covers every header field: changing any one, or the key, fails verification.
TEST(HeaderAuth, TagCoversEveryFieldAndTheKey) {
  auto a = detail::HeaderAuth::create("cluster-secret");
  auto b = detail::HeaderAuth::create("cluster-secret2");
  auto off = detail::HeaderAuth::create("");
  ASSERT_TRUE(a.ok() && b.ok() && off.ok());
  proto::DispatchHeader h;
  h.set_version(1);
  h.set_epoch(2);
  h.set_step(3);
  h.set_layer(4);
  h.set_micro_batch(5);
  h.set_n_tokens(6);
  h.set_slots(7);
  h.set_step_tokens(8);
  h.set_hidden(9);
  h.set_dtype(proto::WIRE_DTYPE_BF16);
  h.set_seq(10);
  (*a)->sign(h);
  EXPECT_EQ(h.auth().size(), detail::kAuthTagBytes);
  EXPECT_TRUE((*a)->verify(h));
  EXPECT_FALSE((*b)->verify(h));
  EXPECT_TRUE((*off)->verify(h));  // no token: nothing is checked
  const std::vector<std::function<void(proto::DispatchHeader&)>> changes = {
      [](auto& x) { x.set_version(9); },     [](auto& x) { x.set_epoch(9); },
      [](auto& x) { x.set_step(9); },        [](auto& x) { x.set_layer(9); },
      [](auto& x) { x.set_micro_batch(9); }, [](auto& x) { x.set_n_tokens(99); },
      [](auto& x) { x.set_slots(9); },       [](auto& x) { x.set_step_tokens(9); },
      [](auto& x) { x.set_hidden(99); },     [](auto& x) { x.set_dtype(proto::WIRE_DTYPE_F32); },
      [](auto& x) { x.set_seq(99); },        [](auto& x) { x.mutable_auth()->back() ^= 1; },
      [](auto& x) { x.clear_auth(); }};
  for (size_t i = 0; i < changes.size(); ++i) {
    proto::DispatchHeader t = h;
    changes[i](t);
    EXPECT_FALSE((*a)->verify(t)) << "change " << i;
  }
  // Replies: the error text is covered too.
  proto::ReplyHeader r;
  r.set_seq(10);
  r.set_error("over capacity");
  (*a)->sign(r);
  EXPECT_TRUE((*a)->verify(r));
  r.set_error("over capacitY");
  EXPECT_FALSE((*a)->verify(r));
}

}  // namespace
}  // namespace moemesh::transport::testing
