// An expert shard's experts on a GPU: weights uploaded once (FP8 or bf16), one FFN per run() call.
#include "core/detail/cuda_experts.h"

#include <fmt/format.h>

#include <cstring>
#include <vector>

#include <spdlog/spdlog.h>

#include "core/detail/cuda_context.h"
#include "core/detail/tensor_parallel.h"
#include "core/detail/weights.h"
#include "kernels/cuda/cuda_kernels.h"

namespace moemesh::detail {

namespace cu = kernels::cuda;

namespace {

void to_bf16(const kernels::WeightView& w, std::vector<uint16_t>& out, std::size_t at) {
  out.resize(std::max(out.size(), at + static_cast<std::size_t>(w.rows * w.cols)));
  weight_to_bf16(w, out.data() + at);
}

}  // namespace

struct CudaExperts::Impl : CudaContext {
  int64_t hidden = 0;
  struct Expert {
    cu::DeviceBuffer gate_up, down;              // bf16, or FP8 codes
    cu::DeviceBuffer gate_up_scale, down_scale;  // FP8 only: float32 per 128x128 block
    int64_t inter = 0;
    bool fp8 = false;
  };
  std::unique_ptr<cu::GroupedGemm> grouped;  // the FP8 products (one group)
  // That one group's arguments, reused by every run() (no allocation per product).
  std::vector<cu::GroupWeight> group{cu::GroupWeight{}};
  std::vector<int64_t> group_rows{0}, group_offset{0};
  bool fp8_fallback_logged = false;
  Status add_fp8(Expert& x, const kernels::FfnWeights& w);
  std::map<ExpertRef, Expert> held;
  int64_t bytes = 0;
  // Scratch, grown on demand.
  cu::DeviceBuffer x32, x16, gu, act, y;
  cu::PinnedBuffer in, out;
  std::vector<uint16_t> staging;
  // run_layer(): the groups' experts and one kind's grouped-GEMM arguments, reused.
  std::vector<const Expert*> layer_experts;
  std::vector<cu::GroupWeight> gate_up_w, down_w;
  std::vector<int64_t> rows, offsets;
  // Grows the scratch for m rows of experts `inter` wide; copies x [m, hidden] (float32, or bf16
  // bits when x_bf16 is set) in as bf16.
  Status stage_in(const float* x, const uint16_t* x_bf16, int64_t m, int64_t inter);
  // A layer's groups (total > 0 rows) into the device scratch y [total, hidden].
  Status compute_layer(int32_t layer, std::span<const ExpertRows> groups, const float* x,
                       const uint16_t* x_bf16, int64_t total);
  // run_layer_combined()'s plan on the device and the combined rows.
  cu::DeviceBuffer plan_offsets, plan_rows, plan_weights, combined;
  // Copies y [m, hidden] out and waits for the stream.
  Status stage_out(float* dst, int64_t m, const char* what);
};

Status CudaExperts::Impl::stage_in(const float* x, const uint16_t* x_bf16, int64_t m,
                                   int64_t inter) {
  const auto rows_bytes = static_cast<std::size_t>(m * hidden * 4);
  for (auto [buf, size] : {std::pair{&x32, x_bf16 ? std::size_t{0} : rows_bytes},
                           {&x16, rows_bytes / 2},
                           {&gu, static_cast<std::size_t>(m * 2 * inter * 4)},
                           {&act, static_cast<std::size_t>(m * inter * 2)},
                           {&y, rows_bytes}})
    if (Status s = ensure(*buf, size); !s) return s;
  for (auto* buf : {&in, &out})
    if (Status s = ensure(*buf, rows_bytes); !s) return s;
  if (x_bf16) {
    std::memcpy(in.data(), x_bf16, rows_bytes / 2);
    cu::copy(x16.data(), in.data(), rows_bytes / 2, stream);
    return {};
  }
  std::memcpy(in.data(), x, rows_bytes);
  cu::copy(x32.data(), in.data(), rows_bytes, stream);
  cu::f32_to_bf16(x32.as<float>(), m * hidden, x16.as<uint16_t>(), stream);
  return {};
}

Status CudaExperts::Impl::stage_out(float* dst, int64_t m, const char* what) {
  const auto rows_bytes = static_cast<std::size_t>(m * hidden * 4);
  cu::copy(out.data(), y.data(), rows_bytes, stream);
  if (Status s = from(cu::synchronize(stream, what)); !s) return s;
  std::memcpy(dst, out.data(), rows_bytes);
  return {};
}

CudaExperts::CudaExperts(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaExperts::~CudaExperts() = default;

Expected<std::unique_ptr<CudaExperts>> CudaExperts::create(int device, int64_t hidden) {
  auto impl = std::make_unique<Impl>();
  if (Status s = impl->open(device); !s) return s.error();
  impl->hidden = hidden;
  std::string e;
  impl->grouped = cu::GroupedGemm::create(impl->stream, cu::GroupedMethod::Auto, &e);
  if (!impl->grouped) return Error(e);
  return std::unique_ptr<CudaExperts>(new CudaExperts(std::move(impl)));
}

std::string CudaExperts::description() const {
  return fmt::format("{} experts={} fp8_experts={} weights={:.2f}GiB",
                     cu::device_description(impl_->device), impl_->held.size(), fp8_experts(),
                     static_cast<double>(impl_->bytes) / (1 << 30));
}

int64_t CudaExperts::fp8_experts() const {
  int64_t n = 0;
  for (const auto& [ref, x] : impl_->held) n += x.fp8 ? 1 : 0;
  return n;
}

Status CudaExperts::Impl::add_fp8(Expert& x, const kernels::FfnWeights& w) {
  const Fp8Matrix gate_up = gate_up_fp8(w, 0, 1);
  const Fp8Matrix down = shard_fp8(w.down, Split::Cols, 0, 1);
  for (auto [buf, size] : {std::pair{&x.gate_up, gate_up.codes.size()},
                           {&x.down, down.codes.size()},
                           {&x.gate_up_scale, gate_up.scales.size() * 4},
                           {&x.down_scale, down.scales.size() * 4}}) {
    std::string e;
    *buf = cu::DeviceBuffer::allocate(size, &e);
    if (!buf->data()) return Error(e);
  }
  cu::copy(x.gate_up.data(), gate_up.codes.data(), gate_up.codes.size(), stream);
  cu::copy(x.down.data(), down.codes.data(), down.codes.size(), stream);
  cu::copy(x.gate_up_scale.data(), gate_up.scales.data(), gate_up.scales.size() * 4, stream);
  cu::copy(x.down_scale.data(), down.scales.data(), down.scales.size() * 4, stream);
  if (Status s = from(cu::synchronize(stream, "uploading an expert")); !s) return s;
  x.fp8 = true;
  bytes += static_cast<int64_t>(gate_up.codes.size() + down.codes.size() +
                                (gate_up.scales.size() + down.scales.size()) * 4);
  return {};
}

Status CudaExperts::add(const ExpertRef& ref, const kernels::FfnWeights& w) {
  Impl& m = *impl_;
  if (m.held.contains(ref)) return {};
  if (std::string e = cu::set_device(m.device); !e.empty()) return Error(e);
  Impl::Expert x;
  x.inter = w.gate.rows;
  if (const std::string refusal = fp8_expert_refusal(w, 1); refusal.empty()) {
    if (Status s = m.add_fp8(x, w); !s) return s;
    m.held.emplace(ref, std::move(x));
    return {};
  } else if (w.gate.dtype == kernels::DType::F8E4M3 && !m.fp8_fallback_logged) {
    spdlog::warn("experts uploaded as bf16 (twice the bytes of FP8): {}", refusal);
    m.fp8_fallback_logged = true;
  }
  std::string e;
  const std::size_t gu_elems = static_cast<std::size_t>(2 * x.inter * m.hidden);
  x.gate_up = cu::DeviceBuffer::allocate(gu_elems * 2, &e);
  if (!x.gate_up.data()) return Error(e);
  x.down = cu::DeviceBuffer::allocate(gu_elems, &e);  // hidden * inter bf16 = half of gate_up
  if (!x.down.data()) return Error(e);
  m.staging.clear();
  to_bf16(w.gate, m.staging, 0);
  to_bf16(w.up, m.staging, gu_elems / 2);
  cu::copy(x.gate_up.data(), m.staging.data(), gu_elems * 2, m.stream);
  if (Status s = from(cu::synchronize(m.stream, "uploading an expert")); !s) return s;
  m.staging.clear();
  to_bf16(w.down, m.staging, 0);
  cu::copy(x.down.data(), m.staging.data(), gu_elems, m.stream);
  if (Status s = from(cu::synchronize(m.stream, "uploading an expert")); !s) return s;
  m.bytes += static_cast<int64_t>(gu_elems * 3);
  m.held.emplace(ref, std::move(x));
  return {};
}

void CudaExperts::release(const ExpertRef& ref) {
  auto it = impl_->held.find(ref);
  if (it == impl_->held.end()) return;
  const Impl::Expert& x = it->second;
  impl_->bytes -= static_cast<int64_t>(x.gate_up.size() + x.down.size() + x.gate_up_scale.size() +
                                       x.down_scale.size());
  impl_->held.erase(it);
}

Status CudaExperts::run(const ExpertRef& ref, const float* x, int64_t m_tokens, float* y) {
  Impl& m = *impl_;
  auto it = m.held.find(ref);
  if (it == m.held.end())
    return Error(fmt::format("expert {} of layer {} is not on the GPU", ref.expert, ref.layer));
  if (std::string e = cu::set_device(m.device); !e.empty()) return Error(e);
  const Impl::Expert& w = it->second;
  const int64_t H = m.hidden;
  if (Status s = m.stage_in(x, nullptr, m_tokens, w.inter); !s) return s;
  // x [m, k] times the expert's weight [n, k]^T into y [m, n].
  auto product = [&](const uint16_t* in, const cu::DeviceBuffer& weight,
                     const cu::DeviceBuffer& scale, int64_t n, int64_t k, float* out) {
    if (!w.fp8) return from(m.blas->gemm(in, weight.as<uint16_t>(), out, m_tokens, n, k));
    m.group[0] = {weight.data(), scale.as<float>()};
    m.group_rows[0] = m_tokens;
    return from(m.grouped->run_fp8(in, m.group, m.group_rows, m.group_offset, n, k, out));
  };
  if (Status s = product(m.x16.as<uint16_t>(), w.gate_up, w.gate_up_scale, 2 * w.inter, H,
                         m.gu.as<float>());
      !s)
    return s;
  cu::swiglu(m.gu.as<float>(), m_tokens, w.inter, m.act.as<uint16_t>(), m.stream);
  if (Status s = product(m.act.as<uint16_t>(), w.down, w.down_scale, H, w.inter, m.y.as<float>());
      !s)
    return s;
  return m.stage_out(y, m_tokens, "an expert on the GPU");
}

Status CudaExperts::run_layer(int32_t layer, std::span<const ExpertRows> groups, const float* x,
                              int64_t total, float* y) {
  if (total == 0 || groups.empty()) return {};
  if (Status s = impl_->compute_layer(layer, groups, x, nullptr, total); !s) return s;
  return impl_->stage_out(y, total, "a layer's experts on the GPU");
}

Status CudaExperts::run_layer_bf16(int32_t layer, std::span<const ExpertRows> groups,
                                   const uint16_t* x, int64_t total, float* y) {
  if (total == 0 || groups.empty()) return {};
  if (Status s = impl_->compute_layer(layer, groups, nullptr, x, total); !s) return s;
  return impl_->stage_out(y, total, "a layer's experts on the GPU");
}

Status CudaExperts::run_layer_combined(int32_t layer, std::span<const ExpertRows> groups,
                                       const float* x, const uint16_t* x_bf16, int64_t total,
                                       const RowCombine& combine, float* out, uint16_t* out_bf16) {
  Impl& m = *impl_;
  const auto n_out = static_cast<int64_t>(combine.offsets.size()) - 1;
  const auto bytes = static_cast<std::size_t>(n_out * m.hidden) * (out_bf16 ? 2 : 4);
  if (n_out <= 0) return {};
  if (combine.rows.empty()) {  // nothing computed for these rows: their sums are zero
    std::memset(out_bf16 ? static_cast<void*>(out_bf16) : static_cast<void*>(out), 0, bytes);
    return {};
  }
  if (Status s = m.compute_layer(layer, groups, x, x_bf16, total); !s) return s;
  const std::size_t n = combine.rows.size();
  for (auto [buf, size] : {std::pair{&m.plan_offsets, combine.offsets.size() * 8},
                           {&m.plan_rows, n * 4},
                           {&m.plan_weights, n * 4},
                           {&m.combined, bytes}})
    if (Status s = ensure(*buf, size); !s) return s;
  if (Status s = ensure(m.out, bytes); !s) return s;
  cu::copy(m.plan_offsets.data(), combine.offsets.data(), combine.offsets.size() * 8, m.stream);
  cu::copy(m.plan_rows.data(), combine.rows.data(), n * 4, m.stream);
  cu::copy(m.plan_weights.data(), combine.weights.data(), n * 4, m.stream);
  cu::combine_rows(m.y.as<float>(), m.plan_offsets.as<int64_t>(), m.plan_rows.as<int32_t>(),
                   m.plan_weights.as<float>(), n_out, m.hidden,
                   out_bf16 ? nullptr : m.combined.as<float>(),
                   out_bf16 ? m.combined.as<uint16_t>() : nullptr, m.stream);
  cu::copy(m.out.data(), m.combined.data(), bytes, m.stream);
  if (Status s = from(cu::synchronize(m.stream, "combining a layer's experts on the GPU")); !s)
    return s;
  std::memcpy(out_bf16 ? static_cast<void*>(out_bf16) : static_cast<void*>(out), m.out.data(),
              bytes);
  return {};
}

Status CudaExperts::Impl::compute_layer(int32_t layer, std::span<const ExpertRows> groups,
                                        const float* x, const uint16_t* x_bf16, int64_t total) {
  Impl& m = *this;
  if (std::string e = cu::set_device(m.device); !e.empty()) return Error(e);
  m.layer_experts.clear();
  int64_t inter = -1;
  for (const ExpertRows& g : groups) {
    auto it = m.held.find(ExpertRef{layer, g.expert});
    if (it == m.held.end())
      return Error(fmt::format("expert {} of layer {} is not on the GPU", g.expert, layer));
    if (inter >= 0 && it->second.inter != inter)
      return Error(fmt::format("the experts of layer {} differ in width ({} and {})", layer, inter,
                               it->second.inter));
    inter = it->second.inter;
    m.layer_experts.push_back(&it->second);
  }
  const int64_t H = m.hidden;
  if (Status s = m.stage_in(x, x_bf16, total, inter); !s) return s;
  // bf16 experts, then FP8 ones (a layer's experts are normally all of one kind): gate|up of
  // their rows, SwiGLU, down. In this order: the batched bf16 product may write every row below
  // its last group (it widens its bf16 result over them), the FP8 one only its groups' rows.
  for (bool fp8 : {false, true}) {
    m.gate_up_w.clear();
    m.down_w.clear();
    m.rows.clear();
    m.offsets.clear();
    for (std::size_t i = 0; i < groups.size(); ++i) {
      const Impl::Expert& w = *m.layer_experts[i];
      if (w.fp8 != fp8 || groups[i].rows == 0) continue;
      m.gate_up_w.push_back({w.gate_up.data(), fp8 ? w.gate_up_scale.as<float>() : nullptr});
      m.down_w.push_back({w.down.data(), fp8 ? w.down_scale.as<float>() : nullptr});
      m.rows.push_back(groups[i].rows);
      m.offsets.push_back(groups[i].offset);
    }
    if (m.rows.empty()) continue;
    auto product = [&](const uint16_t* src, const std::vector<cu::GroupWeight>& w, int64_t n,
                       int64_t k, float* dst) {
      return from(fp8 ? m.grouped->run_fp8(src, w, m.rows, m.offsets, n, k, dst)
                      : m.grouped->run_bf16(src, w, m.rows, m.offsets, n, k, dst));
    };
    if (Status s = product(m.x16.as<uint16_t>(), m.gate_up_w, 2 * inter, H, m.gu.as<float>()); !s)
      return s;
    cu::swiglu(m.gu.as<float>(), total, inter, m.act.as<uint16_t>(), m.stream);
    if (Status s = product(m.act.as<uint16_t>(), m.down_w, H, inter, m.y.as<float>()); !s) return s;
  }
  return {};
}

}  // namespace moemesh::detail
