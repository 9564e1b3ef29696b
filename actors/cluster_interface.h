// The control-plane interfaces of the cluster roles, as typed CAF actors. Every payload that is
// more than a number travels as serialized protobuf bytes (proto/cluster.proto,
// proto/engine.proto), so the same interfaces work inside one process and across nodes through
// CAF's middleman; tensors never travel here (they use the UCX data plane, transport/).
//
// router_actor (one per cluster, published on the join port):
//   everything of engine_actor: the gateway submits requests to the router, which places each on
//       an attention worker (least loaded: requests in flight, then KV usage) and relays the
//       worker's answer; deltas go straight from the worker to the gateway's sink.
//   join(token, NodeInfo bytes, role actor) -> JoinReply bytes. A wrong token or a node serving
//       another model is refused, logged and counted. The router monitors the role actor: its
//       node's loss removes it from the placement (expert worker) or fails its requests cleanly
//       (attention worker).
//   done(request id): an attention worker finished a request (all its sequences ended).
//   cluster() -> ClusterSnapshot bytes; experts() -> ExpertsSnapshot bytes (the admin pages).
//   capacity(factor) -> "" or an error: sets the capacity factor of every expert worker.
//   drain(worker name or id) -> "" or an error: moves the worker's experts to the other expert
//       workers (they bind them, then a placement without it is published); it stays a member
//       ("draining", then holding nothing) until it leaves.
//   rebalance(min balancedness) -> RebalanceReply bytes: re-packs the experts over the expert
//       workers by their load in the statistics window (actors/placement.h, plan_balanced),
//       unless every layer's worker balancedness is already >= the given threshold.
//   status() -> ActorStatus bytes (its own, with RouterFigures).
//   release(version): its own timer: unbinds the copies placement `version` no longer uses.
//   tick: its own timer (status polling).
//   join(HOST:PORT): the address it is published at, once bound (shown as the snapshot's "join").
//
// attention_actor: everything of engine_actor, plus placement(Placement bytes) (takes effect at
//   the next step) and status() -> ActorStatus bytes with AttentionWorkerStats.
//
// expert_actor: assign(Assignment bytes) -> "" or an error (binds the experts, may take seconds),
//   release(Assignment bytes) -> "" or an error (unbinds experts the placement no longer uses),
//   status() -> ActorStatus bytes with ExpertWorkerStats, capacity(factor).
//
// Every actor counts the messages it handles and its errors (actors/introspection.h), and the
// router's cluster() snapshot lists them all with their last status.
//
// directory_actor (one per node, published on the node's control port): status() -> NodeInfo
//   bytes; monitoring it is the node's liveness signal.
//
// Every request across nodes has a finite timeout (the constants below); every remote actor a
// role depends on is monitored.
#pragma once

#include <caf/all.hpp>
#include <chrono>
#include <string>

#include "actors/engine_interface.h"

namespace moemesh::actors {

using join_atom = caf::atom_constant<caf::atom("join")>;
using done_atom = caf::atom_constant<caf::atom("done")>;
using cluster_atom = caf::atom_constant<caf::atom("cluster")>;
using experts_atom = caf::atom_constant<caf::atom("experts")>;
using capacity_atom = caf::atom_constant<caf::atom("capacity")>;
using placement_atom = caf::atom_constant<caf::atom("placement")>;
using assign_atom = caf::atom_constant<caf::atom("assign")>;
using status_atom = caf::atom_constant<caf::atom("status")>;
using tick_atom = caf::atom_constant<caf::atom("tick")>;
using drain_atom = caf::atom_constant<caf::atom("drain")>;
using rebalance_atom = caf::atom_constant<caf::atom("rebalance")>;
using release_atom = caf::atom_constant<caf::atom("release")>;

using router_actor = engine_actor::extend<
    caf::replies_to<join_atom, std::string, std::string, caf::actor>::with<std::string>,
    caf::reacts_to<done_atom, std::string>, caf::replies_to<cluster_atom>::with<std::string>,
    caf::replies_to<experts_atom>::with<std::string>,
    caf::replies_to<capacity_atom, double>::with<std::string>, caf::reacts_to<tick_atom>,
    caf::reacts_to<join_atom, std::string>,
    caf::replies_to<drain_atom, std::string>::with<std::string>,
    caf::replies_to<rebalance_atom, double>::with<std::string>,
    caf::replies_to<status_atom>::with<std::string>, caf::reacts_to<release_atom, uint64_t>>;

using attention_actor = engine_actor::extend<caf::reacts_to<placement_atom, std::string>,
                                             caf::replies_to<status_atom>::with<std::string>>;

using expert_actor = caf::typed_actor<caf::replies_to<assign_atom, std::string>::with<std::string>,
                                      caf::replies_to<release_atom, std::string>::with<std::string>,
                                      caf::replies_to<status_atom>::with<std::string>,
                                      caf::reacts_to<capacity_atom, double>>;

using directory_actor = caf::typed_actor<caf::replies_to<status_atom>::with<std::string>>;

// Timeouts of remote requests.
inline constexpr std::chrono::seconds kJoinTimeout{10};
inline constexpr std::chrono::seconds kStatusTimeout{1};
inline constexpr std::chrono::seconds kAssignTimeout{300};  // binding experts of a large model

// An error reply of submit that starts with this means "no capacity now, retry": the gateway
// answers 503 instead of 400.
inline constexpr std::string_view kUnavailable = "unavailable: ";

}  // namespace moemesh::actors
