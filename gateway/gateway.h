// The gateway: an HTTP/1.1 server (Boost.Beast) speaking the OpenAI-compatible API that vLLM
// users rely on (see docs/api.md): /v1/completions and /v1/chat/completions (streaming as SSE or
// not), /v1/models, /tokenize, /detokenize, /health, /version and /metrics, plus the admin routes
// (gateway/detail/admin.h) and the operations console at /console. It tokenizes and
// applies the chat template, validates every field, and talks to the engine only through the
// engine actor interface (actors/engine_interface.h), so the engine may live in another process.
//
// Every request gets an id (echoing x-request-id when given). A client that disconnects has its
// request cancelled in the engine at once. Errors are OpenAI error objects with the HTTP status in
// "code"; no input crashes the process.
//
// Threads: a pool of I/O threads runs the HTTP sessions, each on its own strand; CAF actors relay
// engine deltas onto those strands. All public methods are thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "actors/cluster_interface.h"
#include "core/chat_template.h"
#include "core/error.h"
#include "core/tokenizer.h"

namespace moemesh {

struct GatewayOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 8000;  // 0: any free port
  std::string
      api_key;  // when set, /v1/*, /tokenize and /detokenize need "Authorization: Bearer KEY"
  int io_threads = 2;
  std::size_t max_body_bytes = 8u << 20;
  std::chrono::seconds idle_timeout{120};
  // Limits (docs/security.md). A request over a limit gets an OpenAI error: 400 for what the
  // request asks (n, max_tokens), 429 with Retry-After for what the server holds.
  int max_open_requests = 4096;     // generation requests in flight at the gateway
  int max_queued_requests = 1024;   // requests accepted that have not yet had a first token
  int max_streams_per_client = 64;  // generation requests in flight per client IP address
  int max_n = 16;                   // choices per prompt ("n")
  int64_t max_tokens_limit = 0;     // cap on max_tokens besides the context (0: none)
  std::string admin_token;          // POST /admin/* needs "Authorization: Bearer TOKEN"; empty: off
  int expert_metrics = 64;          // moemesh_expert_tokens_total series: N busiest, 0 none, -1 all
  std::string console_assets = "/usr/share/javascript/chart.js";  // Chart.js for /console
};

namespace gateway {
// What the gateway serves: one model, its tokenizer and chat template.
struct ServedModel {
  std::string name;  // the id clients send as "model"
  std::string root;  // the checkpoint directory
  int64_t max_model_len = 0;
  int64_t vocab_size = 0;
  std::shared_ptr<const Tokenizer> tokenizer;
  std::shared_ptr<const ChatTemplateConfig> chat_template;  // null: the model has none
  int64_t created = 0;                                      // unix time the model was loaded
};
}  // namespace gateway

class Gateway {
 public:
  // Binds and starts serving: until serve_model() is called, /health answers 503 and the API
  // answers 503 "the model is loading".
  static Expected<std::unique_ptr<Gateway>> start(caf::actor_system& system,
                                                  const GatewayOptions& options);
  ~Gateway();

  void serve_model(gateway::ServedModel model, actors::engine_actor engine);
  // Serves /admin/cluster, /admin/experts and the admin actions from this router (a cluster).
  void set_router(actors::router_actor router);
  uint16_t port() const;
  // Whether the engine (or the cluster) has said it can serve since serve_model(): /health has
  // been able to answer 200. Stays true.
  bool has_been_ready() const;

  // Stops accepting connections, lets requests in flight finish for up to `grace` (then cancels
  // them), and stops the I/O threads.
  void shutdown(std::chrono::milliseconds grace);
  // Thread-safe: a shutdown() waiting for requests in flight stops waiting and cancels them now
  // (serve calls it on a second stop signal). Before shutdown(), makes its grace zero.
  void end_grace();

  struct Impl;

 private:
  explicit Gateway(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace moemesh
