// Shared pieces of the transport tests: a reference expert handler and its expected output.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "transport/data_plane.h"
#include "transport/detail/wire.h"

namespace moemesh::transport::testing {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

inline constexpr int32_t kRejectedExpert = 7;

// The "expert": partial = (sum of weights of slots with expert >= 0, expert != 7) * x; slots whose
// expert is 7 are rejected (over capacity). With bf16 views: the product of the bf16 x, rounded
// to bf16 (what a server converting to and from f32 replies).
inline void reference_handler(std::span<Dispatch> batch) {
  for (Dispatch& d : batch) {
    for (int64_t t = 0; t < d.n_tokens; ++t) {
      float s = 0;
      for (int32_t k = 0; k < d.slots; ++k) {
        const int32_t e = d.experts[t * d.slots + k];
        if (e == kRejectedExpert)
          d.rejected[t * d.slots + k] = 1;
        else if (e >= 0)
          s += d.weights[t * d.slots + k];
      }
      for (int64_t j = 0; j < d.hidden; ++j) {
        const int64_t i = t * d.hidden + j;
        if (d.x_bf16 != nullptr)
          d.partial_bf16[i] = detail::f32_to_bf16(s * detail::bf16_to_f32(d.x_bf16[i]));
        else
          d.partial[i] = s * d.x[i];
      }
    }
  }
}

// A batch of routed tokens: x has `rows` rows; `tokens` picks n of them (out of order).
struct Batch {
  int64_t hidden = 0;
  int32_t slots = 0;
  std::vector<float> x;
  std::vector<int32_t> tokens;
  std::vector<int32_t> experts;
  std::vector<float> weights;
};

inline Batch make_batch(int64_t n, int64_t hidden, int32_t slots, uint32_t seed) {
  Batch b;
  b.hidden = hidden;
  b.slots = slots;
  const int64_t rows = n + 5;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  b.x.resize(static_cast<size_t>(rows * hidden));
  for (float& v : b.x) v = u(rng);
  for (int64_t i = 0; i < n; ++i) b.tokens.push_back(static_cast<int32_t>((i * 7 + 3) % rows));
  std::uniform_int_distribution<int32_t> e(-1, 9);
  std::uniform_real_distribution<float> w(0.0f, 1.0f);
  for (int64_t i = 0; i < n * slots; ++i) {
    b.experts.push_back(e(rng));
    b.weights.push_back(w(rng));
  }
  return b;
}

inline float wire_round(float v, WireDtype dtype) {
  return dtype == WireDtype::BF16 ? detail::bf16_to_f32(detail::f32_to_bf16(v)) : v;
}

// Checks a reply against the reference handler applied to what went on the wire, bit-exactly.
inline void expect_reply_matches(const Reply& r, const Batch& b, WireDtype dtype) {
  ASSERT_TRUE(r.error.empty()) << r.error;
  ASSERT_EQ(r.n_tokens, static_cast<int64_t>(b.tokens.size()));
  ASSERT_EQ(r.slots, b.slots);
  ASSERT_EQ(r.hidden, b.hidden);
  int64_t mismatches = 0;
  for (int64_t t = 0; t < r.n_tokens; ++t) {
    float s = 0;
    for (int32_t k = 0; k < b.slots; ++k) {
      const int32_t e = b.experts[t * b.slots + k];
      EXPECT_EQ(r.rejected[t * b.slots + k], e == kRejectedExpert ? 1 : 0);
      if (e >= 0 && e != kRejectedExpert) s += b.weights[t * b.slots + k];
    }
    const float* row = &b.x[static_cast<size_t>(b.tokens[t] * b.hidden)];
    for (int64_t j = 0; j < b.hidden; ++j) {
      const float want = wire_round(s * wire_round(row[j], dtype), dtype);
      if (r.partial[t * b.hidden + j] != want && ++mismatches <= 3)
        ADD_FAILURE() << "token " << t << " column " << j << ": got " << r.partial[t * b.hidden + j]
                      << ", want " << want;
    }
  }
  EXPECT_EQ(mismatches, 0);
}

inline Status send_batch(DispatchClient& c, int peer, const Batch& b, int32_t layer,
                         uint64_t epoch = 1, uint64_t step = 1) {
  return c.send(peer, epoch, step, layer, /*micro_batch=*/0, static_cast<int64_t>(b.tokens.size()),
                b.x.data(), b.hidden, b.tokens, b.experts.data(), b.weights.data(), b.slots);
}

// Sends `b` (layer 0) and waits for its reply, handing it to `check`; expects no peer to be
// missing. Returns the number of replies (1 when all went well).
inline int round_trip(DispatchClient& c, int peer, const Batch& b,
                      const std::function<void(const Reply&)>& check) {
  const Status sent = send_batch(c, peer, b, 0);
  EXPECT_TRUE(sent.ok()) << sent.error().message();
  if (!sent.ok()) return 0;
  int replies = 0;
  EXPECT_TRUE(c.wait(Clock::now() + 5s, [&](const Reply& r) {
                 ++replies;
                 check(r);
               }).empty());
  return replies;
}

inline std::unique_ptr<DispatchServer> start_server(const DataPlaneOptions& o,
                                                    DispatchServer::Handler h = reference_handler) {
  auto s = DispatchServer::start(o, std::move(h));
  if (!s.ok()) ADD_FAILURE() << s.error().message();
  return s.ok() ? std::move(s.value()) : nullptr;
}

inline std::unique_ptr<DispatchClient> make_client(const DataPlaneOptions& o) {
  auto c = DispatchClient::create(o);
  if (!c.ok()) ADD_FAILURE() << c.error().message();
  return c.ok() ? std::move(c.value()) : nullptr;
}

// The transports every test runs over: TCP and shared memory.
inline std::vector<std::string> test_transports() {
  return {"tcp", "sm"};
}

}  // namespace moemesh::transport::testing
