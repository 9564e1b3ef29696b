#include "core/npy.h"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <regex>

namespace moemesh {

Status write_npy_f32(const std::filesystem::path& path, const std::vector<int64_t>& shape,
                     const float* data) {
  std::string dims;
  int64_t count = 1;
  for (int64_t d : shape) {
    dims += std::to_string(d) + ", ";
    count *= d;
  }
  if (shape.size() > 1)
    dims.resize(dims.size() - 2);  // "(3, 4)"; a 1-D shape keeps "(3,)"
  else if (!shape.empty())
    dims.resize(dims.size() - 1);
  std::string header =
      fmt::format("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}", dims);
  // Pad with spaces so that magic + lengths + header is a multiple of 64, ending in '\n'.
  const std::size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';

  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return Error(fmt::format("cannot write {}: {}", path.string(), std::strerror(errno)));
  const char magic[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  out.write(magic, 8);
  const auto len = static_cast<uint16_t>(header.size());
  const char len_bytes[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
  out.write(len_bytes, 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(data),
            static_cast<std::streamsize>(count * sizeof(float)));
  if (!out) return Error(fmt::format("failed writing {}: {}", path.string(), std::strerror(errno)));
  return {};
}

Expected<NpyArray> read_npy_f32(const std::filesystem::path& path) {
  std::error_code ec;
  const uint64_t file_size = std::filesystem::file_size(path, ec);
  std::ifstream in(path, std::ios::binary);
  if (ec || !in)
    return Error(fmt::format("cannot read {}: {}", path.string(), std::strerror(errno)));
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    return Error(fmt::format("{} is not a .npy file", path.string()));
  uint32_t header_len = 0;
  uint64_t offset = 10;
  if (magic[6] == 1) {
    unsigned char b[2] = {0, 0};
    in.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else {
    unsigned char b[4] = {0, 0, 0, 0};
    in.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
    offset = 12;
  }
  if (!in || header_len > file_size - std::min(file_size, offset))
    return Error(fmt::format("{}: truncated .npy header", path.string()));
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  if (!in) return Error(fmt::format("{}: truncated .npy header", path.string()));
  if (header.find("'descr': '<f4'") == std::string::npos ||
      header.find("'fortran_order': False") == std::string::npos)
    return Error(fmt::format("{}: expected a C-order float32 ('<f4') array, header is {}",
                             path.string(), header));
  std::smatch m;
  if (!std::regex_search(header, m, std::regex(R"('shape': \(([0-9, ]*)\))")))
    return Error(fmt::format("{}: no shape in header {}", path.string(), header));

  // The shape must fit the bytes the file actually holds.
  const uint64_t max_count = (file_size - offset - header_len) / sizeof(float);
  NpyArray a;
  uint64_t count = 1;
  const std::string dims = m[1];
  const std::regex number("[0-9]+");
  for (auto it = std::sregex_iterator(dims.begin(), dims.end(), number);
       it != std::sregex_iterator(); ++it) {
    const std::string text = it->str();
    uint64_t dim = 0;
    const auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), dim);
    if (err != std::errc() || (dim > 0 && count > UINT64_MAX / dim))
      return Error(fmt::format("{}: shape ({}) is larger than any file", path.string(), dims));
    a.shape.push_back(static_cast<int64_t>(dim));
    count *= dim;
  }
  if (count > max_count)
    return Error(fmt::format("{}: holds fewer than the {} floats its header announces",
                             path.string(), count));
  a.data.resize(static_cast<std::size_t>(count));
  in.read(reinterpret_cast<char*>(a.data.data()),
          static_cast<std::streamsize>(count * sizeof(float)));
  if (!in)
    return Error(fmt::format("{}: holds fewer than the {} floats its header announces",
                             path.string(), count));
  return a;
}

}  // namespace moemesh
