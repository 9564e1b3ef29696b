// HMAC-SHA256 tags of data-plane headers (contract in detail/auth.h).
//
// The tag uses libcrypto's SHA-256 block functions directly: they are deprecated in OpenSSL 3 in
// favour of EVP, but EVP has no way to resume a digest from a saved state without duplicating
// (allocating) its context, and the data plane allocates nothing per message in steady state.
#define OPENSSL_SUPPRESS_DEPRECATED 1
#include "transport/detail/auth.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>

#include <cstring>

namespace moemesh::transport::detail {

namespace {

constexpr std::string_view kKeyLabel = "moemesh data plane v1";
constexpr std::string_view kDispatchLabel = "moemesh dispatch v1";
constexpr std::string_view kReplyLabel = "moemesh reply v1";

// Fixed-width little-endian encoding of the fields, in a reused string.
class Encoder {
 public:
  Encoder(std::string& out, std::string_view label) : out_(out) {
    out_.clear();
    out_.append(label);
    out_.push_back('\0');
  }
  void u64(uint64_t v) {
    char b[8];
    for (int i = 0; i < 8; ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xffu);
    out_.append(b, 8);
  }
  void i64(int64_t v) { u64(static_cast<uint64_t>(v)); }
  void bytes(std::string_view s) {
    u64(s.size());
    out_.append(s);
  }

 private:
  std::string& out_;
};

void encode(const proto::DispatchHeader& h, std::string& out) {
  Encoder e(out, kDispatchLabel);
  e.u64(h.version());
  e.u64(h.epoch());
  e.u64(h.step());
  e.i64(h.layer());
  e.i64(h.micro_batch());
  e.i64(h.n_tokens());
  e.i64(h.slots());
  e.i64(h.step_tokens());
  e.i64(h.hidden());
  e.i64(h.dtype());
  e.u64(h.seq());
}

void encode(const proto::ReplyHeader& h, std::string& out) {
  Encoder e(out, kReplyLabel);
  e.u64(h.version());
  e.u64(h.epoch());
  e.u64(h.step());
  e.i64(h.layer());
  e.i64(h.micro_batch());
  e.i64(h.n_tokens());
  e.i64(h.slots());
  e.i64(h.hidden());
  e.i64(h.dtype());
  e.u64(h.seq());
  e.bytes(h.error());
}

}  // namespace

struct HmacSha256::State {
  SHA256_CTX inner;  // after the key ^ ipad block
  SHA256_CTX outer;  // after the key ^ opad block
  ~State() { OPENSSL_cleanse(this, sizeof(*this)); }
};

HmacSha256::HmacSha256(std::string_view key) : state_(std::make_unique<State>()) {
  // RFC 2104: a key longer than the block is hashed first; then zero-padded to the block.
  unsigned char k[SHA256_CBLOCK] = {};
  if (key.size() > sizeof k)
    SHA256(reinterpret_cast<const unsigned char*>(key.data()), key.size(), k);
  else
    std::memcpy(k, key.data(), key.size());
  unsigned char pad[SHA256_CBLOCK];
  for (size_t i = 0; i < sizeof pad; ++i) pad[i] = k[i] ^ 0x36;
  SHA256_Init(&state_->inner);
  SHA256_Update(&state_->inner, pad, sizeof pad);
  for (size_t i = 0; i < sizeof pad; ++i) pad[i] = k[i] ^ 0x5c;
  SHA256_Init(&state_->outer);
  SHA256_Update(&state_->outer, pad, sizeof pad);
  OPENSSL_cleanse(k, sizeof k);
  OPENSSL_cleanse(pad, sizeof pad);
}

HmacSha256::~HmacSha256() = default;

std::array<unsigned char, kAuthTagBytes> HmacSha256::tag(const void* data, size_t n) const {
  std::array<unsigned char, kAuthTagBytes> inner_hash, out;
  SHA256_CTX c = state_->inner;
  SHA256_Update(&c, data, n);
  SHA256_Final(inner_hash.data(), &c);
  c = state_->outer;
  SHA256_Update(&c, inner_hash.data(), inner_hash.size());
  SHA256_Final(out.data(), &c);
  OPENSSL_cleanse(&c, sizeof c);
  return out;
}

Expected<std::unique_ptr<HeaderAuth>> HeaderAuth::create(std::string_view token) {
  if (token.empty()) return std::unique_ptr<HeaderAuth>(new HeaderAuth(nullptr));
  // The data-plane key: HMAC(token, label), so that the token itself keys nothing here.
  const HmacSha256 from_token(token);
  std::array<unsigned char, kAuthTagBytes> key = from_token.tag(kKeyLabel.data(), kKeyLabel.size());
  auto mac = std::make_unique<HmacSha256>(
      std::string_view(reinterpret_cast<const char*>(key.data()), key.size()));
  OPENSSL_cleanse(key.data(), key.size());
  auto out = std::unique_ptr<HeaderAuth>(new HeaderAuth(std::move(mac)));
  out->scratch_.reserve(256);
  return out;
}

template <class Header>
void HeaderAuth::sign_header(Header& h) {
  if (!enabled()) return h.clear_auth();
  encode(h, scratch_);
  const auto t = mac_->tag(scratch_.data(), scratch_.size());
  h.set_auth(t.data(), t.size());
}

template <class Header>
bool HeaderAuth::verify_header(const Header& h) {
  if (!enabled()) return true;
  encode(h, scratch_);
  const auto t = mac_->tag(scratch_.data(), scratch_.size());
  return h.auth().size() == kAuthTagBytes &&
         CRYPTO_memcmp(h.auth().data(), t.data(), kAuthTagBytes) == 0;
}

void HeaderAuth::sign(proto::DispatchHeader& h) {
  sign_header(h);
}
void HeaderAuth::sign(proto::ReplyHeader& h) {
  sign_header(h);
}
bool HeaderAuth::verify(const proto::DispatchHeader& h) {
  return verify_header(h);
}
bool HeaderAuth::verify(const proto::ReplyHeader& h) {
  return verify_header(h);
}

}  // namespace moemesh::transport::detail
