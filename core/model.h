// A loaded MoE model and its forward pass on the CPU.
//
// Model::load reads config.json and the safetensors weights of a Hugging Face checkpoint
// directory, checks every tensor the architecture needs against the config (name, shape, dtype),
// and keeps the weights memory-mapped in their checkpoint dtype. forward() runs a chunk of tokens
// of one sequence (a whole prompt, or one generated token) through the model, appending their keys
// and values to that sequence's KVCache, so each new token costs work linear in the sequence
// length. All arithmetic accumulates in float32.
//
// The routed experts of every MoE layer are computed through an ExpertBackend: by default the
// model's own local experts; a worker that sends token batches to remote expert shards plugs in
// its own implementation, and the model code stays the same. An attention worker loads the model
// with ModelOptions::routed_experts = false, so no routed-expert tensor is bound (nor needs to be
// in the checkpoint), and sets its backend; expert workers hold the experts (core/expert_shard.h).
//
// Threads: a Model is used by one thread at a time (forward() keeps scratch state); its kernels
// parallelise internally on the model's thread pool.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/error.h"

namespace moemesh {

// A MoE layer's input rows in GPU memory, handed to ExpertBackend::start_device() by the GPU
// forward pass. assemble() lays out one message for a destination on the device: `head` (host
// bytes, e.g. routing sections) followed by rows `tokens` of the layer's input, as bf16 bits or as
// float32 ([tokens.size(), hidden]), in memory kept for `slot` (one per destination; reused by the
// next call with the same slot) and returns it once the copies are done. cuda_memory() says what
// that memory is: CUDA device memory, or host memory (the emulated GPU of the tests). Valid, on
// the thread that called start_device(), until the finish() that follows returns.
class DeviceRows {
 public:
  virtual ~DeviceRows() = default;
  virtual Expected<const void*> assemble(int slot, const void* head, std::size_t head_bytes,
                                         std::span<const int32_t> tokens, bool bf16) = 0;
  virtual bool cuda_memory() const = 0;
};

// Computes the routed experts of one MoE layer for a batch of tokens.
//
// The model drives a backend in two steps per MoE layer, so that work it does itself (the shared
// expert) overlaps with routed experts computed elsewhere:
//   start(layer, ...)   begins the layer's routed experts (e.g. sends the token batches);
//   ... the model computes the layer's shared expert ...
//   finish()            completes them, adding the result into `out`.
// Between start() and the finish() that follows, x, ids and weights stay valid and unchanged, and
// the model neither reads nor writes `out`. The model calls them in pairs from one thread, one
// layer at a time, in layer order; when start() fails, finish() is not called for that layer, and
// when either fails the forward pass fails with that error. The defaults make a synchronous
// backend: start() remembers its arguments, finish() calls compute() with them. A backend that
// overrides start() and finish() must still implement compute() (the same result, synchronously).
//
// On a GPU a backend may take the layer's input rows where they are, in device memory
// (start_device()), so that its transport sends them from there instead of from a host copy.
//
// Threads: a backend is driven by the thread that runs Model::forward.
class ExpertBackend {
 public:
  virtual ~ExpertBackend() = default;
  // For each token t < n: out[t] += sum_j weights[t * top_k + j] * E_{ids[t * top_k + j]}(x[t]),
  // where E_e is routed expert e of layer `layer` (an index over all layers). x and out are
  // [n, hidden_size] float32.
  virtual Status compute(int64_t layer, const float* x, int64_t n, const int32_t* ids,
                         const float* weights, int64_t top_k, float* out) = 0;

  // Begins what compute() does; its arguments mean the same.
  virtual Status start(int64_t layer, const float* x, int64_t n, const int32_t* ids,
                       const float* weights, int64_t top_k, float* out);
  // Completes the computation the last start() began, adding into its `out`. Fails when no
  // start() is pending.
  virtual Status finish();

  // Whether start_device() may be called with rows in memory of that kind (DeviceRows::
  // cuda_memory()); the default takes none.
  virtual bool takes_device_rows(bool cuda_memory) const;
  // What start() does, with the input rows in GPU memory (x) instead of float32 host rows; ids,
  // weights and out are host memory as in start(). finish() completes it. The default refuses.
  virtual Status start_device(int64_t layer, DeviceRows& x, int64_t n, const int32_t* ids,
                              const float* weights, int64_t top_k, float* out);

 private:
  struct Pending {
    int64_t layer;
    const float* x;
    int64_t n;
    const int32_t* ids;
    const float* weights;
    int64_t top_k;
    float* out;
  };
  std::optional<Pending> pending_;
};

namespace detail {
class KvStore;
}  // namespace detail

// The keys and values of one sequence, for every layer: blocks of the model's paged KV cache (on
// the CPU, core/detail/kv_store.h; on a GPU, the device pool, whose blocks the same store manages).
// A cache holds its blocks until it
// is destroyed; it moves but does not copy (Model::fork makes a copy that shares full blocks).
// With prefix caching on, the cache's full blocks are registered as they fill, and a later
// sequence with the same prefix can start from them (Model::new_cache_from_prefix).
class KVCache {
 public:
  KVCache() = default;
  KVCache(KVCache&& other) noexcept;
  KVCache& operator=(KVCache&& other) noexcept;
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;
  ~KVCache();

  int64_t length() const { return length_; }
  int64_t capacity() const { return capacity_; }
  // Forgets the tokens; the capacity stays (blocks shared through the prefix cache are swapped
  // for fresh ones, so nothing another sequence reads is overwritten).
  void clear();

 private:
  friend class Model;
  void release();

  int64_t length_ = 0;
  int64_t capacity_ = 0;
  int64_t row_ = 0;  // values per token per layer (num_kv_heads * head_dim)
  std::shared_ptr<detail::KvStore> store_;
  std::vector<int32_t> blocks_;  // this sequence's blocks, in order
  std::vector<int32_t> tokens_;  // with prefix caching: the tokens cached
  int64_t committed_ = 0;        // full blocks registered for prefix reuse
  uint64_t chain_hash_ = 0;      // the last registered block's chain hash
};

struct ModelOptions {
  int threads =
      0;  // compute threads; 0 = one per CPU of `cpus`, else one per CPU the process may use
  // CPUs the compute threads are pinned to, one worker each (kernels::ThreadPool); empty: not
  // pinned. The caller binds its process to them first (kernels::bind_current_thread).
  std::vector<int> cpus = {};
  // false: bind no routed-expert tensors (an attention worker, whose experts live in expert
  // workers). Everything else (embeddings, attention, norms, routers, shared experts, dense MLPs,
  // LM head) is still bound and checked. Such a model needs set_expert_backend() before forward().
  bool routed_experts = true;
  // Where the forward pass runs: "cpu", or "cuda" / "cuda:N" (needs a build with the CUDA backend
  // and a GPU). On a GPU the weights are uploaded once as bf16 and the KV cache is a paged pool
  // of gpu_kv_cache_bytes (0: half the GPU memory left free by the weights).
  std::string device = "cpu";
  int64_t gpu_kv_cache_bytes = 0;
  // How the GPU issues a MoE layer's expert GEMMs: "auto", "loop", "streams", "batched" or
  // "wmma" (kernels/cuda/cuda_kernels.h GroupedMethod).
  std::string grouped_gemm = "auto";
  // Tensor parallelism on GPUs: the attention heads and MLP widths split over this many GPUs
  // (`device`'s index and the ones after it), which add their parts with NCCL. 1: one GPU.
  // tensor_parallel_collective: "auto" (NCCL when the size is over 1), "nccl" (also for size 1),
  // or "one-gpu" (every rank on `device`, adding through device memory: for checking results
  // where one GPU is at hand).
  int tensor_parallel_size = 1;
  std::string tensor_parallel_collective = "auto";
  // Multi-head latent attention on a GPU: a sequence's chunk of at least this many new tokens
  // attends with keys and values expanded from the latent (prefill; fewer FLOPs per key), shorter
  // ones (decode) in the absorbed form over the latent cache. 0 keeps every chunk absorbed.
  int64_t mla_expanded_min_tokens = 64;
  // The KV cache: tokens per block, the dtype its values are stored in ("f32", "bf16", "auto" =
  // the checkpoint's, or "fp8": e4m3 with a float32 scale per token and kv head), the most memory
  // it may take on the CPU (0: it grows as sequences need it), and whether full blocks are shared
  // between sequences with the same prefix. On a GPU the pool is made at load with this block
  // size and dtype, where "fp8" stores FP8 and the others bf16 (f32 values are the CPU's only).
  int64_t kv_block_size = 16;
  std::string kv_cache_dtype = "f32";
  int64_t kv_cache_bytes = 0;
  bool prefix_caching = false;
  // Weight quantization at load: "none" keeps the checkpoint dtypes; "int8" (CPU only) converts
  // the attention projections, dense MLPs, shared experts and routed experts to int8 with a
  // float32 scale per output row (routers, embeddings and the LM head stay as they are); "fp8"
  // converts the same matrices to FP8 E4M3 with a float32 scale per 128x128 block (on a GPU: the
  // routed experts only). Checkpoints that ship FP8 weights (X.weight F8_E4M3 +
  // X.weight_scale_inv) load as FP8 with any value. On a GPU, FP8 routed experts stay FP8 where
  // the FP8 grouped GEMM takes their shapes (docs/gpu.md), and everything else is bf16.
  std::string quantization = "none";
};

// The state of a model's KV cache.
struct KvCacheStats {
  int64_t block_size = 0;
  int64_t num_blocks = 0;   // the pool's size
  int64_t free_blocks = 0;  // allocatable now (never used, or cached and unreferenced)
  double usage = 0;         // fraction of blocks in use by sequences, 0..1
  uint64_t prefix_queries_tokens = 0;
  uint64_t prefix_hits_tokens = 0;
};

enum class Logits {
  None,  // compute no logits (e.g. a prompt chunk whose outputs nobody reads)
  Last,  // logits of the last token only: [1, vocab]
  All,   // logits at every position of the chunk: [n, vocab]
};

class Model {
 public:
  static Expected<std::unique_ptr<Model>> load(const std::filesystem::path& dir,
                                               const ModelOptions& options = {});
  ~Model();

  const ModelConfig& config() const;

  // A cache for one sequence of up to `capacity` tokens. On a GPU whose KV pool cannot hold that
  // many, the cache's capacity is 0 (forward() then fails, saying the pool is full).
  KVCache new_cache(int64_t capacity) const;
  // "cpu", or the GPU and its pool ("NVIDIA H100 ... kv_blocks=...").
  std::string device_description() const;
  // Bytes of weights held on the GPU (on each tensor-parallel rank: rank 0's); 0 on the CPU.
  int64_t device_weight_bytes() const;

  // A cache that starts with the longest prefix of `prompt` found in the prefix cache (whole
  // blocks, and always fewer than prompt.size() tokens, so the last prompt token is computed);
  // *cached receives its length. Without prefix caching, or on a GPU, an empty cache.
  KVCache new_cache_from_prefix(std::span<const int32_t> prompt, int64_t* cached);
  // Grows `cache` to hold at least `capacity` tokens. Fails, changing nothing, when the pool has
  // too few free blocks.
  Status reserve(KVCache& cache, int64_t capacity);
  // A copy of `cache` (same tokens, same capacity) that shares its full blocks; the last, partly
  // filled block is copied. Fails when the pool has no block for that copy.
  Expected<KVCache> fork(const KVCache& cache);
  KvCacheStats kv_stats() const;
  // Replaces the CPU KV cache pool; no cache may hold blocks of the old one. dtype "auto" (the
  // checkpoint's: bf16 for a bf16 checkpoint, else f32), "f32", "bf16" or "fp8"; a limit in
  // tokens, or in bytes when max_tokens is 0 (both 0: grows as needed). A GPU model keeps the pool
  // it loaded with (its dtype and block size; a warning names any other asked for here) and
  // takes only prefix_caching.
  Status configure_kv_cache(const std::string& dtype, int64_t block_size, int64_t max_tokens,
                            int64_t max_bytes, bool prefix_caching);
  // Bytes of one cached token (every layer's keys and values, with FP8 scales).
  int64_t kv_bytes_per_token() const;

  // Whether layer `layer` has routed experts (config().layer_is_moe; false out of range).
  bool is_moe_layer(int64_t layer) const;
  // The MoE layers, ascending.
  std::vector<int64_t> moe_layers() const;
  // Whether the routed experts were loaded (ModelOptions::routed_experts).
  bool has_routed_experts() const;

  // Runs `tokens` (ids < vocab_size) at positions cache.length() ... and appends them to the
  // cache. `logits` receives float32 logits as `mode` says. Fails, changing nothing, when an id is
  // out of range or the cache is too small. When a pass fails midway (an expert backend's error)
  // the cache's length and `logits` are unchanged: the keys and values already written past the
  // length are dead and are overwritten by the next call, so retrying the same tokens (or running
  // others) is valid.
  Status forward(KVCache& cache, std::span<const int32_t> tokens, Logits mode,
                 std::vector<float>& logits);

  // One decode step of several sequences: token b is appended to caches[b] (distinct caches), and
  // `logits` receives [caches.size(), vocab] (the logits of each token). The projections, norms
  // and experts run once over the whole batch (a MoE layer makes one expert call for all of it);
  // attention runs per sequence. Each row's result is the one forward() gives that sequence
  // alone. Fails, changing no cache, as forward() does.
  Status forward_batch(std::span<KVCache* const> caches, std::span<const int32_t> tokens,
                       std::vector<float>& logits);

  // One scheduler step: several sequences' chunks at once (decode tokens and prefill chunks
  // alike; distinct caches). Each chunk's tokens are appended to its cache; `logits` receives
  // [number of chunks with want_logits, vocab], the logits of each such chunk's last token, in
  // order. The projections, norms and experts run once over all the tokens. Fails, changing no
  // cache, as forward() does.
  struct Chunk {
    KVCache* cache = nullptr;
    std::span<const int32_t> tokens;
    bool want_logits = true;
  };
  Status forward_step(std::span<const Chunk> chunks, std::vector<float>& logits);

  // Routes expert computation through `backend` (not owned, outliving its use); nullptr restores
  // local_experts().
  void set_expert_backend(ExpertBackend* backend);
  // The built-in backend over this model's own expert weights. On a model loaded without its
  // routed experts, it is a backend whose every call fails with "this model was loaded without
  // its routed experts (an attention worker): set an expert backend ..." (so is forward() until a
  // backend is set).
  ExpertBackend& local_experts();

  struct Impl;

 private:
  explicit Model(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moemesh
