// The admin routes of the gateway, answered from the router's snapshots.
//
//   GET  /admin/cluster   ClusterSnapshot (proto/cluster.proto) as JSON: nodes, roles, state, the
//                         "join" address, placement version, readiness
//   GET  /admin/experts   ExpertsSnapshot as JSON: per layer and expert, the workers holding it and
//                         its token, overflow and drop counters; balancedness per layer
//   POST /admin/capacity  {"capacity_factor": 1.25} sets the expert workers' capacity factor
//                         (0: no limit)
//   POST /admin/drain     {"worker": "NAME or worker id"} moves an expert worker's experts to the
//                         others, then publishes a placement without it
//   POST /admin/rebalance {"min_balancedness": 0.9} (optional; default 1: always when it helps)
//                         re-packs the experts over the expert workers by their recent load
// The POST routes need "Authorization: Bearer <admin token>".
//
// /admin/cluster lists every actor with its status (proto ActorStatus): the gateway's own first,
// then the router's, every worker's, and workers lost in the last minutes.
//
// JSON comes from protobuf's JSON mapping (field names as in the .proto files). Without a router
// (a single-process server) the GET routes describe that one process.
#pragma once

#include <functional>
#include <string>
#include <string_view>

#include "actors/cluster_interface.h"
#include "proto/cluster.pb.h"

namespace moemesh::gateway {

struct AdminReply {
  unsigned status = 200;
  std::string body;  // JSON
};

struct AdminContext {
  caf::actor_system* system = nullptr;
  actors::router_actor router;  // null: no cluster
  std::string admin_token;      // empty: admin actions are refused
  std::string single_process_model;
  std::function<proto::ActorStatus()> gateway_status;  // the gateway's own status (may be empty)
};

bool is_admin_path(std::string_view path);

// Constant-time comparison of a secret (API key, admin token), so that response timing does not
// reveal it.
bool same_secret(std::string_view a, std::string_view b);

// Answers one admin request; `done` is called exactly once, possibly on another thread.
void handle_admin(const AdminContext& ctx, bool post, std::string_view path,
                  std::string_view authorization, const std::string& body,
                  std::function<void(AdminReply)> done);

}  // namespace moemesh::gateway
