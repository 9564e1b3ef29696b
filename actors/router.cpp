#include "actors/router.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <set>

#include "actors/introspection.h"
#include "actors/placement.h"
#include "proto/cluster.pb.h"
#include "proto/engine.pb.h"

namespace moemesh::actors {
namespace {

using Clock = std::chrono::steady_clock;

struct Member {
  int32_t id = 0;
  proto::NodeInfo info;
  caf::actor handle;
  Clock::time_point joined;
  bool reachable = true;
  bool loading = false;
  bool draining = false;
  std::function<void()> assign_lost;  // ends a pending assign if the member is lost first
  proto::ActorStatus status;          // its last answer to status()
  Clock::time_point status_at;
  double last_busy = -1;  // expert workers: busy seconds at the previous poll
  Clock::time_point last_busy_at;
  int64_t last_tokens = -1;  // attention workers: generated tokens at the previous poll
  Clock::time_point last_tokens_at;
  double tokens_per_second = 0;
  std::set<std::pair<int32_t, int32_t>> held;  // experts bound (expert workers)
  proto::ExpertWorkerStats expert_stats;
  proto::AttentionWorkerStats attention_stats;
  int64_t in_flight = 0;  // requests placed here and not done (attention workers)
};

struct Tracked {
  int32_t worker = 0;
  caf::actor sink;
  int32_t n = 1;
};

// Owned by the router actor; only its handlers touch it.
struct RouterState {
  RouterOptions options;
  std::vector<int32_t> moe_layers;
  std::map<int32_t, Member> members;
  int32_t next_id = 1;
  proto::Placement placement;  // the published one
  uint64_t version = 0;
  bool replanning = false;
  bool replan_again = false;
  std::map<std::string, Tracked> requests;
  uint64_t members_lost = 0;
  uint64_t joins_refused = 0;
  uint64_t requests_failed_by_loss = 0;
  uint64_t requests_placed = 0;
  uint64_t rebalances = 0;
  double last_rebalance_seconds = 0;
  std::optional<Clock::time_point> rebalance_started;  // a rebalance waits for its binds
  std::deque<std::pair<Clock::time_point, proto::ActorStatus>> lost;  // recent losses, newest last
  std::shared_ptr<ActorCounters> counters = std::make_shared<ActorCounters>();
  Clock::time_point last_periodic = Clock::now();
  static inline const char* name = "router";
};

using self_ptr = router_actor::stateful_pointer<RouterState>;

std::vector<int32_t> live_workers(const RouterState& st, const std::string& role) {
  std::vector<int32_t> out;
  for (const auto& [id, m] : st.members)
    if (m.info.role() == role) out.push_back(id);
  return out;
}

// Expert workers that may hold copies: members not being drained.
std::vector<int32_t> placeable_workers(const RouterState& st) {
  std::vector<int32_t> out;
  for (const auto& [id, m] : st.members)
    if (m.info.role() == "expert" && !m.draining) out.push_back(id);
  return out;
}

// Copies lost members are remembered this long in the cluster snapshot (at most kLostKept).
constexpr std::chrono::minutes kLostShown{10};
constexpr std::size_t kLostKept = 32;

bool ready(const RouterState& st, std::string* why) {
  if (!placement_complete(st.placement, static_cast<int32_t>(st.options.config.num_experts))) {
    const auto experts = live_workers(st, "expert").size();
    if (why)
      *why = experts < static_cast<std::size_t>(st.options.min_expert_workers)
                 ? fmt::format("waiting for expert workers: {} of {} joined", experts,
                               st.options.min_expert_workers)
                 : "some experts have no live copy (an expert worker was lost; they come back "
                   "when a worker joins)";
    return false;
  }
  if (live_workers(st, "attention").empty()) {
    if (why) *why = "no attention worker has joined";
    return false;
  }
  return true;
}

// Sends the placement (with the workers' data-plane addresses) to every attention worker.
void publish(self_ptr self, proto::Placement layout) {
  RouterState& st = self->state;
  layout.set_version(++st.version);
  layout.clear_workers();
  std::set<int32_t> used;
  for (const auto& [w, _] : experts_by_worker(layout)) used.insert(w);
  for (int32_t w : used) {
    const Member& m = st.members.at(w);
    proto::ExpertWorkerAddress* a = layout.add_workers();
    a->set_worker_id(w);
    a->set_name(m.info.name());
    a->set_data_address(m.info.data_address());
  }
  st.placement = std::move(layout);
  if (st.rebalance_started) {
    st.last_rebalance_seconds =
        std::chrono::duration<double>(Clock::now() - *st.rebalance_started).count();
    st.rebalance_started.reset();
    spdlog::info("rebalance done version={} seconds={:.3f}", st.version, st.last_rebalance_seconds);
  }
  self->delayed_send(self, st.options.release_grace, release_atom::value, st.version);
  const std::string bytes = st.placement.SerializeAsString();
  for (int32_t id : live_workers(st, "attention"))
    self->send(caf::actor_cast<attention_actor>(st.members.at(id).handle), placement_atom::value,
               bytes);
  std::string why;
  const bool ok = ready(st, &why);
  spdlog::info("placement published version={} expert_workers={} ready={} {}", st.version,
               used.size(), ok, why);
}

void apply_layout(self_ptr self, proto::Placement layout);

// Tokens per (layer, expert) in the statistics window, summed over the expert workers.
std::map<std::pair<int32_t, int32_t>, uint64_t> window_load(const RouterState& st) {
  std::map<std::pair<int32_t, int32_t>, uint64_t> load;
  for (const auto& [id, m] : st.members)
    if (m.info.role() == "expert")
      for (const proto::ExpertCounters& c : m.expert_stats.experts())
        load[{c.layer(), c.expert()}] += c.tokens_window();
  return load;
}

// Plans copies for the live expert workers, has each bind its experts, then publishes.
void replan(self_ptr self, bool fill) {
  RouterState& st = self->state;
  if (st.replanning) {
    st.replan_again = true;
    return;
  }
  const std::vector<int32_t> live = placeable_workers(st);
  if (st.version == 0 && live.size() < static_cast<std::size_t>(st.options.min_expert_workers))
    return;  // the first placement waits for the expected pool
  PlacementRequest req;
  req.moe_layers = st.moe_layers;
  req.num_experts = static_cast<int32_t>(st.options.config.num_experts);
  req.replicas = st.options.expert_replicas;
  req.live_workers = live;
  req.fill = fill;
  req.redundant = st.options.redundant_experts;
  if (st.version == 0 || !fill) {
    proto::Placement layout = plan_placement(st.placement, req);
    if (req.redundant > 0 && fill) layout = plan_balanced(req, {}, layout);
    apply_layout(self, std::move(layout));
  } else {
    apply_layout(self, plan_balanced(req, window_load(st), st.placement));
  }
}

// Has each worker bind the experts `layout` gives it that it does not hold yet, then publishes
// the layout (keeping only the copies that were bound).
void apply_layout(self_ptr self, proto::Placement layout) {
  RouterState& st = self->state;
  auto wanted = experts_by_worker(layout);
  std::vector<std::pair<int32_t, std::set<std::pair<int32_t, int32_t>>>> to_assign;
  for (auto& [w, experts] : wanted) {
    const Member& m = st.members.at(w);
    if (!std::includes(m.held.begin(), m.held.end(), experts.begin(), experts.end()))
      to_assign.emplace_back(w, experts);
  }
  if (to_assign.empty()) {
    proto::Placement published = st.placement;
    published.clear_version();
    published.clear_workers();
    if (layout.SerializeAsString() != published.SerializeAsString())
      publish(self, std::move(layout));
    return;
  }

  st.replanning = true;
  auto pending = std::make_shared<std::size_t>(to_assign.size());
  auto shared_layout = std::make_shared<proto::Placement>(std::move(layout));
  auto finish_one = [self, pending, shared_layout] {
    if (--*pending > 0) return;
    RouterState& s = self->state;
    // Keep only copies on workers that are still members and bound their experts.
    for (proto::LayerPlacement& l : *shared_layout->mutable_layers())
      for (int32_t e = 0; e < l.experts_size(); ++e) {
        proto::ExpertReplicas& r = *l.mutable_experts(e);
        std::vector<int32_t> keep;
        for (int32_t w : r.workers()) {
          auto it = s.members.find(w);
          if (it != s.members.end() && it->second.held.count({l.layer(), e})) keep.push_back(w);
        }
        *r.mutable_workers() = {keep.begin(), keep.end()};
      }
    s.replanning = false;
    publish(self, *shared_layout);
    if (s.replan_again) {
      s.replan_again = false;
      replan(self, true);
    }
  };
  for (auto& [w, experts] : to_assign) {
    Member& m = st.members.at(w);
    proto::Assignment a;
    a.set_version(st.version + 1);
    for (const auto& [layer, expert] : experts) {
      a.mutable_experts()->add_layer(layer);
      a.mutable_experts()->add_expert(expert);
    }
    m.loading = true;
    spdlog::info("assigning experts worker={} experts={}", m.info.name(), experts.size());
    const int32_t id = w;
    auto set = experts;
    // Ends once: on the answer, on the timeout, or when the worker is lost before either.
    auto fired = std::make_shared<bool>(false);
    auto finish_once = [finish_one, fired] {
      if (*fired) return;
      *fired = true;
      finish_one();
    };
    m.assign_lost = finish_once;
    self->request(caf::actor_cast<expert_actor>(m.handle), kAssignTimeout, assign_atom::value,
                  a.SerializeAsString())
        .then(
            [self, id, set, finish_one = finish_once](const std::string& error) {
              auto it = self->state.members.find(id);
              if (it != self->state.members.end()) {
                it->second.loading = false;
                if (error.empty())
                  it->second.held.insert(set.begin(), set.end());
                else
                  spdlog::error("expert worker {} failed to bind its experts: {}",
                                it->second.info.name(), error);
              }
              finish_one();
            },
            [self, id, finish_one = finish_once](caf::error& err) {
              auto it = self->state.members.find(id);
              if (it != self->state.members.end()) {
                it->second.loading = false;
                spdlog::error("expert worker {} did not confirm its experts: {}",
                              it->second.info.name(), caf::to_string(err));
              }
              finish_one();
            });
  }
}

void fail_requests_of(self_ptr self, int32_t worker, const std::string& name) {
  RouterState& st = self->state;
  for (auto it = st.requests.begin(); it != st.requests.end();) {
    if (it->second.worker != worker) {
      ++it;
      continue;
    }
    for (int32_t i = 0; i < it->second.n; ++i) {
      proto::SequenceDelta d;
      d.set_request_id(it->first);
      d.set_index(i);
      d.set_finish_reason("error");
      d.set_error(fmt::format(
          "the attention worker running this request ({}) was lost; retry the request", name));
      d.set_unavailable(true);
      caf::anon_send(it->second.sink, delta_atom::value, d.SerializeAsString());
    }
    ++st.requests_failed_by_loss;
    it = st.requests.erase(it);
  }
}

void on_member_down(self_ptr self, const caf::actor_addr& source, const caf::error& reason) {
  RouterState& st = self->state;
  for (auto it = st.members.begin(); it != st.members.end(); ++it) {
    if (it->second.handle.address() != source) continue;
    const Member m = std::move(it->second);
    st.members.erase(it);
    ++st.members_lost;
    proto::ActorStatus gone = m.status;
    gone.set_role(m.info.role());
    gone.set_name(m.info.name());
    gone.set_worker_id(m.id);
    if (gone.node().empty()) gone.set_node(fmt::format("{}:{}", m.info.host(), m.info.pid()));
    gone.set_state("lost");
    st.lost.emplace_back(Clock::now(), std::move(gone));
    while (st.lost.size() > kLostKept) st.lost.pop_front();
    spdlog::warn("cluster member lost role={} name={} reason={}", m.info.role(), m.info.name(),
                 caf::to_string(reason));
    if (m.info.role() == "attention") {
      fail_requests_of(self, m.id, m.info.name());
    } else {
      // Its copies leave the placement at once (a placement being bound drops them too).
      PlacementRequest req;
      req.moe_layers = st.moe_layers;
      req.num_experts = static_cast<int32_t>(st.options.config.num_experts);
      req.replicas = st.options.expert_replicas;
      req.live_workers = live_workers(st, "expert");  // draining ones keep their copies until moved
      req.fill = false;
      if (st.version > 0) {
        publish(self, plan_placement(st.placement, req));
        // The survivors bind the copies it held (orphaned experts come back at once).
        if (!placeable_workers(st).empty()) replan(self, true);
      }
      if (m.assign_lost) m.assign_lost();
    }
    return;
  }
}

proto::EngineStats total_engine_stats(const RouterState& st) {
  proto::EngineStats sum;
  double kv_used = 0;
  int64_t kv_total = 0;
  for (const auto& [id, m] : st.members) {
    if (m.info.role() != "attention") continue;
    const proto::EngineStats& e = m.attention_stats.engine();
    sum.set_running(sum.running() + e.running());
    sum.set_waiting(sum.waiting() + e.waiting());
    sum.set_prompt_tokens_total(sum.prompt_tokens_total() + e.prompt_tokens_total());
    sum.set_generation_tokens_total(sum.generation_tokens_total() + e.generation_tokens_total());
    sum.set_preemptions_total(sum.preemptions_total() + e.preemptions_total());
    sum.set_requests_failed_total(sum.requests_failed_total() + e.requests_failed_total());
    sum.set_requests_aborted_total(sum.requests_aborted_total() + e.requests_aborted_total());
    sum.set_prefix_cache_queries_total(sum.prefix_cache_queries_total() +
                                       e.prefix_cache_queries_total());
    sum.set_prefix_cache_hits_total(sum.prefix_cache_hits_total() + e.prefix_cache_hits_total());
    kv_used += e.kv_cache_usage() * static_cast<double>(e.kv_cache_tokens());
    kv_total += e.kv_cache_tokens();
  }
  sum.set_kv_cache_tokens(kv_total);
  sum.set_kv_cache_usage(kv_total > 0 ? kv_used / static_cast<double>(kv_total) : 0.0);
  sum.set_requests_failed_total(sum.requests_failed_total() + st.requests_failed_by_loss);
  sum.set_ready(ready(st, nullptr));
  return sum;
}

proto::ActorStatus router_status(self_ptr self) {
  const RouterState& st = self->state;
  proto::ActorStatus s =
      actor_status(*st.counters, "router", "router", self->id(), self->mailbox().size());
  proto::RouterFigures* f = s.mutable_router();
  f->set_placement_version(st.placement.version());
  f->set_members(static_cast<int32_t>(st.members.size()));
  f->set_expert_workers(static_cast<int32_t>(live_workers(st, "expert").size()));
  f->set_attention_workers(static_cast<int32_t>(live_workers(st, "attention").size()));
  f->set_requests_placed_total(st.requests_placed);
  f->set_rebalances_total(st.rebalances);
  f->set_last_rebalance_seconds(st.last_rebalance_seconds);
  return s;
}

const char* member_state(const Member& m, bool holds_experts) {
  if (m.loading) return "loading";
  if (!m.reachable) return "unreachable";
  if (m.draining) return holds_experts ? "draining" : "drained";
  return "up";
}

proto::ClusterSnapshot cluster_snapshot(self_ptr self) {
  const RouterState& st = self->state;
  proto::ClusterSnapshot s;
  s.set_join(st.options.join_address);
  s.set_model(st.options.model);
  s.set_placement_version(st.placement.version());
  std::string why;
  s.set_ready(ready(st, &why));
  s.set_not_ready_reason(why);
  s.set_capacity_factor(st.options.capacity_factor);
  s.set_expert_replicas(st.options.expert_replicas);
  s.set_members_lost_total(st.members_lost);
  s.set_joins_refused_total(st.joins_refused);
  s.set_requests_failed_by_worker_loss_total(st.requests_failed_by_loss);
  const auto now = Clock::now();
  const auto held = experts_by_worker(st.placement);
  for (const auto& [id, m] : st.members) {
    proto::MemberSnapshot* x = s.add_members();
    x->set_worker_id(id);
    x->set_role(m.info.role());
    x->set_name(m.info.name());
    x->set_host(m.info.host());
    x->set_pid(m.info.pid());
    x->set_directory(m.info.directory());
    auto h = held.find(id);
    x->set_state(member_state(m, h != held.end()));
    x->set_joined_seconds_ago(std::chrono::duration<double>(now - m.joined).count());
    x->set_experts_held(h == held.end() ? 0 : static_cast<int32_t>(h->second.size()));
    const proto::EngineStats& e = m.attention_stats.engine();
    x->set_running(e.running());
    x->set_waiting(e.waiting());
    x->set_kv_cache_usage(e.kv_cache_usage());
    x->set_requests_in_flight(m.in_flight);
  }
  *s.add_actors() = router_status(self);
  for (const auto& [id, m] : st.members) {
    proto::ActorStatus a = m.status;
    a.set_role(m.info.role());
    a.set_name(m.info.name());
    a.set_worker_id(id);
    if (a.node().empty()) a.set_node(fmt::format("{}:{}", m.info.host(), m.info.pid()));
    a.set_state(member_state(m, held.count(id) > 0));
    a.set_age_seconds(m.status_at == Clock::time_point{}
                          ? -1.0
                          : std::chrono::duration<double>(now - m.status_at).count());
    *s.add_actors() = std::move(a);
  }
  for (const auto& [when, a] : st.lost) {
    if (now - when > kLostShown) continue;
    proto::ActorStatus x = a;
    x.set_age_seconds(std::chrono::duration<double>(now - when).count());
    *s.add_actors() = std::move(x);
  }
  *s.mutable_engine() = total_engine_stats(st);
  return s;
}

void add_faults(const proto::FaultCounts& a, proto::FaultCounts* sum) {
  sum->set_drops(sum->drops() + a.drops());
  sum->set_delays(sum->delays() + a.delays());
  sum->set_corruptions(sum->corruptions() + a.corruptions());
  sum->set_stalls(sum->stalls() + a.stalls());
}

// Adds an attention worker's data-plane counters into a cluster total (histogram and per-expert
// drops are summed separately).
void add_dispatch_counters(const proto::DispatchStats& a, proto::DispatchStats* sum) {
  sum->set_dispatches_total(sum->dispatches_total() + a.dispatches_total());
  sum->set_timeouts_total(sum->timeouts_total() + a.timeouts_total());
  sum->set_late_replies_total(sum->late_replies_total() + a.late_replies_total());
  sum->set_rerouted_slots_total(sum->rerouted_slots_total() + a.rerouted_slots_total());
  sum->set_dropped_slots_total(sum->dropped_slots_total() + a.dropped_slots_total());
  sum->set_failed_steps_total(sum->failed_steps_total() + a.failed_steps_total());
  sum->set_send_errors_total(sum->send_errors_total() + a.send_errors_total());
  sum->set_auth_failures_total(sum->auth_failures_total() + a.auth_failures_total());
  sum->set_checksum_failures_total(sum->checksum_failures_total() + a.checksum_failures_total());
  sum->set_worker_retries_total(sum->worker_retries_total() + a.worker_retries_total());
  sum->set_error_replies_total(sum->error_replies_total() + a.error_replies_total());
  sum->set_buffers_total(sum->buffers_total() + a.buffers_total());
  sum->set_device_dispatches_total(sum->device_dispatches_total() + a.device_dispatches_total());
  add_faults(a.faults(), sum->mutable_faults());
}

proto::ExpertsSnapshot experts_snapshot(const RouterState& st) {
  proto::ExpertsSnapshot s;
  s.set_placement_version(st.placement.version());
  s.set_rebalances_total(st.rebalances);
  s.set_last_rebalance_seconds(st.last_rebalance_seconds);
  double utilisation = 0;
  int32_t experts = 0;
  for (const auto& [id, m] : st.members)
    if (m.info.role() == "expert") utilisation += m.expert_stats.utilisation(), ++experts;
  s.set_expert_workers(experts);
  s.set_pool_utilisation(experts > 0 ? utilisation / experts : 0.0);
  s.set_capacity_factor(st.options.capacity_factor);
  std::map<std::pair<int32_t, int32_t>, proto::ExpertSnapshot> stats;
  for (const auto& [id, m] : st.members) {
    if (m.info.role() == "expert") {
      *s.add_workers() = m.expert_stats;
      s.set_window_seconds(m.expert_stats.window_seconds());
      for (const proto::ExpertCounters& c : m.expert_stats.experts()) {
        proto::ExpertSnapshot& x = stats[{c.layer(), c.expert()}];
        x.set_tokens_total(x.tokens_total() + c.tokens_total());
        x.set_tokens_window(x.tokens_window() + c.tokens_window());
        x.set_overflows_total(x.overflows_total() + c.overflows_total());
        x.set_compute_seconds(x.compute_seconds() + c.compute_seconds());
        x.set_queue_seconds(x.queue_seconds() + c.queue_seconds());
      }
    } else {
      const proto::Histogram& h = m.attention_stats.dispatch().round_trip();
      proto::Histogram* sum = s.mutable_round_trip();
      if (sum->bounds_size() == 0) *sum->mutable_bounds() = h.bounds();
      if (h.bounds_size() == sum->bounds_size()) {
        sum->mutable_counts()->Resize(h.counts_size(), 0);
        for (int b = 0; b < h.counts_size(); ++b) sum->set_counts(b, sum->counts(b) + h.counts(b));
        sum->set_count(sum->count() + h.count());
        sum->set_sum(sum->sum() + h.sum());
      }
      add_dispatch_counters(m.attention_stats.dispatch(), s.mutable_dispatch());
      for (const proto::ExpertCounters& c : m.attention_stats.dispatch().drops()) {
        proto::ExpertSnapshot& x = stats[{c.layer(), c.expert()}];
        x.set_drops_total(x.drops_total() + c.drops_total());
      }
    }
  }
  std::map<int32_t, std::string> names;
  for (const proto::ExpertWorkerAddress& w : st.placement.workers())
    names[w.worker_id()] = w.name();
  for (std::size_t li = 0; li < st.moe_layers.size(); ++li) {
    const int32_t layer = st.moe_layers[li];
    proto::LayerSnapshot* l = s.add_layers();
    l->set_layer(layer);
    const proto::LayerPlacement* lp = nullptr;
    for (const proto::LayerPlacement& p : st.placement.layers())
      if (p.layer() == layer) lp = &p;
    std::vector<uint64_t> window;
    for (int32_t e = 0; e < st.options.config.num_experts; ++e) {
      proto::ExpertSnapshot x = stats[{layer, e}];
      x.set_layer(layer);
      x.set_expert(e);
      if (lp && e < lp->experts_size())
        for (int32_t w : lp->experts(e).workers()) x.add_workers(names[w]);
      window.push_back(x.tokens_window());
      *l->add_experts() = std::move(x);
    }
    l->set_balancedness(balancedness(window));
  }
  return s;
}

void poll(self_ptr self) {
  for (auto& [id, m] : self->state.members) {
    const int32_t wid = id;
    auto mark = [self, wid](bool ok) {
      auto it = self->state.members.find(wid);
      if (it == self->state.members.end()) return;
      if (it->second.reachable != ok)
        spdlog::warn("cluster member {} is {}", it->second.info.name(),
                     ok ? "reachable again" : "unreachable (status timed out)");
      it->second.reachable = ok;
    };
    if (m.info.role() == "expert") {
      self->request(caf::actor_cast<expert_actor>(m.handle), kStatusTimeout, status_atom::value)
          .then(
              [self, wid, mark](const std::string& bytes) {
                auto it = self->state.members.find(wid);
                if (it == self->state.members.end()) return;
                Member& w = it->second;
                proto::ActorStatus status;
                if (!status.ParseFromString(bytes)) {
                  ++self->state.counters->errors;
                  spdlog::warn("malformed status from {}", w.info.name());
                  return;
                }
                w.expert_stats = status.expert();
                w.expert_stats.set_worker_id(wid);
                w.expert_stats.set_name(w.info.name());
                const auto now = Clock::now();
                const double busy = w.expert_stats.busy_seconds();
                double utilisation = w.status.expert().utilisation();
                if (w.last_busy >= 0 && now > w.last_busy_at) {
                  const double dt = std::chrono::duration<double>(now - w.last_busy_at).count();
                  // Smoothed over a few polls, so one slow poll does not swing it.
                  utilisation =
                      0.5 * std::clamp((busy - w.last_busy) / dt, 0.0, 1.0) + 0.5 * utilisation;
                }
                w.last_busy = busy;
                w.last_busy_at = now;
                w.status = std::move(status);
                w.status.mutable_expert()->set_worker_id(wid);
                w.status.mutable_expert()->set_name(w.info.name());
                w.status.mutable_expert()->set_utilisation(utilisation);
                w.expert_stats.set_utilisation(utilisation);
                w.status_at = now;
                mark(true);
              },
              [mark](caf::error&) { mark(false); });
    } else {
      self->request(caf::actor_cast<attention_actor>(m.handle), kStatusTimeout, status_atom::value)
          .then(
              [self, wid, mark](const std::string& bytes) {
                auto it = self->state.members.find(wid);
                if (it == self->state.members.end()) return;
                proto::ActorStatus status;
                if (!status.ParseFromString(bytes)) {
                  ++self->state.counters->errors;
                  spdlog::warn("malformed status from {}", it->second.info.name());
                  return;
                }
                Member& w = it->second;
                const auto now = Clock::now();
                const auto tokens =
                    static_cast<int64_t>(status.attention().engine().generation_tokens_total());
                if (w.last_tokens >= 0 && now > w.last_tokens_at) {
                  const double dt = std::chrono::duration<double>(now - w.last_tokens_at).count();
                  w.tokens_per_second =
                      0.5 * static_cast<double>(std::max<int64_t>(0, tokens - w.last_tokens)) / dt +
                      0.5 * w.tokens_per_second;
                }
                w.last_tokens = tokens;
                w.last_tokens_at = now;
                status.mutable_attention()->mutable_engine()->set_generation_tokens_per_second(
                    w.tokens_per_second);
                w.attention_stats = status.attention();
                w.status = std::move(status);
                w.status_at = now;
                mark(true);
              },
              [mark](caf::error&) { mark(false); });
    }
  }
}

std::string drain(self_ptr self, const std::string& which) {
  RouterState& st = self->state;
  Member* target = nullptr;
  for (auto& [id, m] : st.members)
    if (m.info.role() == "expert" && (m.info.name() == which || std::to_string(id) == which))
      target = &m;
  if (!target)
    return fmt::format("no expert worker \"{}\": give a name or worker id from /admin/cluster",
                       which);
  if (target->draining) return {};
  if (placeable_workers(st).size() <= 1)
    return fmt::format("cannot drain {}: it is the only expert worker left", target->info.name());
  target->draining = true;
  spdlog::info("draining expert worker name={} worker_id={}", target->info.name(), target->id);
  replan(self, true);
  return {};
}

// Unbinds, on each expert worker, the copies the current placement no longer gives it.
void release_unused(self_ptr self, uint64_t version) {
  RouterState& st = self->state;
  if (version != st.version) return;  // a newer placement schedules its own release
  if (st.replanning) {                // binds in progress may count on what is held: later
    self->delayed_send(self, st.options.release_grace, release_atom::value, version);
    return;
  }
  const auto wanted = experts_by_worker(st.placement);
  for (auto& [id, m] : st.members) {
    if (m.info.role() != "expert" || m.loading) continue;
    auto it = wanted.find(id);
    proto::Assignment a;
    a.set_version(version);
    std::set<std::pair<int32_t, int32_t>> extra;
    for (const auto& x : m.held)
      if (it == wanted.end() || !it->second.count(x)) {
        extra.insert(x);
        a.mutable_experts()->add_layer(x.first);
        a.mutable_experts()->add_expert(x.second);
      }
    if (extra.empty()) continue;
    for (const auto& x : extra) m.held.erase(x);
    spdlog::info("releasing experts worker={} experts={} version={}", m.info.name(), extra.size(),
                 version);
    const std::string name = m.info.name();
    self->request(caf::actor_cast<expert_actor>(m.handle), kStatusTimeout * 10, release_atom::value,
                  a.SerializeAsString())
        .then(
            [name](const std::string& error) {
              if (!error.empty())
                spdlog::warn("expert worker {} could not release experts: {}", name, error);
            },
            [name](caf::error& err) {
              spdlog::warn("expert worker {} did not confirm the release: {}", name,
                           caf::to_string(err));
            });
  }
}

proto::RebalanceReply rebalance(self_ptr self, double threshold) {
  RouterState& st = self->state;
  proto::RebalanceReply r;
  r.set_placement_version(st.placement.version());
  if (st.version == 0) {
    r.set_error("no placement yet: the cluster is still starting");
    return r;
  }
  if (st.replanning || st.rebalance_started) {
    r.set_error("a placement change is being bound; retry in a moment");
    return r;
  }
  const auto load = window_load(st);
  PlacementRequest req;
  req.moe_layers = st.moe_layers;
  req.num_experts = static_cast<int32_t>(st.options.config.num_experts);
  req.replicas = st.options.expert_replicas;
  req.live_workers = placeable_workers(st);
  req.redundant = st.options.redundant_experts;
  proto::Placement layout = plan_balanced(req, load, st.placement);
  r.set_balancedness_before(worker_balancedness(st.placement, load));
  r.set_balancedness_after(worker_balancedness(layout, load));
  r.set_copies_moved(copies_moved(st.placement, layout));
  if (r.balancedness_before() >= threshold || r.copies_moved() == 0 ||
      r.balancedness_after() <= r.balancedness_before()) {
    r.set_skipped(true);
    spdlog::info("rebalance skipped balancedness={:.3f} threshold={:.3f}", r.balancedness_before(),
                 threshold);
    return r;
  }
  ++st.rebalances;
  st.rebalance_started = Clock::now();
  spdlog::info("rebalance started balancedness={:.3f}->{:.3f} copies_moved={}",
               r.balancedness_before(), r.balancedness_after(), r.copies_moved());
  apply_layout(self, std::move(layout));
  return r;
}

}  // namespace

std::string model_fingerprint(const ModelConfig& c) {
  return fmt::format("{} layers={} moe_layers={} experts={} top_k={} hidden={} vocab={}",
                     arch_name(c.arch), c.num_layers, c.num_moe_layers(), c.num_experts, c.top_k,
                     c.hidden_size, c.vocab_size);
}

router_actor spawn_router(caf::actor_system& system, RouterOptions options) {
  auto fn = [](self_ptr self, RouterOptions opts) -> router_actor::behavior_type {
    RouterState& st = self->state;
    st.options = std::move(opts);
    for (int64_t l = 0; l < st.options.config.num_layers; ++l)
      if (st.options.config.layer_is_moe[static_cast<std::size_t>(l)])
        st.moe_layers.push_back(static_cast<int32_t>(l));
    self->set_down_handler(
        [self](caf::down_msg& dm) { on_member_down(self, dm.source, dm.reason); });
    self->send(self, tick_atom::value);
    return {
        counted(st.counters,
                [self](submit_atom, const std::string& bytes,
                       const caf::actor& sink) -> caf::result<std::string> {
                  RouterState& s = self->state;
                  proto::GenerateRequest req;
                  if (!req.ParseFromString(bytes)) return std::string("malformed GenerateRequest");
                  std::string why;
                  if (!ready(s, &why))
                    return std::string(kUnavailable) + "the cluster is not ready: " + why;
                  Member* best = nullptr;
                  for (auto& [id, m] : s.members) {
                    if (m.info.role() != "attention" || !m.reachable) continue;
                    if (!best || m.in_flight < best->in_flight ||
                        (m.in_flight == best->in_flight &&
                         m.attention_stats.engine().kv_cache_usage() <
                             best->attention_stats.engine().kv_cache_usage()))
                      best = &m;
                  }
                  if (!best) return std::string(kUnavailable) + "no attention worker is reachable";
                  const int32_t wid = best->id;
                  ++best->in_flight;
                  ++s.requests_placed;
                  spdlog::debug("request placed request_id={} worker={} in_flight={}",
                                req.request_id(), best->info.name(), best->in_flight);
                  s.requests[req.request_id()] = {wid, sink, std::max(1, req.n())};
                  auto rp = self->make_response_promise<std::string>();
                  const std::string id = req.request_id();
                  auto untrack = [self, id, wid] {
                    auto& r = self->state.requests;
                    auto it = r.find(id);
                    if (it != r.end() && it->second.worker == wid) r.erase(it);
                    auto m = self->state.members.find(wid);
                    if (m != self->state.members.end()) --m->second.in_flight;
                  };
                  self->request(caf::actor_cast<attention_actor>(best->handle),
                                kEngineRequestTimeout, submit_atom::value, bytes, sink)
                      .then(
                          [rp, untrack](const std::string& error) mutable {
                            if (!error.empty()) untrack();
                            rp.deliver(error);
                          },
                          [rp, untrack](caf::error& err) mutable {
                            untrack();
                            rp.deliver(
                                std::string(kUnavailable) +
                                "the attention worker did not answer: " + caf::to_string(err));
                          });
                  return rp;
                }),
        counted(st.counters,
                [self](cancel_atom, const std::string& id, int32_t index) {
                  // Sent to every attention worker: unknown ids are ignored there.
                  for (auto& [wid, m] : self->state.members)
                    if (m.info.role() == "attention")
                      self->send(caf::actor_cast<attention_actor>(m.handle), cancel_atom::value, id,
                                 index);
                }),
        counted(st.counters,
                [self](stats_atom) -> std::string {
                  return total_engine_stats(self->state).SerializeAsString();
                }),
        counted(st.counters,
                [self](join_atom, const std::string& token, const std::string& info_bytes,
                       const caf::actor& handle) -> std::string {
                  RouterState& s = self->state;
                  proto::NodeInfo info;
                  proto::JoinReply reply;
                  auto refuse = [&](const std::string& why) {
                    ++s.joins_refused;
                    spdlog::warn("join refused node={} role={} host={}: {}", info.name(),
                                 info.role(), info.host(), why);
                    reply.set_accepted(false);
                    reply.set_error(why);
                    return reply.SerializeAsString();
                  };
                  if (!info.ParseFromString(info_bytes)) return refuse("malformed NodeInfo");
                  if (token != s.options.cluster_token)
                    return refuse(
                        "wrong cluster token: start the node with the cluster's --cluster-token or "
                        "MOEMESH_CLUSTER_TOKEN");
                  if (info.role() != "attention" && info.role() != "expert")
                    return refuse("unknown role \"" + info.role() + "\"");
                  if (!handle) return refuse("no role actor");
                  const std::string expected = model_fingerprint(s.options.config);
                  if (info.model_fingerprint() != expected)
                    return refuse(
                        fmt::format("the node serves another model ({}); the cluster serves {}",
                                    info.model_fingerprint(), expected));
                  Member m;
                  m.id = s.next_id++;
                  m.info = info;
                  m.handle = handle;
                  m.joined = Clock::now();
                  self->monitor(handle);
                  const int32_t id = m.id;
                  spdlog::info("node joined role={} name={} host={} worker_id={}", info.role(),
                               info.name(), info.host(), id);
                  s.members.emplace(id, std::move(m));
                  reply.set_accepted(true);
                  reply.set_worker_id(id);
                  reply.set_capacity_factor(s.options.capacity_factor);
                  if (info.role() == "attention") {
                    *reply.mutable_placement() = s.placement;
                  } else {
                    poll(self);  // its status soon
                    replan(self, true);
                  }
                  return reply.SerializeAsString();
                }),
        counted(st.counters,
                [self](done_atom, const std::string& id) {
                  auto& r = self->state.requests;
                  auto it = r.find(id);
                  spdlog::debug("request done request_id={} known={}", id, it != r.end());
                  if (it == r.end()) return;
                  auto m = self->state.members.find(it->second.worker);
                  if (m != self->state.members.end()) --m->second.in_flight;
                  r.erase(it);
                }),
        counted(st.counters,
                [self](cluster_atom) -> std::string {
                  return cluster_snapshot(self).SerializeAsString();
                }),
        counted(st.counters,
                [self](experts_atom) -> std::string {
                  return experts_snapshot(self->state).SerializeAsString();
                }),
        counted(st.counters,
                [self](capacity_atom, double factor) -> std::string {
                  if (!(factor >= 0) || factor > 1e6)
                    return fmt::format(
                        "capacity factor {} is out of range: use 0 (no limit) or a "
                        "positive number such as 1.25",
                        factor);
                  self->state.options.capacity_factor = factor;
                  for (auto& [id, m] : self->state.members)
                    if (m.info.role() == "expert")
                      self->send(caf::actor_cast<expert_actor>(m.handle), capacity_atom::value,
                                 factor);
                  spdlog::info("capacity factor set to {}", factor);
                  return {};
                }),
        counted(st.counters,
                [self](join_atom, const std::string& address) {
                  self->state.options.join_address = address;
                }),
        counted(st.counters,
                [self](drain_atom, const std::string& which) -> std::string {
                  std::string error = drain(self, which);
                  if (!error.empty()) ++self->state.counters->errors;
                  return error;
                }),
        counted(st.counters,
                [self](rebalance_atom, double threshold) -> std::string {
                  proto::RebalanceReply r = rebalance(self, threshold);
                  if (!r.error().empty()) ++self->state.counters->errors;
                  return r.SerializeAsString();
                }),
        counted(
            st.counters,
            [self](status_atom) -> std::string { return router_status(self).SerializeAsString(); }),
        counted(st.counters,
                [self](release_atom, uint64_t version) { release_unused(self, version); }),
        counted(st.counters,
                [self](tick_atom) {
                  poll(self);
                  RouterState& s = self->state;
                  const auto every = s.options.rebalance_interval;
                  if (every.count() > 0 && Clock::now() - s.last_periodic >= every) {
                    s.last_periodic = Clock::now();
                    proto::RebalanceReply r = rebalance(self, s.options.rebalance_threshold);
                    if (!r.error().empty())
                      spdlog::info("scheduled rebalance not run: {}", r.error());
                  }
                  self->delayed_send(self, self->state.options.poll_interval, tick_atom::value);
                }),
    };
  };
  return system.spawn(fn, std::move(options));
}

}  // namespace moemesh::actors
