// NumPy .npy files of float32 arrays (format version 1.0, little-endian, C order).
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "core/error.h"

namespace moemesh {

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

Status write_npy_f32(const std::filesystem::path& path, const std::vector<int64_t>& shape,
                     const float* data);

// Reads a float32 ('<f4', C order) array; any other layout is an error naming the file.
Expected<NpyArray> read_npy_f32(const std::filesystem::path& path);

}  // namespace moemesh
