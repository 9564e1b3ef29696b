// Shared helpers of the libFuzzer targets (see README.md): where the fixtures are, quiet logs,
// splitting one input into parts.
#pragma once

#include <spdlog/spdlog.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>

namespace moemesh::fuzz {

// The repository's tests/fixtures (MOEMESH_FUZZ_FIXTURES overrides it, for targets copied to
// another machine).
inline std::filesystem::path fixtures_dir() {
  if (const char* dir = std::getenv("MOEMESH_FUZZ_FIXTURES")) return dir;
  return std::filesystem::path(MOEMESH_SOURCE_DIR) / "tests" / "fixtures";
}

// The project's code logs warnings for bad input: millions of them would drown libFuzzer's output.
inline void quiet_logs() {
  spdlog::set_level(spdlog::level::off);
}

inline std::string_view as_text(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// Splits at the first NUL byte: {before, after}; after is empty when there is none.
inline std::pair<std::string_view, std::string_view> split_at_nul(std::string_view s) {
  const size_t at = s.find('\0');
  if (at == std::string_view::npos) return {s, {}};
  return {s.substr(0, at), s.substr(at + 1)};
}

}  // namespace moemesh::fuzz
