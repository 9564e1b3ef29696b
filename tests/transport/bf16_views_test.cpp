// bf16 views: with DataPlaneOptions::bf16_views a bf16 message reaches the caller as the bits on
// the wire (no conversion in the data plane), and send_bf16() puts bf16 rows on the wire as they
// are. Over TCP and shared memory, eager and rendezvous sizes.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "tests/transport/test_util.h"

namespace moemesh::transport::testing {
namespace {

// x's rows as bf16 bits.
std::vector<uint16_t> bf16_rows(const Batch& b) {
  std::vector<uint16_t> out(b.x.size());
  for (size_t i = 0; i < b.x.size(); ++i) out[i] = detail::f32_to_bf16(b.x[i]);
  return out;
}

// The "expert" on bits: partial = x with every bit pattern's low byte inverted (exact, so any
// conversion on the way shows), rejected = 1 where the expert is kRejectedExpert.
uint16_t twiddle(uint16_t v) {
  return static_cast<uint16_t>(v ^ 0x00ffu);
}

void bits_handler(std::span<Dispatch> batch) {
  for (Dispatch& d : batch) {
    if (d.x_bf16 == nullptr || d.partial_bf16 == nullptr || d.x != nullptr ||
        d.partial != nullptr) {
      *d.error = "expected bf16 views only";
      continue;
    }
    for (int64_t i = 0; i < d.n_tokens * d.slots; ++i)
      d.rejected[i] = d.experts[i] == kRejectedExpert ? 1 : 0;
    for (int64_t i = 0; i < d.n_tokens * d.hidden; ++i) {
      if (d.partial_bf16[i] != 0) {
        *d.error = "partial_bf16 not zeroed at " + std::to_string(i);
        break;
      }
      d.partial_bf16[i] = twiddle(d.x_bf16[i]);
    }
  }
}

Status send_bf16_batch(DispatchClient& c, int peer, const Batch& b, const std::vector<uint16_t>& x,
                       int32_t layer) {
  return c.send_bf16(peer, 1, 1, layer, 0, static_cast<int64_t>(b.tokens.size()), x.data(),
                     b.hidden, b.tokens, b.experts.data(), b.weights.data(), b.slots);
}

struct Case {
  std::string transports;
  int64_t n_tokens;
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  return info.param.transports + "_" + std::to_string(info.param.n_tokens) + "tokens";
}

class Bf16Views : public ::testing::TestWithParam<Case> {
 protected:
  DataPlaneOptions options(bool views = true) const {
    DataPlaneOptions o;
    o.transports = GetParam().transports;
    o.dtype = WireDtype::BF16;
    o.bf16_views = views;
    return o;
  }
};

// bf16 rows in, bf16 bits to the handler, bf16 bits back: every bit as sent, nothing converted.
TEST_P(Bf16Views, BitsTravelUnchangedBothWays) {
  auto server = start_server(options(), bits_handler);
  auto client = make_client(options());
  ASSERT_TRUE(server && client);
  const int peer = client->connect(server->address()).value();
  const Batch b = make_batch(GetParam().n_tokens, 2048, 4, 21);
  const std::vector<uint16_t> x = bf16_rows(b);
  for (int round = 0; round < 3; ++round) {  // reused buffers must start at zero again
    ASSERT_TRUE(send_bf16_batch(*client, peer, b, x, round).ok());
    int replies = 0;
    const auto missing = client->wait(Clock::now() + 5s, [&](const Reply& r) {
      ++replies;
      ASSERT_TRUE(r.error.empty()) << r.error;
      ASSERT_EQ(r.partial, nullptr);
      ASSERT_NE(r.partial_bf16, nullptr);
      int64_t bad = 0;
      for (int64_t t = 0; t < r.n_tokens; ++t) {
        const uint16_t* row = &x[static_cast<size_t>(b.tokens[t] * b.hidden)];
        for (int64_t j = 0; j < b.hidden; ++j)
          bad += r.partial_bf16[t * b.hidden + j] != twiddle(row[j]);
        for (int32_t k = 0; k < b.slots; ++k)
          EXPECT_EQ(r.rejected[t * b.slots + k],
                    b.experts[t * b.slots + k] == kRejectedExpert ? 1 : 0);
      }
      EXPECT_EQ(bad, 0) << "round " << round;
    });
    EXPECT_TRUE(missing.empty());
    EXPECT_EQ(replies, 1);
  }
  const ClientStats cs = client->stats();
  EXPECT_EQ(cs.bytes_out, static_cast<uint64_t>(3 * b.tokens.size() * (4 * 8 + 2048 * 2)));
  EXPECT_EQ(cs.bytes_in, static_cast<uint64_t>(3 * b.tokens.size() * (4 + 2048 * 2)));
  EXPECT_EQ(server->stats().errors, 0u);
}

// Sides that differ interoperate: f32 callers on a bf16 wire against a server with views, and a
// client with views against a server without; results as the reference handler computes them.
TEST_P(Bf16Views, ViewsOnOneSideOnlyGiveTheSameResults) {
  const Batch b = make_batch(GetParam().n_tokens, 2048, 4, 22);
  {
    // Server with views: the reference handler computes on the bits.
    auto server = start_server(options(), [](std::span<Dispatch> batch) {
      for (const Dispatch& d : batch) ASSERT_NE(d.x_bf16, nullptr);
      reference_handler(batch);
    });
    auto client = make_client(options(/*views=*/false));
    ASSERT_TRUE(server && client);
    const int peer = client->connect(server->address()).value();
    EXPECT_EQ(round_trip(*client, peer, b,
                         [&](const Reply& r) { expect_reply_matches(r, b, WireDtype::BF16); }),
              1);
  }
  {
    // Client with views, f32 rows sent (converted as UCX copies), server without views.
    auto server = start_server(options(/*views=*/false));
    auto client = make_client(options());
    ASSERT_TRUE(server && client);
    const int peer = client->connect(server->address()).value();
    EXPECT_EQ(round_trip(*client, peer, b,
                         [&](const Reply& r) {
                           ASSERT_TRUE(r.error.empty()) << r.error;
                           ASSERT_NE(r.partial_bf16, nullptr);
                           std::vector<float> as_f32(static_cast<size_t>(r.n_tokens * r.hidden));
                           bf16_to_f32(r.partial_bf16, as_f32.data(), as_f32.size());
                           Reply converted = r;
                           converted.partial = as_f32.data();
                           expect_reply_matches(converted, b, WireDtype::BF16);
                         }),
              1);
  }
}

// A server with views still hands f32 dispatches to its handler as f32.
TEST_P(Bf16Views, F32DispatchesKeepF32Views) {
  auto server = start_server(options(), reference_handler);
  DataPlaneOptions f32 = options(/*views=*/false);
  f32.dtype = WireDtype::F32;
  auto client = make_client(f32);
  ASSERT_TRUE(server && client);
  const int peer = client->connect(server->address()).value();
  const Batch b = make_batch(GetParam().n_tokens, 2048, 4, 23);
  EXPECT_EQ(round_trip(*client, peer, b,
                       [&](const Reply& r) { expect_reply_matches(r, b, WireDtype::F32); }),
            1);
  // And send_bf16 is refused by a client that puts f32 on the wire, naming the fix.
  const std::vector<uint16_t> x = bf16_rows(b);
  const Status s = client->send_bf16(peer, 1, 1, 0, 0, 1, x.data(), b.hidden, b.tokens,
                                     b.experts.data(), b.weights.data(), b.slots);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message().find("dtype BF16"), std::string::npos) << s.error().message();
}

std::vector<Case> cases() {
  std::vector<Case> out;
  for (const std::string& t : test_transports())
    for (int64_t n : {1, 256}) out.push_back({t, n});
  return out;
}

INSTANTIATE_TEST_SUITE_P(transport, Bf16Views, ::testing::ValuesIn(cases()), case_name);

// bf16 rows still needed by a dispatch in flight when its round ends are copied before wait()
// returns, as f32 rows are: the caller may overwrite them at once.
TEST(transportBf16Views, RowsMayChangeOnceWaitReturnsWithADispatchInFlight) {
  for (const std::string& transports : test_transports()) {
    SCOPED_TRACE(transports);
    DataPlaneOptions o;
    o.transports = transports;
    o.dtype = WireDtype::BF16;
    o.bf16_views = true;
    const Batch stall = make_batch(1, 64, 2, 31);
    const Batch big = make_batch(2048, 2048, 2, 32);  // 8 MiB of bf16
    const std::vector<uint16_t> stall_x = bf16_rows(stall), want = bf16_rows(big);
    std::atomic<bool> big_seen{false};
    std::atomic<int64_t> big_mismatches{-1};
    auto server = start_server(o, [&](std::span<Dispatch> batch) {
      for (Dispatch& d : batch) {
        if (d.layer == 0) std::this_thread::sleep_for(500ms);
        if (d.layer != 1) continue;
        int64_t bad = 0;
        for (int64_t t = 0; t < d.n_tokens; ++t) {
          const uint16_t* row = &want[static_cast<size_t>(big.tokens[t] * big.hidden)];
          for (int64_t j = 0; j < d.hidden; ++j) bad += d.x_bf16[t * d.hidden + j] != row[j];
        }
        big_mismatches = bad;
        big_seen = true;
      }
    });
    auto client = make_client(o);
    ASSERT_TRUE(server && client);
    const int p = client->connect(server->address()).value();
    std::vector<uint16_t> x = want;  // the array the client sends from, overwritten below
    ASSERT_TRUE(send_bf16_batch(*client, p, stall, stall_x, 0).ok());
    ASSERT_TRUE(send_bf16_batch(*client, p, big, x, 1).ok());
    EXPECT_EQ(client->wait(Clock::now() + 100ms, nullptr), std::vector<int>{p});
    std::fill(x.begin(), x.end(), uint16_t{0xdead});
    const auto deadline = Clock::now() + 10s;
    while (!big_seen && Clock::now() < deadline) client->wait(Clock::now() + 20ms, nullptr);
    ASSERT_TRUE(big_seen) << "the 8 MiB dispatch never reached the handler";
    EXPECT_EQ(big_mismatches.load(), 0);
  }
}

}  // namespace
}  // namespace moemesh::transport::testing
