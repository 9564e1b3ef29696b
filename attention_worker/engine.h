// The engine of an attention worker: runs many requests on one model at once, the way vLLM's
// engine does.
//
// submit() queues a request (n sequences sampled from one prompt). The engine's loop thread runs
// scheduler steps. Each step takes, first come first served, every running sequence's next token
// (decode) and then chunks of prompts still to prefill, up to max_num_batched_tokens tokens and
// max_num_seqs sequences, and runs them through the model in one forward pass
// (Model::forward_step). The KV cache is the model's paged cache: a new request starts from the
// longest cached prefix of its prompt (prefix caching), takes blocks as it grows, and when the pool
// runs out the most recently admitted sequence is preempted: its blocks are freed and it is
// recomputed (prompt + what it generated so far) when room returns, so a full cache delays
// requests but never fails them. Each new token goes to the request's sink as a
// proto::SequenceDelta. cancel() removes a request (or one of its sequences) before the next step
// and frees its blocks at once. Every request ends with one final delta per sequence whose
// finish_reason is "stop", "length", "abort" or "error": nothing accepted is dropped silently.
//
// Threads: the loop thread owns the model and every sequence; submit(), cancel() and stats() may
// be called from any thread (they talk to the loop through a mutex-guarded inbox and atomics).
// Sinks are called on the loop thread and must not block.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "actors/sampling_proto.h"
#include "core/core.h"
#include "proto/engine.pb.h"

namespace moemesh {

struct EngineOptions {
  int max_num_seqs = 64;                  // sequences scheduled together
  int64_t max_num_batched_tokens = 2048;  // tokens per step: decode tokens + prefill chunks
  // The KV cache pool (CPU models; a GPU model's pool is sized when it loads): tokens, or bytes
  // when kv_cache_tokens is 0.
  int64_t kv_cache_tokens = 0;
  int64_t kv_cache_bytes = int64_t{2} << 30;
  // "auto" (the checkpoint's dtype: bf16 for bf16 checkpoints, else f32), "bf16", "fp8"
  // (e4m3 with per-row scales) or "f32".
  std::string kv_cache_dtype = "auto";
  int64_t block_size = 16;
  bool prefix_caching = true;
  int64_t max_model_len = 0;  // cap on prompt + completion; 0: the model's max_position_embeddings
};

class Engine {
 public:
  using Sink = std::function<void(proto::SequenceDelta delta)>;

  // Takes the model, sets up its KV cache as `options` say, and starts the loop thread. Fails on
  // bad options (a KV cache dtype or size that cannot work).
  static Expected<std::unique_ptr<Engine>> start(std::unique_ptr<Model> model,
                                                 const EngineOptions& options);
  ~Engine();  // aborts what is still running (each sequence gets its final "abort" delta)
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Validates and queues a request. Errors (bad sampling parameters, token ids out of range, a
  // prompt that does not fit the context or the whole cache) are returned here and nothing is
  // queued.
  Status submit(const proto::GenerateRequest& request, Sink sink);

  // Stops sequence `index` of the request, or all of them when index < 0. Unknown ids are ignored.
  void cancel(const std::string& request_id, int index = -1);

  proto::EngineStats stats() const;
  const ModelConfig& config() const;
  int64_t max_model_len() const;

  struct Impl;

 private:
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moemesh
