#include "core/checkpoint.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace moemesh {
namespace fs = std::filesystem;
using nlohmann::json;

struct Checkpoint::Mapping {
  std::string path;
  const char* base = nullptr;
  std::size_t size = 0;

  ~Mapping() {
    if (base != nullptr && size > 0) munmap(const_cast<char*>(base), size);
  }
};

namespace {

// Element sizes of the dtypes the safetensors format defines.
int64_t safetensors_elem_size(const std::string& dtype) {
  static const std::map<std::string, int64_t> kSizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"I64", 8}, {"U64", 8},     {"F64", 8}};
  auto it = kSizes.find(dtype);
  return it == kSizes.end() ? 0 : it->second;
}

std::optional<kernels::DType> compute_dtype(const std::string& dtype) {
  if (dtype == "F32") return kernels::DType::F32;
  if (dtype == "F16") return kernels::DType::F16;
  if (dtype == "BF16") return kernels::DType::BF16;
  if (dtype == "F8_E4M3") return kernels::DType::F8E4M3;  // with a weight_scale_inv tensor
  return std::nullopt;
}

Expected<std::string> read_text(const fs::path& path) {
  std::ifstream in(path);
  if (!in) return Error(fmt::format("cannot read {}: {}", path.string(), std::strerror(errno)));
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

kernels::WeightView TensorView::matrix() const {
  kernels::WeightView w;
  w.data = data;
  w.dtype = dtype;
  w.rows = shape.empty() ? 1 : shape[0];
  w.cols = w.rows == 0 ? 0 : numel() / w.rows;
  return w;
}

std::vector<float> TensorView::to_f32() const {
  std::vector<float> out(static_cast<std::size_t>(numel()));
  kernels::to_f32(data, dtype, numel(), out.data());
  return out;
}

Checkpoint::~Checkpoint() = default;

Status Checkpoint::add_file(const fs::path& file) {
  const std::string path = file.string();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return Error(fmt::format("cannot open checkpoint file {}: {}", path, std::strerror(errno)));
  }
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return Error(fmt::format("checkpoint file {} is not a regular file", path));
  }
  auto mapping = std::make_unique<Mapping>();
  mapping->path = path;
  mapping->size = static_cast<std::size_t>(st.st_size);
  if (mapping->size < 8) {
    ::close(fd);
    return Error(
        fmt::format("checkpoint file {} is truncated: {} bytes, too short for a "
                    "safetensors header",
                    path, mapping->size));
  }
  void* base = mmap(nullptr, mapping->size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (base == MAP_FAILED)
    return Error(fmt::format("cannot map checkpoint file {}: {}", path, std::strerror(errno)));
  mapping->base = static_cast<const char*>(base);

  uint64_t header_len = 0;
  std::memcpy(&header_len, mapping->base, 8);  // little-endian by the format's definition
  if (header_len > mapping->size - 8) {
    return Error(
        fmt::format("checkpoint file {} is truncated or not a safetensors file: its "
                    "header claims {} bytes but the file has {}",
                    path, header_len, mapping->size));
  }
  json header = json::parse(mapping->base + 8, mapping->base + 8 + header_len, nullptr, false);
  if (header.is_discarded() || !header.is_object())
    return Error(
        fmt::format("checkpoint file {} has a corrupt safetensors header (not a JSON "
                    "object)",
                    path));

  const char* data_begin = mapping->base + 8 + header_len;
  const uint64_t data_size = mapping->size - 8 - header_len;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const json& e = it.value();
    auto bad = [&](const std::string& what) {
      return Error(fmt::format("checkpoint file {}: tensor \"{}\": {}", path, it.key(), what));
    };
    if (!e.is_object() || !e.contains("dtype") || !e["dtype"].is_string() || !e.contains("shape") ||
        !e["shape"].is_array() || !e.contains("data_offsets") || !e["data_offsets"].is_array() ||
        e["data_offsets"].size() != 2)
      return bad("header entry lacks dtype, shape or data_offsets");
    Entry entry;
    entry.dtype = e["dtype"].get<std::string>();
    const int64_t elem = safetensors_elem_size(entry.dtype);
    if (elem == 0) return bad(fmt::format("unknown dtype \"{}\"", entry.dtype));
    int64_t numel = 1;
    for (const json& d : e["shape"]) {
      if (!d.is_number_unsigned()) return bad("shape holds a non-integer or negative dimension");
      if (d.get<uint64_t>() > (uint64_t{1} << 50)) return bad("shape is implausibly large");
      const auto dim = static_cast<int64_t>(d.get<uint64_t>());
      if (dim > 0 && numel > (int64_t{1} << 50) / dim) return bad("shape is implausibly large");
      numel *= dim;
      entry.shape.push_back(dim);
    }
    const json& off = e["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      return bad("data_offsets must be two non-negative integers");
    const uint64_t begin = off[0].get<uint64_t>();
    const uint64_t end = off[1].get<uint64_t>();
    if (begin > end || end - begin != static_cast<uint64_t>(numel * elem))
      return bad(fmt::format("data_offsets [{}, {}] do not match shape {} of {}", begin, end,
                             shape_string(entry.shape), entry.dtype));
    if (end > data_size)
      return bad(
          fmt::format("data ends at byte {} but the file holds only {} bytes of tensor "
                      "data: the file is truncated",
                      end, data_size));
    entry.mapping = mapping.get();
    entry.data = data_begin + begin;
    if (entries_.count(it.key())) return bad("appears in more than one checkpoint file");
    entries_.emplace(it.key(), std::move(entry));
  }
  mappings_.push_back(std::move(mapping));
  return {};
}

Expected<std::shared_ptr<const Checkpoint>> Checkpoint::open_file(const fs::path& file) {
  std::shared_ptr<Checkpoint> ckpt(new Checkpoint());
  ckpt->dir_ = file.parent_path();
  if (Status s = ckpt->add_file(file); !s) return s.error();
  return std::shared_ptr<const Checkpoint>(ckpt);
}

Expected<std::shared_ptr<const Checkpoint>> Checkpoint::open(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    return Error(
        fmt::format("model directory {} does not exist or is not a directory", dir.string()));
  std::shared_ptr<Checkpoint> ckpt(new Checkpoint());
  ckpt->dir_ = dir;

  const fs::path index_path = dir / "model.safetensors.index.json";
  if (fs::exists(index_path)) {
    Expected<std::string> text = read_text(index_path);
    if (!text) return text.error();
    json index = json::parse(*text, nullptr, false);
    if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
        !index["weight_map"].is_object())
      return Error(
          fmt::format("{} is not a safetensors index: expected an object with a "
                      "\"weight_map\" object",
                      index_path.string()));
    std::set<std::string> shards;
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        return Error(fmt::format("{}: weight_map[\"{}\"] must be a file name", index_path.string(),
                                 it.key()));
      const std::string shard = it.value().get<std::string>();
      if (shard.find('/') != std::string::npos || shard == "..")
        return Error(fmt::format("{}: shard name \"{}\" must be a file in the model directory",
                                 index_path.string(), shard));
      shards.insert(shard);
    }
    for (const std::string& shard : shards) {
      const fs::path p = dir / shard;
      if (!fs::exists(p))
        return Error(fmt::format("checkpoint shard {} listed in {} is missing", p.string(),
                                 index_path.string()));
      if (Status s = ckpt->add_file(p); !s) return s.error();
    }
    // Every tensor the index names must be in the shard it names.
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      auto e = ckpt->entries_.find(it.key());
      const std::string shard = (dir / it.value().get<std::string>()).string();
      if (e == ckpt->entries_.end() || e->second.mapping->path != shard)
        return Error(fmt::format("{} places tensor \"{}\" in {}, but that file does not hold it",
                                 index_path.string(), it.key(), shard));
    }
  } else {
    std::vector<fs::path> files;
    for (const auto& de : fs::directory_iterator(dir, ec))
      if (de.path().extension() == ".safetensors") files.push_back(de.path());
    if (files.empty())
      return Error(
          fmt::format("model directory {} holds no *.safetensors file and no "
                      "model.safetensors.index.json",
                      dir.string()));
    if (files.size() > 1 && !fs::exists(dir / "model.safetensors"))
      return Error(
          fmt::format("model directory {} holds {} *.safetensors files but no "
                      "model.safetensors.index.json saying how they fit together",
                      dir.string(), files.size()));
    if (Status s = ckpt->add_file(files.size() == 1 ? files[0] : dir / "model.safetensors"); !s)
      return s.error();
  }
  return std::shared_ptr<const Checkpoint>(ckpt);
}

bool Checkpoint::contains(const std::string& name) const {
  return entries_.count(name) > 0;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& [name, e] : entries_) out.push_back(name);
  return out;
}

Expected<TensorView> Checkpoint::tensor(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end())
    return Error(
        fmt::format("tensor \"{}\" is missing from the checkpoint in {}", name, dir_.string()));
  const Entry& e = it->second;
  std::optional<kernels::DType> dt = compute_dtype(e.dtype);
  if (!dt)
    return Error(
        fmt::format("tensor \"{}\" in {} has dtype {}; moemesh reads F32, F16, BF16 and "
                    "F8_E4M3 weights",
                    name, e.mapping->path, e.dtype));
  if (reinterpret_cast<uintptr_t>(e.data) % kernels::dtype_size(*dt) != 0)
    return Error(
        fmt::format("tensor \"{}\" in {} is not aligned to its {}-byte elements; "
                    "re-save the checkpoint with the safetensors library",
                    name, e.mapping->path, kernels::dtype_size(*dt)));
  TensorView v;
  v.name = name;
  v.file = e.mapping->path;
  v.dtype = *dt;
  v.shape = e.shape;
  v.data = e.data;
  return v;
}

Expected<TensorView> Checkpoint::tensor(const std::string& name, const std::vector<int64_t>& shape,
                                        const std::string& why) const {
  Expected<TensorView> v = tensor(name);
  if (!v) return v;
  if (v->shape != shape)
    return Error(fmt::format("tensor \"{}\" in {} has shape {}, but {} implies {}", name, v->file,
                             shape_string(v->shape), why, shape_string(shape)));
  return v;
}

}  // namespace moemesh
