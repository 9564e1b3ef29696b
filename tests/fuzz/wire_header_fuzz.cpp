// Fuzzes the data plane's wire format as the two sides read it (transport/detail/wire.h): the
// DispatchHeader an expert worker receives (transport/server.cpp: version, dtype, payload layout
// against the bytes that arrived) and the ReplyHeader an attention worker receives
// (transport/client.cpp), then the payload itself: routing sections, bf16 -> f32 conversion, and
// the fused bf16 unpack that UCX calls with fragments cut anywhere, which must give the same
// floats as the plain conversion. The same input is also read as a framed data-plane address
// (transport/detail/ucx.h) with its transport profile.
//
// Input: byte 0: bit 0 reply (else dispatch), bits 1-7 the fragment size of the fused unpack;
// bytes 1-2: the header length H (little endian); H bytes of sealed header (the serialized
// protobuf, then its CRC-32 seal); the rest is the payload. As on both sides, a header whose seal
// does not match is still parsed (its seq names the dispatch to refuse) but never used further.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <vector>

#include "proto/dataplane.pb.h"
#include "tests/fuzz/fuzz_common.h"
#include "transport/detail/ucx.h"
#include "transport/detail/wire.h"

namespace detail = moemesh::transport::detail;
using moemesh::transport::WireDtype;

namespace {

void copy(void* to, const void* from, size_t n) {
  if (n) std::memcpy(to, from, n);
}

// The floats of a bf16 or f32 section, through the plain conversion.
std::vector<float> to_floats(const std::byte* bytes, size_t elems, WireDtype dtype) {
  std::vector<float> out(elems);
  if (dtype == WireDtype::BF16) {
    std::vector<uint16_t> aligned(elems);
    copy(aligned.data(), bytes, 2 * elems);
    detail::bf16_to_f32_n(aligned.data(), out.data(), elems);
  } else {
    copy(out.data(), bytes, 4 * elems);
  }
  return out;
}

// The fused path: `head_bytes` copied as they are, then the bf16 body straight into floats, in
// fragments of `frag` bytes. Returns false when the two paths disagree.
bool fused_matches(const std::byte* payload, size_t head_bytes, size_t total, size_t frag) {
  const size_t elems = (total - head_bytes) / 2;
  detail::ByteBuffer head, body;
  head.reserve(head_bytes);
  body.reserve(elems * 4);
  const detail::Bf16Message m{head.data(), head_bytes, reinterpret_cast<float*>(body.data()),
                              elems,       nullptr,    0};
  if (m.wire_bytes() != total) return false;
  for (size_t at = 0; at < total; at += frag)
    if (!detail::bf16_message_unpack(m, at, payload + at, std::min(frag, total - at))) return false;
  if (detail::bf16_message_unpack(m, total, payload, 1)) return false;  // past the end
  if (head_bytes && std::memcmp(head.data(), payload, head_bytes) != 0) return false;
  const std::vector<float> want = to_floats(payload + head_bytes, elems, WireDtype::BF16);
  return elems == 0 || std::memcmp(want.data(), body.data(), 4 * elems) == 0;
}

void dispatch(const uint8_t* header, size_t header_len, const std::byte* payload, size_t length,
              size_t frag) {
  moemesh::proto::DispatchHeader h;
  const detail::Unsealed sealed = detail::unseal_header(header, header_len);
  if (sealed.body == 0 || !h.ParseFromArray(header, static_cast<int>(sealed.body))) return;
  if (!sealed.intact) return;
  (void)detail::reply_layout(h.n_tokens(), h.slots(), h.hidden(), WireDtype::F32);
  if (h.version() != detail::kWireVersion) return;
  const auto dtype = detail::from_proto(h.dtype());
  if (!dtype) return;
  const auto layout = detail::dispatch_layout(h.n_tokens(), h.slots(), h.hidden(), *dtype);
  if (!layout || layout->total != length) return;
  if (layout->experts > layout->weights || layout->weights > layout->x || layout->x > length)
    __builtin_trap();
  const size_t routing = static_cast<size_t>(h.n_tokens()) * static_cast<size_t>(h.slots());
  std::vector<int32_t> experts(routing);
  std::vector<float> weights(routing);
  copy(experts.data(), payload + layout->experts, 4 * routing);
  copy(weights.data(), payload + layout->weights, 4 * routing);
  const size_t x_elems = static_cast<size_t>(h.n_tokens()) * static_cast<size_t>(h.hidden());
  if (layout->x + x_elems * detail::dtype_size(*dtype) != length) __builtin_trap();
  (void)to_floats(payload + layout->x, x_elems, *dtype);
  if (*dtype == WireDtype::BF16 && !fused_matches(payload, layout->x, length, frag))
    __builtin_trap();
}

void reply(const uint8_t* header, size_t header_len, const std::byte* payload, size_t length,
           size_t frag) {
  moemesh::proto::ReplyHeader h;
  const detail::Unsealed sealed = detail::unseal_header(header, header_len);
  if (sealed.body == 0 || !h.ParseFromArray(header, static_cast<int>(sealed.body))) return;
  if (!sealed.intact) return;
  if (!h.error().empty()) return;
  const auto dtype = detail::from_proto(h.dtype());
  if (!dtype) return;
  const auto layout = detail::reply_layout(h.n_tokens(), h.slots(), h.hidden(), *dtype);
  if (!layout || layout->total != length) return;
  const size_t elems = static_cast<size_t>(h.n_tokens()) * static_cast<size_t>(h.hidden());
  if (layout->rejected != elems * detail::dtype_size(*dtype) || layout->rejected > length)
    __builtin_trap();
  (void)to_floats(payload + layout->partial, elems, *dtype);
  if (*dtype == WireDtype::BF16) {
    // The client's fused receive: partial as floats, then `rejected` as a tail.
    const size_t rejected = length - 2 * elems;
    detail::ByteBuffer buf;
    buf.reserve(elems * 4 + rejected);
    const detail::Bf16Message m{
        nullptr, 0, reinterpret_cast<float*>(buf.data()), elems, buf.data() + elems * 4, rejected};
    if (m.wire_bytes() != length) __builtin_trap();
    for (size_t at = 0; at < length; at += frag)
      if (!detail::bf16_message_unpack(m, at, payload + at, std::min(frag, length - at)))
        __builtin_trap();
    if (rejected && std::memcmp(buf.data() + elems * 4, payload + 2 * elems, rejected) != 0)
      __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  moemesh::fuzz::quiet_logs();
  return 0;
}

// The whole input as a framed data-plane address (it travels inside control messages from other
// nodes): unframing never reads outside it, a frame that unframes frames back to the same bytes,
// and the peer's transport profile is judged against a local one without crashing.
void address(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const auto a = detail::unframe_address(input);
  if (!a.ok()) return;
  if (detail::frame_address(a->raw.data(), a->raw.size(), a->profile) != input) __builtin_trap();
  (void)detail::check_transport_profile(a->profile,
                                        "host=h posix=32832 sysv=32832 tcp_tx=64k tcp_rx=64k");
  (void)detail::check_transport_profile("tcp_tx=8k tcp_rx=64k", a->profile);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  address(data, size);
  if (size < 3) return 0;
  const bool is_reply = data[0] & 1;
  const size_t frag = (data[0] >> 1) + 1;
  const size_t header_len = std::min<size_t>(data[1] | (size_t{data[2]} << 8), size - 3);
  const uint8_t* header = data + 3;
  // The payload in its own allocation, so that ASan sees reads past its end.
  const size_t length = size - 3 - header_len;
  std::vector<std::byte> payload(length);
  copy(payload.data(), header + header_len, length);
  if (is_reply) {
    reply(header, header_len, payload.data(), length, frag);
  } else {
    dispatch(header, header_len, payload.data(), length, frag);
  }
  return 0;
}
