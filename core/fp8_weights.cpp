// FP8 E4M3 weights with 128x128 block scales (core/detail/weights.h): binding the DeepSeek-V3 /
// Kimi K2 layout of FP8 checkpoints (X.weight F8_E4M3 + X.weight_scale_inv F32), checking their
// config.json's quantization_config, and quantizing to that layout at load (--quantization fp8).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/detail/fp8_config.h"
#include "core/detail/weights.h"

namespace moemesh::detail {

using kernels::DType;
using kernels::WeightView;

Expected<WeightView> checkpoint_matrix(const Checkpoint& ckpt, const TensorView& t) {
  WeightView w = t.matrix();
  const std::string scale_name = t.name + "_scale_inv";
  const bool fp8 = t.dtype == DType::F8E4M3;
  if (!ckpt.contains(scale_name)) {
    if (fp8)
      return Error(fmt::format(
          "tensor \"{}\" in {} is F8_E4M3 but the checkpoint has no \"{}\" (its float32 block "
          "scales [ceil(rows / 128), ceil(cols / 128)])",
          t.name, t.file, scale_name));
    return w;
  }
  if (!fp8)
    return Error(fmt::format(
        "tensor \"{}\" in {} has block scales \"{}\" but dtype {}; scaled weights must be F8_E4M3",
        t.name, t.file, scale_name, kernels::dtype_name(t.dtype)));
  const std::vector<int64_t> shape = {kernels::fp8_blocks(w.rows), kernels::fp8_blocks(w.cols)};
  Expected<TensorView> s =
      ckpt.tensor(scale_name, shape,
                  fmt::format("the 128x128 blocks of \"{}\" {}", t.name, shape_string(t.shape)));
  if (!s) return s.error();
  if (s->dtype != DType::F32)
    return Error(fmt::format("tensor \"{}\" in {} has dtype {}; FP8 block scales must be F32",
                             scale_name, s->file, kernels::dtype_name(s->dtype)));
  w.scale = static_cast<const float*>(s->data);
  return w;
}

Status check_fp8_quantization_config(const std::filesystem::path& dir) {
  const std::filesystem::path path = dir / "config.json";
  std::ifstream in(path);
  if (!in) return {};  // load_model_config reports a missing config.json
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("quantization_config")) return {};
  const nlohmann::json& q = j["quantization_config"];
  const std::string where = path.string() + ": quantization_config";
  if (!q.is_object()) return Error(where + " is not an object");
  const std::string method = q.contains("quant_method") && q["quant_method"].is_string()
                                 ? q["quant_method"].get<std::string>()
                                 : std::string();
  if (method != "fp8")
    return Error(fmt::format(
        "{}.quant_method is \"{}\"; moemesh reads unquantized checkpoints and FP8 block-quantized "
        "ones (\"fp8\")",
        where, method));
  if (q.contains("fmt") && q["fmt"] != "e4m3")
    return Error(
        fmt::format("{}.fmt is {}; moemesh reads FP8 weights in e4m3", where, q["fmt"].dump()));
  if (q.contains("weight_block_size") &&
      q["weight_block_size"] != nlohmann::json::array({128, 128}))
    return Error(fmt::format("{}.weight_block_size is {}; moemesh reads blocks of [128, 128]",
                             where, q["weight_block_size"].dump()));
  return {};
}

WeightView quantize_fp8(const WeightView& w, QuantizedStore& store, kernels::ThreadPool* pool) {
  if (w.empty() || w.dtype == DType::I8 || w.dtype == DType::F8E4M3) return w;
  auto m = std::make_unique<QuantizedStore::Matrix>();
  m->codes.resize(static_cast<std::size_t>(w.rows * w.cols));
  m->scale.resize(
      static_cast<std::size_t>(kernels::fp8_blocks(w.rows) * kernels::fp8_blocks(w.cols)));
  kernels::quantize_fp8_e4m3(w, m->codes.data(), m->scale.data(), pool);
  const WeightView out{m->codes.data(), DType::F8E4M3, w.rows, w.cols, m->scale.data()};
  store.matrices.push_back(std::move(m));
  return out;
}

void quantize_fp8(kernels::FfnWeights& w, QuantizedStore& store, kernels::ThreadPool* pool) {
  w.gate = quantize_fp8(w.gate, store, pool);
  w.up = quantize_fp8(w.up, store, pool);
  w.down = quantize_fp8(w.down, store, pool);
}

void quantize_fp8(ModelWeights& w, kernels::ThreadPool* pool) {
  for_each_quantized_matrix(w, [&](WeightView& v) { v = quantize_fp8(v, w.quantized, pool); });
}

WeightView dequantize_f32(const WeightView& w, QuantizedStore& store) {
  if (w.empty() || w.dtype != DType::F8E4M3) return w;
  auto m = std::make_unique<QuantizedStore::Matrix>();
  m->dense.resize(static_cast<std::size_t>(w.rows * w.cols));
  kernels::dequantize_rows(w, 0, w.rows, m->dense.data());
  const WeightView out{m->dense.data(), DType::F32, w.rows, w.cols};
  store.matrices.push_back(std::move(m));
  return out;
}

}  // namespace moemesh::detail
