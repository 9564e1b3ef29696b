// Test helpers for core: a scoped temporary directory and a tiny safetensors writer.
//
// SafetensorsWriter lays tensors out as the safetensors library does (an 8-byte little-endian
// header length, a JSON header padded with spaces to a multiple of 8 bytes, then the tensor data
// in insertion order) and has knobs that corrupt the result in the ways a real file can be
// broken: wrong data_offsets, a wrong shape in the header, a lying header length, a header that
// is not JSON, a truncated file.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace moemesh::test {

// A fresh directory under testing::TempDir(), named after the running test, removed on
// destruction.
class ScopedTempDir {
 public:
  ScopedTempDir() {
    static std::atomic<int> counter{0};
    const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = info ? std::string(info->test_suite_name()) + "." + info->name() : "test";
    for (char& ch : name)
      if (ch == '/') ch = '_';
    path_ =
        std::filesystem::path(::testing::TempDir()) /
        ("moemesh_" + name + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~ScopedTempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  ScopedTempDir(const ScopedTempDir&) = delete;
  ScopedTempDir& operator=(const ScopedTempDir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

// EXPECT_TRUE(Contains(message, "tensor name")) prints both strings when it fails.
inline ::testing::AssertionResult Contains(const std::string& haystack, const std::string& needle) {
  if (haystack.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "\"" << haystack << "\" does not contain \"" << needle << "\"";
}

inline void write_file(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Writes model.safetensors.index.json mapping each tensor name to its shard's file name.
inline void write_index(const std::filesystem::path& dir,
                        const std::map<std::string, std::string>& weight_map) {
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}};
  write_file(dir / "model.safetensors.index.json", index.dump(2));
}

// How SafetensorsWriter::write breaks the file it writes.
struct Corruption {
  std::optional<uint64_t> header_len;  // write this length instead of the true one
  std::optional<std::string> header;   // write this text instead of the JSON header
  std::size_t truncate = 0;            // drop this many bytes from the end of the file
  bool align = true;                   // pad the header to a multiple of 8 bytes
  std::string pad_prefix;              // inserted before the header JSON (misaligns data)
};

class SafetensorsWriter {
 public:
  struct Tensor {
    std::string name;
    std::string dtype;  // as written in the header: "F32", "BF16", "I64", ...
    std::vector<int64_t> shape;
    std::string bytes;
    std::optional<std::pair<uint64_t, uint64_t>> offsets;  // overrides the computed offsets
  };

  SafetensorsWriter& raw(const std::string& name, const std::string& dtype,
                         std::vector<int64_t> shape, std::string bytes) {
    remove(name);
    tensors_.push_back({name, dtype, std::move(shape), std::move(bytes), std::nullopt});
    return *this;
  }

  SafetensorsWriter& f32(const std::string& name, std::vector<int64_t> shape,
                         const std::vector<float>& values) {
    return raw(name, "F32", std::move(shape), to_bytes(values));
  }

  // Half-precision tensors given as raw bit patterns.
  SafetensorsWriter& f16_bits(const std::string& name, std::vector<int64_t> shape,
                              const std::vector<uint16_t>& bits) {
    return raw(name, "F16", std::move(shape), to_bytes(bits));
  }
  SafetensorsWriter& bf16_bits(const std::string& name, std::vector<int64_t> shape,
                               const std::vector<uint16_t>& bits) {
    return raw(name, "BF16", std::move(shape), to_bytes(bits));
  }

  // Knobs.
  void remove(const std::string& name) {
    std::erase_if(tensors_, [&](const Tensor& t) { return t.name == name; });
  }
  void set_offsets(const std::string& name, uint64_t begin, uint64_t end) {
    find(name).offsets = std::make_pair(begin, end);
  }
  // Changes the shape the header announces, keeping the data (so offsets no longer match,
  // unless the element count stays the same).
  void set_header_shape(const std::string& name, std::vector<int64_t> shape) {
    find(name).shape = std::move(shape);
  }
  void set_dtype(const std::string& name, const std::string& dtype) { find(name).dtype = dtype; }

  bool has(const std::string& name) const {
    for (const Tensor& t : tensors_)
      if (t.name == name) return true;
    return false;
  }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const Tensor& t : tensors_) out.push_back(t.name);
    return out;
  }
  const std::vector<Tensor>& tensors() const { return tensors_; }

  std::string header_json() const {
    nlohmann::json header = nlohmann::json::object();
    header["__metadata__"] = {{"format", "pt"}};
    uint64_t offset = 0;
    for (const Tensor& t : tensors_) {
      const uint64_t end = offset + t.bytes.size();
      const auto [b, e] = t.offsets.value_or(std::make_pair(offset, end));
      header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {b, e}}};
      offset = end;
    }
    return header.dump();
  }

  // The whole file as bytes.
  std::string bytes(const Corruption& c = {}) const {
    std::string header = c.pad_prefix + c.header.value_or(header_json());
    if (c.align) header.append((8 - header.size() % 8) % 8, ' ');
    const uint64_t len = c.header_len.value_or(header.size());
    std::string out(8, '\0');
    for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((len >> (8 * i)) & 0xff);
    out += header;
    for (const Tensor& t : tensors_) out += t.bytes;
    out.resize(out.size() > c.truncate ? out.size() - c.truncate : 0);
    return out;
  }

  void write(const std::filesystem::path& file, const Corruption& c = {}) const {
    write_file(file, bytes(c));
  }

 private:
  template <class T>
  static std::string to_bytes(const std::vector<T>& v) {
    std::string s(v.size() * sizeof(T), '\0');
    if (!v.empty()) std::memcpy(s.data(), v.data(), s.size());
    return s;
  }

  Tensor& find(const std::string& name) {
    for (Tensor& t : tensors_)
      if (t.name == name) return t;
    ADD_FAILURE() << "SafetensorsWriter: no tensor " << name;
    static Tensor dummy;
    return dummy;
  }

  std::vector<Tensor> tensors_;
};

}  // namespace moemesh::test
