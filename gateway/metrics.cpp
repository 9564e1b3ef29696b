#include "gateway/detail/metrics.h"

#include <fmt/format.h>

#include <algorithm>

namespace moemesh::gateway {
namespace {

std::vector<double> latency_buckets() {
  return {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25,  0.5,   0.75,
          1.0,   2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
}
std::vector<double> token_buckets() {
  return {1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000};
}

constexpr std::chrono::seconds kRateWindow{10};

void header(std::string& out, const char* name, const char* type, const char* help) {
  out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

}  // namespace

void Histogram::observe(double v) {
  std::lock_guard<std::mutex> lock(mu_);
  for (std::size_t i = 0; i < buckets_.size(); ++i) {
    if (v <= buckets_[i]) {
      ++counts_[i];
      break;
    }
  }
  sum_ += v;
  ++count_;
}

void Histogram::render(std::string& out, const std::string& name, const std::string& labels) const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t cumulative = 0;
  for (std::size_t i = 0; i < buckets_.size(); ++i) {
    cumulative += counts_[i];
    out += fmt::format("{}_bucket{{{},le=\"{}\"}} {}\n", name, labels, buckets_[i], cumulative);
  }
  out += fmt::format("{}_bucket{{{},le=\"+Inf\"}} {}\n", name, labels, count_);
  out += fmt::format("{}_sum{{{}}} {}\n", name, labels, sum_);
  out += fmt::format("{}_count{{{}}} {}\n", name, labels, count_);
}

Metrics::Metrics(std::string model_name)
    : labels_(fmt::format("model_name=\"{}\"", model_name)),
      ttft_(latency_buckets()),
      itl_(latency_buckets()),
      tpot_(latency_buckets()),
      e2e_(latency_buckets()),
      queue_(latency_buckets()),
      prefill_(latency_buckets()),
      decode_(latency_buckets()),
      prompt_len_(token_buckets()),
      gen_len_(token_buckets()) {}

void Metrics::record_request(const RequestRecord& r) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++finished_[r.finished_reason];
    prompt_tokens_ += static_cast<uint64_t>(r.prompt_tokens);
    generation_tokens_ += static_cast<uint64_t>(r.generation_tokens);
  }
  if (r.ttft >= 0) ttft_.observe(r.ttft);
  e2e_.observe(r.e2e);
  if (r.queue >= 0) queue_.observe(r.queue);
  if (r.prefill >= 0) prefill_.observe(r.prefill);
  if (r.decode >= 0) decode_.observe(r.decode);
  if (r.generation_tokens > 1 && r.ttft >= 0)
    tpot_.observe((r.e2e - r.ttft) / static_cast<double>(r.generation_tokens - 1));
  prompt_len_.observe(static_cast<double>(r.prompt_tokens));
  gen_len_.observe(static_cast<double>(r.generation_tokens));
}

void RejectCounters::count(std::string_view reason) {
  std::size_t i = 0;
  while (i + 1 < kReasons.size() && reason != kReasons[i]) ++i;
  counts_[i].fetch_add(1, std::memory_order_relaxed);
}

uint64_t RejectCounters::value(std::string_view reason) const {
  for (std::size_t i = 0; i < kReasons.size(); ++i)
    if (reason == kReasons[i]) return counts_[i].load(std::memory_order_relaxed);
  return 0;
}

void RejectCounters::render(std::string& out, const std::string& labels) const {
  out +=
      "# HELP moemesh_requests_rejected_total Requests refused before the engine, by reason (a "
      "server limit or authentication).\n# TYPE moemesh_requests_rejected_total counter\n";
  for (std::size_t i = 0; i < kReasons.size(); ++i)
    out += fmt::format("moemesh_requests_rejected_total{{{}{}reason=\"{}\"}} {}\n", labels,
                       labels.empty() ? "" : ",", kReasons[i],
                       counts_[i].load(std::memory_order_relaxed));
}

void Metrics::observe_inter_token(double seconds) {
  itl_.observe(seconds);
}

void Metrics::count_http(int status) {
  std::lock_guard<std::mutex> lock(mu_);
  ++http_[status];
  const auto now = std::chrono::steady_clock::now();
  recent_.push_back(now);
  while (!recent_.empty() && now - recent_.front() > kRateWindow) recent_.pop_front();
}

void Metrics::set_experts(const proto::ExpertsSnapshot& s) {
  std::lock_guard<std::mutex> lock(mu_);
  experts_ = s;
}

void Metrics::set_expert_series(int top) {
  std::lock_guard<std::mutex> lock(mu_);
  expert_top_ = top;
}

proto::GatewayFigures Metrics::gateway_figures() const {
  std::lock_guard<std::mutex> lock(mu_);
  proto::GatewayFigures g;
  g.set_open_streams(open_streams_);
  uint64_t total = 0, errors = 0;
  for (const auto& [code, n] : http_) {
    total += n;
    if (code >= 400) errors += n;
  }
  g.set_requests_total(total);
  g.set_http_errors_total(errors);
  const auto now = std::chrono::steady_clock::now();
  while (!recent_.empty() && now - recent_.front() > kRateWindow) recent_.pop_front();
  g.set_requests_per_second(static_cast<double>(recent_.size()) /
                            std::chrono::duration<double>(kRateWindow).count());
  return g;
}

void Metrics::render_experts(std::string& out) const {
  if (!experts_) return;
  const proto::ExpertsSnapshot& x = *experts_;
  header(out, "moemesh_layer_balancedness", "gauge",
         "Mean over max tokens per expert of a MoE layer in the statistics window (1 = even).");
  for (const proto::LayerSnapshot& l : x.layers())
    out += fmt::format("moemesh_layer_balancedness{{{},layer=\"{}\"}} {}\n", labels_, l.layer(),
                       l.balancedness());
  header(out, "moemesh_expert_pool_utilisation", "gauge",
         "Mean utilisation of the expert workers (0-1): the autoscaling signal of the pool.");
  out += fmt::format("moemesh_expert_pool_utilisation{{{}}} {}\n", labels_, x.pool_utilisation());
  header(out, "moemesh_expert_workers", "gauge", "Expert workers in the cluster.");
  out += fmt::format("moemesh_expert_workers{{{}}} {}\n", labels_, x.expert_workers());
  header(out, "moemesh_rebalances_total", "counter",
         "Rebalances of the expert placement by load (scheduled or requested) that ran.");
  out += fmt::format("moemesh_rebalances_total{{{}}} {}\n", labels_, x.rebalances_total());
  header(out, "moemesh_rebalance_duration_seconds", "gauge",
         "The last rebalance: from the decision to the new placement published.");
  out += fmt::format("moemesh_rebalance_duration_seconds{{{}}} {}\n", labels_,
                     x.last_rebalance_seconds());
  header(out, "moemesh_worker_load", "gauge",
         "Expert worker utilisation: compute seconds per second, smoothed (0-1).");
  for (const proto::ExpertWorkerStats& w : x.workers())
    out += fmt::format("moemesh_worker_load{{{},worker=\"{}\"}} {}\n", labels_, w.name(),
                       w.utilisation());
  uint64_t overflows = 0, drops = 0;
  std::vector<const proto::ExpertSnapshot*> experts;
  for (const proto::LayerSnapshot& l : x.layers())
    for (const proto::ExpertSnapshot& e : l.experts()) {
      overflows += e.overflows_total();
      drops += e.drops_total();
      experts.push_back(&e);
    }
  if (expert_top_ != 0) {
    std::size_t keep =
        expert_top_ < 0 ? experts.size() : std::min(experts.size(), std::size_t(expert_top_));
    std::partial_sort(experts.begin(), experts.begin() + static_cast<std::ptrdiff_t>(keep),
                      experts.end(), [](const auto* a, const auto* b) {
                        if (a->tokens_total() != b->tokens_total())
                          return a->tokens_total() > b->tokens_total();
                        return std::make_pair(a->layer(), a->expert()) <
                               std::make_pair(b->layer(), b->expert());
                      });
    experts.resize(keep);
    std::sort(experts.begin(), experts.end(), [](const auto* a, const auto* b) {
      return std::make_pair(a->layer(), a->expert()) < std::make_pair(b->layer(), b->expert());
    });
    header(out, "moemesh_expert_tokens_total", "counter",
           "Token-slots computed per routed expert (the busiest, see --expert-metrics).");
    for (const auto* e : experts)
      out += fmt::format("moemesh_expert_tokens_total{{{},layer=\"{}\",expert=\"{}\"}} {}\n",
                         labels_, e->layer(), e->expert(), e->tokens_total());
  }
  header(out, "moemesh_expert_overflow_total", "counter",
         "Token-slots expert workers rejected over the capacity factor.");
  out += fmt::format("moemesh_expert_overflow_total{{{}}} {}\n", labels_, overflows);
  header(out, "moemesh_expert_dropped_total", "counter",
         "Token-slots dropped with no replica to take them (gate weights renormalised).");
  out += fmt::format("moemesh_expert_dropped_total{{{}}} {}\n", labels_, drops);
  // Data-plane events: what went wrong between attention and expert workers, counted on the side
  // that saw it (injected faults only in fault-injection builds).
  const proto::DispatchStats& d = x.dispatch();
  uint64_t server_errors = 0, server_auth = 0, server_checksum = 0;
  uint64_t faults[4] = {d.faults().drops(), d.faults().delays(), d.faults().corruptions(),
                        d.faults().stalls()};
  for (const proto::ExpertWorkerStats& w : x.workers()) {
    server_errors += w.errors_total();
    server_auth += w.auth_failures_total();
    server_checksum += w.checksum_failures_total();
    faults[0] += w.faults().drops();
    faults[1] += w.faults().delays();
    faults[2] += w.faults().corruptions();
    faults[3] += w.faults().stalls();
  }
  const std::pair<const char*, std::pair<const char*, uint64_t>> counters[] = {
      {"moemesh_dataplane_dispatches_total",
       {"Dispatches attention workers sent.", d.dispatches_total()}},
      {"moemesh_dataplane_device_dispatches_total",
       {"Dispatches sent straight from GPU memory (UCX with CUDA support), not staged through "
        "host memory.",
        d.device_dispatches_total()}},
      {"moemesh_dataplane_timeouts_total",
       {"Dispatches without a reply within the dispatch timeout.", d.timeouts_total()}},
      {"moemesh_dataplane_late_replies_total",
       {"Replies dropped: after their deadline, unexpected or unreadable.",
        d.late_replies_total()}},
      {"moemesh_dataplane_error_replies_total",
       {"Replies that carried an expert worker's error.", d.error_replies_total()}},
      {"moemesh_dataplane_send_errors_total",
       {"Dispatches the transport refused or failed (dead or unreachable worker).",
        d.send_errors_total()}},
      {"moemesh_dataplane_failed_steps_total",
       {"Engine steps failed because a dispatch got no usable answer.", d.failed_steps_total()}},
      {"moemesh_dataplane_rerouted_slots_total",
       {"Token-slots sent again to another replica.", d.rerouted_slots_total()}},
      {"moemesh_dataplane_worker_retries_total",
       {"Lost expert workers tried again after their back-off.", d.worker_retries_total()}},
      {"moemesh_dataplane_server_errors_total",
       {"Dispatches expert workers refused, answered with an error or could not answer.",
        server_errors}},
  };
  for (const auto& [name, help_value] : counters) {
    header(out, name, "counter", help_value.first);
    out += fmt::format("{}{{{}}} {}\n", name, labels_, help_value.second);
  }
  header(out, "moemesh_dataplane_auth_failures_total", "counter",
         "Data-plane headers whose authentication tag did not verify, by the side that refused.");
  out += fmt::format("moemesh_dataplane_auth_failures_total{{{},side=\"expert\"}} {}\n", labels_,
                     server_auth);
  out += fmt::format("moemesh_dataplane_auth_failures_total{{{},side=\"attention\"}} {}\n", labels_,
                     d.auth_failures_total());
  header(out, "moemesh_dataplane_checksum_failures_total", "counter",
         "Data-plane headers whose checksum did not match (corrupted), by the side that saw it.");
  out += fmt::format("moemesh_dataplane_checksum_failures_total{{{},side=\"expert\"}} {}\n",
                     labels_, server_checksum);
  out += fmt::format("moemesh_dataplane_checksum_failures_total{{{},side=\"attention\"}} {}\n",
                     labels_, d.checksum_failures_total());
  header(out, "moemesh_dataplane_faults_injected_total", "counter",
         "Faults injected into the data plane by a fault-injection build (MOEMESH_FAULTS).");
  const char* kinds[] = {"drop", "delay", "corrupt", "stall"};
  for (int i = 0; i < 4; ++i)
    out += fmt::format("moemesh_dataplane_faults_injected_total{{{},kind=\"{}\"}} {}\n", labels_,
                       kinds[i], faults[i]);
  const proto::Histogram& h = x.round_trip();
  header(out, "moemesh_dataplane_round_trip_seconds", "histogram",
         "One MoE layer's dispatch to expert workers until the last reply is combined.");
  for (int b = 0; b < h.bounds_size() && b < h.counts_size(); ++b)
    out += fmt::format("moemesh_dataplane_round_trip_seconds_bucket{{{},le=\"{}\"}} {}\n", labels_,
                       h.bounds(b), h.counts(b));
  out += fmt::format("moemesh_dataplane_round_trip_seconds_bucket{{{},le=\"+Inf\"}} {}\n", labels_,
                     h.count());
  out += fmt::format("moemesh_dataplane_round_trip_seconds_sum{{{}}} {}\n", labels_, h.sum());
  out += fmt::format("moemesh_dataplane_round_trip_seconds_count{{{}}} {}\n", labels_, h.count());
}

void Metrics::set_engine_stats(const proto::EngineStats& s) {
  std::lock_guard<std::mutex> lock(mu_);
  engine_ = s;
}

void Metrics::set_open_streams(int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  open_streams_ = n;
}

std::string Metrics::render() const {
  std::string out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    header(out, "vllm:num_requests_running", "gauge", "Sequences running in the engine.");
    out += fmt::format("vllm:num_requests_running{{{}}} {}\n", labels_, engine_.running());
    header(out, "vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled.");
    out += fmt::format("vllm:num_requests_waiting{{{}}} {}\n", labels_, engine_.waiting());
    header(out, "vllm:kv_cache_usage_perc", "gauge",
           "Fraction of the KV cache blocks in use (0-1).");
    out += fmt::format("vllm:kv_cache_usage_perc{{{}}} {}\n", labels_, engine_.kv_cache_usage());
    header(out, "vllm:num_preemptions_total", "counter", "Sequences preempted by the scheduler.");
    out +=
        fmt::format("vllm:num_preemptions_total{{{}}} {}\n", labels_, engine_.preemptions_total());
    header(out, "vllm:prefix_cache_queries_total", "counter",
           "Prompt tokens looked up in the prefix cache.");
    out += fmt::format("vllm:prefix_cache_queries_total{{{}}} {}\n", labels_,
                       engine_.prefix_cache_queries_total());
    header(out, "vllm:prefix_cache_hits_total", "counter",
           "Prompt tokens found in the prefix cache.");
    out += fmt::format("vllm:prefix_cache_hits_total{{{}}} {}\n", labels_,
                       engine_.prefix_cache_hits_total());
    header(out, "vllm:prompt_tokens_total", "counter", "Prompt tokens of finished requests.");
    out += fmt::format("vllm:prompt_tokens_total{{{}}} {}\n", labels_, prompt_tokens_);
    header(out, "vllm:generation_tokens_total", "counter",
           "Generated tokens of finished requests.");
    out += fmt::format("vllm:generation_tokens_total{{{}}} {}\n", labels_, generation_tokens_);
    header(out, "vllm:request_success_total", "counter", "Finished requests by finish reason.");
    for (const char* reason : {"stop", "length", "abort", "error"}) {
      auto it = finished_.find(reason);
      out += fmt::format("vllm:request_success_total{{{},finished_reason=\"{}\"}} {}\n", labels_,
                         reason, it == finished_.end() ? 0 : it->second);
    }
    header(out, "moemesh_engine_requests_failed_total", "counter", "Requests the engine failed.");
    out += fmt::format("moemesh_engine_requests_failed_total{{{}}} {}\n", labels_,
                       engine_.requests_failed_total());
    header(out, "moemesh_engine_requests_aborted_total", "counter",
           "Requests aborted in the engine.");
    out += fmt::format("moemesh_engine_requests_aborted_total{{{}}} {}\n", labels_,
                       engine_.requests_aborted_total());
    header(out, "moemesh_http_responses_total", "counter", "HTTP responses by status code.");
    for (const auto& [code, n] : http_)
      out += fmt::format("moemesh_http_responses_total{{{},code=\"{}\"}} {}\n", labels_, code, n);
    header(out, "moemesh_open_streams", "gauge", "Requests in flight at the gateway.");
    out += fmt::format("moemesh_open_streams{{{}}} {}\n", labels_, open_streams_);
    render_experts(out);
  }
  const std::pair<const Histogram*, const char*> hists[] = {
      {&ttft_, "vllm:time_to_first_token_seconds"},
      {&itl_, "vllm:inter_token_latency_seconds"},
      {&tpot_, "vllm:request_time_per_output_token_seconds"},
      {&e2e_, "vllm:e2e_request_latency_seconds"},
      {&queue_, "vllm:request_queue_time_seconds"},
      {&prefill_, "vllm:request_prefill_time_seconds"},
      {&decode_, "vllm:request_decode_time_seconds"},
      {&prompt_len_, "vllm:request_prompt_tokens"},
      {&gen_len_, "vllm:request_generation_tokens"},
  };
  for (const auto& [h, name] : hists) {
    header(out, name, "histogram", "See vLLM's metric of the same name.");
    h->render(out, name, labels_);
  }
  return out;
}

}  // namespace moemesh::gateway
