// The engine of an attention worker: runs many requests on one model at once.
//
// submit() queues a request (n sequences sampled from one prompt); the engine's loop thread
// admits waiting requests while the running set is below max_num_seqs and their KV cache
// reservation (prompt + max_tokens per sequence) fits the budget, prefills them, and then advances
// every running sequence by one token per step, handing each new token to the request's sink as a
// proto::SequenceDelta. cancel() removes a request (or one of its sequences) before the next step
// and frees its cache at once. Every request ends with one final delta per sequence whose
// finish_reason is "stop", "length", "abort" or "error": nothing accepted is dropped silently.
//
// Threads: the loop thread owns the model and every sequence; submit(), cancel() and stats() may
// be called from any thread (they talk to the loop through a mutex-guarded inbox). Sinks are
// called on the loop thread and must not block.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "actors/sampling_proto.h"
#include "core/core.h"
#include "proto/engine.pb.h"

namespace moemesh {

struct EngineOptions {
  int max_num_seqs = 64;  // sequences decoded together
  int64_t kv_cache_tokens =
      0;  // budget of cached tokens over all sequences; 0: from kv_cache_bytes
  int64_t kv_cache_bytes = int64_t{2} << 30;
  int64_t max_model_len = 0;  // cap on prompt + completion; 0: the model's max_position_embeddings
};

class Engine {
 public:
  using Sink = std::function<void(proto::SequenceDelta delta)>;

  // Takes the model and starts the loop thread.
  static std::unique_ptr<Engine> start(std::unique_ptr<Model> model, const EngineOptions& options);
  ~Engine();  // aborts what is still running (each sequence gets its final "abort" delta)
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Validates and queues a request. Errors (bad sampling parameters, token ids out of range, a
  // prompt that does not fit the context or the cache) are returned here and nothing is queued.
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
