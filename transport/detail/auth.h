// Authentication of data-plane messages with the cluster token.
//
// Every dispatch header (attention -> expert worker) and every reply header carries `auth`: an
// HMAC-SHA256 (RFC 2104 over OpenSSL libcrypto's SHA-256) of the header's fields, in a fixed
// little-endian encoding behind a domain label, under a key derived from the cluster token (key =
// HMAC-SHA256(token, "moemesh data plane v1")). A DispatchServer refuses a dispatch whose tag does
// not verify (an error reply, counted in ServerStats::auth_failures, logged once per peer endpoint)
// before it receives its payload; a DispatchClient turns a reply whose tag does not verify into an
// error reply (ClientStats::auth_failures) so its bytes are never used.
//
// What this does not do (see docs/security.md): the tensor payload is not covered (hashing it
// would cost a pass over every byte of every message), there is no replay protection, and nothing
// is encrypted; the data-plane network must still be closed to everyone but the cluster.
//
// An empty token turns authentication off on that side: nothing is signed and nothing is checked.
// Not thread-safe: each side keeps one, used by the thread that owns its UCX worker.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "core/error.h"
#include "proto/dataplane.pb.h"

namespace moemesh::transport::detail {

inline constexpr size_t kAuthTagBytes = 32;

// HMAC-SHA256 with the key's inner and outer SHA-256 states computed once: a tag costs three
// SHA-256 blocks for a header-sized message (~0.2 us with SHA-NI) and no heap allocation, where
// EVP_MAC re-initialisation copies (allocates) its digest contexts per message.
class HmacSha256 {
 public:
  explicit HmacSha256(std::string_view key);
  ~HmacSha256();
  HmacSha256(const HmacSha256&) = delete;
  HmacSha256& operator=(const HmacSha256&) = delete;
  std::array<unsigned char, kAuthTagBytes> tag(const void* data, size_t n) const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

class HeaderAuth {
 public:
  // An empty token gives a HeaderAuth that signs and checks nothing.
  static Expected<std::unique_ptr<HeaderAuth>> create(std::string_view token);
  bool enabled() const { return mac_ != nullptr; }

  // Sets h.auth() to the tag of h's other fields (clears it when disabled).
  void sign(proto::DispatchHeader& h);
  void sign(proto::ReplyHeader& h);
  // True when disabled, or when h.auth() is the tag of h's other fields (constant-time compare).
  bool verify(const proto::DispatchHeader& h);
  bool verify(const proto::ReplyHeader& h);

 private:
  explicit HeaderAuth(std::unique_ptr<HmacSha256> mac) : mac_(std::move(mac)) {}
  template <class Header>
  void sign_header(Header& h);
  template <class Header>
  bool verify_header(const Header& h);
  std::unique_ptr<HmacSha256> mac_;
  std::string scratch_;  // the encoded fields (reused: no allocation per message)
};

}  // namespace moemesh::transport::detail
