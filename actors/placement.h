// Expert placement: which expert workers hold which routed experts.
//
// plan_placement() keeps every copy that a live worker already holds and adds copies where an
// expert has fewer than `replicas` (capped at the number of live workers) — each new copy on the
// live worker holding the fewest experts of that layer, then the fewest overall, then the lowest
// id — so that the first placement over N workers spreads each layer's experts evenly, and a
// worker that joins later takes exactly the copies that are missing (an orphaned expert goes back
// to the first worker that joins). Copies held by workers that are not live are dropped.
//
// Pure functions: no actors, no I/O; the router calls them from its actor.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "proto/cluster.pb.h"

namespace moemesh::actors {

struct PlacementRequest {
  std::vector<int32_t> moe_layers;  // indices over all layers
  int32_t num_experts = 0;
  int32_t replicas = 1;
  std::vector<int32_t> live_workers;  // ids of expert workers that may hold copies
  bool fill = true;                   // false: only drop the copies of workers not live
};

// The layers of the result follow request.moe_layers; workers/version are left to the caller.
proto::Placement plan_placement(const proto::Placement& current, const PlacementRequest& request);

// The (layer, expert) pairs each worker holds in `placement`.
std::map<int32_t, std::set<std::pair<int32_t, int32_t>>> experts_by_worker(
    const proto::Placement& placement);

// Whether every expert of every layer has at least one copy.
bool placement_complete(const proto::Placement& placement, int32_t num_experts);

// Load-aware placement (a rebalance): per layer, the expert copies are packed onto the live
// workers heaviest first (longest-processing-time greedy), each copy carrying load / replicas, on
// the worker with the least load of that layer so far; ties go to a worker that already holds the
// expert (so a balanced layer moves nothing), then to the fewest experts, then the lowest id.
// `load` gives the tokens of (layer, expert) in the statistics window (missing: 0).
proto::Placement plan_balanced(const PlacementRequest& request,
                               const std::map<std::pair<int32_t, int32_t>, uint64_t>& load,
                               const proto::Placement& current);

// Per layer, mean / max of the load each worker carries under `placement` (1 = even); a layer
// with no load counts as 1. Returns the minimum over layers.
double worker_balancedness(const proto::Placement& placement,
                           const std::map<std::pair<int32_t, int32_t>, uint64_t>& load);

// How many (layer, expert, worker) copies of `to` are not in `from`.
int64_t copies_moved(const proto::Placement& from, const proto::Placement& to);

// mean / max of per-expert counts (1 when every count is equal, including all zero).
double balancedness(const std::vector<uint64_t>& counts);

}  // namespace moemesh::actors
