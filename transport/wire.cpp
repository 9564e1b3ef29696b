// Wire format helpers of the data plane (see detail/wire.h).
#include "transport/detail/wire.h"

#include <ucp/api/ucp.h>
#include <zlib.h>

#include <algorithm>
#include <bit>
#include <cstring>

#include "transport/detail/ucx.h"

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
uint32_t header_crc(const void* data, size_t length) {
  return static_cast<uint32_t>(
      crc32_z(crc32_z(0, nullptr, 0), static_cast<const Bytef*>(data), length));
}
}  // namespace

void seal_header(std::string& header) {
  const uint32_t crc = header_crc(header.data(), header.size());
  char seal[kHeaderSealBytes];
  for (size_t i = 0; i < kHeaderSealBytes; ++i)
    seal[i] = static_cast<char>((crc >> (8 * i)) & 0xff);
  header.append(seal, kHeaderSealBytes);
}

Unsealed unseal_header(const void* header, size_t length) {
  if (header == nullptr || length < kHeaderSealBytes) return {};
  const size_t body = length - kHeaderSealBytes;
  const auto* seal = static_cast<const unsigned char*>(header) + body;
  uint32_t stored = 0;
  for (size_t i = 0; i < kHeaderSealBytes; ++i) stored |= uint32_t{seal[i]} << (8 * i);
  return {body, stored == header_crc(header, body)};
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
// Fragments of a UCX copy may start at any byte: 2-byte values are read and written through
// these unaligned types (x86 vector loads and stores do not care).
namespace {
typedef uint16_t u16_unaligned __attribute__((aligned(1), may_alias));
}  // namespace

// Multiversioned (chosen when the program loads), except under ThreadSanitizer: ifunc resolvers
// run while the program is relocated, before TSan's runtime is up, and crash there.
#if defined(__SANITIZE_THREAD__)
#define MOEMESH_CLONES(...)
#else
#define MOEMESH_CLONES(...) __attribute__((target_clones(__VA_ARGS__)))
#endif

MOEMESH_CLONES("avx2", "default") void bf16_to_f32_n(const void* src, float* dst, size_t n) {
  // memcpy: fragments start at any byte, and both compilers vectorise this form.
  const auto* s = static_cast<const unsigned char*>(src);
  for (size_t i = 0; i < n; ++i) {
    uint16_t v;
    std::memcpy(&v, s + 2 * i, sizeof v);
    dst[i] = std::bit_cast<float>(uint32_t{v} << 16);
  }
}

namespace {

// f32 bits -> bf16 bits, round to nearest even; NaN stays (quiet) NaN. Branch-free.
inline uint16_t round_bits(uint32_t b) {
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  const uint32_t nan = (b >> 16) | 0x40u;
  return static_cast<uint16_t>(((b & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

// AVX-512 or AVX2 when the CPU has it (chosen at load time), SSE2 otherwise. AVX-512 narrows
// with one instruction where AVX2 needs a pack and a permute: 20% faster on a 7 MB array (Xeon).
MOEMESH_CLONES("arch=x86-64-v4", "avx2", "default")
void to_bf16_block(const float* __restrict s, u16_unaligned* __restrict d, size_t n) {
  for (size_t i = 0; i < n; ++i) d[i] = round_bits(std::bit_cast<uint32_t>(s[i]));
}

}  // namespace

void f32_to_bf16_n(const float* src, void* dst, size_t n) {
  to_bf16_block(src, static_cast<u16_unaligned*>(dst), n);
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

namespace {

// Wire bytes [from, from + n) of a bf16 body <-> its f32 values. Byte 2i+k of the wire (k = 0 low,
// 1 high) is byte 2+k of f32 element i, whose bytes 0 and 1 are zero.
void pack_body(const float* body, size_t from, std::byte* out, size_t n) {
  if (n == 0) return;
  if (from % 2 == 1) {  // the high byte of an element split across fragments
    *out++ = static_cast<std::byte>(f32_to_bf16(body[from / 2]) >> 8);
    ++from;
    --n;
  }
  f32_to_bf16_n(body + from / 2, out, n / 2);
  if (n % 2 == 1)  // the low byte of an element split across fragments
    out[n - 1] = static_cast<std::byte>(f32_to_bf16(body[(from + n) / 2]) & 0xffu);
}

void unpack_body(float* body, size_t from, const std::byte* in, size_t n) {
  if (n == 0) return;
  auto* bytes = reinterpret_cast<std::byte*>(body);
  if (from % 2 == 1) {
    bytes[2 * from + 1] = *in++;  // 4i + 3 for from = 2i + 1
    ++from;
    --n;
  }
  bf16_to_f32_n(in, body + from / 2, n / 2);
  if (n % 2 == 1) {
    std::byte* e = bytes + 4 * ((from + n) / 2);
    e[0] = e[1] = std::byte{0};
    e[2] = in[n - 1];
  }
}

// Walks the sections of `m` that wire bytes [offset, offset + n) cover.
template <class Head, class Body, class Tail>
void for_sections(const Bf16Message& m, size_t offset, size_t n, Head head, Body body, Tail tail) {
  const size_t body_end = m.head_bytes + 2 * m.body_elems;
  size_t done = 0;
  auto part = [&](size_t begin, size_t end, auto&& f) {
    const size_t from = offset + done;
    if (done == n || from >= end || from < begin) return;
    const size_t k = std::min(end - from, n - done);
    f(from - begin, done, k);
    done += k;
  };
  part(0, m.head_bytes, head);
  part(m.head_bytes, body_end, body);
  part(body_end, body_end + m.tail_bytes, tail);
}

void* bf16_start(void*, const void* buffer, size_t) {
  return const_cast<void*>(buffer);  // the Bf16Message is the state: nothing to allocate
}
void* bf16_start_unpack(void*, void* buffer, size_t) {
  return buffer;
}
size_t bf16_packed_size(void* state) {
  return static_cast<const Bf16Message*>(state)->wire_bytes();
}
size_t bf16_pack(void* state, size_t offset, void* dest, size_t max_length) {
  return bf16_message_pack(*static_cast<const Bf16Message*>(state), offset, dest, max_length);
}
ucs_status_t bf16_unpack(void* state, size_t offset, const void* src, size_t length) {
  return bf16_message_unpack(*static_cast<const Bf16Message*>(state), offset, src, length)
             ? UCS_OK
             : UCS_ERR_MESSAGE_TRUNCATED;
}
void bf16_finish(void*) {}

}  // namespace

size_t bf16_message_pack(const Bf16Message& m, size_t offset, void* dest, size_t max_length) {
  const size_t n = std::min(max_length, m.wire_bytes() - std::min(offset, m.wire_bytes()));
  auto* out = static_cast<std::byte*>(dest);
  for_sections(
      m, offset, n, [&](size_t at, size_t o, size_t k) { std::memcpy(out + o, m.head + at, k); },
      [&](size_t at, size_t o, size_t k) { pack_body(m.body, at, out + o, k); },
      [&](size_t at, size_t o, size_t k) { std::memcpy(out + o, m.tail + at, k); });
  return n;
}
bool bf16_message_unpack(const Bf16Message& m, size_t offset, const void* src, size_t length) {
  if (offset > m.wire_bytes() || length > m.wire_bytes() - offset) return false;
  const auto* in = static_cast<const std::byte*>(src);
  for_sections(
      m, offset, length,
      [&](size_t at, size_t o, size_t k) { std::memcpy(m.head + at, in + o, k); },
      [&](size_t at, size_t o, size_t k) { unpack_body(m.body, at, in + o, k); },
      [&](size_t at, size_t o, size_t k) { std::memcpy(m.tail + at, in + o, k); });
  return true;
}

uint64_t bf16_message_datatype() {
  static const ucp_datatype_t dt = [] {
    static const ucp_generic_dt_ops_t ops = {&bf16_start, &bf16_start_unpack, &bf16_packed_size,
                                             &bf16_pack,  &bf16_unpack,       &bf16_finish};
    ucp_datatype_t out = 0;
    if (ucp_dt_create_generic(&ops, nullptr, &out) != UCS_OK) return ucp_datatype_t{0};
    return out;
  }();
  return dt;
}

namespace {

// Wire bytes [from, from + n) of the body of `m` (rows back to back in m.dtype) into out.
void pack_rows(const GatherMessage& m, size_t from, std::byte* out, size_t n) {
  const size_t esize = dtype_size(m.dtype);
  const size_t row_bytes = m.hidden * esize;
  while (n > 0) {
    const size_t r = from / row_bytes, within = from % row_bytes;
    const size_t k = std::min(n, row_bytes - within);
    if (m.x == nullptr) {
      std::memset(out, 0, k);
    } else {
      const size_t row = m.rows != nullptr ? static_cast<size_t>(m.rows[r]) : r;
      const std::byte* src = m.x + row * m.hidden * dtype_size(m.source);
      if (m.dtype == m.source)
        std::memcpy(out, src + within, k);
      else
        pack_body(reinterpret_cast<const float*>(src), within, out, k);
    }
    from += k;
    out += k;
    n -= k;
  }
}

void* gather_start(void*, const void* buffer, size_t) {
  return const_cast<void*>(buffer);  // the GatherMessage is the state
}
void* gather_start_unpack(void*, void*, size_t) {
  return nullptr;  // send only
}
size_t gather_packed_size(void* state) {
  return static_cast<const GatherMessage*>(state)->wire_bytes();
}
size_t gather_pack(void* state, size_t offset, void* dest, size_t max_length) {
  return gather_message_pack(*static_cast<const GatherMessage*>(state), offset, dest, max_length);
}
ucs_status_t gather_unpack(void*, size_t, const void*, size_t) {
  return UCS_ERR_UNSUPPORTED;
}
void gather_finish(void*) {}

}  // namespace

size_t gather_message_pack(const GatherMessage& m, size_t offset, void* dest, size_t max_length) {
  const size_t total = m.wire_bytes();
  const size_t n = std::min(max_length, total - std::min(offset, total));
  auto* out = static_cast<std::byte*>(dest);
  size_t done = 0;
  if (offset < m.head_bytes && n > 0) {
    done = std::min(n, m.head_bytes - offset);
    std::memcpy(out, m.head + offset, done);
  }
  if (done < n) pack_rows(m, offset + done - m.head_bytes, out + done, n - done);
  return n;
}

bool GatherMessage::materialize(ByteBuffer& own) {
  const size_t row_bytes = hidden * dtype_size(source);
  const bool grew = own.reserve(n_rows * row_bytes);
  std::byte* dst = own.data();
  if (x == nullptr) {
    if (n_rows > 0) std::memset(dst, 0, n_rows * row_bytes);
  } else {
    for (size_t i = 0; i < n_rows; ++i) {
      const size_t row = rows != nullptr ? static_cast<size_t>(rows[i]) : i;
      std::memcpy(dst + i * row_bytes, x + row * row_bytes, row_bytes);
    }
  }
  x = dst;
  rows = nullptr;
  return grew;
}

uint64_t gather_message_datatype() {
  static const ucp_datatype_t dt = [] {
    static const ucp_generic_dt_ops_t ops = {&gather_start,       &gather_start_unpack,
                                             &gather_packed_size, &gather_pack,
                                             &gather_unpack,      &gather_finish};
    ucp_datatype_t out = 0;
    if (ucp_dt_create_generic(&ops, nullptr, &out) != UCS_OK) return ucp_datatype_t{0};
    return out;
  }();
  return dt;
}

bool fused_ok(const std::string& transports) {
  if (transports.empty() || bf16_message_datatype() == 0 || gather_message_datatype() == 0)
    return false;
  size_t begin = 0;
  while (begin <= transports.size()) {
    const size_t end = std::min(transports.find(',', begin), transports.size());
    const std::string name = transports.substr(begin, end - begin);
    static const char* const kCopying[] = {"sm", "shm", "posix", "sysv", "cma", "self"};
    if (name == "tcp") {
      const auto bytes = tcp_send_segment_bytes();
      if (!bytes || *bytes < 32 * 1024) return false;
    } else if (std::find(std::begin(kCopying), std::end(kCopying), name) == std::end(kCopying)) {
      return false;
    }
    begin = end + 1;
  }
  return true;
}

bool ByteBuffer::reserve(size_t n) {
  if (n <= capacity_ && data_) return false;
  const size_t cap = std::max<size_t>(n, 64);
  data_.reset(new std::byte[cap]);  // operator new[] aligns to 16 bytes on this ABI
  capacity_ = cap;
  return true;
}

}  // namespace moemesh::transport::detail

namespace moemesh::transport {

void bf16_to_f32(const uint16_t* src, float* dst, size_t n) {
  detail::bf16_to_f32_n(src, dst, n);
}
void f32_to_bf16(const float* src, uint16_t* dst, size_t n) {
  detail::f32_to_bf16_n(src, dst, n);
}

}  // namespace moemesh::transport
