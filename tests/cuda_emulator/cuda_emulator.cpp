// A CPU stand-in for the kernels/cuda library (kernels/cuda/cuda_kernels.h), for tests only: two
// emulated GPUs whose "device memory" is host memory and whose ops run at once, in plain loops,
// computing what the header says each op computes. Linked instead of the real library into
// core_cuda_emulated_test, it runs the GPU forward pass's host logic (core/cuda_forward.cpp:
// sharding, all-reduces, KV block tables, staging for remote experts) on machines without a GPU.
// The real kernels are checked against the CPU kernels by kernels_cuda_test on a GPU; nothing here
// says anything about them.
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cuda/cuda_kernels.h"

namespace moemesh::kernels::cuda {

namespace {

constexpr int kDevices = 2;
thread_local int current_device = 0;

float bf(uint16_t b) {
  return kernels::bf16_to_f32(b);
}
uint16_t to_bf(float v) {
  return kernels::f32_to_bf16(v);
}

}  // namespace

// ---- Runtime -----------------------------------------------------------------------------------

int device_count() {
  return kDevices;
}

bool device_memory_is_host() {
  return true;
}

std::string device_description(int device) {
  if (device < 0 || device >= kDevices) return {};
  return "emulated GPU " + std::to_string(device) + " (host memory, for tests)";
}

std::string set_device(int device) {
  if (device < 0 || device >= kDevices)
    return "CUDA device " + std::to_string(device) + " does not exist: this machine has " +
           std::to_string(kDevices) + " (use cuda:0 .. cuda:" + std::to_string(kDevices - 1) +
           ", or --device cpu)";
  current_device = device;
  return {};
}

std::string check(const char*) {
  return {};
}

std::string synchronize(Stream, const char*) {
  return {};
}

std::string memory_info(int64_t* free_bytes, int64_t* total_bytes) {
  *total_bytes = int64_t{4} << 30;
  *free_bytes = int64_t{2} << 30;
  return {};
}

struct DeviceMemory {};
struct PinnedMemory {};

template <typename Kind>
Buffer<Kind> Buffer<Kind>::allocate(std::size_t bytes, std::string* error) {
  Buffer b;
  if (bytes == 0) return b;
  b.data_ = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  if (!b.data_) {
    if (error) *error = "allocating " + std::to_string(bytes) + " bytes of emulated memory failed";
    return b;
  }
  // Like fresh device memory, never zero by accident: NaN in every float.
  std::memset(b.data_, 0xff, bytes);
  b.size_ = bytes;
  return b;
}

template <typename Kind>
void Buffer<Kind>::reset() {
  std::free(data_);
  data_ = nullptr;
  size_ = 0;
}

template class Buffer<DeviceMemory>;
template class Buffer<PinnedMemory>;

void copy(void* dst, const void* src, std::size_t bytes, Stream) {
  if (bytes) std::memmove(dst, src, bytes);
}

void copy_rows(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch,
               std::size_t width, std::size_t rows, Stream) {
  for (std::size_t r = 0; r < rows; ++r)
    std::memmove(static_cast<char*>(dst) + r * dst_pitch,
                 static_cast<const char*>(src) + r * src_pitch, width);
}

void fill_bytes(void* dst, int value, std::size_t bytes, Stream) {
  if (bytes) std::memset(dst, value, bytes);
}

StreamHandle StreamHandle::create(std::string*) {
  StreamHandle h;
  h.stream_ = reinterpret_cast<Stream>(new char);
  return h;
}

StreamHandle::~StreamHandle() {
  delete reinterpret_cast<char*>(stream_);
}

StreamHandle::StreamHandle(StreamHandle&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)) {}

StreamHandle& StreamHandle::operator=(StreamHandle&& other) noexcept {
  if (this != &other) {
    delete reinterpret_cast<char*>(stream_);
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

// ---- Conversions, elementwise and row ops -------------------------------------------------------

void f32_to_bf16(const float* src, int64_t n, uint16_t* dst, Stream) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_bf(src[i]);
}

void bf16_to_f32(const uint16_t* src, int64_t n, float* dst, Stream) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf(src[i]);
}

void embedding(const uint16_t* table, int64_t hidden, const int32_t* ids, int64_t n, float* out,
               Stream) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < hidden; ++i) out[t * hidden + i] = bf(table[ids[t] * hidden + i]);
}

void rmsnorm(float* x, const float* residual, const float* weight, int64_t n, int64_t dim,
             float eps, float* y_f32, uint16_t* y_bf16, Stream) {
  for (int64_t t = 0; t < n; ++t) {
    float* xr = x + t * dim;
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) {
      if (residual) xr[i] += residual[t * dim + i];
      ss += double(xr[i]) * xr[i];
    }
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / dim) + eps);
    for (int64_t i = 0; i < dim; ++i) {
      const float y = weight[i] * (xr[i] * inv);
      if (y_f32) y_f32[t * dim + i] = y;
      if (y_bf16) y_bf16[t * dim + i] = to_bf(y);
    }
  }
}

void layernorm(float* x, const float* residual, const float* weight, int64_t n, int64_t dim,
               float eps, float* y_f32, uint16_t* y_bf16, Stream) {
  for (int64_t t = 0; t < n; ++t) {
    float* xr = x + t * dim;
    if (residual)
      for (int64_t i = 0; i < dim; ++i) xr[i] += residual[t * dim + i];
    double sum = 0;
    for (int64_t i = 0; i < dim; ++i) sum += xr[i];
    const double mean = sum / static_cast<double>(dim);
    double sq = 0;
    for (int64_t i = 0; i < dim; ++i) sq += (xr[i] - mean) * (xr[i] - mean);
    const double inv = 1.0 / std::sqrt(sq / static_cast<double>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) {
      const auto y = static_cast<float>(weight[i] * ((xr[i] - mean) * inv));
      if (y_f32) y_f32[t * dim + i] = y;
      if (y_bf16) y_bf16[t * dim + i] = to_bf(y);
    }
  }
}

void row_sum_squares(const float* x, int64_t n, int64_t dim, float* out, Stream) {
  for (int64_t t = 0; t < n; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += double(x[t * dim + i]) * x[t * dim + i];
    out[t] = static_cast<float>(ss);
  }
}

void rmsnorm_apply(float* x, const float* sum_squares, int64_t total_dim, const float* weight,
                   int64_t n, int64_t dim, float eps, Stream) {
  for (int64_t t = 0; t < n; ++t) {
    const float inv = 1.0f / std::sqrt(sum_squares[t] / static_cast<float>(total_dim) + eps);
    for (int64_t i = 0; i < dim; ++i) x[t * dim + i] = weight[i] * (x[t * dim + i] * inv);
  }
}

void add(float* x, const float* d, int64_t n, Stream) {
  for (int64_t i = 0; i < n; ++i) x[i] += d[i];
}

void clamp(float* x, int64_t n, float limit, Stream) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::min(std::max(x[i], -limit), limit);
}

void add_bias(float* x, const float* bias, int64_t n, int64_t dim, Stream) {
  for (int64_t i = 0; i < n * dim; ++i) x[i] += bias[i % dim];
}

void rope(float* x, int64_t n_tokens, int64_t token_stride, int64_t n_heads, int64_t head_dim,
          int64_t rotary_dim, const int32_t* positions, const float* inv_freq, Stream) {
  const int64_t half = rotary_dim / 2;
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t h = 0; h < n_heads; ++h) {
      float* v = x + t * token_stride + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float angle = static_cast<float>(positions[t]) * inv_freq[i];
        const float c = std::cos(angle), s = std::sin(angle);
        const float a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
}

void swiglu(const float* gate_up, int64_t n, int64_t inter, uint16_t* out, Stream) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < inter; ++i) {
      const float g = gate_up[t * 2 * inter + i];
      const float u = gate_up[t * 2 * inter + inter + i];
      out[t * inter + i] = to_bf(g / (1.0f + std::exp(-g)) * u);
    }
}

void add_gated_rows(float* out, const float* x, const float* row_gate, int64_t n, int64_t dim,
                    Stream) {
  for (int64_t t = 0; t < n; ++t) {
    const float s = row_gate ? 1.0f / (1.0f + std::exp(-row_gate[t])) : 1.0f;
    for (int64_t i = 0; i < dim; ++i) out[t * dim + i] += s * x[t * dim + i];
  }
}

// ---- MoE routing -------------------------------------------------------------------------------

void route_topk(const float* logits, const float* bias, int64_t n, const RouterSpec& spec,
                int32_t* ids, float* weights, Stream) {
  const int64_t E = spec.n_experts;
  std::vector<float> score(static_cast<std::size_t>(E)), chooser(score.size());
  for (int64_t t = 0; t < n; ++t) {
    const float* l = logits + t * E;
    if (spec.scoring == Scoring::Softmax) {
      const float mx = *std::max_element(l, l + E);
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += std::exp(double(l[e]) - mx);
      for (int64_t e = 0; e < E; ++e)
        score[e] = static_cast<float>(std::exp(double(l[e]) - mx) / sum);
    } else {
      for (int64_t e = 0; e < E; ++e) score[e] = 1.0f / (1.0f + std::exp(-l[e]));
    }
    for (int64_t e = 0; e < E; ++e) chooser[e] = score[e] + (bias ? bias[e] : 0.0f);
    if (spec.n_groups > 1) {
      const int64_t per = E / spec.n_groups;
      std::vector<std::pair<float, int64_t>> groups;
      for (int64_t g = 0; g < spec.n_groups; ++g) {
        std::vector<float> v(chooser.begin() + g * per, chooser.begin() + (g + 1) * per);
        std::sort(v.rbegin(), v.rend());
        const float rank = spec.group_score == GroupScore::Max ? v[0] : v[0] + v[1];
        groups.emplace_back(-rank, g);
      }
      std::sort(groups.begin(), groups.end());
      std::vector<bool> keep(static_cast<std::size_t>(spec.n_groups), false);
      for (int64_t i = 0; i < spec.topk_groups; ++i) keep[groups[i].second] = true;
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / per]) chooser[e] = -INFINITY;
    }
    std::vector<int64_t> order(static_cast<std::size_t>(E));
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return chooser[a] > chooser[b]; });
    double sum = 0;
    for (int64_t j = 0; j < spec.top_k; ++j) sum += score[order[j]];
    for (int64_t j = 0; j < spec.top_k; ++j) {
      float w = score[order[j]];
      if (spec.renormalize) w = static_cast<float>(w / sum);
      ids[t * spec.top_k + j] = static_cast<int32_t>(order[j]);
      weights[t * spec.top_k + j] = w * spec.scaling;
    }
  }
}

void divide_by_p_norm(float* weights, int64_t n, int64_t k, double p, Stream) {
  for (int64_t t = 0; t < n; ++t) {
    float* w = weights + t * k;
    double acc = 0;
    for (int64_t j = 0; j < k; ++j) acc += std::pow(std::fabs(static_cast<double>(w[j])), p);
    const auto d = static_cast<float>(std::pow(acc, 1.0 / p));
    for (int64_t j = 0; j < k; ++j) w[j] /= d;
  }
}

void moe_align(const int32_t* ids, int64_t n_slots, int64_t n_experts, int32_t* counts,
               int32_t* offsets, int32_t* row_of_slot, int32_t* slot_of_row, Stream) {
  std::fill(counts, counts + n_experts, 0);
  for (int64_t s = 0; s < n_slots; ++s) ++counts[ids[s]];
  offsets[0] = 0;
  for (int64_t e = 0; e < n_experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
  std::vector<int32_t> next(offsets, offsets + n_experts);
  for (int64_t s = 0; s < n_slots; ++s) {
    const int32_t row = next[ids[s]]++;
    row_of_slot[s] = row;
    slot_of_row[row] = static_cast<int32_t>(s);
  }
}

void moe_gather(const uint16_t* x, const int32_t* slot_of_row, int64_t n_rows, int64_t top_k,
                int64_t hidden, uint16_t* out, Stream) {
  for (int64_t r = 0; r < n_rows; ++r)
    std::memcpy(out + r * hidden, x + (slot_of_row[r] / top_k) * hidden,
                static_cast<std::size_t>(hidden) * 2);
}

void moe_combine(const float* y, const int32_t* row_of_slot, const float* weights, int64_t n_tokens,
                 int64_t top_k, int64_t hidden, bool accumulate, float* out, Stream) {
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t i = 0; i < hidden; ++i) {
      float acc = accumulate ? out[t * hidden + i] : 0.0f;
      for (int64_t j = 0; j < top_k; ++j)
        acc += weights[t * top_k + j] * y[row_of_slot[t * top_k + j] * hidden + i];
      out[t * hidden + i] = acc;
    }
}

void combine_rows(const float* y, const int64_t* offsets, const int32_t* rows, const float* weights,
                  int64_t n_out, int64_t hidden, float* out, uint16_t* out_bf16, Stream) {
  if ((out == nullptr) == (out_bf16 == nullptr)) return;  // the real library fails the launch
  for (int64_t o = 0; o < n_out; ++o)
    for (int64_t i = 0; i < hidden; ++i) {
      float acc = 0.0f;
      for (int64_t j = offsets[o]; j < offsets[o + 1]; ++j) {
        const float product = weights[j] * y[int64_t{rows[j]} * hidden + i];
        acc = acc + product;
      }
      if (out_bf16)
        out_bf16[o * hidden + i] = to_bf(acc);
      else
        out[o * hidden + i] = acc;
    }
}

// ---- Paged KV cache and attention --------------------------------------------------------------

namespace {

// Element i of a stored row at `slot` (one plane): bf16 bits, or an FP8 code times its row's
// scale (rows of head_dim values, n_kv_heads per slot).
float stored(const void* plane, const float* scales, bool fp8, int64_t slot, int64_t row,
             int64_t head_dim, int64_t i) {
  if (!fp8) return bf(static_cast<const uint16_t*>(plane)[slot * row + i]);
  const int64_t n_kv = row / head_dim;
  return kernels::fp8_e4m3_to_f32(static_cast<const uint8_t*>(plane)[slot * row + i]) *
         scales[slot * n_kv + i / head_dim];
}

}  // namespace

void paged_kv_write(const float* k, const float* v, int64_t n, const int32_t* slots,
                    const PagedKv& cache, Stream) {
  const int64_t hd = cache.head_dim;
  const int64_t row = cache.n_kv_heads * hd;
  for (int64_t t = 0; t < n; ++t) {
    if (slots[t] < 0) continue;
    for (int plane = 0; plane < 2; ++plane) {
      const float* src = (plane ? v : k) + t * row;
      void* dst = plane ? cache.v : cache.k;
      if (!cache.fp8) {
        for (int64_t i = 0; i < row; ++i)
          static_cast<uint16_t*>(dst)[slots[t] * row + i] = to_bf(src[i]);
        continue;
      }
      for (int64_t h = 0; h < cache.n_kv_heads; ++h) {
        float amax = 0;
        for (int64_t d = 0; d < hd; ++d) amax = std::max(amax, std::fabs(src[h * hd + d]));
        float scale = amax / 448.0f;
        if (!(scale > 0)) scale = 1.0f;
        for (int64_t d = 0; d < hd; ++d)
          static_cast<uint8_t*>(dst)[slots[t] * row + h * hd + d] =
              kernels::f32_to_fp8_e4m3(src[h * hd + d] / scale);
        (plane ? cache.v_scale : cache.k_scale)[slots[t] * cache.n_kv_heads + h] = scale;
      }
    }
  }
}

void paged_kv_read_bf16(const PagedKv& cache, bool values, const int32_t* slots, int64_t n,
                        uint16_t* out, Stream) {
  const int64_t row = cache.n_kv_heads * cache.head_dim;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < row; ++i)
      out[r * row + i] =
          to_bf(stored(values ? cache.v : cache.k, values ? cache.v_scale : cache.k_scale,
                       cache.fp8, slots[r], row, cache.head_dim, i));
}

void paged_attention(const float* q, int64_t n_q, const PagedKv& cache, const AttentionBatch& batch,
                     int64_t n_heads, float scale, int64_t window, float* out, Stream) {
  const int64_t hd = cache.head_dim;
  const int64_t row = cache.n_kv_heads * hd;
  const int64_t group = n_heads / cache.n_kv_heads;
  const int64_t bs = cache.block_size;
  auto key = [&](int64_t slot, int64_t i) {
    return stored(cache.k, cache.k_scale, cache.fp8, slot, row, hd, i);
  };
  auto value = [&](int64_t slot, int64_t i) {
    return stored(cache.v, cache.v_scale, cache.fp8, slot, row, hd, i);
  };
  for (int64_t t = 0; t < n_q; ++t) {
    const int64_t pos = batch.pos[t];
    const int32_t* table = batch.block_tables + batch.seq[t] * batch.max_blocks;
    const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
    for (int64_t h = 0; h < n_heads; ++h) {
      const float* qh = q + t * n_heads * hd + h * hd;
      const int64_t kvh = h / group;
      std::vector<float> s;
      for (int64_t j = first; j <= pos; ++j) {
        const int64_t slot = table[j / bs] * bs + j % bs;
        float dot = 0;
        for (int64_t d = 0; d < hd; ++d) dot += qh[d] * key(slot, kvh * hd + d);
        s.push_back(dot * scale);
      }
      const float mx = *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (float& v : s) sum += (v = std::exp(v - mx));
      float* o = out + t * n_heads * hd + h * hd;
      std::fill(o, o + hd, 0.0f);
      for (int64_t j = first; j <= pos; ++j) {
        const int64_t slot = table[j / bs] * bs + j % bs;
        const auto p = static_cast<float>(s[j - first] / sum);
        for (int64_t d = 0; d < hd; ++d) o[d] += p * value(slot, kvh * hd + d);
      }
    }
  }
}

// ---- Matrix products ---------------------------------------------------------------------------

namespace {

// y[m, n] = x[m, k] * w[n, k]^T + beta * y, float32 sums of bf16 operands.
void gemm_host(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t n, int64_t k,
               float beta) {
  std::vector<float> xr(static_cast<std::size_t>(k));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t t = 0; t < k; ++t) xr[t] = bf(x[i * k + t]);
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0;
      const uint16_t* wr = w + j * k;
      for (int64_t t = 0; t < k; ++t) acc += xr[t] * bf(wr[t]);
      y[i * n + j] = acc + (beta != 0.0f ? beta * y[i * n + j] : 0.0f);
    }
  }
}

}  // namespace

struct Blas::Impl {
  Stream stream = nullptr;
};

std::unique_ptr<Blas> Blas::create(Stream stream, std::string*) {
  auto impl = std::make_unique<Impl>();
  impl->stream = stream;
  return std::unique_ptr<Blas>(new Blas(std::move(impl)));
}

Blas::Blas(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Blas::~Blas() = default;

std::string Blas::gemm(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t n,
                       int64_t k, float beta) {
  gemm_host(x, w, y, m, n, k, beta);
  return {};
}

std::string Blas::gemm_bf16_out(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t m,
                                int64_t n, int64_t k) {
  std::vector<float> f(static_cast<std::size_t>(m * n));
  gemm_host(x, w, f.data(), m, n, k, 0.0f);
  for (std::size_t i = 0; i < f.size(); ++i) y[i] = to_bf(f[i]);
  return {};
}

std::string Blas::gemm_strided_batched(const StridedBatch& b, int64_t m, int64_t n, int64_t k,
                                       int64_t batch) {
  for (int64_t g = 0; g < batch; ++g) {
    const uint16_t* x = b.x + g * b.x_stride;
    const uint16_t* w = b.w + g * b.w_stride;
    float* y = b.y + g * b.y_stride;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        float acc = 0;
        for (int64_t t = 0; t < k; ++t)
          acc += bf(x[i * b.ldx + t]) * bf(b.w_k_major ? w[t * b.ldw + j] : w[j * b.ldw + t]);
        y[i * b.ldy + j] = acc;
      }
  }
  return {};
}

Stream Blas::stream() const {
  return impl_->stream;
}

const char* grouped_method_name(GroupedMethod m) {
  switch (m) {
    case GroupedMethod::Loop:
      return "loop";
    case GroupedMethod::Streams:
      return "streams";
    case GroupedMethod::Batched:
      return "batched";
    case GroupedMethod::Wmma:
      return "wmma";
    case GroupedMethod::Auto:
      return "auto";
  }
  return "?";
}

struct GroupedGemm::Impl {
  GroupedMethod method = GroupedMethod::Auto;
  int64_t fp8_gemv_rows = kFp8GroupedGemvRows;
};

std::unique_ptr<GroupedGemm> GroupedGemm::create(Stream, GroupedMethod method, std::string*) {
  auto impl = std::make_unique<Impl>();
  impl->method = method;
  return std::unique_ptr<GroupedGemm>(new GroupedGemm(std::move(impl)));
}

GroupedGemm::GroupedGemm(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GroupedGemm::~GroupedGemm() = default;

GroupedMethod GroupedGemm::method() const {
  return impl_->method;
}

std::string GroupedGemm::run_bf16(const uint16_t* x, const std::vector<GroupWeight>& weights,
                                  const std::vector<int64_t>& rows,
                                  const std::vector<int64_t>& offsets, int64_t n, int64_t k,
                                  float* y) {
  for (std::size_t g = 0; g < weights.size(); ++g)
    if (rows[g] > 0)
      gemm_host(x + offsets[g] * k, static_cast<const uint16_t*>(weights[g].w), y + offsets[g] * n,
                rows[g], n, k, 0.0f);
  return {};
}

std::string GroupedGemm::run_fp8(const uint16_t* x, const std::vector<GroupWeight>& weights,
                                 const std::vector<int64_t>& rows,
                                 const std::vector<int64_t>& offsets, int64_t n, int64_t k,
                                 float* y) {
  // As the kernels do (the GEMV for groups of few rows, the tile kernel for more): each weight
  // dequantised with its block's scale and rounded to bf16, then a bf16 product with float32
  // accumulation.
  std::vector<float> dense(static_cast<std::size_t>(n * k));
  std::vector<uint16_t> w16(dense.size());
  for (std::size_t g = 0; g < weights.size(); ++g) {
    if (rows[g] <= 0) continue;
    if (weights[g].block_scale == nullptr)
      return "grouped GEMM (fp8): group " + std::to_string(g) + " has no block scales";
    const kernels::WeightView view{weights[g].w, kernels::DType::F8E4M3, n, k,
                                   weights[g].block_scale};
    kernels::dequantize_rows(view, 0, n, dense.data());
    for (std::size_t i = 0; i < dense.size(); ++i) w16[i] = to_bf(dense[i]);
    gemm_host(x + offsets[g] * k, w16.data(), y + offsets[g] * n, rows[g], n, k, 0.0f);
  }
  return {};
}

void GroupedGemm::set_fp8_gemv_rows(int64_t rows) {
  impl_->fp8_gemv_rows = rows;
}

std::string fp8_gemv(const uint16_t* x, const uint8_t* w, const float* scale, int64_t m, int64_t n,
                     int64_t k, float* y, Stream) {
  if (m < 1 || m > kFp8GemvMaxRows || n < 1 || k < 1 || k % 16 != 0)
    return "fp8_gemv: needs 1 <= m <= 8, n >= 1 and k a multiple of 16";
  // As the kernel does: each code times its block's scale, rounded to bf16; products with the
  // bf16 inputs summed in float32.
  const kernels::WeightView view{w, kernels::DType::F8E4M3, n, k, scale};
  std::vector<float> dense(static_cast<std::size_t>(n * k));
  kernels::dequantize_rows(view, 0, n, dense.data());
  for (float& v : dense) v = bf(to_bf(v));
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0;
      for (int64_t t = 0; t < k; ++t) acc += bf(x[r * k + t]) * dense[j * k + t];
      y[r * n + j] = acc;
    }
  return {};
}

void fp8_dequantize_bf16(const uint8_t* w, const float* scale, int64_t rows, int64_t cols,
                         uint16_t* out, Stream) {
  if (rows <= 0 || cols <= 0) return;
  const kernels::WeightView view{w, kernels::DType::F8E4M3, rows, cols, scale};
  std::vector<float> dense(static_cast<std::size_t>(rows * cols));
  kernels::dequantize_rows(view, 0, rows, dense.data());
  for (std::size_t i = 0; i < dense.size(); ++i) out[i] = to_bf(dense[i]);
}

// ---- Collectives -------------------------------------------------------------------------------

namespace {

// Ranks that add through host memory with a breakable barrier; NCCL's emulation refuses a device
// twice, as NCCL does.
struct HostGroup {
  explicit HostGroup(int n) : size(n), slots(static_cast<std::size_t>(n)) {}
  std::mutex mu;
  std::condition_variable cv;
  const int size;
  int waiting = 0;          // guarded by mu
  uint64_t generation = 0;  // guarded by mu
  bool aborted = false;     // guarded by mu
  std::vector<const float*> slots;

  bool arrive() {
    std::unique_lock lock(mu);
    if (aborted) return false;
    const uint64_t gen = generation;
    if (++waiting == size) {
      waiting = 0;
      ++generation;
      cv.notify_all();
      return true;
    }
    cv.wait(lock, [&] { return generation != gen || aborted; });
    return generation != gen;
  }
};

class HostRank final : public Collective {
 public:
  HostRank(std::shared_ptr<HostGroup> g, int rank, const char* kind)
      : g_(std::move(g)), rank_(rank), kind_(kind) {}
  int rank() const override { return rank_; }
  int size() const override { return g_->size; }
  const char* kind() const override { return kind_; }
  std::string all_reduce_sum(float* data, int64_t count, Stream) override {
    mine_.assign(data, data + count);
    g_->slots[rank_] = mine_.data();
    if (!g_->arrive()) return stopped();
    for (int64_t i = 0; i < count; ++i) {
      float acc = g_->slots[0][i];
      for (int r = 1; r < g_->size; ++r) acc += g_->slots[r][i];
      data[i] = acc;
    }
    if (!g_->arrive()) return stopped();
    return {};
  }
  void abort() override {
    std::lock_guard lock(g_->mu);
    g_->aborted = true;
    g_->cv.notify_all();
  }

 private:
  static std::string stopped() {
    return "the tensor-parallel group stopped after an error on one of its ranks";
  }
  std::shared_ptr<HostGroup> g_;
  int rank_;
  const char* kind_;
  std::vector<float> mine_;
};

std::vector<std::unique_ptr<Collective>> host_group(int size, const char* kind) {
  auto g = std::make_shared<HostGroup>(size);
  std::vector<std::unique_ptr<Collective>> ranks;
  for (int r = 0; r < size; ++r) ranks.push_back(std::make_unique<HostRank>(g, r, kind));
  return ranks;
}

}  // namespace

std::vector<std::unique_ptr<Collective>> nccl_group(const std::vector<int>& devices,
                                                    std::string* error) {
  std::vector<int> sorted = devices;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end() || sorted.front() < 0 ||
      sorted.back() >= kDevices) {
    if (error) *error = "emulated NCCL: each rank needs a device of its own";
    return {};
  }
  return host_group(static_cast<int>(devices.size()), "nccl");
}

std::vector<std::unique_ptr<Collective>> one_gpu_group(int size) {
  return host_group(size, "one-gpu");
}

}  // namespace moemesh::kernels::cuda
