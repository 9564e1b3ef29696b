// Wire format helpers of the data plane (see detail/wire.h).
#include "transport/detail/wire.h"

#include <algorithm>
#include <bit>

namespace moemesh::transport::detail {

std::optional<WireDtype> from_proto(int d) {
  if (d == proto::WIRE_DTYPE_F32) return WireDtype::F32;
  if (d == proto::WIRE_DTYPE_BF16) return WireDtype::BF16;
  return std::nullopt;
}

const char* dtype_name(WireDtype d) {
  return d == WireDtype::BF16 ? "bf16" : "f32";
}

namespace {

// n_tokens * per_row bytes, or -1 on a negative or oversized shape.
int64_t checked_bytes(int64_t n_tokens, int64_t per_row) {
  if (n_tokens < 0 || per_row < 0) return -1;
  if (per_row != 0 && n_tokens > kMaxPayloadBytes / per_row) return -1;
  return n_tokens * per_row;
}

}  // namespace

std::optional<DispatchLayout> dispatch_layout(int64_t n_tokens, int32_t slots, int64_t hidden,
                                              WireDtype dtype) {
  if (slots < 0 || hidden <= 0 || hidden > kMaxPayloadBytes) return std::nullopt;
  const int64_t routing = checked_bytes(n_tokens, int64_t{slots} * 4);
  const int64_t x = checked_bytes(n_tokens, hidden * static_cast<int64_t>(dtype_size(dtype)));
  if (routing < 0 || x < 0 || 2 * routing + x > kMaxPayloadBytes) return std::nullopt;
  DispatchLayout l;
  l.experts = 0;
  l.weights = static_cast<size_t>(routing);
  l.x = static_cast<size_t>(2 * routing);
  l.total = static_cast<size_t>(2 * routing + x);
  return l;
}

std::optional<ReplyLayout> reply_layout(int64_t n_tokens, int32_t slots, int64_t hidden,
                                        WireDtype dtype) {
  if (slots < 0 || hidden <= 0 || hidden > kMaxPayloadBytes) return std::nullopt;
  const int64_t partial = checked_bytes(n_tokens, hidden * static_cast<int64_t>(dtype_size(dtype)));
  const int64_t rejected = checked_bytes(n_tokens, slots);
  if (partial < 0 || rejected < 0 || partial + rejected > kMaxPayloadBytes) return std::nullopt;
  ReplyLayout l;
  l.partial = 0;
  l.rejected = static_cast<size_t>(partial);
  l.total = static_cast<size_t>(partial + rejected);
  return l;
}

// The loops below are written so that the compiler vectorises them (no branches, plain arrays);
// sections of a payload are at least 2-byte aligned (see the layouts), so uint16_t access is fine.
__attribute__((target_clones("avx2", "default"))) void bf16_to_f32_n(const void* src, float* dst,
                                                                     size_t n) {
  const auto* s = static_cast<const uint16_t*>(src);
  for (size_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(uint32_t{s[i]} << 16);
}

namespace {

// f32 bits -> bf16 bits, round to nearest even; NaN stays (quiet) NaN. Branch-free.
inline uint16_t round_bits(uint32_t b) {
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  const uint32_t nan = (b >> 16) | 0x40u;
  return static_cast<uint16_t>(((b & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

// AVX2 when the CPU has it (chosen at load time), SSE2 otherwise.
__attribute__((target_clones("avx2", "default"))) void to_bf16_block(const float* __restrict s,
                                                                     uint16_t* __restrict d,
                                                                     size_t n) {
  for (size_t i = 0; i < n; ++i) d[i] = round_bits(std::bit_cast<uint32_t>(s[i]));
}

}  // namespace

void f32_to_bf16_n(const float* src, void* dst, size_t n) {
  to_bf16_block(src, static_cast<uint16_t*>(dst), n);
}

void f32_to_bf16_in_place(void* buf, size_t n) {
  // Block by block through a small buffer: block [i, i+k) of floats is read before bytes
  // [2i, 2i+2k) are written, and those bytes hold floats below i+k, all already read.
  constexpr size_t kBlock = 512;
  uint16_t tmp[kBlock];
  auto* p = static_cast<std::byte*>(buf);
  for (size_t i = 0; i < n; i += kBlock) {
    const size_t k = std::min(kBlock, n - i);
    to_bf16_block(reinterpret_cast<const float*>(p + 4 * i), tmp, k);
    std::memcpy(p + 2 * i, tmp, 2 * k);
  }
}

bool ByteBuffer::reserve(size_t n) {
  if (n <= capacity_ && data_) return false;
  const size_t cap = std::max<size_t>(n, 64);
  data_.reset(new std::byte[cap]);  // operator new[] aligns to 16 bytes on this ABI
  capacity_ = cap;
  return true;
}

}  // namespace moemesh::transport::detail
