// The forward pass on a GPU: weights uploaded once as bf16, a paged KV cache pool, and the layer
// loop of model.cpp expressed in kernels/cuda ops on one stream.
#include "core/detail/cuda_forward.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>

#include "core/detail/cuda_forward_impl.h"
#include "core/detail/tensor_parallel.h"
#include "kernels/cuda/cuda_kernels.h"

namespace moemesh::detail {

Status parse_device(const std::string& text, bool* cuda, int* device) {
  *cuda = false;
  *device = 0;
  if (text == "cpu") return {};
  if (text == "cuda") {
    *cuda = true;
    return {};
  }
  if (text.rfind("cuda:", 0) == 0) {
    const std::string n = text.substr(5);
    if (!n.empty() && n.size() < 4 && std::all_of(n.begin(), n.end(), ::isdigit)) {
      *cuda = true;
      *device = std::stoi(n);
      return {};
    }
  }
  return Error(fmt::format("device '{}' is not one of cpu, cuda, cuda:N", text));
}

namespace {

cu::GroupedMethod parse_method(const std::string& s, bool* ok) {
  *ok = true;
  if (s == "loop") return cu::GroupedMethod::Loop;
  if (s == "streams") return cu::GroupedMethod::Streams;
  if (s == "batched") return cu::GroupedMethod::Batched;
  if (s == "wmma") return cu::GroupedMethod::Wmma;
  if (s == "auto") return cu::GroupedMethod::Auto;
  *ok = false;
  return cu::GroupedMethod::Loop;
}

}  // namespace

CudaForward::CudaForward(std::vector<std::unique_ptr<Impl>> ranks,
                         std::vector<std::unique_ptr<kernels::cuda::Collective>> group)
    : group_(std::move(group)), ranks_(std::move(ranks)) {}
CudaForward::~CudaForward() = default;

int64_t CudaForward::block_size() const {
  return ranks_[0]->options.block_size;
}

std::string CudaForward::description() const {
  const Impl& m = *ranks_[0];
  std::string tp;
  if (ranks_.size() > 1 || !group_.empty()) {
    tp = fmt::format(" tensor_parallel={} collective={} lm_head={} devices=", ranks_.size(),
                     group_.front()->kind(),
                     m.vocab_count == m.c.vocab_size ? "rank0" : "vocab-parallel");
    for (std::size_t r = 0; r < ranks_.size(); ++r)
      tp += fmt::format("{}{}", r ? "," : "", ranks_[r]->device);
  }
  int64_t fp8_layers = 0;
  for (const Impl::Layer& l : m.layers) fp8_layers += l.experts_fp8 ? 1 : 0;
  return fmt::format(
      "{} weights={:.2f}GiB fp8_expert_layers={} fp8_dense={} kv_blocks={} block_size={} "
      "kv_dtype={} grouped_gemm={}{}",
      cu::device_description(m.device), static_cast<double>(m.weight_bytes) / (1 << 30), fp8_layers,
      m.fp8_dense, m.num_blocks, m.options.block_size, m.options.kv_fp8 ? "fp8" : "bf16",
      m.grouped ? cu::grouped_method_name(m.grouped->method()) : "-", tp);
}

int64_t CudaForward::weight_bytes() const {
  return ranks_[0]->weight_bytes;
}

int64_t CudaForward::num_blocks() const {
  return ranks_[0]->num_blocks;
}

bool CudaForward::kv_fp8() const {
  return ranks_[0]->options.kv_fp8;
}

int64_t CudaForward::kv_bytes_per_token() const {
  return ranks_[0]->kv_slot_bytes();
}

cu::PagedKv CudaForward::Impl::layer_cache(int64_t l) const {
  const int64_t slots = num_blocks * options.block_size;
  const int64_t plane = slots * kv_row() * kv_value_bytes();  // bytes of one layer's k (or v)
  const int64_t scale_plane = slots * kv_heads();             // floats of its scales
  const int64_t first = kv_planes() * l;                      // the layer's k plane
  const int64_t second = first + kv_planes() - 1;             // its v plane (k under MLA)
  cu::PagedKv cache;
  cache.k = kv.as<char>() + first * plane;
  cache.v = kv.as<char>() + second * plane;
  cache.block_size = options.block_size;
  cache.n_kv_heads = kv_heads();
  cache.head_dim = c.mla ? kv_row() : c.head_dim;
  if (options.kv_fp8) {
    cache.fp8 = true;
    cache.k_scale = kv_scale.as<float>() + first * scale_plane;
    cache.v_scale = kv_scale.as<float>() + second * scale_plane;
  }
  return cache;
}

std::string CudaForward::copy_block(int32_t src, int32_t dst) {
  // Every rank holds its KV heads of the same blocks.
  for (const auto& rank : ranks_) {
    Impl& m = *rank;
    const ModelConfig& c = m.c;
    const int64_t bs = m.options.block_size;
    const auto block_bytes = static_cast<std::size_t>(bs * m.kv_row() * m.kv_value_bytes());
    const auto block_scales = static_cast<std::size_t>(bs * m.kv_heads());
    if (std::string e = cu::set_device(m.device); !e.empty()) return e;
    for (int64_t l = 0; l < c.num_layers; ++l) {
      const cu::PagedKv cache = m.layer_cache(l);
      for (int plane = 0; plane < m.kv_planes(); ++plane) {
        char* values = static_cast<char*>(plane ? cache.v : cache.k);
        cu::copy(values + dst * block_bytes, values + src * block_bytes, block_bytes, m.stream);
        if (!cache.fp8) continue;
        float* scales = plane ? cache.v_scale : cache.k_scale;
        cu::copy(scales + dst * block_scales, scales + src * block_scales, block_scales * 4,
                 m.stream);
      }
    }
    if (std::string e = cu::synchronize(m.stream, "copying a KV block"); !e.empty()) return e;
  }
  return {};
}

Expected<std::unique_ptr<CudaForward>> CudaForward::create(const ModelConfig& config,
                                                           const ModelWeights& weights,
                                                           const CudaOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  if (options.block_size <= 0) return Error("the KV cache block size must be positive");
  bool ok = false;
  parse_method(options.grouped_gemm, &ok);
  if (!ok)
    return Error(
        fmt::format("grouped GEMM method '{}' is not one of auto, loop, streams, batched, wmma",
                    options.grouped_gemm));
  const int N = options.tensor_parallel;
  if (Status s = check_tensor_parallel(config, N); !s) return s.error();
  if (options.collective != "auto" && options.collective != "nccl" &&
      options.collective != "one-gpu")
    return Error(
        fmt::format("collective '{}' is not one of auto, nccl, one-gpu", options.collective));
  const bool one_gpu = options.collective == "one-gpu";
  std::vector<int> devices;
  for (int r = 0; r < N; ++r) devices.push_back(one_gpu ? options.device : options.device + r);
  if (N > 1 && cu::device_count() > 0 && devices.back() >= cu::device_count())
    return Error(fmt::format(
        "--tensor-parallel-size {} from cuda:{} needs GPUs {}..{}, and this machine has {}: "
        "lower the size or the first device",
        N, options.device, options.device, devices.back(), cu::device_count()));

  // The group first (NCCL is loaded only when asked for), then each rank's shard.
  std::vector<std::unique_ptr<cu::Collective>> group;
  if (one_gpu) {
    group = cu::one_gpu_group(N);
  } else if (N > 1 || options.collective == "nccl") {
    if (cu::device_count() == 0)
      return Error(
          "--device cuda: no CUDA device is usable on this machine (no GPU, or no driver); use "
          "--device cpu");
    std::string e;
    group = cu::nccl_group(devices, &e);
    if (group.empty()) return Error(e);
  }
  std::vector<std::unique_ptr<Impl>> ranks;
  const ModelConfig local = rank_config(config, N);
  for (int r = 0; r < N; ++r) {
    auto impl = std::make_unique<Impl>();
    if (Status st = impl->open(devices[r]); !st) return st.error();
    impl->c = local;
    impl->full = config;
    impl->options = options;
    impl->rank = r;
    impl->ranks = N;
    impl->group = group.empty() ? nullptr : group[r].get();
    std::string e;
    impl->grouped =
        cu::GroupedGemm::create(impl->stream, parse_method(options.grouped_gemm, &ok), &e);
    if (!impl->grouped) return Error(e);
    if (N > 1) spdlog::info("loading tensor-parallel rank {} of {} on cuda:{}", r, N, devices[r]);
    if (Status s = impl->load(weights); !s) return s.error();
    ranks.push_back(std::move(impl));
  }

  // The KV pool: the bytes asked for, or half of what the weights left free, on each GPU (the
  // least of them: every rank holds the same blocks).
  const int64_t block_bytes = options.block_size * ranks[0]->kv_slot_bytes();
  int64_t budget = options.kv_cache_bytes;
  if (budget <= 0) {
    budget = INT64_MAX;
    for (const auto& m : ranks) {
      if (Status s = from(cu::set_device(m->device)); !s) return s.error();
      int64_t free_bytes = 0, total = 0;
      if (std::string err = cu::memory_info(&free_bytes, &total); !err.empty()) return Error(err);
      // Ranks that share a GPU (one-gpu) share what it has free.
      budget = std::min(budget, free_bytes / 2 / (one_gpu ? N : 1));
    }
  }
  const int64_t num_blocks = budget / block_bytes;
  if (num_blocks < 1)
    return Error(fmt::format(
        "the GPU KV cache budget of {} bytes holds no block of {} bytes: give more memory", budget,
        block_bytes));
  for (const auto& m : ranks) {
    if (Status s = from(cu::set_device(m->device)); !s) return s.error();
    m->num_blocks = num_blocks;
    const int64_t slots = num_blocks * options.block_size;
    const int64_t planes = local.num_layers * m->kv_planes();
    if (std::string err;
        (m->kv = cu::DeviceBuffer::allocate(
             static_cast<std::size_t>(planes * slots * m->kv_row() * m->kv_value_bytes()), &err)),
        !m->kv.data())
      return Error(err + " (the KV cache pool; lower its size)");
    if (options.kv_fp8) {
      if (std::string err;
          (m->kv_scale = cu::DeviceBuffer::allocate(
               static_cast<std::size_t>(planes * slots * m->kv_heads() * 4), &err)),
          !m->kv_scale.data())
        return Error(err + " (the KV cache pool's FP8 scales; lower its size)");
    }
    if (std::string err = cu::synchronize(m->stream, "loading the model onto the GPU");
        !err.empty())
      return Error(err);
  }
  const auto ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  auto fwd = std::unique_ptr<CudaForward>(new CudaForward(std::move(ranks), std::move(group)));
  spdlog::info("gpu model ready {} ms={:.0f}", fwd->description(), ms);
  return fwd;
}

Status CudaForward::Impl::load(const ModelWeights& w) {
  // What every rank holds whole: embeddings, norms, routers, the shared expert's gate. The LM
  // head's rows are split over the ranks when they divide the vocabulary (vocab_first,
  // vocab_count), else rank 0 holds all of them.
  if (Status s = upload_whole(embed, w.embed); !s) return s;
  const int64_t V = c.vocab_size;
  const int64_t H = c.hidden_size;
  vocab_count = ranks > 1 && V % ranks == 0 ? V / ranks : rank == 0 ? V : 0;
  vocab_first = vocab_count == V ? 0 : rank * vocab_count;
  if (w.lm_head.data == w.embed.data) {
    lm_head = embed.as<uint16_t>() + vocab_first * H;
  } else if (vocab_count > 0) {
    if (Status s = upload_bf16(lm_head_own, rows_bf16(w.lm_head, vocab_first, vocab_count)); !s)
      return s;
    lm_head = lm_head_own.as<uint16_t>();
  }
  if (Status s = upload_f32(final_norm, w.final_norm); !s) return s;
  std::vector<float> freq = options.inv_freq;
  if (freq.empty()) {
    freq.resize(static_cast<std::size_t>(c.rotary_dim / 2));
    kernels::rope_inv_freq(c.rope_theta, c.rotary_dim, freq.data());
  }
  if (Status s = upload_f32(inv_freq, freq); !s) return s;
  if (c.mla && options.mla_softmax_scale <= 0.0f)  // not given: qk_head_dim^-0.5, no YaRN mscale
    options.mla_softmax_scale = 1.0f / std::sqrt(static_cast<float>(c.mla->qk_head_dim()));

  // Vectors over the q and k features: this rank's part (per-head q/k norm weights are whole).
  const bool split_qk_norm = c.qk_norm == QkNorm::Full;
  layers.resize(w.layers.size());
  int64_t last_percent = -1;
  for (std::size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& L = w.layers[l];
    Layer& D = layers[l];
    for (auto [dst, src, split] : {std::tuple{&D.input_norm, &L.input_norm, false},
                                   {&D.post_norm, &L.post_attention_norm, false},
                                   {&D.q_bias, &L.attn.q_bias, true},
                                   {&D.o_bias, &L.attn.o_bias, false},
                                   {&D.q_norm, &L.attn.q_norm, split_qk_norm},
                                   {&D.k_norm, &L.attn.k_norm, split_qk_norm}})
      if (Status s = upload_f32(*dst, split ? shard_vector(*src, rank, ranks) : *src); !s) return s;
    if (Status s = upload_dense(D.o, L.attn.o, Split::Cols); !s) return s;
    if (c.mla) {
      if (Status s = load_mla(D, L); !s) return s;
    } else if (Status s = upload_dense(D.q, L.attn.q, Split::Rows); !s) {
      return s;
    }
    // This rank's KV heads (replicated when the ranks outnumber them), with their biases.
    const KvShare mine = kv_share(full, rank, ranks);
    const int64_t hd = full.head_dim;
    if (!c.mla)
      for (auto [dst, src, bias_dst, bias_src] :
           {std::tuple{&D.k, &L.attn.k, &D.k_bias, &L.attn.k_bias},
            {&D.v, &L.attn.v, &D.v_bias, &L.attn.v_bias}}) {
        const int64_t first = mine.first * hd, count = mine.count * hd;
        if (Status s =
                dense_fp8_rows(*src, first, count)
                    ? upload_dense_fp8(*dst, rows_fp8(*src, first, count))
                    : upload_dense_bf16(*dst, rows_bf16(*src, first, count), count, src->cols);
            !s)
          return s;
        if (Status s =
                upload_f32(*bias_dst, slice_vector(*bias_src, mine.first * hd, mine.count * hd));
            !s)
          return s;
      }
    D.moe = L.moe;
    if (!L.moe) {
      if (Status s = upload_ffn(D.mlp, L.mlp); !s) return s;
    } else {
      if (Status s = upload_whole(D.router, L.router); !s) return s;
      if (Status s = upload_f32(D.router_bias, L.router_bias); !s) return s;
      D.shared = L.has_shared_expert;
      if (D.shared) {
        if (Status s = upload_ffn(D.shared_expert, L.shared_expert); !s) return s;
        if (!L.shared_expert_gate.empty())
          if (Status s = upload_whole(D.shared_gate, L.shared_expert_gate); !s) return s;
      }
      if (!L.experts.empty()) {
        routed_experts = true;
        if (Status s = upload_experts(D, L.experts, l); !s) return s;
      }
    }
    const int64_t percent = static_cast<int64_t>((l + 1) * 100 / w.layers.size());
    if (percent / 25 != last_percent / 25) {
      spdlog::info("uploading weights to the GPU: {}% ({} of {} layers, {:.2f} GiB)", percent,
                   l + 1, w.layers.size(), static_cast<double>(weight_bytes) / (1 << 30));
      last_percent = percent;
    }
  }
  return {};
}

Status CudaForward::Impl::upload_experts(Layer& D, const std::vector<kernels::FfnWeights>& experts,
                                         std::size_t l) {
  std::string refusal;
  for (const kernels::FfnWeights& e : experts)
    if (refusal = fp8_expert_refusal(e, ranks); !refusal.empty()) break;
  if (refusal.empty()) return upload_experts_fp8(D, experts);
  if (experts[0].gate.dtype == kernels::DType::F8E4M3 && !fp8_fallback_logged) {
    spdlog::warn(
        "routed experts of layer {} are uploaded as bf16 (twice the bytes of FP8): {}; FP8 "
        "experts stay FP8 on the GPU when each rank's expert width is a multiple of 128 and hidden "
        "of 64",
        l, refusal);
    fp8_fallback_logged = true;
  }
  const int64_t E = static_cast<int64_t>(experts.size());
  const int64_t I = experts[0].gate.rows / ranks;
  const int64_t H = experts[0].gate.cols;
  const std::size_t gu_bytes = static_cast<std::size_t>(2 * I * H * 2);
  const std::size_t d_bytes = static_cast<std::size_t>(H * I * 2);
  if (Status s = ensure(D.experts_gate_up, gu_bytes * E); !s) return s;
  if (Status s = ensure(D.experts_down, d_bytes * E); !s) return s;
  for (int64_t e = 0; e < E; ++e) {
    const std::vector<uint16_t> gate_up = gate_up_rows(experts[e], rank, ranks);
    cu::copy(static_cast<char*>(D.experts_gate_up.data()) + e * gu_bytes, gate_up.data(), gu_bytes,
             stream);
    const std::vector<uint16_t> down = shard_bf16(experts[e].down, Split::Cols, rank, ranks);
    cu::copy(static_cast<char*>(D.experts_down.data()) + e * d_bytes, down.data(), d_bytes, stream);
    if (Status s = from(cu::synchronize(stream, "uploading experts")); !s) return s;
    D.gate_up_groups.push_back(
        {static_cast<char*>(D.experts_gate_up.data()) + e * gu_bytes, nullptr});
    D.down_groups.push_back({static_cast<char*>(D.experts_down.data()) + e * d_bytes, nullptr});
  }
  weight_bytes += static_cast<int64_t>((gu_bytes + d_bytes) * E);
  return {};
}

Status CudaForward::Impl::upload_experts_fp8(Layer& D,
                                             const std::vector<kernels::FfnWeights>& experts) {
  const int64_t E = static_cast<int64_t>(experts.size());
  const int64_t I = experts[0].gate.rows / ranks;
  const int64_t H = experts[0].gate.cols;
  const std::size_t gu_bytes = static_cast<std::size_t>(2 * I * H);  // one byte a weight
  const std::size_t d_bytes = static_cast<std::size_t>(H * I);
  const std::size_t gu_scales = static_cast<std::size_t>(2 * (I / 128) * kernels::fp8_blocks(H));
  const std::size_t d_scales = static_cast<std::size_t>(kernels::fp8_blocks(H) * (I / 128));
  if (Status s = ensure(D.experts_gate_up, gu_bytes * E); !s) return s;
  if (Status s = ensure(D.experts_down, d_bytes * E); !s) return s;
  if (Status s = ensure(D.experts_gate_up_scale, gu_scales * E * 4); !s) return s;
  if (Status s = ensure(D.experts_down_scale, d_scales * E * 4); !s) return s;
  for (int64_t e = 0; e < E; ++e) {
    const Fp8Matrix gate_up = gate_up_fp8(experts[e], rank, ranks);
    const Fp8Matrix down = shard_fp8(experts[e].down, Split::Cols, rank, ranks);
    if (gate_up.codes.size() != gu_bytes || gate_up.scales.size() != gu_scales ||
        down.codes.size() != d_bytes || down.scales.size() != d_scales)
      return Error(fmt::format("expert {}: FP8 shard sizes do not match the layer's", e));
    char* gu_w = static_cast<char*>(D.experts_gate_up.data()) + e * gu_bytes;
    char* d_w = static_cast<char*>(D.experts_down.data()) + e * d_bytes;
    float* gu_s = D.experts_gate_up_scale.as<float>() + e * gu_scales;
    float* d_s = D.experts_down_scale.as<float>() + e * d_scales;
    cu::copy(gu_w, gate_up.codes.data(), gu_bytes, stream);
    cu::copy(d_w, down.codes.data(), d_bytes, stream);
    cu::copy(gu_s, gate_up.scales.data(), gu_scales * 4, stream);
    cu::copy(d_s, down.scales.data(), d_scales * 4, stream);
    if (Status s = from(cu::synchronize(stream, "uploading experts")); !s) return s;
    D.gate_up_groups.push_back({gu_w, gu_s});
    D.down_groups.push_back({d_w, d_s});
  }
  D.experts_fp8 = true;
  weight_bytes += static_cast<int64_t>((gu_bytes + d_bytes + (gu_scales + d_scales) * 4) * E);
  return {};
}

Expected<const void*> CudaForward::Impl::Rows::assemble(int slot, const void* head,
                                                        std::size_t head_bytes,
                                                        std::span<const int32_t> rows, bool bf16) {
  const int64_t H = m->c.hidden_size;
  const auto n = static_cast<int64_t>(rows.size());
  const std::size_t row_bytes = static_cast<std::size_t>(H) * (bf16 ? 2 : 4);
  if (slot < 0) return Error("DeviceRows::assemble: negative slot");
  if (messages.size() <= static_cast<std::size_t>(slot)) messages.resize(slot + 1);
  cu::DeviceBuffer& out = messages[slot];
  if (Status s = ensure(out, head_bytes + static_cast<std::size_t>(n) * row_bytes); !s)
    return s.error();
  if (head_bytes > 0) {
    if (Status s = ensure(head_host, head_bytes); !s) return s.error();
    std::memcpy(head_host.data(), head, head_bytes);
    cu::copy(out.data(), head_host.data(), head_bytes, m->stream);
  }
  if (n > 0) {
    const auto token_bytes = static_cast<std::size_t>(n) * 4;
    if (Status s = ensure(tokens_host, token_bytes); !s) return s.error();
    if (Status s = ensure(tokens, token_bytes); !s) return s.error();
    std::memcpy(tokens_host.data(), rows.data(), token_bytes);
    cu::copy(tokens.data(), tokens_host.data(), token_bytes, m->stream);
    // A float32 row gathers as a bf16 row twice as wide: the same bytes.
    const auto* x = bf16 ? m->xn.as<uint16_t>() : m->xn_f32.as<uint16_t>();
    cu::moe_gather(x, tokens.as<int32_t>(), n, 1, bf16 ? H : 2 * H,
                   reinterpret_cast<uint16_t*>(static_cast<char*>(out.data()) + head_bytes),
                   m->stream);
  }
  if (Status s = from(cu::synchronize(m->stream, "assembling a dispatch on the GPU")); !s)
    return s.error();
  return static_cast<const void*>(out.data());
}

Status CudaForward::Impl::ensure_scratch(int64_t n, int64_t segments, int64_t max_blocks,
                                         bool staged) {
  const int64_t H = c.hidden_size;
  const int64_t qd = q_width();
  const int64_t ad = attn_width();
  const int64_t kvd = c.num_kv_heads * c.head_dim;
  const int64_t slots = n * std::max<int64_t>(1, c.top_k);
  const int64_t E = std::max<int64_t>(1, c.num_experts);
  const int64_t I = std::max({c.intermediate_size, c.moe_intermediate_size,
                              c.shared_expert_intermediate_size, int64_t{1}});
  const std::size_t f = sizeof(float);
  for (auto [buf, bytes] : {std::pair{&x, n * H * f},
                            {&delta, n * H * f},
                            {&xn, n * H * 2},
                            {&xn_f32, n * H * f},
                            {&q, n * qd * f},
                            {&k, n * kvd * f},
                            {&v, n * kvd * f},
                            {&attn, n * std::max(qd, ad) * f},
                            {&attn_bf16, n * std::max(qd, ad) * 2},
                            {&gu, n * 2 * I * f},
                            {&act, n * I * 2},
                            {&router_logits, n * E * f},
                            {&ids, slots * 4},
                            {&wts, slots * f},
                            {&counts, E * 4},
                            {&offsets, (E + 1) * 4},
                            {&row_of_slot, slots * 4},
                            {&slot_of_row, slots * 4},
                            {&xe, slots * H * 2},
                            {&ge, slots * 2 * I * f},
                            {&ae, slots * I * 2},
                            {&ye, slots * H * f},
                            {&shared_out, n * H * f},
                            {&shared_gate_out, n * f},
                            {&meta, (4 * n + segments * max_blocks) * 4},
                            {&sum_squares, 2 * n * f}})
    if (Status s = ensure(*buf, static_cast<std::size_t>(bytes)); !s) return s;
  if (c.mla) {
    // Latent attention: q's low-rank input, the new latent rows, the absorbed queries [n, heads,
    // row] and their attention outputs, and bf16 copies of the per-head products' inputs.
    const MlaConfig& a = *c.mla;
    const int64_t row = a.cache_row();
    const int64_t hr = c.num_heads * row;
    for (auto [buf, bytes] : {std::pair{&mla_qa, n * a.q_lora_rank * f},
                              {&mla_qa_bf16, n * a.q_lora_rank * 2},
                              {&mla_ckv, n * row * f},
                              {&mla_latent, n * a.kv_lora_rank * f},
                              {&mla_q_abs, n * hr * f},
                              {&mla_lat, n * hr * f},
                              {&mla_bf16, n * std::max(hr, qd) * 2}})
      if (Status s = ensure(*buf, static_cast<std::size_t>(bytes)); !s) return s;
  }
  if (Status s = ensure(counts_host, static_cast<std::size_t>(E * 4)); !s) return s;
  if (staged)
    for (auto [buf, bytes] : {std::pair{&stage_x, n * H * f},
                              {&stage_ids, slots * 4},
                              {&stage_w, slots * f},
                              {&stage_out, n * H * f}})
      if (Status s = ensure(*buf, static_cast<std::size_t>(bytes)); !s) return s;
  return {};
}

Status CudaForward::Impl::ffn_dense(const Ffn& f, int64_t n, float* out) {
  if (Status s = linear(f.gate_up, xn.as<uint16_t>(), gu.as<float>(), n); !s) return s;
  cu::swiglu(gu.as<float>(), n, f.inter, act.as<uint16_t>(), stream);
  return linear(f.down, act.as<uint16_t>(), out, n);
}

Status CudaForward::Impl::ffn(int64_t l, int64_t n, ExpertBackend* external, bool remote,
                              Status& deferred) {
  const Layer& D = layers[l];
  const int64_t H = c.hidden_size;
  float* out = delta.as<float>();
  if (!D.moe) return ffn_dense(D.mlp, n, out);

  const int64_t E = c.num_experts;
  const int64_t K = c.top_k;
  const int64_t slots = n * K;
  if (Status s = from(blas->gemm(xn.as<uint16_t>(), D.router.as<uint16_t>(),
                                 router_logits.as<float>(), n, E, H));
      !s)
    return s;
  // The router of model.cpp's ffn_block: softmax top-k, or the grouped router (sigmoid scores,
  // the correction bias, expert groups, routed_scaling_factor) of the deepseek families.
  cu::RouterSpec spec;
  spec.n_experts = E;
  spec.top_k = K;
  spec.renormalize = c.norm_topk_prob;
  if (c.grouped_router) {
    spec.scoring =
        c.scoring == RouterScoring::Sigmoid ? cu::Scoring::Sigmoid : cu::Scoring::Softmax;
    spec.scaling = c.routed_scaling_factor;
    spec.n_groups = c.n_group;
    spec.topk_groups = c.topk_group;
    spec.group_score = c.group_top2_sum ? cu::GroupScore::Top2Sum : cu::GroupScore::Max;
  }
  cu::route_topk(router_logits.as<float>(), D.router_bias.as<float>(), n, spec, ids.as<int32_t>(),
                 wts.as<float>(), stream);
  if (c.expert_weights_norm_p)  // dbrx
    cu::divide_by_p_norm(wts.as<float>(), n, K, *c.expert_weights_norm_p, stream);

  if (remote && !external) {
    // Another rank's backend computes the routed experts: this rank adds its shared expert part.
    cu::fill_bytes(out, 0, static_cast<std::size_t>(n * H * 4), stream);
    if (D.shared)
      if (Status s = ffn_dense(D.shared_expert, n, shared_out.as<float>()); !s) return s;
  } else if (external) {
    // Remote experts: the backend takes the rows from device memory where its transport can
    // (takes_device_rows()), else they are staged through pinned host memory; ids, weights and
    // the result go through the host. The shared expert overlaps the backend.
    const bool on_device = external->takes_device_rows(device_rows.cuda_memory());
    if (!on_device)
      cu::copy(stage_x.data(), xn_f32.data(), static_cast<std::size_t>(n * H * 4), stream);
    cu::copy(stage_ids.data(), ids.data(), static_cast<std::size_t>(slots * 4), stream);
    cu::copy(stage_w.data(), wts.data(), static_cast<std::size_t>(slots * 4), stream);
    if (Status s = from(cu::synchronize(stream, "staging tokens for the expert backend")); !s)
      return s;
    float* host_out = stage_out.as<float>();
    std::fill(host_out, host_out + n * H, 0.0f);
    device_rows.m = this;
    Status started = on_device ? external->start_device(l, device_rows, n, stage_ids.as<int32_t>(),
                                                        stage_w.as<float>(), K, host_out)
                               : external->start(l, stage_x.as<float>(), n, stage_ids.as<int32_t>(),
                                                 stage_w.as<float>(), K, host_out);
    Status shared_status;
    if (D.shared) shared_status = ffn_dense(D.shared_expert, n, shared_out.as<float>());
    Status backend = started ? external->finish() : started;
    if (!shared_status) return shared_status;
    if (!backend) {
      // With other ranks the step goes on (they wait in its sums) and fails at its end.
      if (!group) return backend;
      if (deferred) deferred = backend;
      std::fill(host_out, host_out + n * H, 0.0f);
    }
    cu::copy(out, host_out, static_cast<std::size_t>(n * H * 4), stream);
  } else {
    if (!routed_experts)
      return Error(
          "this model was loaded without its routed experts (an attention worker): set an "
          "expert backend with Model::set_expert_backend");
    cu::moe_align(ids.as<int32_t>(), slots, E, counts.as<int32_t>(), offsets.as<int32_t>(),
                  row_of_slot.as<int32_t>(), slot_of_row.as<int32_t>(), stream);
    cu::copy(counts_host.data(), counts.data(), static_cast<std::size_t>(E * 4), stream);
    // The token gather runs while the host waits for the counts it needs to issue the GEMMs.
    cu::moe_gather(xn.as<uint16_t>(), slot_of_row.as<int32_t>(), slots, K, H, xe.as<uint16_t>(),
                   stream);
    if (Status s = from(cu::synchronize(stream, "routing tokens to experts")); !s) return s;
    rows.assign(static_cast<std::size_t>(E), 0);
    offs.assign(static_cast<std::size_t>(E), 0);
    int64_t total = 0;
    for (int64_t e = 0; e < E; ++e) {
      rows[e] = counts_host.as<int32_t>()[e];
      offs[e] = total;
      total += rows[e];
    }
    if (total != slots)
      return Error(
          fmt::format("layer {}: the expert counts add up to {}, not {} slots", l, total, slots));
    const int64_t I = c.moe_intermediate_size;
    auto run = [&](const uint16_t* in, const std::vector<cu::GroupWeight>& w, int64_t n_out,
                   int64_t k_in, float* y) {
      return from(D.experts_fp8 ? grouped->run_fp8(in, w, rows, offs, n_out, k_in, y)
                                : grouped->run_bf16(in, w, rows, offs, n_out, k_in, y));
    };
    if (Status s = run(xe.as<uint16_t>(), D.gate_up_groups, 2 * I, H, ge.as<float>()); !s) return s;
    cu::swiglu(ge.as<float>(), slots, I, ae.as<uint16_t>(), stream);
    if (Status s = run(ae.as<uint16_t>(), D.down_groups, H, I, ye.as<float>()); !s) return s;
    cu::moe_combine(ye.as<float>(), row_of_slot.as<int32_t>(), wts.as<float>(), n, K, H, false, out,
                    stream);
    if (D.shared)
      if (Status s = ffn_dense(D.shared_expert, n, shared_out.as<float>()); !s) return s;
  }
  if (D.shared) {
    const float* gate = nullptr;
    if (D.shared_gate.data()) {
      if (Status s = from(blas->gemm(xn.as<uint16_t>(), D.shared_gate.as<uint16_t>(),
                                     shared_gate_out.as<float>(), n, 1, H));
          !s)
        return s;
      gate = shared_gate_out.as<float>();
    }
    cu::add_gated_rows(out, shared_out.as<float>(), gate, n, H, stream);
  }
  return {};
}

Status CudaForward::Impl::attention(int64_t l, int64_t n, const Step& step, float* out) {
  const Layer& D = layers[l];
  const int64_t qd = c.num_heads * c.head_dim;
  const int64_t kvd = c.num_kv_heads * c.head_dim;
  const uint16_t* xin = xn.as<uint16_t>();
  float* qs = q.as<float>();
  float* ks = k.as<float>();
  float* vs = v.as<float>();
  for (auto [w, b, y, dim] : {std::tuple{&D.q, &D.q_bias, qs, qd},
                              {&D.k, &D.k_bias, ks, kvd},
                              {&D.v, &D.v_bias, vs, kvd}}) {
    if (Status s = linear(*w, xin, y, n); !s) return s;
    if (b->data()) cu::add_bias(y, b->as<float>(), n, dim, stream);
  }
  if (c.qk_norm == QkNorm::Full) {
    Status s;
    full_qk_norm(D, qs, ks, n, s);
    if (!s) return s;
  } else if (c.qk_norm == QkNorm::PerHead) {
    cu::rmsnorm(qs, nullptr, D.q_norm.as<float>(), n * c.num_heads, c.head_dim, c.rms_norm_eps, qs,
                nullptr, stream);
    cu::rmsnorm(ks, nullptr, D.k_norm.as<float>(), n * c.num_kv_heads, c.head_dim, c.rms_norm_eps,
                ks, nullptr, stream);
  }
  if (c.clip_qkv) {
    cu::clamp(qs, n * qd, *c.clip_qkv, stream);
    cu::clamp(ks, n * kvd, *c.clip_qkv, stream);
    cu::clamp(vs, n * kvd, *c.clip_qkv, stream);
  }
  // The first rotary_dim features of each head rotate (all of them but with a partial factor).
  cu::rope(qs, n, qd, c.num_heads, c.head_dim, c.rotary_dim, step.pos, inv_freq.as<float>(),
           stream);
  cu::rope(ks, n, kvd, c.num_kv_heads, c.head_dim, c.rotary_dim, step.pos, inv_freq.as<float>(),
           stream);
  const cu::PagedKv cache = layer_cache(l);
  cu::paged_kv_write(ks, vs, n, step.slot, cache, stream);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  cu::paged_attention(qs, n, cache, step.batch, c.num_heads, scale, c.layer_window[l],
                      attn.as<float>(), stream);
  cu::f32_to_bf16(attn.as<float>(), n * qd, attn_bf16.as<uint16_t>(), stream);
  return linear(D.o, attn_bf16.as<uint16_t>(), out, n);
}

void CudaForward::Impl::full_qk_norm(const Layer& D, float* qs, float* ks, int64_t n, Status& s) {
  const int64_t qd = c.num_heads * c.head_dim;
  const int64_t kvd = c.num_kv_heads * c.head_dim;
  if (!group) {
    cu::rmsnorm(qs, nullptr, D.q_norm.as<float>(), n, qd, c.rms_norm_eps, qs, nullptr, stream);
    cu::rmsnorm(ks, nullptr, D.k_norm.as<float>(), n, kvd, c.rms_norm_eps, ks, nullptr, stream);
    return;
  }
  // Each rank holds some of the features: the sums of squares are added over the ranks first.
  float* ss = sum_squares.as<float>();
  cu::row_sum_squares(qs, n, qd, ss, stream);
  cu::row_sum_squares(ks, n, kvd, ss + n, stream);
  if (s = all_reduce(ss, 2 * n); !s) return;
  // Every rank holds the same share: the whole widths are ranks times this rank's.
  cu::rmsnorm_apply(qs, ss, qd * ranks, D.q_norm.as<float>(), n, qd, c.rms_norm_eps, stream);
  cu::rmsnorm_apply(ks, ss + n, kvd * ranks, D.k_norm.as<float>(), n, kvd, c.rms_norm_eps, stream);
}

namespace {

// The longest block table of a step's segments (at least 1): the width of its table array.
int64_t max_blocks_of(std::span<const CudaForward::Segment> segments) {
  int64_t most = 1;
  for (const CudaForward::Segment& s : segments) most = std::max(most, s.n_blocks);
  return most;
}

}  // namespace

Status CudaForward::forward(std::span<const Segment> segments, std::span<const int32_t> tokens,
                            ExpertBackend* external, std::span<const int64_t> logit_rows,
                            std::vector<float>& logits) {
  const bool remote = external != nullptr;
  if (ranks_.size() == 1) {
    Status s = run_rank(*ranks_[0], segments, tokens, external, remote, logit_rows, logits);
    if (!s && !group_.empty()) group_[0]->abort();
    return s;
  }
  // Scratch on every GPU before any rank starts (a rank that stops early would leave the others
  // waiting in a sum).
  const int64_t max_blocks = max_blocks_of(segments);
  for (const auto& m : ranks_) {
    if (Status s = from(cu::set_device(m->device)); !s) return s;
    if (Status s = m->ensure_scratch(static_cast<int64_t>(tokens.size()),
                                     static_cast<int64_t>(segments.size()), max_blocks, remote);
        !s)
      return s;
  }
  // One thread per rank (rank 0 on the caller's); a rank that fails releases the others.
  std::vector<Status> status(ranks_.size());
  std::vector<std::vector<float>> unused(ranks_.size());
  std::vector<std::thread> threads;
  for (std::size_t r = 1; r < ranks_.size(); ++r)
    threads.emplace_back([&, r] {
      status[r] = run_rank(*ranks_[r], segments, tokens, nullptr, remote, logit_rows, unused[r]);
      if (!status[r]) group_[r]->abort();
    });
  status[0] = run_rank(*ranks_[0], segments, tokens, external, remote, logit_rows, logits);
  if (!status[0]) group_[0]->abort();
  for (std::thread& t : threads) t.join();
  for (Status& s : status)
    if (!s) return s;
  return {};
}

Status CudaForward::run_rank(Impl& m, std::span<const Segment> segments,
                             std::span<const int32_t> tokens, ExpertBackend* external, bool remote,
                             std::span<const int64_t> logit_rows, std::vector<float>& logits) {
  const ModelConfig& c = m.c;
  const auto n = static_cast<int64_t>(tokens.size());
  const int64_t H = c.hidden_size;
  const int64_t bs = m.options.block_size;
  if (std::string e = cu::set_device(m.device); !e.empty()) return Error(e);

  const int64_t max_blocks = max_blocks_of(segments);
  const auto n_seg = static_cast<int64_t>(segments.size());
  if (Status s = m.ensure_scratch(n, n_seg, max_blocks, external != nullptr); !s) return s;

  // Per-token metadata: tokens, positions, sequence index, cache slots; then the block tables.
  m.meta_host.assign(static_cast<std::size_t>(4 * n + n_seg * max_blocks), 0);
  int32_t* tok = m.meta_host.data();
  int32_t* pos = tok + n;
  int32_t* seq = pos + n;
  int32_t* slot = seq + n;
  int32_t* tables = slot + n;
  int64_t max_pos = 0;
  for (int64_t si = 0; si < n_seg; ++si) {
    const Segment& s = segments[si];
    const int32_t* blocks = s.blocks;
    std::copy(blocks, blocks + s.n_blocks, tables + si * max_blocks);
    for (int64_t t = 0; t < s.n; ++t) {
      const int64_t row = s.begin + t;
      const int64_t p = s.past + t;
      tok[row] = tokens[row];
      pos[row] = static_cast<int32_t>(p);
      seq[row] = static_cast<int32_t>(si);
      slot[row] = static_cast<int32_t>(blocks[p / bs] * bs + p % bs);
      max_pos = std::max(max_pos, p);
    }
  }
  cu::copy(m.meta.data(), m.meta_host.data(), m.meta_host.size() * 4, m.stream);
  const auto* d_tok = m.meta.as<int32_t>();
  const int32_t* d_pos = d_tok + n;
  const int32_t* d_seq = d_pos + n;
  const int32_t* d_slot = d_seq + n;
  const int32_t* d_tables = d_slot + n;

  float* x = m.x.as<float>();
  float* delta = m.delta.as<float>();
  uint16_t* xn = m.xn.as<uint16_t>();
  float* xn_f32 = external ? m.xn_f32.as<float>() : nullptr;
  Status deferred;  // the expert backend's error, with other ranks (reported at the step's end)
  cu::embedding(m.embed.as<uint16_t>(), H, d_tok, n, x, m.stream);

  Impl::Step step;
  step.pos = d_pos;
  step.slot = d_slot;
  step.batch.seq = d_seq;
  step.batch.pos = d_pos;
  step.batch.block_tables = d_tables;
  step.batch.max_blocks = max_blocks;
  step.batch.max_pos = max_pos;
  step.segments = segments;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const Impl::Layer& D = m.layers[l];
    // Attention: x += o(attn(norm(x))) ...
    m.norm(x, l == 0 ? nullptr : delta, D.input_norm.as<float>(), n, H, c.rms_norm_eps, nullptr, xn,
           m.stream);
    if (c.mla) {
      if (Status s = m.mla_attention(l, n, step, delta); !s) return s;
    } else if (Status s = m.attention(l, n, step, delta); !s) {
      return s;
    }
    if (D.o_bias.data() && m.rank == 0) cu::add_bias(delta, D.o_bias.as<float>(), n, H, m.stream);
    if (Status s = m.all_reduce(delta, n * H); !s) return s;
    // ... then x += ffn(norm(x)).
    m.norm(x, delta, D.post_norm.as<float>(), n, H, c.rms_norm_eps, xn_f32, xn, m.stream);
    if (Status s = m.ffn(l, n, external, remote, deferred); !s) return s;
    if (Status s = m.all_reduce(delta, n * H); !s) return s;
  }
  if (!deferred) {
    (void)cu::synchronize(m.stream, "forward pass");
    return deferred;
  }

  if (logit_rows.empty() || m.vocab_count == 0) {
    logits.clear();
    return from(cu::synchronize(m.stream, "forward pass"));
  }
  const auto rows = static_cast<int64_t>(logit_rows.size());
  m.norm(x, delta, m.final_norm.as<float>(), n, H, c.rms_norm_eps, nullptr, xn, m.stream);
  // The rows asked for: a contiguous run at the end (one sequence's logits, or a decode batch)
  // is used in place; others are gathered first.
  const uint16_t* head_in = xn + logit_rows.front() * H;
  const bool contiguous = logit_rows.back() - logit_rows.front() + 1 == rows;
  if (!contiguous) {
    std::vector<int32_t> idx(logit_rows.begin(), logit_rows.end());
    cu::copy(m.row_of_slot.data(), idx.data(), idx.size() * 4, m.stream);
    cu::moe_gather(xn, m.row_of_slot.as<int32_t>(), rows, 1, H, m.xe.as<uint16_t>(), m.stream);
    head_in = m.xe.as<uint16_t>();
  }
  const int64_t V = c.vocab_size;
  if (Status s = ensure(m.logits, static_cast<std::size_t>(rows * V * 4)); !s) return s;
  if (m.vocab_count == V) {
    if (Status s = from(m.blas->gemm(head_in, m.lm_head, m.logits.as<float>(), rows, V, H)); !s)
      return s;
  } else {
    // Vocabulary-parallel: this rank's columns of zeroed [rows, V] logits, summed over the ranks.
    cu::fill_bytes(m.logits.data(), 0, static_cast<std::size_t>(rows * V * 4), m.stream);
    cu::Blas::StridedBatch b;
    b.x = head_in;
    b.ldx = H;
    b.w = m.lm_head;
    b.ldw = H;
    b.y = m.logits.as<float>() + m.vocab_first;
    b.ldy = V;
    if (Status s = from(m.blas->gemm_strided_batched(b, rows, m.vocab_count, H, 1)); !s) return s;
    if (Status s = m.all_reduce(m.logits.as<float>(), rows * V); !s) return s;
    if (m.rank > 0) {
      logits.clear();
      return from(cu::synchronize(m.stream, "forward pass"));
    }
  }
  logits.resize(static_cast<std::size_t>(rows * V));
  cu::copy(logits.data(), m.logits.data(), logits.size() * 4, m.stream);
  return from(cu::synchronize(m.stream, "forward pass"));
}

}  // namespace moemesh::detail
