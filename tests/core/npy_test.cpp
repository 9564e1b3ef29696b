#include "core/npy.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "tests/core/test_checkpoint_writer.h"

namespace moemesh {
namespace {

using test::Contains;
using test::ScopedTempDir;

// The header of a .npy file: its length field and text, checked against the format.
std::string npy_header(const std::string& bytes) {
  EXPECT_GE(bytes.size(), 10u);
  if (bytes.size() < 10) return "";
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  const std::size_t len = static_cast<unsigned char>(bytes[8]) |
                          (static_cast<std::size_t>(static_cast<unsigned char>(bytes[9])) << 8);
  EXPECT_EQ((10 + len) % 64, 0u) << "header length " << len;
  EXPECT_LE(10 + len, bytes.size());
  const std::string header = bytes.substr(10, len);
  EXPECT_EQ(header.back(), '\n');
  return header;
}

// Writes a hand-made .npy file (version 1.0) with the given header dict and payload.
void write_raw_npy(const std::filesystem::path& path, std::string dict, const std::string& data) {
  dict.append((64 - (10 + dict.size() + 1) % 64) % 64, ' ');
  dict += '\n';
  std::string bytes("\x93NUMPY\x01\x00", 8);
  bytes += static_cast<char>(dict.size() & 0xff);
  bytes += static_cast<char>(dict.size() >> 8);
  test::write_file(path, bytes + dict + data);
}

TEST(Npy, RoundTrip1D) {
  ScopedTempDir dir;
  const std::vector<float> v = {1.5f, -2.0f, 0.0f, 3.0e-7f, 1e30f};
  ASSERT_TRUE(write_npy_f32(dir / "v.npy", {5}, v.data()).ok());

  const std::string bytes = test::read_file(dir / "v.npy");
  const std::string header = npy_header(bytes);
  EXPECT_TRUE(Contains(header, "'descr': '<f4'"));
  EXPECT_TRUE(Contains(header, "'fortran_order': False"));
  EXPECT_TRUE(Contains(header, "'shape': (5,)"));
  EXPECT_EQ(bytes.size(), 10 + header.size() + v.size() * sizeof(float));
  std::vector<float> payload(v.size());
  std::memcpy(payload.data(), bytes.data() + 10 + header.size(), v.size() * sizeof(float));
  EXPECT_EQ(payload, v);

  Expected<NpyArray> a = read_npy_f32(dir / "v.npy");
  ASSERT_TRUE(a.ok()) << a.error().message();
  EXPECT_EQ(a->shape, (std::vector<int64_t>{5}));
  EXPECT_EQ(a->data, v);
}

TEST(Npy, RoundTrip2D) {
  ScopedTempDir dir;
  std::vector<float> v(3 * 7);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i) * 0.25f - 2.0f;
  ASSERT_TRUE(write_npy_f32(dir / "m.npy", {3, 7}, v.data()).ok());
  const std::string header = npy_header(test::read_file(dir / "m.npy"));
  EXPECT_TRUE(Contains(header, "'shape': (3, 7)"));

  Expected<NpyArray> a = read_npy_f32(dir / "m.npy");
  ASSERT_TRUE(a.ok()) << a.error().message();
  EXPECT_EQ(a->shape, (std::vector<int64_t>{3, 7}));
  EXPECT_EQ(a->data, v);

  // Overwriting replaces the old contents.
  const float one = 4.0f;
  ASSERT_TRUE(write_npy_f32(dir / "m.npy", {1, 1}, &one).ok());
  a = read_npy_f32(dir / "m.npy");
  ASSERT_TRUE(a.ok()) << a.error().message();
  EXPECT_EQ(a->shape, (std::vector<int64_t>{1, 1}));
  EXPECT_EQ(a->data, std::vector<float>{4.0f});
}

TEST(Npy, RoundTripLongHeaderAndEmpty) {
  ScopedTempDir dir;
  // A shape long enough that the header needs more than one 64-byte block.
  const std::vector<int64_t> shape = {1, 2, 1, 3, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  std::vector<float> v(12);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  ASSERT_TRUE(write_npy_f32(dir / "long.npy", shape, v.data()).ok());
  EXPECT_GT(npy_header(test::read_file(dir / "long.npy")).size(), 64u);
  Expected<NpyArray> a = read_npy_f32(dir / "long.npy");
  ASSERT_TRUE(a.ok()) << a.error().message();
  EXPECT_EQ(a->shape, shape);
  EXPECT_EQ(a->data, v);

  ASSERT_TRUE(write_npy_f32(dir / "empty.npy", {0, 4}, nullptr).ok());
  a = read_npy_f32(dir / "empty.npy");
  ASSERT_TRUE(a.ok()) << a.error().message();
  EXPECT_EQ(a->shape, (std::vector<int64_t>{0, 4}));
  EXPECT_TRUE(a->data.empty());
}

TEST(Npy, ReadsFilesWrittenByNumpy) {
  ScopedTempDir dir;
  // numpy.save(np.array([[1, 2], [3, 4]], dtype='<f4')) writes exactly this header.
  const float v[4] = {1.0f, 2.0f, 3.0f, 4.0f};
  write_raw_npy(dir / "np.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
                std::string(reinterpret_cast<const char*>(v), sizeof v));
  Expected<NpyArray> a = read_npy_f32(dir / "np.npy");
  ASSERT_TRUE(a.ok()) << a.error().message();
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(a->data, (std::vector<float>{1.0f, 2.0f, 3.0f, 4.0f}));
}

TEST(Npy, ErrorsNameTheFile) {
  ScopedTempDir dir;
  const auto expect_error = [](const std::filesystem::path& path, const std::string& what) {
    Expected<NpyArray> a = read_npy_f32(path);
    ASSERT_FALSE(a.ok()) << path;
    EXPECT_TRUE(Contains(a.error().message(), path.string()));
    EXPECT_TRUE(Contains(a.error().message(), what));
  };

  expect_error(dir / "missing.npy", "missing.npy");

  test::write_file(dir / "text.npy", "hello, this is not a numpy file at all");
  expect_error(dir / "text.npy", "not a .npy file");

  test::write_file(dir / "short.npy", "\x93NU");
  expect_error(dir / "short.npy", "not a .npy file");

  const double d[2] = {1.0, 2.0};
  write_raw_npy(dir / "f64.npy", "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }",
                std::string(reinterpret_cast<const char*>(d), sizeof d));
  expect_error(dir / "f64.npy", "<f8");

  const float f[4] = {1.0f, 2.0f, 3.0f, 4.0f};
  const std::string data(reinterpret_cast<const char*>(f), sizeof f);
  write_raw_npy(dir / "fortran.npy", "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
                data);
  expect_error(dir / "fortran.npy", "fortran_order");

  write_raw_npy(dir / "big_endian.npy", "{'descr': '>f4', 'fortran_order': False, 'shape': (4,), }",
                data);
  expect_error(dir / "big_endian.npy", ">f4");

  // The header announces more data than the file holds.
  write_raw_npy(dir / "truncated.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }",
                data);
  expect_error(dir / "truncated.npy", "5 floats");

  // The header length runs past the end of the file.
  std::string bytes = test::read_file(dir / "truncated.npy").substr(0, 40);
  test::write_file(dir / "short_header.npy", bytes);
  expect_error(dir / "short_header.npy", "header");
}

// Regression: read_npy_f32 once trusted the header's shape. A huge shape threw std::bad_alloc, a
// dimension beyond int64 threw std::out_of_range, and a product that overflowed to 0 was accepted
// as an empty array with shape (2^32, 2^32).
TEST(Npy, HugeShapesAreErrors) {
  ScopedTempDir dir;
  const std::string data(16, '\0');
  for (const char* shape :
       {"(1000000000000000,)", "(99999999999999999999999,)", "(4294967296, 4294967296)"}) {
    const auto path = dir / "huge.npy";
    write_raw_npy(path,
                  std::string("{'descr': '<f4', 'fortran_order': False, 'shape': ") + shape + ", }",
                  data);
    try {
      Expected<NpyArray> a = read_npy_f32(path);
      ASSERT_FALSE(a.ok()) << shape;
      EXPECT_TRUE(Contains(a.error().message(), path.string()));
    } catch (const std::exception& e) {
      ADD_FAILURE() << "read_npy_f32 threw " << e.what() << " for shape " << shape;
    }
  }
}

}  // namespace
}  // namespace moemesh
