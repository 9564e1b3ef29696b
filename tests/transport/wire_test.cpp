// Wire format of the data plane: dtype conversion, payload layouts, address framing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>

#include "transport/detail/ucx.h"
#include "transport/detail/wire.h"

namespace moemesh::transport::detail {
namespace {

TEST(transportWire, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(-2.0f), 0xc000);
  // 1 + 2^-8 is halfway between 1 and the next bf16 (1 + 2^-7): ties go to even (1.0).
  EXPECT_EQ(f32_to_bf16(1.0f + 1.0f / 256), 0x3f80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: ties go to even (up).
  EXPECT_EQ(f32_to_bf16(1.0f + 3.0f / 256), 0x3f82);
  EXPECT_EQ(f32_to_bf16(1.0f + 1.0f / 256 + 1.0f / 4096), 0x3f81);
  EXPECT_EQ(bf16_to_f32(0x3f81), 1.0f + 1.0f / 128);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isinf(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::infinity()))));
}

TEST(transportWire, InPlaceConversionMatchesCopyingConversion) {
  std::vector<float> v(1001);
  for (size_t i = 0; i < v.size(); ++i) v[i] = std::sin(static_cast<float>(i)) * 100.0f;
  std::vector<uint16_t> want(v.size());
  f32_to_bf16_n(v.data(), want.data(), v.size());
  f32_to_bf16_in_place(v.data(), v.size());
  const auto* got = reinterpret_cast<const uint16_t*>(v.data());
  for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], want[i]) << i;
}

// UCX cuts a message into fragments anywhere, bf16 values included; every byte must land.
TEST(transportWire, Bf16MessagePacksAndUnpacksInFragmentsOfAnySize) {
  std::vector<std::byte> head(5), tail(3);
  for (size_t i = 0; i < head.size(); ++i) head[i] = static_cast<std::byte>(0xa0 + i);
  for (size_t i = 0; i < tail.size(); ++i) tail[i] = static_cast<std::byte>(0xb0 + i);
  std::vector<float> body(37);
  for (size_t i = 0; i < body.size(); ++i) body[i] = std::sin(static_cast<float>(i)) * 1000.0f;
  body[3] = std::numeric_limits<float>::quiet_NaN();
  const Bf16Message src{head.data(), head.size(), body.data(),
                        body.size(), tail.data(), tail.size()};
  std::vector<std::byte> want(head);
  for (float v : body) {
    const uint16_t b = f32_to_bf16(v);
    want.push_back(static_cast<std::byte>(b & 0xffu));
    want.push_back(static_cast<std::byte>(b >> 8));
  }
  want.insert(want.end(), tail.begin(), tail.end());
  ASSERT_EQ(src.wire_bytes(), want.size());

  for (size_t frag : {1, 2, 3, 7, 16, 33, 200}) {
    std::vector<std::byte> wire(want.size() + 4);
    std::vector<size_t> starts;
    for (size_t at = 0; at < want.size(); at += frag) {
      EXPECT_EQ(bf16_message_pack(src, at, wire.data() + at, frag),
                std::min(frag, want.size() - at));
      starts.push_back(at);
    }
    ASSERT_TRUE(std::equal(want.begin(), want.end(), wire.begin())) << "fragments of " << frag;

    std::vector<std::byte> h(head.size()), t(tail.size());
    std::vector<float> b(body.size(), 12345.0f);
    const Bf16Message dst{h.data(), h.size(), b.data(), b.size(), t.data(), t.size()};
    std::reverse(starts.begin(), starts.end());  // any order
    for (size_t at : starts)
      ASSERT_TRUE(bf16_message_unpack(dst, at, wire.data() + at, std::min(frag, want.size() - at)));
    EXPECT_FALSE(bf16_message_unpack(dst, want.size() - 1, wire.data(), 2));
    EXPECT_EQ(h, head);
    EXPECT_EQ(t, tail);
    for (size_t i = 0; i < body.size(); ++i) {
      const float expect = bf16_to_f32(f32_to_bf16(body[i]));
      if (std::isnan(expect))
        EXPECT_TRUE(std::isnan(b[i]));
      else
        EXPECT_EQ(b[i], expect) << "element " << i << ", fragments of " << frag;
    }
  }
}

TEST(transportWire, LayoutsKeepSectionsAlignedAndRefuseBadShapes) {
  const auto d = dispatch_layout(3, 2, 5, WireDtype::BF16);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->weights, 24u);
  EXPECT_EQ(d->x, 48u);
  EXPECT_EQ(d->total, 48u + 3 * 5 * 2);
  const auto r = reply_layout(3, 2, 5, WireDtype::F32);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->rejected, 60u);
  EXPECT_EQ(r->total, 66u);
  EXPECT_TRUE(dispatch_layout(0, 2, 5, WireDtype::F32));
  EXPECT_FALSE(dispatch_layout(-1, 2, 5, WireDtype::F32));
  EXPECT_FALSE(dispatch_layout(3, -2, 5, WireDtype::F32));
  EXPECT_FALSE(dispatch_layout(3, 2, 0, WireDtype::F32));
  EXPECT_FALSE(dispatch_layout(int64_t{1} << 40, 2, 4096, WireDtype::F32));
  EXPECT_FALSE(reply_layout(int64_t{1} << 40, 2, 4096, WireDtype::BF16));
}

TEST(transportWire, AddressFrameRoundTripsAndDetectsDamage) {
  static const char kRaw[] = "\x01\x02some ucx address\x00\xff";
  const std::string raw(kRaw, sizeof(kRaw) - 1);
  const std::string profile = "host=abc posix=32832 sysv=32832";
  const std::string framed = frame_address(raw.data(), raw.size(), profile);
  auto back = unframe_address(framed);
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(back->raw, raw);
  EXPECT_EQ(back->profile, profile);
  const std::string bare_framed = frame_address(raw.data(), raw.size());
  auto bare = unframe_address(bare_framed);  // views into bare_framed
  ASSERT_TRUE(bare.ok()) << bare.error().message();
  EXPECT_EQ(bare->raw, raw);
  EXPECT_EQ(bare->profile, "");
  EXPECT_FALSE(unframe_address(framed.substr(0, 8)).ok());
  EXPECT_FALSE(unframe_address(framed + "x").ok());
  std::string flipped = framed;
  flipped[framed.size() - 2] ^= 1;
  auto bad = unframe_address(flipped);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message().find("checksum"), std::string::npos);
  std::string version = framed;
  version[4] = 9;
  EXPECT_FALSE(unframe_address(version).ok());
  std::string profile_flipped = framed;
  profile_flipped[15] ^= 1;  // inside the profile: covered by the checksum too
  EXPECT_FALSE(unframe_address(profile_flipped).ok());
}

TEST(transportWire, AddressHexRoundTripsAndRefusesWhatIsNotHex) {
  static const char kRaw[] = "MMDP\x02\x00\xff\x10";
  const std::string raw(kRaw, sizeof(kRaw) - 1);
  const std::string hex = address_to_hex(raw);
  EXPECT_EQ(hex,
            "4d4d445002"
            "00ff10");
  EXPECT_EQ(address_from_hex(hex), raw);
  EXPECT_EQ(address_from_hex("4D4d"), std::string("MM"));
  EXPECT_FALSE(address_from_hex("abc"));  // odd length
  EXPECT_FALSE(address_from_hex("zz"));
  EXPECT_EQ(address_from_hex(""), std::string());
}

// UCX 1.13 crashes when two shared-memory peers use different segment sizes, or when a tcp
// segment is larger than its receiver's: connect() refuses such a peer with a message naming the
// variables.
TEST(transportWire, TransportProfilesThatWouldCrashUcxAreRefused) {
  const std::string ours = "host=m1 posix=32832 sysv=32832 tcp_tx=64k tcp_rx=64k";
  EXPECT_TRUE(check_transport_profile(ours, ours).ok());
  EXPECT_TRUE(check_transport_profile("", ours).ok());
  EXPECT_TRUE(check_transport_profile(ours, "").ok());
  // Another machine: shared memory is not used between them.
  EXPECT_TRUE(check_transport_profile("host=m2 posix=8256 sysv=8256", ours).ok());
  const Status posix = check_transport_profile("host=m1 posix=8256 sysv=32832", ours);
  ASSERT_FALSE(posix.ok());
  EXPECT_NE(posix.error().message().find("posix"), std::string::npos) << posix.error().message();
  EXPECT_NE(posix.error().message().find("8256"), std::string::npos);
  EXPECT_NE(posix.error().message().find("UCX_POSIX_SEG_SIZE"), std::string::npos);
  EXPECT_FALSE(check_transport_profile("host=m1 posix=32832 sysv=default", ours).ok());
  // Tcp: UCX's defaults (8k out, 64k in) fit 64k segments; a receiver of 16k does not.
  EXPECT_TRUE(check_transport_profile("tcp_tx=8k tcp_rx=64k", ours).ok());
  EXPECT_TRUE(
      check_transport_profile("host=m2 posix=8256 sysv=8256 tcp_tx=65536 tcp_rx=65536", ours).ok());
  const Status small_rx = check_transport_profile("tcp_tx=8k tcp_rx=16k", ours);
  ASSERT_FALSE(small_rx.ok());
  EXPECT_NE(small_rx.error().message().find("UCX_TCP_RX_SEG_SIZE"), std::string::npos)
      << small_rx.error().message();
  EXPECT_FALSE(check_transport_profile("tcp_tx=128k tcp_rx=128k", ours).ok());
  // A value that is not a size is not judged.
  EXPECT_TRUE(check_transport_profile("tcp_tx=auto tcp_rx=64k", ours).ok());
}

TEST(transportWire, MemoryUnitsParseLikeUcx) {
  EXPECT_EQ(parse_memunits("65536"), 65536u);
  EXPECT_EQ(parse_memunits("64k"), 65536u);
  EXPECT_EQ(parse_memunits("8K"), 8192u);
  EXPECT_EQ(parse_memunits("64kb"), 65536u);
  EXPECT_EQ(parse_memunits("1m"), 1048576u);
  EXPECT_FALSE(parse_memunits(""));
  EXPECT_FALSE(parse_memunits("auto"));
  EXPECT_FALSE(parse_memunits("12q"));
}

// The profile of this process names this machine and the sizes in effect (the defaults moemesh
// sets unless the environment has values).
TEST(transportWire, TransportProfileOfThisProcess) {
  DataPlaneOptions o;
  o.transports = "sm,tcp";
  auto w = UcxWorker::create(o, "client", false);
  ASSERT_TRUE(w.ok()) << w.error().message();
  const std::string profile = transport_profile("sm,tcp");
  EXPECT_EQ(profile, (*w)->profile());
  EXPECT_NE(profile.find("host="), std::string::npos);
  if (std::getenv("UCX_MM_SEG_SIZE") == nullptr) {
    const char* posix = std::getenv("UCX_POSIX_SEG_SIZE");
    const char* sysv = std::getenv("UCX_SYSV_SEG_SIZE");
    ASSERT_TRUE(posix != nullptr && sysv != nullptr);
    EXPECT_NE(profile.find(std::string("posix=") + posix), std::string::npos) << profile;
    EXPECT_NE(profile.find(std::string("sysv=") + sysv), std::string::npos) << profile;
  }
  if (std::getenv("UCX_TCP_RX_SEG_SIZE") == nullptr) {
    const char* tx = std::getenv("UCX_TCP_TX_SEG_SIZE");
    ASSERT_TRUE(tx != nullptr);
    EXPECT_NE(profile.find(std::string("tcp_tx=") + tx), std::string::npos) << profile;
  }
  EXPECT_EQ(transport_profile("tcp").find("host="), std::string::npos);
  EXPECT_EQ(transport_profile("sm").find("tcp_tx="), std::string::npos);
  auto back = unframe_address((*w)->address());
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->profile, profile);
}

}  // namespace
}  // namespace moemesh::transport::detail
