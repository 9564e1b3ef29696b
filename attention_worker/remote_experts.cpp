#include "attention_worker/remote_experts.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace moemesh {

namespace {

using Clock = std::chrono::steady_clock;

// A worker that timed out is tried again after this back-off, doubled at each failure up to the
// maximum: a stalled worker or a lost message must not mask a live worker until the next
// placement.
constexpr std::chrono::milliseconds kRetryFirst{1000};
constexpr std::chrono::milliseconds kRetryMax{30000};

// Buckets of the data-plane round-trip histogram (seconds).
constexpr double kRoundTripBounds[] = {50e-6, 100e-6, 250e-6, 500e-6, 1e-3,   2.5e-3, 5e-3, 10e-3,
                                       25e-3, 50e-3,  100e-3, 250e-3, 500e-3, 1.0,    2.5};

// What became of one (token, slot) in the current call.
enum class SlotState : uint8_t {
  Pending,   // sent in the current round, no answer yet
  Done,      // computed and summed
  Rejected,  // over a worker's capacity: reroute or drop
  Failed,    // its worker timed out, failed or answered with an error: reroute or fail the step
  Dropped,   // rejected with no other replica: gate weights renormalised
};

// How one worker fared in the current round.
enum class RoundState : uint8_t { Idle, Sent, Answered, Error, SendFailed, TimedOut };

}  // namespace

struct RemoteExperts::Impl {
  struct Worker {
    int32_t id = 0;
    std::string name;
    std::string address;
    int peer = -1;     // DispatchClient peer; -1 while lost
    bool lost = true;  // timed out or unreachable: not chosen until retry_at (or a placement)
    Clock::time_point retry_at{};          // when a lost worker is connected again
    std::chrono::milliseconds backoff{0};  // its current back-off (0 after an answer)
    bool bad = false;  // failed in the current call: not chosen for its second round
    RoundState status = RoundState::Idle;  // in the current round
    std::string error;                     // why the current round failed
    // The current round's dispatch: rows tokens[r] of x, experts/weights [rows, top_k].
    std::vector<int32_t> tokens;
    std::vector<int32_t> experts;
    std::vector<float> weights;
    // The reply, staged until every worker has answered (views die with on_reply).
    std::vector<float> partial;
    std::vector<uint8_t> rejected;
  };

  Impl(const ModelConfig& c, const RemoteExpertsOptions& o,
       std::unique_ptr<transport::DispatchClient> cl)
      : config(c), options(o), client(std::move(cl)) {
    drops.assign(static_cast<std::size_t>(c.num_layers * c.num_experts), 0);
    reps.resize(static_cast<std::size_t>(c.num_layers));
    on_reply = [this](const transport::Reply& r) { take_reply(r); };
  }

  void apply(const proto::Placement& p);
  int worker_of_peer(int peer) const;
  // A replica of `reps` for key `key`, skipping lost workers, workers bad in this call and
  // `exclude`; -1 when there is none.
  int pick(const std::vector<int>& reps, uint64_t key, int exclude) const;
  Status send_round(int round);
  // Worker wi's dispatch of this round laid out in GPU memory (routing sections, then its rows)
  // and sent from there.
  Status send_device(int wi, int round);
  void take_reply(const transport::Reply& r);
  void wait_round();
  void retry_lost();
  Status fail(std::string message);
  void record_stats();
  std::string no_copy_message(int64_t layer, int32_t expert) const;

  const ModelConfig config;
  const RemoteExpertsOptions options;

  // Owned by the engine thread.
  std::unique_ptr<transport::DispatchClient> client;
  std::vector<Worker> workers;                      // ascending id
  std::vector<std::vector<std::vector<int>>> reps;  // [layer][expert] -> worker indices
  uint64_t epoch = 0;                               // version of the placement in use
  bool placed = false;                              // a placement was applied
  uint64_t calls = 0;                               // start() calls: the step id of dispatches
  int round = 0;                                    // 0: first dispatch, 1: the rerouted slots
  std::function<void(const transport::Reply&)> on_reply;  // take_reply, made once
  // The call in progress.
  bool pending = false;
  int64_t layer = 0, n = 0, top_k = 0;
  const float* x = nullptr;
  DeviceRows* device = nullptr;  // instead of x: the rows in GPU memory (start_device())
  std::vector<std::byte> head;   // a device dispatch's routing sections, laid out on the host
  // What DeviceRows::assemble() returned for each slot (slots wi, wi + workers, ... are worker
  // wi's), to tell which buffers UCX may still read.
  std::vector<const void*> slot_payloads;
  uint64_t device_dispatches = 0;  // not yet published to stats
  const int32_t* ids = nullptr;
  const float* gate = nullptr;
  float* out = nullptr;
  std::vector<int> dest;         // [n * top_k]: worker of the slot in this round, -1: none
  std::vector<int> first;        // [n * top_k]: worker that failed or rejected it
  std::vector<SlotState> state;  // [n * top_k]
  std::vector<float> routed;     // [n, hidden]: routed output of the call
  uint64_t rerouted = 0, dropped = 0, failed_steps = 0;  // not yet published to stats
  uint64_t retries = 0, error_replies = 0;               // not yet published to stats
  Clock::time_point started;                             // start() of the call in progress

  // Guarded by placement_mutex.
  mutable std::mutex placement_mutex;
  std::optional<proto::Placement> next_placement;
  uint64_t placement_version = 0;

  // Guarded by stats_mutex.
  mutable std::mutex stats_mutex;
  proto::DispatchStats stats;
  std::vector<uint64_t> drops;       // [num_layers, num_experts]
  std::vector<uint64_t> round_trip;  // per bucket of kRoundTripBounds (not cumulative)
  uint64_t round_trips = 0;
  double round_trip_sum = 0;
};

int RemoteExperts::Impl::worker_of_peer(int peer) const {
  for (std::size_t w = 0; w < workers.size(); ++w)
    if (workers[w].peer == peer) return static_cast<int>(w);
  return -1;
}

void RemoteExperts::Impl::apply(const proto::Placement& p) {
  std::vector<Worker> next;
  for (const proto::ExpertWorkerAddress& a : p.workers()) {
    if (std::any_of(next.begin(), next.end(),
                    [&](const Worker& w) { return w.id == a.worker_id(); }))
      continue;
    Worker w;
    w.id = a.worker_id();
    w.name = a.name();
    w.address = a.data_address();
    next.push_back(std::move(w));
  }
  std::sort(next.begin(), next.end(), [](const Worker& a, const Worker& b) { return a.id < b.id; });
  // Keep live connections to the same address; forget workers that left or moved.
  for (Worker& old : workers) {
    auto it =
        std::find_if(next.begin(), next.end(), [&](const Worker& w) { return w.id == old.id; });
    if (old.peer >= 0 && it != next.end() && it->address == old.address) {
      it->peer = old.peer;
      it->lost = false;
    } else if (old.peer >= 0) {
      client->disconnect(old.peer);
    }
  }
  for (Worker& w : next) {
    if (w.peer >= 0) continue;
    Expected<int> peer = client->connect(w.address);
    if (peer) {
      w.peer = *peer;
      w.lost = false;
    } else {
      spdlog::warn("remote_experts connect_failed worker={} name={} version={} error=\"{}\"", w.id,
                   w.name, p.version(), peer.error().message());
    }
  }
  workers = std::move(next);

  reps.assign(static_cast<std::size_t>(config.num_layers), {});
  for (const proto::LayerPlacement& lp : p.layers()) {
    const int64_t l = lp.layer();
    if (l < 0 || l >= config.num_layers || !config.layer_is_moe[static_cast<std::size_t>(l)] ||
        lp.experts_size() > config.num_experts) {
      spdlog::warn(
          "remote_experts bad_placement version={} layer={} experts={} error=\"not an MoE "
          "layer of the model, or more experts than it has ({})\"",
          p.version(), l, lp.experts_size(), config.num_experts);
      continue;
    }
    auto& table = reps[static_cast<std::size_t>(l)];
    table.assign(static_cast<std::size_t>(config.num_experts), {});
    for (int e = 0; e < lp.experts_size(); ++e)
      for (int32_t id : lp.experts(e).workers()) {
        auto it = std::find_if(workers.begin(), workers.end(),
                               [&](const Worker& w) { return w.id == id; });
        if (it == workers.end()) {
          spdlog::warn(
              "remote_experts bad_placement version={} layer={} expert={} worker={} "
              "error=\"the worker has no address in the placement\"",
              p.version(), l, e, id);
          continue;
        }
        const int w = static_cast<int>(it - workers.begin());
        if (std::find(table[e].begin(), table[e].end(), w) == table[e].end()) table[e].push_back(w);
      }
  }
  epoch = p.version();
  placed = true;
  spdlog::info("remote_experts placement version={} workers={}", epoch, workers.size());
}

int RemoteExperts::Impl::pick(const std::vector<int>& r, uint64_t key, int exclude) const {
  // Live copies first. With none, a lost worker whose endpoint still stands (it was silent, not
  // dead) is tried as the last resort: a lost message or a short stall then fails one step, not
  // every step of its back-off.
  for (const bool last_resort : {false, true}) {
    auto usable = [&](int w) {
      const Worker& wk = workers[w];
      return w != exclude && !wk.bad && (last_resort ? wk.lost && wk.peer >= 0 : !wk.lost);
    };
    const auto live = static_cast<uint64_t>(std::count_if(r.begin(), r.end(), usable));
    if (live == 0) continue;
    uint64_t k = key % live;
    for (int w : r)
      if (usable(w) && k-- == 0) return w;
  }
  return -1;
}

std::string RemoteExperts::Impl::no_copy_message(int64_t l, int32_t e) const {
  if (!placed)
    return fmt::format(
        "expert {} of layer {} has no live copy: no expert placement has been set yet (the "
        "router publishes one when expert workers have joined)",
        e, l);
  return fmt::format(
      "expert {} of layer {} has no live copy (placement version {}): the expert worker holding "
      "it did not answer; it is tried again after a back-off of at most 30 s, and a worker that "
      "is gone is replaced when a worker joins",
      e, l, epoch);
}

Status RemoteExperts::Impl::send_round(int r) {
  round = r;
  const int64_t k = top_k;
  for (Worker& w : workers) {
    w.tokens.clear();
    w.experts.clear();
    w.weights.clear();
    w.status = RoundState::Idle;
  }
  for (int64_t i = 0; i < n * k; ++i) {
    if (dest[i] < 0) continue;
    Worker& w = workers[dest[i]];
    const auto t = static_cast<int32_t>(i / k);
    if (w.tokens.empty() || w.tokens.back() != t) {
      w.tokens.push_back(t);
      w.experts.resize(w.experts.size() + k, -1);
      w.weights.resize(w.weights.size() + k, 0.0f);
    }
    const std::size_t at = (w.tokens.size() - 1) * k + i % k;
    w.experts[at] = ids[i];
    w.weights[at] = gate[i];
    state[i] = SlotState::Pending;
  }
  for (std::size_t wi = 0; wi < workers.size(); ++wi) {
    Worker& w = workers[wi];
    if (w.tokens.empty()) continue;
    Status s = device != nullptr
                   ? send_device(static_cast<int>(wi), r)
                   : client->send(w.peer, epoch, calls, static_cast<int32_t>(layer), r, n, x,
                                  config.hidden_size, w.tokens, w.experts.data(), w.weights.data(),
                                  static_cast<int32_t>(k));
    if (s) {
      w.status = RoundState::Sent;
    } else {
      w.status = RoundState::SendFailed;
      w.error = "the dispatch could not be sent: " + s.error().message();
    }
  }
  return {};
}

Status RemoteExperts::Impl::send_device(int wi, int r) {
  Worker& w = workers[static_cast<std::size_t>(wi)];
  const auto rows = static_cast<int64_t>(w.tokens.size());
  const auto k = static_cast<int32_t>(top_k);
  const auto layout =
      transport::dispatch_payload_layout(rows, k, config.hidden_size, options.data_plane.dtype);
  if (!layout) return Error(fmt::format("a dispatch of {} tokens is too large", rows));
  head.resize(layout->x);
  const std::size_t routing = static_cast<std::size_t>(rows) * static_cast<std::size_t>(k) * 4;
  std::memcpy(head.data() + layout->experts, w.experts.data(), routing);
  std::memcpy(head.data() + layout->weights, w.weights.data(), routing);
  // A buffer UCX may still read (a worker that has not taken its last message yet) is neither
  // rewritten nor reallocated: the message goes to the next slot of this worker instead.
  std::size_t slot = static_cast<std::size_t>(wi);
  while (slot < slot_payloads.size() && slot_payloads[slot] != nullptr &&
         client->payload_in_flight(slot_payloads[slot]))
    slot += workers.size();
  Expected<const void*> payload =
      device->assemble(static_cast<int>(slot), head.data(), head.size(), w.tokens,
                       options.data_plane.dtype == transport::WireDtype::BF16);
  if (!payload) return payload.error();
  if (slot_payloads.size() <= slot) slot_payloads.resize(slot + 1, nullptr);
  slot_payloads[slot] = *payload;
  Status s = client->send_payload(
      w.peer, epoch, calls, static_cast<int32_t>(layer), r, n, rows, k, config.hidden_size,
      *payload,
      device->cuda_memory() ? transport::PayloadMemory::Cuda : transport::PayloadMemory::Host);
  if (s) ++device_dispatches;
  return s;
}

void RemoteExperts::Impl::take_reply(const transport::Reply& r) {
  const int64_t H = config.hidden_size;
  const int64_t k = top_k;
  const int wi = worker_of_peer(r.peer);
  if (wi < 0 || r.micro_batch != round || r.layer != layer) return;
  Worker& w = workers[wi];
  if (w.status != RoundState::Sent) return;
  if (!r.error.empty()) {
    ++error_replies;
    w.status = RoundState::Error;
    w.error = fmt::format("it answered with an error: {}", r.error);
    return;
  }
  const auto rows = static_cast<int64_t>(w.tokens.size());
  if (r.n_tokens != rows || r.slots != k || r.hidden != H) {
    w.status = RoundState::Error;
    w.error = fmt::format("its reply has {} rows x {} slots x {} hidden, {} x {} x {} were sent",
                          r.n_tokens, r.slots, r.hidden, rows, k, H);
    return;
  }
  if (r.partial_bf16 != nullptr) {  // bf16 views: converted while copied (no pass of its own)
    w.partial.resize(static_cast<std::size_t>(rows * H));
    transport::bf16_to_f32(r.partial_bf16, w.partial.data(), w.partial.size());
  } else {
    w.partial.assign(r.partial, r.partial + rows * H);
  }
  w.rejected.assign(r.rejected, r.rejected + rows * k);
  w.status = RoundState::Answered;
}

void RemoteExperts::Impl::wait_round() {
  const int64_t H = config.hidden_size;
  const int64_t k = top_k;
  const std::vector<int> late = client->wait(Clock::now() + options.timeout, on_reply);
  for (int peer : late) {
    const int wi = worker_of_peer(peer);
    if (wi >= 0 && workers[wi].status == RoundState::Sent)
      workers[wi].status = RoundState::TimedOut;
  }
  // Combine in ascending worker order; note what has to go again.
  for (std::size_t wi = 0; wi < workers.size(); ++wi) {
    Worker& w = workers[wi];
    if (w.status == RoundState::Idle) continue;
    if (w.status == RoundState::Sent) w.status = RoundState::TimedOut;  // wait() did not say
    if (w.status == RoundState::TimedOut)
      w.error = fmt::format("it did not answer within {} ms", options.timeout.count());
    const bool ok = w.status == RoundState::Answered;
    if (!ok) {
      w.bad = true;
      spdlog::warn(
          "remote_experts worker_failed worker={} name={} version={} layer={} "
          "error=\"{}\"",
          w.id, w.name, epoch, layer, w.error);
      if (w.status == RoundState::TimedOut || w.status == RoundState::SendFailed) {
        // Lost until its back-off ends or the next placement: masked. A failed endpoint is
        // closed; a silent one is kept (its late replies are dropped as late), since UCX would
        // pair a new endpoint from this client with the server's side of the old one.
        w.lost = true;
        if ((w.status == RoundState::SendFailed || client->peer_failed(w.peer)) && w.peer >= 0) {
          client->disconnect(w.peer);
          w.peer = -1;
        }
        w.backoff = w.backoff.count() == 0 ? kRetryFirst : std::min(2 * w.backoff, kRetryMax);
        w.retry_at = Clock::now() + w.backoff;
      }
    } else {
      w.lost = false;  // a last-resort try (see pick()) that worked
      w.backoff = std::chrono::milliseconds(0);
    }
    for (std::size_t r = 0; r < w.tokens.size(); ++r) {
      const int64_t t = w.tokens[r];
      if (ok) {
        float* dst = routed.data() + t * H;
        const float* src = w.partial.data() + r * H;
        for (int64_t d = 0; d < H; ++d) dst[d] += src[d];
      }
      for (int64_t j = 0; j < k; ++j) {
        if (w.experts[r * k + j] < 0) continue;
        const int64_t i = t * k + j;
        first[i] = static_cast<int>(wi);
        if (!ok)
          state[i] = SlotState::Failed;
        else
          state[i] = w.rejected[r * k + j] ? SlotState::Rejected : SlotState::Done;
      }
    }
  }
}

// Connects again to the lost workers whose back-off has ended (the placement still lists them:
// a worker that is really gone is removed from it by the router within moments).
void RemoteExperts::Impl::retry_lost() {
  const auto now = Clock::now();
  for (Worker& w : workers) {
    if (!w.lost || w.address.empty() || w.retry_at == Clock::time_point{} || now < w.retry_at)
      continue;
    w.retry_at = {};
    if (w.peer < 0) {
      Expected<int> peer = client->connect(w.address);
      if (!peer) {
        w.retry_at = now + w.backoff;
        continue;
      }
      w.peer = *peer;
    }
    w.lost = false;
    ++retries;
    spdlog::info("remote_experts retry worker={} name={} version={} backoff_ms={}", w.id, w.name,
                 epoch, w.backoff.count());
  }
}

Status RemoteExperts::Impl::fail(std::string message) {
  ++failed_steps;
  dropped = 0;  // the whole step failed: its slots count there, not as drops
  pending = false;
  record_stats();
  return Error(std::move(message));
}

void RemoteExperts::Impl::record_stats() {
  const transport::ClientStats c = client->stats();
  std::lock_guard lock(stats_mutex);
  stats.set_dispatches_total(c.dispatches);
  stats.set_timeouts_total(c.timeouts);
  stats.set_late_replies_total(c.late_replies);
  stats.set_rerouted_slots_total(stats.rerouted_slots_total() + rerouted);
  stats.set_dropped_slots_total(stats.dropped_slots_total() + dropped);
  stats.set_failed_steps_total(stats.failed_steps_total() + failed_steps);
  stats.set_send_errors_total(c.send_errors);
  stats.set_auth_failures_total(c.auth_failures);
  stats.set_checksum_failures_total(c.checksum_failures);
  stats.set_buffers_total(c.buffers);
  stats.set_worker_retries_total(stats.worker_retries_total() + retries);
  stats.set_error_replies_total(stats.error_replies_total() + error_replies);
  stats.set_device_dispatches_total(stats.device_dispatches_total() + device_dispatches);
  proto::FaultCounts* f = stats.mutable_faults();
  f->set_drops(c.faults.drops);
  f->set_delays(c.faults.delays);
  f->set_corruptions(c.faults.corruptions);
  f->set_stalls(c.faults.stalls);
  if (dropped > 0)
    for (int64_t i = 0; i < n * top_k; ++i)
      if (state[i] == SlotState::Dropped) ++drops[layer * config.num_experts + ids[i]];
  rerouted = dropped = failed_steps = retries = error_replies = device_dispatches = 0;
}

RemoteExperts::RemoteExperts(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RemoteExperts::~RemoteExperts() = default;

Expected<std::unique_ptr<RemoteExperts>> RemoteExperts::create(
    const ModelConfig& config, const RemoteExpertsOptions& options) {
  if (options.timeout.count() <= 0)
    return Error(fmt::format("remote experts: the dispatch timeout must be positive, got {} ms",
                             options.timeout.count()));
  Expected<std::unique_ptr<transport::DispatchClient>> client =
      transport::DispatchClient::create(options.data_plane);
  if (!client) return Error("remote experts: data plane: " + client.error().message());
  spdlog::info(
      "remote experts: data plane UCX takes CUDA memory: {} (a model on a GPU sends its rows from "
      "{})",
      (*client)->cuda_memory() ? "yes" : "no",
      (*client)->cuda_memory() && options.device_rows ? "GPU memory" : "pinned host memory");
  return std::unique_ptr<RemoteExperts>(
      new RemoteExperts(std::make_unique<Impl>(config, options, std::move(*client))));
}

void RemoteExperts::set_placement(const proto::Placement& placement) {
  std::lock_guard lock(impl_->placement_mutex);
  impl_->next_placement = placement;
  impl_->placement_version = placement.version();
}

uint64_t RemoteExperts::placement_version() const {
  std::lock_guard lock(impl_->placement_mutex);
  return impl_->placement_version;
}

proto::DispatchStats RemoteExperts::stats() const {
  proto::DispatchStats out;
  {
    std::lock_guard lock(impl_->stats_mutex);
    out = impl_->stats;
    proto::Histogram* h = out.mutable_round_trip();
    uint64_t cumulative = 0;
    for (std::size_t b = 0; b < std::size(kRoundTripBounds); ++b) {
      cumulative += b < impl_->round_trip.size() ? impl_->round_trip[b] : 0;
      h->add_bounds(kRoundTripBounds[b]);
      h->add_counts(cumulative);
    }
    h->set_count(impl_->round_trips);
    h->set_sum(impl_->round_trip_sum);
    const int64_t E = impl_->config.num_experts;
    for (std::size_t i = 0; i < impl_->drops.size(); ++i) {
      if (impl_->drops[i] == 0) continue;
      proto::ExpertCounters* c = out.add_drops();
      c->set_layer(static_cast<int32_t>(static_cast<int64_t>(i) / E));
      c->set_expert(static_cast<int32_t>(static_cast<int64_t>(i) % E));
      c->set_drops_total(impl_->drops[i]);
    }
  }
  out.set_placement_version(placement_version());
  return out;
}

Status RemoteExperts::compute(int64_t layer, const float* x, int64_t n, const int32_t* ids,
                              const float* weights, int64_t top_k, float* out) {
  if (Status s = start(layer, x, n, ids, weights, top_k, out); !s) return s;
  return finish();
}

bool RemoteExperts::takes_device_rows(bool cuda_memory) const {
  // Host "device" memory (the tests' emulated GPU) goes to UCX as host memory.
  return impl_->options.device_rows && (!cuda_memory || impl_->client->cuda_memory());
}

Status RemoteExperts::start_device(int64_t layer, DeviceRows& x, int64_t n, const int32_t* ids,
                                   const float* weights, int64_t top_k, float* out) {
  if (!takes_device_rows(x.cuda_memory()))
    return impl_->fail(
        "remote experts: rows in GPU memory, but this data plane's UCX does not take CUDA memory");
  return begin(layer, nullptr, &x, n, ids, weights, top_k, out);
}

Status RemoteExperts::start(int64_t layer, const float* x, int64_t n, const int32_t* ids,
                            const float* weights, int64_t top_k, float* out) {
  return begin(layer, x, nullptr, n, ids, weights, top_k, out);
}

Status RemoteExperts::begin(int64_t layer, const float* x, DeviceRows* device, int64_t n,
                            const int32_t* ids, const float* weights, int64_t top_k, float* out) {
  Impl& m = *impl_;
  {
    std::optional<proto::Placement> next;
    {
      std::lock_guard lock(m.placement_mutex);
      next.swap(m.next_placement);
    }
    if (next) m.apply(*next);
  }
  m.retry_lost();
  m.pending = false;
  ++m.calls;
  const ModelConfig& c = m.config;
  if (layer < 0 || layer >= c.num_layers || !c.layer_is_moe[static_cast<std::size_t>(layer)])
    return m.fail(fmt::format("layer {} has no routed experts ({} has {} layers)", layer,
                              c.model_type, c.num_layers));
  if (n < 0 || top_k < 1)
    return m.fail(
        fmt::format("remote experts: {} tokens with top_k {} for layer {}", n, top_k, layer));
  m.layer = layer;
  m.x = x;
  m.device = device;
  m.n = n;
  m.ids = ids;
  m.gate = weights;
  m.top_k = top_k;
  m.out = out;
  const auto slots = static_cast<std::size_t>(n * top_k);
  m.dest.assign(slots, -1);
  m.first.assign(slots, -1);
  m.state.assign(slots, SlotState::Done);
  const auto& table = m.reps[static_cast<std::size_t>(layer)];
  for (auto& w : m.workers) w.bad = false;
  for (int64_t i = 0; i < n * top_k; ++i) {
    const int32_t e = ids[i];
    if (e < 0 || e >= c.num_experts)
      return m.fail(fmt::format("expert id {} is out of range for layer {} ({} experts)", e, layer,
                                c.num_experts));
    const int w =
        table.empty() ? -1 : m.pick(table[e], static_cast<uint64_t>(i / top_k) + m.calls, -1);
    if (w < 0) return m.fail(m.no_copy_message(layer, e));
    m.dest[i] = w;
  }
  m.routed.assign(static_cast<std::size_t>(n * c.hidden_size), 0.0f);
  m.started = Clock::now();
  if (Status s = m.send_round(0); !s) return m.fail(s.error().message());
  m.pending = true;
  return {};
}

Status RemoteExperts::finish() {
  Impl& m = *impl_;
  if (!m.pending) return Error("RemoteExperts::finish() was called with no start() pending");
  const int64_t k = m.top_k;
  const int64_t H = m.config.hidden_size;
  m.wait_round();

  // Second round: what was rejected or lost goes to another replica when there is one.
  const auto& table = m.reps[static_cast<std::size_t>(m.layer)];
  uint64_t again = 0;
  for (int64_t i = 0; i < m.n * k; ++i) {
    m.dest[i] = -1;
    if (m.state[i] != SlotState::Rejected && m.state[i] != SlotState::Failed) continue;
    const int w = m.pick(table[m.ids[i]], static_cast<uint64_t>(i / k) + m.calls, m.first[i]);
    if (w >= 0) {
      m.dest[i] = w;
      ++again;
    } else if (m.state[i] == SlotState::Rejected) {
      m.state[i] = SlotState::Dropped;
      ++m.dropped;
    } else {
      const Impl::Worker& bad = m.workers[m.first[i]];
      return m.fail(fmt::format(
          "expert worker {} ({}) failed layer {}'s dispatch at placement version {}: {}; expert "
          "{} of layer {} has no other live copy, so the step failed (dispatch timeout {} ms)",
          bad.id, bad.name, m.layer, m.epoch, bad.error, m.ids[i], m.layer,
          m.options.timeout.count()));
    }
  }
  if (again > 0) {
    m.rerouted += again;
    if (Status s = m.send_round(1); !s) return m.fail(s.error().message());
    m.wait_round();
    for (int64_t i = 0; i < m.n * k; ++i) {
      if (m.dest[i] < 0) continue;
      if (m.state[i] == SlotState::Rejected) {
        m.state[i] = SlotState::Dropped;
        ++m.dropped;
      } else if (m.state[i] == SlotState::Failed) {
        const Impl::Worker& bad = m.workers[m.first[i]];
        return m.fail(fmt::format(
            "expert worker {} ({}) failed layer {}'s rerouted dispatch at placement version {}: "
            "{}; no copy of expert {} of layer {} is left to try, so the step failed (dispatch "
            "timeout {} ms)",
            bad.id, bad.name, m.layer, m.epoch, bad.error, m.ids[i], m.layer,
            m.options.timeout.count()));
      }
    }
  }

  // Renormalise tokens that lost slots, then add the routed output into out.
  for (int64_t t = 0; t < m.n; ++t) {
    float total = 0, kept = 0;
    bool lost = false;
    for (int64_t j = 0; j < k; ++j) {
      total += m.gate[t * k + j];
      if (m.state[t * k + j] == SlotState::Dropped)
        lost = true;
      else
        kept += m.gate[t * k + j];
    }
    float* row = m.routed.data() + t * H;
    if (lost) {
      const float scale = kept > 0 ? total / kept : 0.0f;
      for (int64_t d = 0; d < H; ++d) row[d] *= scale;
    }
    float* o = m.out + t * H;
    for (int64_t d = 0; d < H; ++d) o[d] += row[d];
  }
  if (m.dropped > 0)
    spdlog::debug("remote_experts dropped layer={} slots={} version={}", m.layer, m.dropped,
                  m.epoch);
  m.pending = false;
  {
    const double seconds = std::chrono::duration<double>(Clock::now() - m.started).count();
    std::lock_guard lock(m.stats_mutex);
    m.round_trip.resize(std::size(kRoundTripBounds));
    for (std::size_t b = 0; b < std::size(kRoundTripBounds); ++b)
      if (seconds <= kRoundTripBounds[b]) {
        ++m.round_trip[b];
        break;
      }
    ++m.round_trips;
    m.round_trip_sum += seconds;
  }
  m.record_stats();
  return {};
}

}  // namespace moemesh
