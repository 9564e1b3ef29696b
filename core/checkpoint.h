// Read-only access to the tensors of a Hugging Face safetensors checkpoint.
//
// Checkpoint::open maps every *.safetensors file of a model directory into memory (a single
// model.safetensors, or the shards listed by model.safetensors.index.json) and validates their
// headers: sizes, offsets and dtypes are checked against the file before any tensor is handed out,
// so a truncated or corrupt file is an error naming the file, never a crash. Tensor data is not
// copied: a TensorView points into the mapping, which lives as long as the Checkpoint.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/cpu_kernels.h"

namespace moemesh {

struct TensorView {
  std::string name;
  std::string file;  // the file the tensor lives in (for messages)
  kernels::DType dtype = kernels::DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;

  int64_t numel() const;
  // The tensor as a 2-D weight matrix (rows = shape[0], cols = product of the rest).
  kernels::WeightView matrix() const;
  // The tensor's elements converted to float32.
  std::vector<float> to_f32() const;
};

std::string shape_string(const std::vector<int64_t>& shape);

class Checkpoint {
 public:
  // Opens DIR's safetensors files. Errors name the directory or file and what is wrong.
  static Expected<std::shared_ptr<const Checkpoint>> open(const std::filesystem::path& dir);

  // Opens one .safetensors file.
  static Expected<std::shared_ptr<const Checkpoint>> open_file(const std::filesystem::path& file);

  bool contains(const std::string& name) const;

  // The named tensor. Fails when it is missing, or when its dtype is not F32, F16, BF16 or F8_E4M3
  // (whose block scales are a tensor of their own: see bind_weights).
  Expected<TensorView> tensor(const std::string& name) const;

  // Like tensor(), and also checks the shape; `why` says where the expected shape comes from
  // (e.g. "hidden_size=64, num_attention_heads=4 in config.json") for the message.
  Expected<TensorView> tensor(const std::string& name, const std::vector<int64_t>& shape,
                              const std::string& why) const;

  std::vector<std::string> names() const;
  const std::filesystem::path& dir() const { return dir_; }

  ~Checkpoint();
  Checkpoint(const Checkpoint&) = delete;
  Checkpoint& operator=(const Checkpoint&) = delete;

 private:
  struct Mapping;
  struct Entry {
    std::string dtype;  // as written in the header ("F32", "BF16", "I64", ...)
    std::vector<int64_t> shape;
    const Mapping* mapping = nullptr;
    const char* data = nullptr;
  };

  Checkpoint() = default;
  Status add_file(const std::filesystem::path& file);

  std::filesystem::path dir_;
  std::vector<std::unique_ptr<Mapping>> mappings_;
  std::map<std::string, Entry> entries_;
};

}  // namespace moemesh
