#include "core/model.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/checkpoint.h"
#include "core/cpus.h"
#include "core/detail/fp8_config.h"
#include "core/detail/local_experts.h"
#include "core/detail/model_impl.h"

namespace moemesh {

Status ExpertBackend::start(int64_t layer, const float* x, int64_t n, const int32_t* ids,
                            const float* weights, int64_t top_k, float* out) {
  pending_ = Pending{layer, x, n, ids, weights, top_k, out};
  return {};
}

Status ExpertBackend::finish() {
  if (!pending_) return Error("ExpertBackend::finish() was called with no start() pending");
  const Pending p = *pending_;
  pending_.reset();
  return compute(p.layer, p.x, p.n, p.ids, p.weights, p.top_k, p.out);
}

bool ExpertBackend::takes_device_rows(bool) const {
  return false;
}

Status ExpertBackend::start_device(int64_t, DeviceRows&, int64_t, const int32_t*, const float*,
                                   int64_t, float*) {
  return Error("this expert backend does not take rows in GPU memory (takes_device_rows())");
}

Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Model::~Model() = default;

const ModelConfig& Model::config() const {
  return impl_->config;
}

Expected<std::unique_ptr<Model>> Model::load(const std::filesystem::path& dir,
                                             const ModelOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  Expected<ModelConfig> config = load_model_config(dir);
  if (!config) return config.error();
  if (Status s = detail::check_fp8_quantization_config(dir); !s) return s.error();
  Expected<std::shared_ptr<const Checkpoint>> ckpt = Checkpoint::open(dir);
  if (!ckpt) return ckpt.error();
  detail::Quantization quant = detail::Quantization::None;
  if (Status s = detail::parse_quantization(options.quantization, &quant); !s) return s.error();
  if (quant == detail::Quantization::Int8 && options.device != "cpu")
    return Error(fmt::format(
        "quantization 'int8' is not supported on device '{}': it works with --device cpu only "
        "(on a GPU use fp8)",
        options.device));
  Expected<detail::ModelWeights> weights =
      detail::bind_weights(*config, *ckpt, options.routed_experts);
  if (!weights) return weights.error();

  auto impl = std::make_unique<Impl>();
  impl->config = std::move(*config);
  impl->weights = std::move(*weights);
  impl->pool = std::make_unique<kernels::ThreadPool>(options.threads, options.cpus);
  if (quant == detail::Quantization::Int8) detail::quantize_int8(impl->weights, impl->pool.get());
  // The same matrices on both devices: on a GPU they stay FP8 where their shapes allow.
  if (quant == detail::Quantization::Fp8) detail::quantize_fp8(impl->weights, impl->pool.get());
  if (options.device == "cpu") detail::pack_for_amx(impl->weights, impl->pool.get());
  impl->routed_experts = options.routed_experts;
  if (options.routed_experts)
    impl->local = std::make_unique<detail::LocalExperts>(impl->weights, impl->config.hidden_size,
                                                         impl->pool.get());
  else
    impl->local = std::make_unique<detail::NoLocalExperts>();
  impl->experts = impl->local.get();
  impl->init_rope();

  bool cuda = false;
  int device = 0;
  if (options.tensor_parallel_size != 1 && options.device == "cpu")
    return Error(fmt::format(
        "--tensor-parallel-size {} splits a model over GPUs: it needs --device cuda (on the CPU "
        "use 1)",
        options.tensor_parallel_size));
#if MOEMESH_HAVE_CUDA
  if (Status s = detail::parse_device(options.device, &cuda, &device); !s) return s.error();
  if (cuda) {
    // The pool's values: FP8 for "fp8", else bf16 (f32 values are the CPU's only).
    Expected<detail::KvStoreOptions> ko =
        detail::kv_store_options(options.kv_cache_dtype, impl->weights.embed.dtype,
                                 options.kv_block_size, 0, 0, options.prefix_caching);
    if (!ko) return ko.error();
    detail::CudaOptions co;
    co.device = device;
    co.kv_cache_bytes = options.gpu_kv_cache_bytes;
    co.block_size = ko->block_size;
    co.kv_fp8 = ko->dtype == kernels::KvDtype::FP8;
    co.grouped_gemm = options.grouped_gemm;
    co.tensor_parallel = options.tensor_parallel_size;
    co.collective = options.tensor_parallel_collective;
    co.inv_freq = impl->inv_freq;
    co.rope_scale = impl->rope_scale;
    co.mla_softmax_scale = impl->mla_softmax_scale;
    co.mla_expanded_min_tokens = options.mla_expanded_min_tokens;
    Expected<std::unique_ptr<detail::CudaForward>> fwd =
        detail::CudaForward::create(impl->config, impl->weights, co);
    if (!fwd) return fwd.error();
    impl->cuda = std::move(*fwd);
    impl->kv = impl->gpu_kv_store(options.prefix_caching);
  }
#else
  if (options.device != "cpu")
    return Error(fmt::format(
        "device '{}': this moemesh was built without the CUDA backend (configure with "
        "-DMOEMESH_CUDA=ON on a machine with the CUDA toolkit), so only --device cpu works",
        options.device));
#endif
  (void)device;
  if (!cuda) {
    Expected<detail::KvStoreOptions> ko = detail::kv_store_options(
        options.kv_cache_dtype, impl->weights.embed.dtype, options.kv_block_size, 0,
        options.kv_cache_bytes, options.prefix_caching);
    if (!ko) return ko.error();
    impl->kv = std::make_shared<detail::KvStore>(impl->config, *ko);
  }

  const ModelConfig& c = impl->config;
  const auto ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  spdlog::info(
      "loaded model dir={} arch={} layers={} moe_layers={} experts={} top_k={} "
      "routed_experts={} tensors={} quantization={} quantized_bytes={} amx_packed_bytes={} "
      "threads={} cpus={} device={} isa={} ms={:.1f}",
      dir.string(), arch_name(c.arch), c.num_layers, c.num_moe_layers(), c.num_experts, c.top_k,
      options.routed_experts, impl->weights.checkpoint->names().size(),
      detail::quantization_name(quant), impl->weights.quantized.bytes(),
      impl->weights.quantized.packed_bytes(), impl->pool->size(),
      options.cpus.empty() ? std::string("any") : format_cpu_list(options.cpus),
      cuda ? "cuda:" + std::to_string(device) : std::string("cpu"),
      kernels::isa_name(kernels::active_isa()), ms);
  if (kernels::isa_env_rejected())
    spdlog::warn(
        "MOEMESH_ISA names no ISA this CPU has (baseline, avx2, avx512, amx up to {}): ignored, "
        "using {}",
        kernels::isa_name(kernels::detected_isa()), kernels::isa_name(kernels::active_isa()));
  return std::unique_ptr<Model>(new Model(std::move(impl)));
}

bool Model::is_moe_layer(int64_t layer) const {
  const ModelConfig& c = impl_->config;
  return layer >= 0 && layer < c.num_layers && c.layer_is_moe[static_cast<std::size_t>(layer)];
}

std::vector<int64_t> Model::moe_layers() const {
  std::vector<int64_t> layers;
  for (int64_t l = 0; l < impl_->config.num_layers; ++l)
    if (is_moe_layer(l)) layers.push_back(l);
  return layers;
}

bool Model::has_routed_experts() const {
  return impl_->routed_experts;
}

std::string Model::device_description() const {
#if MOEMESH_HAVE_CUDA
  if (impl_->cuda) return impl_->cuda->description();
#endif
  return "cpu";
}

int64_t Model::device_weight_bytes() const {
#if MOEMESH_HAVE_CUDA
  if (impl_->cuda) return impl_->cuda->weight_bytes();
#endif
  return 0;
}

void Model::set_expert_backend(ExpertBackend* backend) {
  impl_->experts = backend ? backend : impl_->local.get();
}

ExpertBackend& Model::local_experts() {
  return *impl_->local;
}

Status Model::forward(KVCache& cache, std::span<const int32_t> tokens, Logits mode,
                      std::vector<float>& logits) {
  return impl_->forward(cache, tokens, mode, logits);
}

Status Model::forward_batch(std::span<KVCache* const> caches, std::span<const int32_t> tokens,
                            std::vector<float>& logits) {
  return impl_->forward_batch(caches, tokens, logits);
}

Status Model::forward_step(std::span<const Chunk> chunks, std::vector<float>& logits) {
  return impl_->forward_step(chunks, logits);
}

void Model::Impl::attention_block(int64_t l, std::span<const Segment> segments, int64_t n,
                                  const float* x_norm, float* out) {
  if (config.mla) return mla_attention_block(l, segments, n, x_norm, out);
  const ModelConfig& c = config;
  const detail::AttentionWeights& w = weights.layers[l].attn;
  const int64_t q_dim = c.num_heads * c.head_dim;
  const int64_t kv_dim = c.num_kv_heads * c.head_dim;
  kernels::ThreadPool* p = pool.get();

  std::vector<float> q(static_cast<std::size_t>(n * q_dim));
  std::vector<float> k(static_cast<std::size_t>(n * kv_dim));
  std::vector<float> v(static_cast<std::size_t>(n * kv_dim));
  auto bias = [](const std::vector<float>& b) { return b.empty() ? nullptr : b.data(); };
  kernels::linear(x_norm, n, w.q, bias(w.q_bias), q.data(), p);
  kernels::linear(x_norm, n, w.k, bias(w.k_bias), k.data(), p);
  kernels::linear(x_norm, n, w.v, bias(w.v_bias), v.data(), p);

  if (c.qk_norm == QkNorm::Full) {
    kernels::rmsnorm(q.data(), w.q_norm.data(), n, q_dim, c.rms_norm_eps, q.data());
    kernels::rmsnorm(k.data(), w.k_norm.data(), n, kv_dim, c.rms_norm_eps, k.data());
  } else if (c.qk_norm == QkNorm::PerHead) {
    kernels::rmsnorm(q.data(), w.q_norm.data(), n * c.num_heads, c.head_dim, c.rms_norm_eps,
                     q.data());
    kernels::rmsnorm(k.data(), w.k_norm.data(), n * c.num_kv_heads, c.head_dim, c.rms_norm_eps,
                     k.data());
  }
  if (c.clip_qkv) {
    const float lim = *c.clip_qkv;
    for (auto* t : {&q, &k, &v})
      for (float& e : *t) e = std::clamp(e, -lim, lim);
  }

  std::vector<int32_t> positions(static_cast<std::size_t>(n));
  for (const Segment& seg : segments)
    for (int64_t t = 0; t < seg.n; ++t)
      positions[seg.begin + t] = static_cast<int32_t>(seg.cache->length_ + t);
  kernels::rope(q.data(), n, q_dim, c.num_heads, c.head_dim, c.rotary_dim, positions.data(),
                inv_freq.data());
  kernels::rope(k.data(), n, kv_dim, c.num_kv_heads, c.head_dim, c.rotary_dim, positions.data(),
                inv_freq.data());

  std::vector<float> attn(static_cast<std::size_t>(n * q_dim));
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  const kernels::PagedKv view = kv->layer_view(l);
  for (const Segment& seg : segments) {
    const KVCache& cache = *seg.cache;
    const int32_t* table = cache.blocks_.data();
    kernels::paged_kv_write(k.data() + seg.begin * kv_dim, v.data() + seg.begin * kv_dim, seg.n,
                            table, cache.length_, view);
    kernels::paged_attention(q.data() + seg.begin * q_dim, seg.n, view, table, cache.length_,
                             c.num_heads, scale, c.layer_window[l], attn.data() + seg.begin * q_dim,
                             p);
  }
  kernels::linear(attn.data(), n, w.o, bias(w.o_bias), out, p);
}

Status Model::Impl::ffn_block(int64_t l, int64_t n, const float* x_norm, float* out) {
  const ModelConfig& c = config;
  const detail::LayerWeights& L = weights.layers[l];
  const int64_t H = c.hidden_size;
  kernels::ThreadPool* p = pool.get();
  std::fill(out, out + n * H, 0.0f);
  if (!L.moe) {
    std::vector<float> scratch(static_cast<std::size_t>(2 * n * L.mlp.gate.rows));
    kernels::swiglu_ffn(x_norm, n, L.mlp, scratch.data(), out, p);
    return {};
  }
  std::vector<float> router(static_cast<std::size_t>(n * c.num_experts));
  kernels::linear(x_norm, n, L.router, nullptr, router.data(), p);
  std::vector<int32_t> ids(static_cast<std::size_t>(n * c.top_k));
  std::vector<float> gate_w(static_cast<std::size_t>(n * c.top_k));
  if (c.grouped_router)
    kernels::grouped_topk(router.data(), L.router_bias.empty() ? nullptr : L.router_bias.data(), n,
                          c.num_experts, c.top_k, c.scoring == RouterScoring::Sigmoid,
                          c.norm_topk_prob, c.routed_scaling_factor, c.n_group, c.topk_group,
                          c.group_top2_sum, ids.data(), gate_w.data());
  else
    kernels::softmax_topk(router.data(), n, c.num_experts, c.top_k, c.norm_topk_prob, ids.data(),
                          gate_w.data());
  if (c.expert_weights_norm_p)
    divide_by_p_norm(gate_w.data(), n, c.top_k, *c.expert_weights_norm_p);
  // The routed experts run (possibly remotely) while the shared expert is computed here; `out`
  // is the backend's until finish() returns. Then out = routed sum, and out += gate * shared.
  if (Status s = experts->start(l, x_norm, n, ids.data(), gate_w.data(), c.top_k, out); !s)
    return s;
  std::vector<float> shared, gate;
  if (L.has_shared_expert) {
    shared.resize(static_cast<std::size_t>(n * H));
    std::vector<float> scratch(static_cast<std::size_t>(2 * n * L.shared_expert.gate.rows));
    kernels::swiglu_ffn(x_norm, n, L.shared_expert, scratch.data(), shared.data(), p);
    gate.assign(static_cast<std::size_t>(n), 1.0f);
    if (!L.shared_expert_gate.empty()) {
      kernels::linear(x_norm, n, L.shared_expert_gate, nullptr, gate.data(), p);
      for (float& g : gate) g = 1.0f / (1.0f + std::exp(-g));
    }
  }
  if (Status s = experts->finish(); !s) return s;
  if (L.has_shared_expert)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t d = 0; d < H; ++d) out[t * H + d] += gate[t] * shared[t * H + d];
  return {};
}

Status Model::Impl::check_chunk(const KVCache& cache, std::span<const int32_t> tokens) const {
  const ModelConfig& c = config;
  const auto n = static_cast<int64_t>(tokens.size());
  if (n == 0) return Error("forward() needs at least one token");
  for (int32_t id : tokens)
    if (id < 0 || id >= c.vocab_size)
      return Error(
          fmt::format("token id {} is out of range: the vocabulary has {} tokens (ids 0 "
                      "to {})",
                      id, c.vocab_size, c.vocab_size - 1));
  const bool made_here = cache.store_ == kv || cache.capacity_ == 0;
  if (cache.row_ != cache_row(c) || !made_here)
    return Error("the KV cache was not made by this model's new_cache()");
  if (cache.capacity_ == 0 && !cache.store_)
    return Error(
        "the KV cache pool had no room for this sequence when its cache was made: finish other "
        "sequences first, or give the pool more memory");
  if (cache.length_ + n > cache.capacity_)
    return Error(
        fmt::format("the sequence would hold {} tokens, more than its cache's capacity "
                    "of {}",
                    cache.length_ + n, cache.capacity_));
  return {};
}

Status Model::Impl::check_segments(std::span<const Segment> segments,
                                   std::span<const int32_t> tokens) const {
  std::vector<const KVCache*> seen;
  seen.reserve(segments.size());
  for (const Segment& seg : segments) {
    if (seg.cache == nullptr) return Error("forward got a null cache");
    if (Status s = check_chunk(*seg.cache, tokens.subspan(seg.begin, seg.n)); !s) return s;
    seen.push_back(seg.cache);
  }
  std::sort(seen.begin(), seen.end());
  if (std::adjacent_find(seen.begin(), seen.end()) != seen.end())
    return Error("a step got the same cache twice: one chunk (or one token) per sequence");
  return {};
}

void Model::Impl::advance(std::span<const Segment> segments, std::span<const int32_t> tokens) {
  for (const Segment& seg : segments) {
    KVCache& cache = *seg.cache;
    cache.length_ += seg.n;
    if (!cache.store_ || !cache.store_->prefix_caching()) continue;
    // Register every block this chunk filled, so later sequences with this prefix reuse it.
    const auto chunk = tokens.subspan(seg.begin, seg.n);
    cache.tokens_.insert(cache.tokens_.end(), chunk.begin(), chunk.end());
    const int64_t bs = cache.store_->block_size();
    while ((cache.committed_ + 1) * bs <= cache.length_) {
      const auto at = static_cast<std::size_t>(cache.committed_ * bs);
      cache.chain_hash_ = cache.store_->commit(
          cache.blocks_[cache.committed_], cache.chain_hash_,
          std::span<const int32_t>(cache.tokens_.data() + at, static_cast<std::size_t>(bs)));
      ++cache.committed_;
    }
  }
}

void Model::Impl::logits_of(const std::vector<float>& x, std::span<const int64_t> rows,
                            std::vector<float>& logits) {
  const ModelConfig& c = config;
  const int64_t H = c.hidden_size;
  const auto m = static_cast<int64_t>(rows.size());
  std::vector<float> normed(static_cast<std::size_t>(m * H));
  for (int64_t i = 0; i < m; ++i)
    norm(x.data() + rows[i] * H, weights.final_norm.data(), 1, normed.data() + i * H);
  logits.resize(static_cast<std::size_t>(m * c.vocab_size));
  if (m > 0) kernels::linear(normed.data(), m, weights.lm_head, nullptr, logits.data(), pool.get());
}

Status Model::Impl::run_layers(std::span<const Segment> segments, int64_t n,
                               std::vector<float>& x) {
  const ModelConfig& c = config;
  std::vector<float> normed(x.size());
  std::vector<float> delta(x.size());
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const detail::LayerWeights& L = weights.layers[l];
    norm(x.data(), L.input_norm.data(), n, normed.data());
    attention_block(l, segments, n, normed.data(), delta.data());
    for (std::size_t i = 0; i < x.size(); ++i) x[i] += delta[i];
    norm(x.data(), L.post_attention_norm.data(), n, normed.data());
    if (Status s = ffn_block(l, n, normed.data(), delta.data()); !s) return s;
    for (std::size_t i = 0; i < x.size(); ++i) x[i] += delta[i];
  }
  return {};
}

Status Model::Impl::forward(KVCache& cache, std::span<const int32_t> tokens, Logits mode,
                            std::vector<float>& logits) {
  const auto n = static_cast<int64_t>(tokens.size());
  const Segment segment{&cache, 0, n};
  if (Status s = check_segments({&segment, 1}, tokens); !s) return s;
  std::vector<int64_t> rows;
  if (mode == Logits::All)
    for (int64_t t = 0; t < n; ++t) rows.push_back(t);
  else if (mode == Logits::Last)
    rows.push_back(n - 1);
  if (on_gpu()) return forward_gpu({&segment, 1}, tokens, rows, logits);
  std::vector<float> x(static_cast<std::size_t>(n * config.hidden_size));
  kernels::embedding(weights.embed, tokens.data(), n, x.data());
  if (Status s = run_layers({&segment, 1}, n, x); !s) return s;
  advance({&segment, 1}, tokens);
  logits_of(x, rows, logits);
  return {};
}

Status Model::Impl::forward_batch(std::span<KVCache* const> caches, std::span<const int32_t> tokens,
                                  std::vector<float>& logits) {
  const auto n = static_cast<int64_t>(tokens.size());
  if (n == 0) return Error("forward_batch() needs at least one sequence");
  if (caches.size() != tokens.size())
    return Error(fmt::format("forward_batch() got {} caches for {} tokens: one token per sequence",
                             caches.size(), tokens.size()));
  std::vector<Model::Chunk> chunks;
  chunks.reserve(caches.size());
  for (int64_t b = 0; b < n; ++b) chunks.push_back({caches[b], tokens.subspan(b, 1), true});
  return forward_step(chunks, logits);
}

Status Model::Impl::forward_step(std::span<const Model::Chunk> chunks, std::vector<float>& logits) {
  if (chunks.empty()) return Error("a forward step needs at least one chunk");
  std::vector<int32_t> tokens;
  std::vector<Segment> segments;
  std::vector<int64_t> rows;
  segments.reserve(chunks.size());
  for (const Model::Chunk& ch : chunks) {
    if (ch.tokens.empty()) return Error("forward() needs at least one token");
    const auto begin = static_cast<int64_t>(tokens.size());
    segments.push_back({ch.cache, begin, static_cast<int64_t>(ch.tokens.size())});
    tokens.insert(tokens.end(), ch.tokens.begin(), ch.tokens.end());
    if (ch.want_logits) rows.push_back(static_cast<int64_t>(tokens.size()) - 1);
  }
  if (Status s = check_segments(segments, tokens); !s) return s;
  if (on_gpu()) return forward_gpu(segments, tokens, rows, logits);
  const auto n = static_cast<int64_t>(tokens.size());
  std::vector<float> x(static_cast<std::size_t>(n * config.hidden_size));
  kernels::embedding(weights.embed, tokens.data(), n, x.data());
  if (Status s = run_layers(segments, n, x); !s) return s;
  advance(segments, tokens);
  logits_of(x, rows, logits);
  return {};
}

std::shared_ptr<detail::KvStore> Model::Impl::gpu_kv_store(bool prefix_caching) {
#if MOEMESH_HAVE_CUDA
  detail::KvStoreOptions o;
  o.dtype = cuda->kv_fp8() ? kernels::KvDtype::FP8 : kernels::KvDtype::BF16;
  o.block_size = cuda->block_size();
  o.max_tokens = cuda->num_blocks() * o.block_size;
  o.prefix_caching = prefix_caching;
  detail::CudaForward* gpu = cuda.get();
  o.device_copy = [gpu](int32_t src, int32_t dst) {
    // A failed copy leaves a CUDA error that the next forward pass reports.
    if (std::string e = gpu->copy_block(src, dst); !e.empty())
      spdlog::error("copying GPU KV block {} to {} failed: {}", src, dst, e);
  };
  return std::make_shared<detail::KvStore>(config, o);
#else
  (void)prefix_caching;
  return nullptr;
#endif
}

Status Model::Impl::forward_gpu(std::span<const Segment> segments, std::span<const int32_t> tokens,
                                std::span<const int64_t> logit_rows, std::vector<float>& logits) {
#if MOEMESH_HAVE_CUDA
  std::vector<detail::CudaForward::Segment> gpu;
  gpu.reserve(segments.size());
  for (const Segment& s : segments)
    gpu.push_back({s.cache->blocks_.data(), static_cast<int64_t>(s.cache->blocks_.size()),
                   s.cache->length_, s.begin, s.n});
  // The model's own experts run on the GPU; any other backend gets staged host copies.
  ExpertBackend* external = experts == local.get() && routed_experts ? nullptr : experts;
  if (Status s = cuda->forward(gpu, tokens, external, logit_rows, logits); !s) return s;
  advance(segments, tokens);
  return {};
#else
  (void)segments, (void)tokens, (void)logit_rows, (void)logits;
  return Error("this moemesh was built without the CUDA backend");
#endif
}

}  // namespace moemesh
