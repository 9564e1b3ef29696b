// What every process of a cluster does on the control plane: configure CAF's middleman (BASP
// heartbeats so a lost node is noticed within seconds), publish this node's directory actor, and
// join the router.
//
// join_cluster() BLOCKS (it uses CAF's blocking connect through a scoped actor with a timeout):
// call it from a process's main thread, never from inside an actor.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include "actors/cluster_interface.h"
#include "core/error.h"
#include "proto/cluster.pb.h"

namespace moemesh::actors {

// The actor system of a cluster process: CAF's network layer (middleman), 2 scheduler threads
// (the control plane is light; compute has its own threads), and heartbeats every 500 ms so a
// peer silent for 3 s is dropped (its actors go down).
void configure_control_plane(caf::actor_system_config& cfg);

// "HOST:PORT" (IPv4, a host name, or [IPv6]:PORT) -> (host, port).
Expected<std::pair<std::string, uint16_t>> parse_host_port(std::string_view text,
                                                           std::string_view flag);

// The cluster token from --cluster-token, else $MOEMESH_CLUSTER_TOKEN.
std::string cluster_token_from(const std::string& flag_value);

struct JoinOptions {
  std::string join;  // HOST:PORT of the router
  std::string cluster_token;
  std::string bind_host = "127.0.0.1";       // interface of this node's control port
  uint16_t control_port = 0;                 // 0: any free port
  std::chrono::milliseconds timeout{60000};  // keep trying to reach the router this long
};

struct Joined {
  router_actor router;
  proto::JoinReply reply;
  directory_actor directory;
  std::string directory_address;  // HOST:PORT
};

// Reaches the router at HOST:PORT, retrying until `timeout` (the router may still be starting).
Expected<router_actor> connect_router(caf::actor_system& system, const std::string& join,
                                      std::chrono::milliseconds timeout);

// Publishes the node's directory (answering status with `info`), reaches the router (retrying
// until the timeout: the router may still be starting) and joins it with `role`. Errors name the
// address and what to check; a refusal carries the router's reason.
Expected<Joined> join_cluster(caf::actor_system& system, const JoinOptions& options,
                              proto::NodeInfo info, const caf::actor& role);

// Stops the directory and closes its port (before the actor system shuts down).
void leave_cluster(caf::actor_system& system, Joined& joined);

}  // namespace moemesh::actors
