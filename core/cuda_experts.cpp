// An expert shard's experts on a GPU: bf16 weights uploaded once, one FFN per run() call.
#include "core/detail/cuda_experts.h"

#include <fmt/format.h>

#include <cstring>
#include <vector>

#include "core/detail/cuda_context.h"
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
    cu::DeviceBuffer gate_up, down;
    int64_t inter = 0;
  };
  std::map<ExpertRef, Expert> held;
  int64_t bytes = 0;
  // Scratch, grown on demand.
  cu::DeviceBuffer x32, x16, gu, act, y;
  cu::PinnedBuffer in, out;
  std::vector<uint16_t> staging;
};

CudaExperts::CudaExperts(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaExperts::~CudaExperts() = default;

Expected<std::unique_ptr<CudaExperts>> CudaExperts::create(int device, int64_t hidden) {
  auto impl = std::make_unique<Impl>();
  if (Status s = impl->open(device); !s) return s.error();
  impl->hidden = hidden;
  return std::unique_ptr<CudaExperts>(new CudaExperts(std::move(impl)));
}

std::string CudaExperts::description() const {
  return fmt::format("{} experts={} weights={:.2f}GiB", cu::device_description(impl_->device),
                     impl_->held.size(), static_cast<double>(impl_->bytes) / (1 << 30));
}

Status CudaExperts::add(const ExpertRef& ref, const kernels::FfnWeights& w) {
  Impl& m = *impl_;
  if (m.held.contains(ref)) return {};
  if (std::string e = cu::set_device(m.device); !e.empty()) return Error(e);
  Impl::Expert x;
  x.inter = w.gate.rows;
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
  impl_->bytes -= static_cast<int64_t>(it->second.gate_up.size() + it->second.down.size());
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
  const auto rows_bytes = static_cast<std::size_t>(m_tokens * H * 4);
  for (auto [buf, bytes] : {std::pair{&m.x32, rows_bytes},
                            {&m.x16, rows_bytes / 2},
                            {&m.gu, static_cast<std::size_t>(m_tokens * 2 * w.inter * 4)},
                            {&m.act, static_cast<std::size_t>(m_tokens * w.inter * 2)},
                            {&m.y, rows_bytes}})
    if (Status s = ensure(*buf, bytes); !s) return s;
  for (auto* buf : {&m.in, &m.out})
    if (Status s = ensure(*buf, rows_bytes); !s) return s;
  std::memcpy(m.in.data(), x, rows_bytes);
  cu::copy(m.x32.data(), m.in.data(), rows_bytes, m.stream);
  cu::f32_to_bf16(m.x32.as<float>(), m_tokens * H, m.x16.as<uint16_t>(), m.stream);
  if (Status s = from(m.blas->gemm(m.x16.as<uint16_t>(), w.gate_up.as<uint16_t>(), m.gu.as<float>(),
                                   m_tokens, 2 * w.inter, H));
      !s)
    return s;
  cu::swiglu(m.gu.as<float>(), m_tokens, w.inter, m.act.as<uint16_t>(), m.stream);
  if (Status s = from(m.blas->gemm(m.act.as<uint16_t>(), w.down.as<uint16_t>(), m.y.as<float>(),
                                   m_tokens, H, w.inter));
      !s)
    return s;
  cu::copy(m.out.data(), m.y.data(), rows_bytes, m.stream);
  if (Status s = from(cu::synchronize(m.stream, "an expert on the GPU")); !s) return s;
  std::memcpy(y, m.out.data(), rows_bytes);
  return {};
}

}  // namespace moemesh::detail
