// Internal: the gateway's Prometheus metrics, with vLLM's names (dashboards and autoscalers scrape
// them) and moemesh's own under the moemesh_ prefix. Thread-safe: every method may be called from
// any thread.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "proto/cluster.pb.h"
#include "proto/engine.pb.h"

namespace moemesh::gateway {

class Histogram {
 public:
  explicit Histogram(std::vector<double> buckets)
      : buckets_(std::move(buckets)), counts_(buckets_.size(), 0) {}
  void observe(double v);
  // Appends the _bucket, _sum and _count series of `name` with `labels` (e.g. model_name="x").
  void render(std::string& out, const std::string& name, const std::string& labels) const;

 private:
  mutable std::mutex mu_;
  std::vector<double> buckets_;
  std::vector<uint64_t> counts_;  // per bucket, not cumulative
  double sum_ = 0;
  uint64_t count_ = 0;
};

// Requests the gateway refused before they reached the engine, by reason: a server limit or a
// wrong API key (moemesh_requests_rejected_total{reason}). Lives as long as the gateway, so that
// refusals before the model is served are counted too. Thread-safe.
class RejectCounters {
 public:
  static constexpr std::array<const char*, 9> kReasons = {
      "body_size",           // 413, --max-body-bytes
      "prompt_length",       // 400, the prompt fills the context (--max-model-len)
      "max_tokens",          // 400, max_tokens over the context or --max-tokens-limit
      "n",                   // 400, --max-n
      "streams_per_client",  // 429, --max-streams-per-client
      "queue_full",          // 429, --max-queued-requests
      "open_requests",       // 429, --max-open-requests
      "auth",                // 401, wrong or missing API key / admin token
      "other",               // any other reason (kept so that nothing is lost)
  };
  void count(std::string_view reason);
  uint64_t value(std::string_view reason) const;
  // Appends the counter family with `labels` (e.g. model_name="x").
  void render(std::string& out, const std::string& labels) const;

 private:
  std::array<std::atomic<uint64_t>, kReasons.size()> counts_{};
};

class Metrics {
 public:
  explicit Metrics(std::string model_name);
  const std::string& labels() const { return labels_; }

  // One finished request (all of its choices).
  struct RequestRecord {
    std::string finished_reason;  // stop, length, abort, error
    int64_t prompt_tokens = 0;
    int64_t generation_tokens = 0;
    double ttft = -1;  // seconds, < 0 when no token was produced
    double e2e = 0;
    double queue = -1;
    double prefill = -1;
    double decode = -1;
  };
  void record_request(const RequestRecord& r);
  void observe_inter_token(double seconds);
  void count_http(int status);
  void set_engine_stats(const proto::EngineStats& s);
  void set_open_streams(int64_t n);
  // The router's per-expert statistics (a cluster): they feed the moemesh_expert_*, layer and
  // worker series. `top`: how many (layer, expert) series of moemesh_expert_tokens_total to show,
  // the busiest by total tokens (0: none, < 0: all).
  void set_experts(const proto::ExpertsSnapshot& s);
  void set_expert_series(int top);
  // The gateway's figures for its ActorStatus: open streams, requests/s over the last 10 s,
  // responses and error responses.
  proto::GatewayFigures gateway_figures() const;

  std::string render() const;

 private:
  void render_experts(std::string& out) const;  // with mu_ held

  std::string labels_;
  Histogram ttft_, itl_, tpot_, e2e_, queue_, prefill_, decode_, prompt_len_, gen_len_;
  mutable std::mutex mu_;  // guards the fields below
  std::map<std::string, uint64_t> finished_;
  std::map<int, uint64_t> http_;
  uint64_t prompt_tokens_ = 0;
  uint64_t generation_tokens_ = 0;
  int64_t open_streams_ = 0;
  proto::EngineStats engine_;
  std::optional<proto::ExpertsSnapshot> experts_;
  int expert_top_ = 64;
  mutable std::deque<std::chrono::steady_clock::time_point> recent_;  // responses, last 10 s
};

}  // namespace moemesh::gateway
