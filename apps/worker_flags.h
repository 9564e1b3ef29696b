// Flags every worker role (attention, expert) takes to join a cluster.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "actors/node.h"
#include "transport/data_plane.h"

namespace moemesh::apps {

struct WorkerFlags {
  std::string model;
  std::string join;
  std::string cluster_token;
  std::string bind_host = "127.0.0.1";
  uint16_t control_port = 0;
  double join_timeout_s = 60;
  int threads = 0;
  std::string transports;
  std::string net_devices;
  std::string name;

  void add(CLI::App& app) {
    app.add_option("--join", join, "HOST:PORT of the router (see /admin/cluster \"join\")")
        ->required();
    app.add_option("--model", model,
                   "Hugging Face checkpoint directory (default: the built-in demo model)");
    app.add_option("--cluster-token", cluster_token,
                   "Shared secret of the cluster (default: $MOEMESH_CLUSTER_TOKEN)");
    app.add_option("--bind-host", bind_host, "Interface of this node's control port")
        ->capture_default_str();
    app.add_option("--control-port", control_port, "This node's control port (0: any)");
    app.add_option("--join-timeout", join_timeout_s, "Seconds to keep trying to reach the router")
        ->check(CLI::Range(0.0, 3600.0))
        ->capture_default_str();
    app.add_option("--threads", threads, "Compute threads (0: one per hardware thread)")
        ->check(CLI::Range(0, 4096));
    app.add_option("--transports", transports,
                   "UCX transports of the data plane (UCX_TLS), e.g. tcp or sm,self (default: "
                   "UCX's choice)");
    app.add_option("--net-devices", net_devices,
                   "Network devices of the data plane (UCX_NET_DEVICES), e.g. eth0");
    app.add_option("--name", name, "Node name shown in /admin/cluster (default: ROLE-PID@HOST)");
  }

  actors::JoinOptions join_options() const {
    actors::JoinOptions o;
    o.join = join;
    o.cluster_token = actors::cluster_token_from(cluster_token);
    o.bind_host = bind_host;
    o.control_port = control_port;
    o.timeout = std::chrono::milliseconds(static_cast<int64_t>(join_timeout_s * 1000));
    return o;
  }
};

}  // namespace moemesh::apps
