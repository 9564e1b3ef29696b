// The router: membership, expert placement, request placement and statistics of a cluster (see
// actors/cluster_interface.h for its interface).
//
// Membership: workers join with the cluster token (a wrong token or a different model is refused,
// logged and counted); the router monitors each worker's role actor and polls its status every
// `poll_interval` with a finite timeout. A worker whose status times out is shown "unreachable";
// one whose node is lost (CAF's down message, driven by BASP heartbeats) is removed.
//
// Expert placement: once `min_expert_workers` expert workers have joined, the router plans a
// placement (actors/placement.h) with `expert_replicas` copies of every expert, assigns each
// worker its experts, and — when every worker has bound them — publishes the placement with a new
// version to every attention worker. A lost expert worker is removed from the placement at once
// (attention workers then send its tokens to the other copies, or fail the requests that need an
// expert with no copy left), then the survivors bind the copies it held. Once a placement exists,
// every change of the pool (a worker joining, draining or lost) and every rebalance plans with
// plan_balanced over the statistics window: a joining worker takes its share, moving few copies;
// copies no longer placed are released after a grace period.
//
// Request placement: each submitted request goes to the attention worker with the fewest requests
// in flight (then the lowest KV usage). If that worker is lost, each of its requests ends with an
// "error" delta (marked unavailable) sent by the router, so no client waits forever.
#pragma once

#include <chrono>
#include <string>

#include "actors/cluster_interface.h"
#include "core/config.h"

namespace moemesh::actors {

struct RouterOptions {
  std::string cluster_token;
  std::string join_address;  // HOST:PORT that workers join (shown in /admin/cluster)
  std::string model;         // checkpoint directory (for the snapshot)
  ModelConfig config;
  int32_t expert_replicas = 1;
  int32_t min_expert_workers = 1;
  double capacity_factor = 0;
  std::chrono::milliseconds poll_interval{500};
  // Elastic pool (actors/placement.h, plan_balanced): spare copies per layer for the heaviest
  // experts; a rebalance every `rebalance_interval` (0: only on request) unless every layer's
  // worker balancedness is at least `rebalance_threshold`; copies a new placement no longer
  // uses are released `release_grace` after it is published (steps in flight finish first).
  int32_t redundant_experts = 0;
  std::chrono::milliseconds rebalance_interval{0};
  double rebalance_threshold = 0.9;
  std::chrono::milliseconds release_grace{3000};
};

// A short description of what must match between the router and a worker's checkpoint.
std::string model_fingerprint(const ModelConfig& config);

router_actor spawn_router(caf::actor_system& system, RouterOptions options);

}  // namespace moemesh::actors
