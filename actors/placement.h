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
  int32_t redundant = 0;  // plan_balanced: extra copies per layer for the heaviest experts
};

// The layers of the result follow request.moe_layers; workers/version are left to the caller.
proto::Placement plan_placement(const proto::Placement& current, const PlacementRequest& request);

// The (layer, expert) pairs each worker holds in `placement`.
std::map<int32_t, std::set<std::pair<int32_t, int32_t>>> experts_by_worker(
    const proto::Placement& placement);

// Whether every expert of every layer has at least one copy.
bool placement_complete(const proto::Placement& placement, int32_t num_experts);

// Load-aware placement, for rebalancing and for workers joining or leaving (EPLB-style, per layer):
//   1. copies per expert: `replicas` each (capped at the live workers), then `redundant` more,
//      one at a time to the expert with the largest load per copy;
//   2. the current copies on live workers are kept (up to that count);
//   3. missing copies are placed heaviest first, each on the least loaded live worker without one;
//   4. copies then move from the most to the least loaded worker while a move lowers the larger of
//      the two loads, each time the copy whose share is closest to half the gap.
// So a balanced layer moves nothing, a joining worker takes about its share, and a leaving worker's
// copies land where there is room. `load` gives the tokens of (layer, expert) in the statistics
// window (missing: 0); a layer without statistics counts as evenly loaded.
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
