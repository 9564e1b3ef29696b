// Wire format of the data plane: dtype conversion, payload layouts, address framing.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

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
  const std::string framed = frame_address(raw.data(), raw.size());
  auto back = unframe_address(framed);
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(*back, raw);
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
}

}  // namespace
}  // namespace moemesh::transport::detail
