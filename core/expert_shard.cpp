#include "core/expert_shard.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <map>
#include <system_error>

#include "core/checkpoint.h"
#include "core/cpus.h"
#include "core/detail/fp8_config.h"
#include "core/detail/weights.h"
#if MOEMESH_HAVE_CUDA
#include "core/detail/cuda_experts.h"
#endif

namespace moemesh {

struct ExpertShard::Impl {
  std::filesystem::path dir;
  ModelConfig config;
  std::shared_ptr<const Checkpoint> checkpoint;  // owns the mappings the views point into
  std::unique_ptr<kernels::ThreadPool> pool;
  std::map<ExpertRef, kernels::FfnWeights> held;
  // With int8 / fp8 quantization: each held expert's quantized weights, which its views in `held`
  // point into (an FP8 checkpoint's experts point into the checkpoint, as unquantized ones do).
  detail::Quantization quantization = detail::Quantization::None;
  std::map<ExpertRef, detail::QuantizedStore> quantized;
  // Each held expert's copies of matrices the checkpoint lays out otherwise (dbrx's w2).
  std::map<ExpertRef, detail::CopiedStore> copies;
  std::vector<float> scratch;  // run()'s, reused
  std::vector<float> widened;  // run_layer_bf16()'s rows as float32 (CPU), reused
  std::vector<float> outputs;  // run_layer_combined()'s expert outputs (CPU), reused
  std::vector<float> sums;     // run_layer_combined()'s float32 sums for bf16 output (CPU)
  std::vector<char> covered;   // run_layer_combined()'s check: rows some group computes
#if MOEMESH_HAVE_CUDA
  std::unique_ptr<detail::CudaExperts> gpu;  // set when the shard computes on a GPU
#endif

  Status check(const ExpertRef& r) const;
  // run_layer()'s checks: every group's expert held, its rows within the batch.
  Status check_groups(int32_t layer, std::span<const ExpertRows> groups, int64_t total_rows) const;
  int64_t weight_bytes() const {
    int64_t bytes = 0;
    for (const auto& [ref, w] : held) bytes += detail::ffn_bytes(w);
    return bytes;
  }
  // Binds `experts` that are not held yet; all or nothing.
  Status bind(std::span<const ExpertRef> experts);
};

Status ExpertShard::Impl::check(const ExpertRef& r) const {
  const std::string source = (dir / "config.json").string();
  if (r.layer < 0 || r.layer >= config.num_layers)
    return Error(
        fmt::format("layer {} is out of range: {} has num_hidden_layers={} (layers 0 to {})",
                    r.layer, source, config.num_layers, config.num_layers - 1));
  if (!config.layer_is_moe[static_cast<std::size_t>(r.layer)]) {
    std::vector<int64_t> moe;
    for (int64_t l = 0; l < config.num_layers; ++l)
      if (config.layer_is_moe[static_cast<std::size_t>(l)]) moe.push_back(l);
    return Error(fmt::format(
        "layer {} is a dense layer in {} and has no routed experts (the MoE layers are [{}])",
        r.layer, source, fmt::join(moe, ", ")));
  }
  if (r.expert < 0 || r.expert >= config.num_experts)
    return Error(fmt::format(
        "expert {} of layer {} is out of range: {} gives {} experts per MoE layer (ids 0 to {})",
        r.expert, r.layer, source, config.num_experts, config.num_experts - 1));
  return {};
}

Status ExpertShard::Impl::bind(std::span<const ExpertRef> experts) {
  std::map<int32_t, std::vector<int32_t>> by_layer;  // new experts, deduplicated and sorted
  for (const ExpertRef& r : experts) {
    if (Status s = check(r); !s) return s;
    if (held.contains(r)) continue;
    std::vector<int32_t>& ids = by_layer[r.layer];
    if (std::find(ids.begin(), ids.end(), r.expert) == ids.end()) ids.push_back(r.expert);
  }
  std::map<ExpertRef, kernels::FfnWeights> bound;
  std::map<ExpertRef, detail::CopiedStore> bound_copies;
  for (auto& [layer, ids] : by_layer) {
    std::sort(ids.begin(), ids.end());
    std::vector<detail::CopiedStore> layer_copies;
    Expected<std::vector<kernels::FfnWeights>> w =
        detail::bind_experts(config, *checkpoint, layer, ids, &layer_copies);
    if (!w) return w.error();
    for (std::size_t i = 0; i < ids.size(); ++i) {
      bound.emplace(ExpertRef{layer, ids[i]}, (*w)[i]);
      if (i < layer_copies.size())
        bound_copies.emplace(ExpertRef{layer, ids[i]}, std::move(layer_copies[i]));
    }
  }
  std::map<ExpertRef, detail::QuantizedStore> stores;
  if (quantization == detail::Quantization::Int8)
    for (auto& [ref, w] : bound) detail::quantize_int8(w, stores[ref], pool.get());
  if (quantization == detail::Quantization::Fp8)
    for (auto& [ref, w] : bound) detail::quantize_fp8(w, stores[ref], pool.get());
#if MOEMESH_HAVE_CUDA
  const bool on_gpu = gpu != nullptr;
#else
  const bool on_gpu = false;
#endif
  if (!on_gpu)
    for (auto& [ref, w] : bound) detail::pack_for_amx(w, stores[ref], pool.get());
#if MOEMESH_HAVE_CUDA
  if (gpu)
    for (const auto& [ref, w] : bound)
      if (Status s = gpu->add(ref, w); !s) {
        for (const auto& [undo, unused] : bound) gpu->release(undo);
        return s;
      }
#endif
  held.merge(bound);
  quantized.merge(stores);
  copies.merge(bound_copies);
  return {};
}

ExpertShard::ExpertShard(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ExpertShard::~ExpertShard() = default;

Expected<std::unique_ptr<ExpertShard>> ExpertShard::load(const std::filesystem::path& dir,
                                                         std::span<const ExpertRef> experts,
                                                         const ExpertShardOptions& options) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec))
    return Error(
        fmt::format("model directory {} does not exist or is not a directory", dir.string()));
  Expected<ModelConfig> config = load_model_config(dir);
  if (!config) return config.error();
  if (Status s = detail::check_fp8_quantization_config(dir); !s) return s.error();
  Expected<std::shared_ptr<const Checkpoint>> ckpt = Checkpoint::open(dir);
  if (!ckpt) return ckpt.error();

  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  impl->config = std::move(*config);
  impl->checkpoint = std::move(*ckpt);
  if (Status s = detail::parse_quantization(options.quantization, &impl->quantization); !s)
    return s.error();
  if (impl->quantization == detail::Quantization::Int8 && options.device != "cpu")
    return Error(fmt::format(
        "quantization 'int8' is not supported on device '{}': it works with device cpu only (on a "
        "GPU use fp8)",
        options.device));
  if (options.device != "cpu") {
#if MOEMESH_HAVE_CUDA
    int device = 0;
    const std::string& d = options.device;
    if (d.rfind("cuda", 0) != 0 ||
        (d.size() > 4 && (d[4] != ':' || d.size() == 5 ||
                          d.find_first_not_of("0123456789", 5) != std::string::npos)))
      return Error(fmt::format("device '{}' is not one of cpu, cuda, cuda:N", d));
    if (d.size() > 5) device = std::stoi(d.substr(5));
    Expected<std::unique_ptr<detail::CudaExperts>> gpu =
        detail::CudaExperts::create(device, impl->config.hidden_size);
    if (!gpu) return gpu.error();
    impl->gpu = std::move(*gpu);
#else
    return Error(fmt::format(
        "device '{}': this moemesh was built without the CUDA backend, so only cpu works",
        options.device));
#endif
  }
  impl->pool = std::make_unique<kernels::ThreadPool>(options.threads, options.cpus);
  if (Status s = impl->bind(experts); !s) return s.error();
  spdlog::info(
      "loaded expert shard dir={} arch={} experts={} weight_bytes={} quantization={} threads={} "
      "cpus={} device={} isa={}",
      dir.string(), arch_name(impl->config.arch), impl->held.size(), impl->weight_bytes(),
      detail::quantization_name(impl->quantization), impl->pool->size(),
      options.cpus.empty() ? std::string("any") : format_cpu_list(options.cpus), options.device,
      options.device == "cpu" ? kernels::isa_name(kernels::active_isa()) : "-");
  return std::unique_ptr<ExpertShard>(new ExpertShard(std::move(impl)));
}

const ModelConfig& ExpertShard::config() const {
  return impl_->config;
}

bool ExpertShard::holds(int32_t layer, int32_t expert) const {
  return impl_->held.contains(ExpertRef{layer, expert});
}

std::vector<ExpertRef> ExpertShard::experts() const {
  std::vector<ExpertRef> out;
  out.reserve(impl_->held.size());
  for (const auto& [ref, w] : impl_->held) out.push_back(ref);
  return out;
}

Status ExpertShard::add(std::span<const ExpertRef> experts) {
  return impl_->bind(experts);
}

void ExpertShard::release(std::span<const ExpertRef> experts) {
  for (const ExpertRef& r : experts) {
    impl_->held.erase(r);
    impl_->quantized.erase(r);
    impl_->copies.erase(r);
#if MOEMESH_HAVE_CUDA
    if (impl_->gpu) impl_->gpu->release(r);
#endif
  }
}

std::string ExpertShard::device_description() const {
#if MOEMESH_HAVE_CUDA
  if (impl_->gpu) return impl_->gpu->description();
#endif
  return "cpu";
}

Status ExpertShard::run(int32_t layer, int32_t expert, const float* x, int64_t m, float* y) {
  const auto it = impl_->held.find(ExpertRef{layer, expert});
  if (it == impl_->held.end())
    return Error(fmt::format("expert {} of layer {} is not held by this expert shard of {}", expert,
                             layer, impl_->dir.string()));
  if (m < 0) return Error(fmt::format("ExpertShard::run: token count {} is negative", m));
  if (m == 0) return {};
#if MOEMESH_HAVE_CUDA
  if (impl_->gpu) return impl_->gpu->run(it->first, x, m, y);
#endif
  const kernels::FfnWeights& w = it->second;
  impl_->scratch.resize(static_cast<std::size_t>(2 * m * w.gate.rows));
  kernels::swiglu_ffn(x, m, w, impl_->scratch.data(), y, impl_->pool.get());
  return {};
}

Status ExpertShard::Impl::check_groups(int32_t layer, std::span<const ExpertRows> groups,
                                       int64_t total_rows) const {
  for (const ExpertRows& g : groups) {
    if (!held.contains(ExpertRef{layer, g.expert}))
      return Error(fmt::format("expert {} of layer {} is not held by this expert shard of {}",
                               g.expert, layer, dir.string()));
    if (g.offset < 0 || g.rows < 0 || g.offset + g.rows > total_rows)
      return Error(fmt::format(
          "ExpertShard::run_layer: rows [{}, {}) of expert {} are outside the batch's {} rows",
          g.offset, g.offset + g.rows, g.expert, total_rows));
  }
  return {};
}

Status ExpertShard::run_layer_bf16(int32_t layer, std::span<const ExpertRows> groups,
                                   const uint16_t* x, int64_t total_rows, float* y) {
  if (Status s = impl_->check_groups(layer, groups, total_rows); !s) return s;
#if MOEMESH_HAVE_CUDA
  if (impl_->gpu) return impl_->gpu->run_layer_bf16(layer, groups, x, total_rows, y);
#endif
  const int64_t H = impl_->config.hidden_size;
  std::vector<float>& w = impl_->widened;
  w.resize(static_cast<std::size_t>(total_rows * H));
  for (const ExpertRows& g : groups)
    kernels::to_f32(x + g.offset * H, kernels::DType::BF16, g.rows * H, w.data() + g.offset * H);
  for (const ExpertRows& g : groups)
    if (Status s = run(layer, g.expert, w.data() + g.offset * H, g.rows, y + g.offset * H); !s)
      return s;
  return {};
}

Status ExpertShard::run_layer_combined(int32_t layer, std::span<const ExpertRows> groups,
                                       const float* x, const uint16_t* x_bf16, int64_t total_rows,
                                       const RowCombine& combine, float* out, uint16_t* out_bf16) {
  if ((x == nullptr) == (x_bf16 == nullptr) || (out == nullptr) == (out_bf16 == nullptr))
    return Error(
        "ExpertShard::run_layer_combined: give exactly one of x and x_bf16, and of out "
        "and out_bf16");
  if (Status s = impl_->check_groups(layer, groups, total_rows); !s) return s;
  const auto& o = combine.offsets;
  bool ok = !o.empty() && o.front() == 0 && combine.weights.size() == combine.rows.size() &&
            o.back() == static_cast<int64_t>(combine.rows.size());
  for (std::size_t i = 1; ok && i < o.size(); ++i) ok = o[i] >= o[i - 1];
  // Every row a group computes (the others' outputs are unspecified).
  std::vector<char>& covered = impl_->covered;
  covered.assign(static_cast<std::size_t>(std::max<int64_t>(total_rows, 0)), 0);
  for (const ExpertRows& g : groups)
    std::fill(covered.begin() + g.offset, covered.begin() + g.offset + g.rows, 1);
  for (std::size_t i = 0; ok && i < combine.rows.size(); ++i)
    ok = combine.rows[i] >= 0 && combine.rows[i] < total_rows && covered[combine.rows[i]];
  if (!ok)
    return Error(fmt::format(
        "ExpertShard::run_layer_combined: the combine of {} output rows is malformed (offsets must "
        "ascend from 0 to the {} rows, each one of the batch's {} that a group computes, one "
        "weight per row)",
        o.empty() ? 0 : o.size() - 1, combine.rows.size(), total_rows));
#if MOEMESH_HAVE_CUDA
  if (impl_->gpu)
    return impl_->gpu->run_layer_combined(layer, groups, x, x_bf16, total_rows, combine, out,
                                          out_bf16);
#endif
  const int64_t H = impl_->config.hidden_size;
  const auto n_out = static_cast<int64_t>(o.size()) - 1;
  std::vector<float>& y = impl_->outputs;
  y.resize(static_cast<std::size_t>(total_rows * H));
  Status s = x ? run_layer(layer, groups, x, total_rows, y.data())
               : run_layer_bf16(layer, groups, x_bf16, total_rows, y.data());
  if (!s) return s;
  float* sums = out;
  if (out_bf16) {
    impl_->sums.resize(static_cast<std::size_t>(n_out * H));
    sums = impl_->sums.data();
  }
  for (int64_t r = 0; r < n_out; ++r) {
    float* dst = sums + r * H;
    std::fill(dst, dst + H, 0.0f);
    for (int64_t i = o[static_cast<std::size_t>(r)]; i < o[static_cast<std::size_t>(r) + 1]; ++i) {
      const float w = combine.weights[static_cast<std::size_t>(i)];
      const float* src = y.data() + int64_t{combine.rows[static_cast<std::size_t>(i)]} * H;
      for (int64_t k = 0; k < H; ++k) dst[k] += w * src[k];
    }
  }
  if (out_bf16)
    for (int64_t i = 0; i < n_out * H; ++i) out_bf16[i] = kernels::f32_to_bf16(sums[i]);
  return {};
}

Status ExpertShard::run_layer(int32_t layer, std::span<const ExpertRows> groups, const float* x,
                              int64_t total_rows, float* y) {
  if (Status s = impl_->check_groups(layer, groups, total_rows); !s) return s;
#if MOEMESH_HAVE_CUDA
  if (impl_->gpu) return impl_->gpu->run_layer(layer, groups, x, total_rows, y);
#endif
  const int64_t H = impl_->config.hidden_size;
  for (const ExpertRows& g : groups)
    if (Status s = run(layer, g.expert, x + g.offset * H, g.rows, y + g.offset * H); !s) return s;
  return {};
}

int64_t ExpertShard::weight_bytes() const {
  return impl_->weight_bytes();
}

}  // namespace moemesh
