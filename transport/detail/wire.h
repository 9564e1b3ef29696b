// Wire format of the data plane: active-message ids, payload layouts, dtype conversion, and the
// reusable byte buffers both sides build messages in.
//
// Dispatch payload (little endian, sections in this order so each is naturally aligned when the
// payload starts 4-byte aligned):
//   experts int32 [n_tokens, slots] | weights f32 [n_tokens, slots] | x [n_tokens, hidden] dtype
// Reply payload (no payload with an error):
//   partial [n_tokens, hidden] dtype | rejected uint8 [n_tokens, slots]
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "proto/dataplane.pb.h"
#include "transport/data_plane.h"

namespace moemesh::transport::detail {

// Active-message ids (below 65536, see notes/ucx-1.13.md).
inline constexpr unsigned kDispatchAmId = 0x4d31;
inline constexpr unsigned kReplyAmId = 0x4d32;
inline constexpr uint32_t kWireVersion = 2;

// Every AM header is the serialized protobuf header followed by a CRC-32 (zlib's, little endian)
// of those bytes: the seal. A header whose seal does not match was corrupted on the way; its
// fields are not trusted (the payload bytes are not covered: they rely on the transport's own
// integrity checks, see docs/security.md).
inline constexpr size_t kHeaderSealBytes = 4;
// Appends the seal to a serialized header.
void seal_header(std::string& header);
struct Unsealed {
  size_t body = 0;      // bytes of the protobuf header (the seal removed)
  bool intact = false;  // the seal matches
};
// Splits a received header; body 0 when it is too short to have a seal.
Unsealed unseal_header(const void* header, size_t length);

// Sizes larger than this are refused on both sides (a message is one layer of one step).
inline constexpr int64_t kMaxPayloadBytes = int64_t{1} << 32;

inline size_t dtype_size(WireDtype d) {
  return d == WireDtype::BF16 ? 2 : 4;
}
inline proto::WireDtype to_proto(WireDtype d) {
  return d == WireDtype::BF16 ? proto::WIRE_DTYPE_BF16 : proto::WIRE_DTYPE_F32;
}
// nullopt for a value this version does not know.
std::optional<WireDtype> from_proto(int d);
const char* dtype_name(WireDtype d);

struct DispatchLayout {
  size_t experts = 0, weights = 0, x = 0;  // byte offsets
  size_t total = 0;
};
// nullopt when the shape is negative or too large.
std::optional<DispatchLayout> dispatch_layout(int64_t n_tokens, int32_t slots, int64_t hidden,
                                              WireDtype dtype);

struct ReplyLayout {
  size_t partial = 0, rejected = 0;  // byte offsets
  size_t total = 0;
};
std::optional<ReplyLayout> reply_layout(int64_t n_tokens, int32_t slots, int64_t hidden,
                                        WireDtype dtype);

// bf16 <-> f32 (round to nearest even; NaN stays NaN).
inline uint16_t f32_to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
inline float bf16_to_f32(uint16_t b) {
  const uint32_t bits = uint32_t{b} << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}
// bf16 arrays must be 2-byte aligned, f32 arrays 4-byte aligned. Vectorised.
void bf16_to_f32_n(const void* src, float* dst, size_t n);
void f32_to_bf16_n(const float* src, void* dst, size_t n);
// In place: the first n floats of buf become n bf16 values at the start of buf.
void f32_to_bf16_in_place(void* buf, size_t n);

// A message whose wire form is `head` bytes | bf16[body_elems] | `tail` bytes while this side
// holds the body as f32. As a UCX generic datatype (bf16_message_datatype(), count 1, the
// Bf16Message as buffer) UCX's own fragment copies convert: pack reads the f32 body and writes
// bf16 into UCX's send buffers, unpack writes the f32 body straight from UCX's receive buffers.
// That saves the separate conversion pass and a copy through a staging buffer. Fragments may
// start and end at any byte. Generic datatypes rule out zero-copy rendezvous, so they are used
// only where UCX copies anyway (see fused_ok()). The Bf16Message must live until the
// operation completes.
struct Bf16Message {
  std::byte* head = nullptr;
  size_t head_bytes = 0;
  float* body = nullptr;
  size_t body_elems = 0;
  std::byte* tail = nullptr;
  size_t tail_bytes = 0;
  size_t wire_bytes() const { return head_bytes + 2 * body_elems + tail_bytes; }
};
// The datatype's pack and unpack: wire bytes [offset, offset + n) of the message (pack writes
// min(max_length, what is left) bytes and returns that; unpack refuses bytes past the end).
size_t bf16_message_pack(const Bf16Message& m, size_t offset, void* dest, size_t max_length);
bool bf16_message_unpack(const Bf16Message& m, size_t offset, const void* src, size_t length);
// The generic datatype (created on first use, lives as long as the process).
uint64_t bf16_message_datatype();
// Whether UCX copies every message anyway with these UCX_TLS, so that generic datatypes (which
// rule out zero-copy) cost nothing and save a pass: shared memory (with peer error handling UCX
// 1.13 moves rendezvous data through bounce buffers) and tcp with send segments of 32 KiB or more
// (its bcopy path; with UCX's 8 KiB segments it is slower than zero-copy). False for the default
// and for RDMA transports, which send zero-copy. Call after UCX's settings are in place
// (UcxWorker::create()).
bool fused_ok(const std::string& transports);

// A growable byte buffer that never shrinks and never zero-fills (16-byte aligned).
class ByteBuffer {
 public:
  // Makes room for n bytes; returns true when it had to allocate.
  bool reserve(size_t n);
  std::byte* data() { return data_.get(); }
  const std::byte* data() const { return data_.get(); }
  size_t capacity() const { return capacity_; }

 private:
  std::unique_ptr<std::byte[]> data_;
  size_t capacity_ = 0;
};

// A dispatch whose wire form is `head` bytes | rows x[rows[i]] of [*, hidden] `source` in `dtype`
// (source BF16 needs dtype BF16: the rows go as they are),
// gathered (and converted) only when UCX packs them: as a UCX generic datatype
// (gather_message_datatype(), count 1, the GatherMessage as buffer) the rows go from the caller's
// array straight into UCX's send buffers, without a gathered copy of their own. Only where UCX
// copies anyway (fused_ok()). x must hold still until the operation completes or the
// message is redirected with materialize() to a copy of its rows. x null: the rows pack as zeros.
struct GatherMessage {
  const std::byte* head = nullptr;
  size_t head_bytes = 0;
  const std::byte* x = nullptr;
  const int32_t* rows = nullptr;  // null: row i is x's row i
  size_t n_rows = 0;
  size_t hidden = 0;
  WireDtype dtype = WireDtype::F32;
  WireDtype source = WireDtype::F32;  // what x holds
  size_t wire_bytes() const { return head_bytes + n_rows * hidden * dtype_size(dtype); }
  // Copies the rows into `own` (n_rows x hidden in `source`) and packs from there from now on.
  // Returns true when `own` had to grow.
  bool materialize(ByteBuffer& own);
};
size_t gather_message_pack(const GatherMessage& m, size_t offset, void* dest, size_t max_length);
uint64_t gather_message_datatype();

// Serializes a protobuf message into a reused string (no allocation once it is large enough;
// room is kept for the seal, see seal_header()).
template <class Message>
void serialize_into(const Message& m, std::string& out) {
  const size_t n = m.ByteSizeLong();
  if (out.capacity() < n + kHeaderSealBytes) out.reserve(n + kHeaderSealBytes);
  out.resize(n);
  m.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(out.data()));
}

// Takes the free entry whose buffer fits `bytes` most tightly (else the largest, which then
// grows the least often); nullptr when `free` is empty. Keeps each pool at its high-water mark
// of concurrent messages of each size instead of growing every entry to the largest size.
template <class T, class Capacity>
T* take_best_fit(std::vector<T*>& free, size_t bytes, Capacity capacity) {
  if (free.empty()) return nullptr;
  size_t best = 0;
  for (size_t i = 1; i < free.size(); ++i) {
    const size_t c = capacity(*free[i]), b = capacity(*free[best]);
    const bool fits = c >= bytes, best_fits = b >= bytes;
    if ((fits && (!best_fits || c < b)) || (!fits && !best_fits && c > b)) best = i;
  }
  T* out = free[best];
  free[best] = free.back();
  free.pop_back();
  return out;
}

// Buffer/string growth detection for pool accounting.
inline bool grows(const std::string& s, size_t n) {
  return s.capacity() < n + kHeaderSealBytes;
}

}  // namespace moemesh::transport::detail
