#include "core/checkpoint.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "tests/core/test_checkpoint_writer.h"

namespace moemesh {
namespace {

namespace fs = std::filesystem;
using test::Contains;
using test::Corruption;
using test::SafetensorsWriter;
using test::ScopedTempDir;

// Half-precision bit patterns with their exact float values.
const std::vector<uint16_t> kF16Bits = {0x3c00, 0xc000, 0x3800, 0x7bff, 0x0001, 0x8000};
const std::vector<float> kF16Values = {1.0f, -2.0f, 0.5f, 65504.0f, std::ldexp(1.0f, -24), -0.0f};
const std::vector<uint16_t> kBf16Bits = {0x3f80, 0xc000, 0x4049, 0xbf00};
const std::vector<float> kBf16Values = {1.0f, -2.0f, 3.140625f, -0.5f};

SafetensorsWriter three_dtypes() {
  SafetensorsWriter w;
  w.f32("a.f32", {2, 3}, {1.0f, -2.5f, 3.25f, 0.0f, 1e-20f, -7.0f});
  w.f16_bits("b.f16", {3, 2}, kF16Bits);
  w.bf16_bits("c.bf16", {4}, kBf16Bits);
  return w;
}

Expected<std::shared_ptr<const Checkpoint>> open_written(const ScopedTempDir& dir,
                                                         const SafetensorsWriter& w,
                                                         const Corruption& c = {}) {
  w.write(dir / "model.safetensors", c);
  return Checkpoint::open(dir.path());
}

// Opens a directory expected to fail and returns the message.
std::string open_error(const fs::path& dir) {
  Expected<std::shared_ptr<const Checkpoint>> ck = Checkpoint::open(dir);
  EXPECT_FALSE(ck.ok()) << "opened " << dir;
  return ck.ok() ? "" : ck.error().message();
}

TEST(Checkpoint, ReadsF32F16Bf16Exactly) {
  ScopedTempDir dir;
  auto ck = open_written(dir, three_dtypes());
  ASSERT_TRUE(ck.ok()) << ck.error().message();
  const Checkpoint& c = **ck;
  EXPECT_EQ(c.names(), (std::vector<std::string>{"a.f32", "b.f16", "c.bf16"}));
  EXPECT_TRUE(c.contains("b.f16"));
  EXPECT_FALSE(c.contains("__metadata__"));
  EXPECT_EQ(c.dir(), dir.path());

  Expected<TensorView> a = c.tensor("a.f32");
  ASSERT_TRUE(a.ok()) << a.error().message();
  EXPECT_EQ(a->name, "a.f32");
  EXPECT_EQ(a->file, (dir / "model.safetensors").string());
  EXPECT_EQ(a->dtype, kernels::DType::F32);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a->numel(), 6);
  EXPECT_EQ(a->to_f32(), (std::vector<float>{1.0f, -2.5f, 3.25f, 0.0f, 1e-20f, -7.0f}));
  const kernels::WeightView m = a->matrix();
  EXPECT_EQ(m.rows, 2);
  EXPECT_EQ(m.cols, 3);
  EXPECT_EQ(static_cast<const float*>(m.row(1))[2], -7.0f);

  Expected<TensorView> b = c.tensor("b.f16", {3, 2}, "a test");
  ASSERT_TRUE(b.ok()) << b.error().message();
  EXPECT_EQ(b->dtype, kernels::DType::F16);
  const std::vector<float> bf = b->to_f32();
  ASSERT_EQ(bf.size(), kF16Values.size());
  for (std::size_t i = 0; i < bf.size(); ++i) {
    EXPECT_EQ(bf[i], kF16Values[i]) << i;
    EXPECT_EQ(std::signbit(bf[i]), std::signbit(kF16Values[i])) << i;
  }
  uint16_t raw = 0;
  std::memcpy(&raw, static_cast<const char*>(b->data) + 2, 2);
  EXPECT_EQ(raw, 0xc000);  // the view points at the file's bytes

  Expected<TensorView> bb = c.tensor("c.bf16");
  ASSERT_TRUE(bb.ok()) << bb.error().message();
  EXPECT_EQ(bb->dtype, kernels::DType::BF16);
  EXPECT_EQ(bb->shape, (std::vector<int64_t>{4}));
  EXPECT_EQ(bb->to_f32(), kBf16Values);
}

TEST(Checkpoint, OpenFileAndEmptyTensor) {
  ScopedTempDir dir;
  SafetensorsWriter w = three_dtypes();
  w.f32("empty", {0, 4}, {});
  w.write(dir / "weights.safetensors");
  auto ck = Checkpoint::open_file(dir / "weights.safetensors");
  ASSERT_TRUE(ck.ok()) << ck.error().message();
  Expected<TensorView> e = (*ck)->tensor("empty", {0, 4}, "a test");
  ASSERT_TRUE(e.ok()) << e.error().message();
  EXPECT_EQ(e->numel(), 0);
  EXPECT_TRUE(e->to_f32().empty());
  // A single file of any name is the checkpoint of its directory.
  auto by_dir = Checkpoint::open(dir.path());
  ASSERT_TRUE(by_dir.ok()) << by_dir.error().message();
  EXPECT_TRUE((*by_dir)->contains("c.bf16"));
}

TEST(Checkpoint, Sharded) {
  ScopedTempDir dir;
  SafetensorsWriter s1, s2;
  s1.f32("x", {2}, {1.0f, 2.0f}).bf16_bits("y", {1}, {0x3f80});
  s2.f32("z", {1, 1}, {42.0f});
  s1.write(dir / "model-00001-of-00002.safetensors");
  s2.write(dir / "model-00002-of-00002.safetensors");
  test::write_index(dir.path(), {{"x", "model-00001-of-00002.safetensors"},
                                 {"y", "model-00001-of-00002.safetensors"},
                                 {"z", "model-00002-of-00002.safetensors"}});
  auto ck = Checkpoint::open(dir.path());
  ASSERT_TRUE(ck.ok()) << ck.error().message();
  EXPECT_EQ((*ck)->names(), (std::vector<std::string>{"x", "y", "z"}));
  Expected<TensorView> z = (*ck)->tensor("z");
  ASSERT_TRUE(z.ok()) << z.error().message();
  EXPECT_EQ(z->file, (dir / "model-00002-of-00002.safetensors").string());
  EXPECT_EQ(z->to_f32(), std::vector<float>{42.0f});
  EXPECT_EQ((*ck)->tensor("x")->to_f32(), (std::vector<float>{1.0f, 2.0f}));
  EXPECT_EQ((*ck)->tensor("y")->to_f32(), std::vector<float>{1.0f});
}

TEST(Checkpoint, MissingOrEmptyDirectory) {
  ScopedTempDir dir;
  EXPECT_TRUE(Contains(open_error(dir / "nope"), (dir / "nope").string()));

  test::write_file(dir / "config.json", "{}");
  const std::string m = open_error(dir.path());
  EXPECT_TRUE(Contains(m, dir.path().string()));
  EXPECT_TRUE(Contains(m, "safetensors"));
}

TEST(Checkpoint, FileTooShortForHeader) {
  ScopedTempDir dir;
  test::write_file(dir / "model.safetensors", std::string("\x10\0\0\0\0\0\0", 7));
  const std::string m = open_error(dir.path());
  EXPECT_TRUE(Contains(m, (dir / "model.safetensors").string()));
  EXPECT_TRUE(Contains(m, "truncated"));
}

TEST(Checkpoint, HeaderLengthLargerThanFile) {
  ScopedTempDir dir;
  Corruption c;
  c.header_len = uint64_t{1} << 40;
  three_dtypes().write(dir / "model.safetensors", c);
  std::string m = open_error(dir.path());
  EXPECT_TRUE(Contains(m, (dir / "model.safetensors").string()));
  EXPECT_TRUE(Contains(m, std::to_string(uint64_t{1} << 40)));

  c.header_len = ~uint64_t{0};  // must not overflow into a small length
  three_dtypes().write(dir / "model.safetensors", c);
  EXPECT_TRUE(Contains(open_error(dir.path()), (dir / "model.safetensors").string()));
}

TEST(Checkpoint, HeaderNotJson) {
  ScopedTempDir dir;
  for (const std::string& header :
       {std::string("{\"a\": [1, 2"), std::string("[1, 2, 3]"), std::string("\xff\xfe garbage")}) {
    Corruption c;
    c.header = header;
    three_dtypes().write(dir / "model.safetensors", c);
    const std::string m = open_error(dir.path());
    EXPECT_TRUE(Contains(m, (dir / "model.safetensors").string()));
    EXPECT_TRUE(Contains(m, "header"));
  }
  // An entry that is not a tensor description names the entry.
  Corruption c;
  c.header = R"({"weird": 5})";
  three_dtypes().write(dir / "model.safetensors", c);
  EXPECT_TRUE(Contains(open_error(dir.path()), "\"weird\""));
}

TEST(Checkpoint, TruncatedData) {
  ScopedTempDir dir;
  Corruption c;
  c.truncate = 3;  // cuts into the last tensor, c.bf16
  auto ck = open_written(dir, three_dtypes(), c);
  ASSERT_FALSE(ck.ok());
  EXPECT_TRUE(Contains(ck.error().message(), (dir / "model.safetensors").string()));
  EXPECT_TRUE(Contains(ck.error().message(), "\"c.bf16\""));
  EXPECT_TRUE(Contains(ck.error().message(), "truncated"));

  SafetensorsWriter w = three_dtypes();
  w.set_offsets("a.f32", 1000, 1024);  // the right size, past the end
  ck = open_written(dir, w);
  ASSERT_FALSE(ck.ok());
  EXPECT_TRUE(Contains(ck.error().message(), "\"a.f32\""));
  EXPECT_TRUE(Contains(ck.error().message(), "1024"));
}

TEST(Checkpoint, OffsetsNotMatchingShape) {
  ScopedTempDir dir;
  SafetensorsWriter w = three_dtypes();
  w.set_header_shape("b.f16", {3, 3});  // 18 bytes announced, 12 stored
  auto ck = open_written(dir, w);
  ASSERT_FALSE(ck.ok());
  EXPECT_TRUE(Contains(ck.error().message(), (dir / "model.safetensors").string()));
  EXPECT_TRUE(Contains(ck.error().message(), "\"b.f16\""));
  EXPECT_TRUE(Contains(ck.error().message(), "[3, 3]"));

  w = three_dtypes();
  w.set_offsets("a.f32", 8, 4);  // end before begin
  ck = open_written(dir, w);
  ASSERT_FALSE(ck.ok());
  EXPECT_TRUE(Contains(ck.error().message(), "\"a.f32\""));

  w = three_dtypes();
  w.set_header_shape("a.f32", {2, -3});
  ck = open_written(dir, w);
  ASSERT_FALSE(ck.ok());
  EXPECT_TRUE(Contains(ck.error().message(), "\"a.f32\""));
}

TEST(Checkpoint, UnknownDtype) {
  ScopedTempDir dir;
  SafetensorsWriter w = three_dtypes();
  w.set_dtype("a.f32", "F33");
  auto ck = open_written(dir, w);
  ASSERT_FALSE(ck.ok());
  EXPECT_TRUE(Contains(ck.error().message(), (dir / "model.safetensors").string()));
  EXPECT_TRUE(Contains(ck.error().message(), "\"a.f32\""));
  EXPECT_TRUE(Contains(ck.error().message(), "F33"));
}

TEST(Checkpoint, UnsupportedDtypeFailsOnlyWhenRequested) {
  ScopedTempDir dir;
  SafetensorsWriter w = three_dtypes();
  w.raw("step", "I64", {1}, std::string(8, '\0'));
  w.raw("scale", "F8_E5M2", {4}, std::string(4, '\x38'));
  auto ck = open_written(dir, w);
  ASSERT_TRUE(ck.ok()) << ck.error().message();
  EXPECT_TRUE((*ck)->contains("step"));
  EXPECT_TRUE((*ck)->tensor("a.f32").ok());
  for (const char* name : {"step", "scale"}) {
    Expected<TensorView> t = (*ck)->tensor(name);
    ASSERT_FALSE(t.ok()) << name;
    EXPECT_TRUE(Contains(t.error().message(), std::string("\"") + name + "\""));
    EXPECT_TRUE(Contains(t.error().message(), (dir / "model.safetensors").string()));
  }
  EXPECT_TRUE(Contains((*ck)->tensor("step").error().message(), "I64"));
  EXPECT_TRUE(Contains((*ck)->tensor("scale").error().message(), "F8_E5M2"));
}

TEST(Checkpoint, MisalignedDataIsAnErrorNotACrash) {
  ScopedTempDir dir;
  SafetensorsWriter w;
  w.f32("x", {2}, {1.0f, 2.0f});
  Corruption c;
  c.align = false;
  const std::size_t json_size = w.header_json().size();
  c.pad_prefix = std::string((10 - json_size % 8) % 8, ' ');  // header length = 2 mod 8
  auto ck = open_written(dir, w, c);
  ASSERT_TRUE(ck.ok()) << ck.error().message();
  Expected<TensorView> x = (*ck)->tensor("x");
  ASSERT_FALSE(x.ok());
  EXPECT_TRUE(Contains(x.error().message(), "\"x\""));
  EXPECT_TRUE(Contains(x.error().message(), "aligned"));
}

TEST(Checkpoint, MissingTensorAndShapeMismatch) {
  ScopedTempDir dir;
  auto ck = open_written(dir, three_dtypes());
  ASSERT_TRUE(ck.ok()) << ck.error().message();
  Expected<TensorView> t = (*ck)->tensor("model.norm.weight");
  ASSERT_FALSE(t.ok());
  EXPECT_TRUE(Contains(t.error().message(), "\"model.norm.weight\""));
  EXPECT_TRUE(Contains(t.error().message(), dir.path().string()));

  t = (*ck)->tensor("a.f32", {3, 2}, "hidden_size=3 in config.json");
  ASSERT_FALSE(t.ok());
  const std::string& m = t.error().message();
  EXPECT_TRUE(Contains(m, "\"a.f32\""));
  EXPECT_TRUE(Contains(m, (dir / "model.safetensors").string()));
  EXPECT_TRUE(Contains(m, "[2, 3]"));
  EXPECT_TRUE(Contains(m, "[3, 2]"));
  EXPECT_TRUE(Contains(m, "hidden_size=3 in config.json"));

  EXPECT_FALSE((*ck)->tensor("c.bf16", {4, 1}, "rank").ok());
  EXPECT_TRUE((*ck)->tensor("c.bf16", {4}, "rank").ok());
}

TEST(Checkpoint, IndexNamesMissingShard) {
  ScopedTempDir dir;
  three_dtypes().write(dir / "model-00001-of-00002.safetensors");
  test::write_index(dir.path(), {{"a.f32", "model-00001-of-00002.safetensors"},
                                 {"d", "model-00002-of-00002.safetensors"}});
  const std::string m = open_error(dir.path());
  EXPECT_TRUE(Contains(m, (dir / "model-00002-of-00002.safetensors").string()));
  EXPECT_TRUE(Contains(m, "model.safetensors.index.json"));
}

TEST(Checkpoint, IndexPlacesTensorInWrongShard) {
  ScopedTempDir dir;
  SafetensorsWriter s1, s2;
  s1.f32("x", {1}, {1.0f});
  s2.f32("y", {1}, {2.0f});
  s1.write(dir / "a.safetensors");
  s2.write(dir / "b.safetensors");
  test::write_index(dir.path(), {{"x", "a.safetensors"}, {"y", "a.safetensors"}});
  std::string m = open_error(dir.path());
  EXPECT_TRUE(Contains(m, "\"y\""));
  EXPECT_TRUE(Contains(m, (dir / "a.safetensors").string()));

  // A tensor that no shard holds at all.
  test::write_index(dir.path(), {{"x", "a.safetensors"}, {"ghost", "b.safetensors"}});
  m = open_error(dir.path());
  EXPECT_TRUE(Contains(m, "\"ghost\""));

  // Shard names must stay inside the model directory.
  test::write_index(dir.path(), {{"x", "../a.safetensors"}});
  EXPECT_TRUE(Contains(open_error(dir.path()), "../a.safetensors"));

  test::write_file(dir / "model.safetensors.index.json", R"({"weight_map": [1]})");
  EXPECT_TRUE(Contains(open_error(dir.path()), "model.safetensors.index.json"));
}

TEST(Checkpoint, SeveralFilesWithoutIndex) {
  ScopedTempDir dir;
  three_dtypes().write(dir / "model-00001-of-00002.safetensors");
  three_dtypes().write(dir / "model-00002-of-00002.safetensors");
  const std::string m = open_error(dir.path());
  EXPECT_TRUE(Contains(m, dir.path().string()));
  EXPECT_TRUE(Contains(m, "model.safetensors.index.json"));
}

TEST(Checkpoint, CorruptShardNamesItsFile) {
  ScopedTempDir dir;
  SafetensorsWriter s1, s2;
  s1.f32("x", {1}, {1.0f});
  s2.f32("y", {2}, {2.0f, 3.0f});
  s1.write(dir / "a.safetensors");
  Corruption c;
  c.truncate = 4;
  s2.write(dir / "b.safetensors", c);
  test::write_index(dir.path(), {{"x", "a.safetensors"}, {"y", "b.safetensors"}});
  const std::string m = open_error(dir.path());
  EXPECT_TRUE(Contains(m, (dir / "b.safetensors").string()));
  EXPECT_TRUE(Contains(m, "\"y\""));
}

// Regression: dimensions of 2^63 and more once passed the unsigned check and became negative
// int64 dimensions ([-1, -1] has one element, so offsets [0, 4] "matched").
TEST(Checkpoint, DimensionsBeyondInt64AreRejected) {
  ScopedTempDir dir;
  Corruption c;
  c.header = R"({"x": {"dtype": "F32", "shape": [18446744073709551615, 18446744073709551615],
                       "data_offsets": [0, 4]}})";
  SafetensorsWriter w;
  w.f32("x", {1}, {1.0f});
  auto ck = open_written(dir, w, c);
  ASSERT_FALSE(ck.ok()) << "shape read as " << shape_string((*ck)->tensor("x")->shape);
  EXPECT_TRUE(Contains(ck.error().message(), "\"x\""));
}

}  // namespace
}  // namespace moemesh
