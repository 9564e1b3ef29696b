// What the role subcommands share: the demo model's location, the model description the gateway
// serves, stop signals, and waiting for a stop (a signal, or the loss of the router).
#pragma once

#include <signal.h>

#include <filesystem>
#include <string>

#include "actors/cluster_interface.h"
#include "core/core.h"
#include "gateway/gateway.h"

namespace moemesh::apps {

// The built-in demo model: models/demo of the source tree the binary was built from
// (build/bin/moemesh -> models/demo), or $MOEMESH_DEMO_MODEL.
std::filesystem::path demo_model_dir();

// --model, or the demo model when empty.
std::filesystem::path model_dir_or_demo(const std::string& flag);

// Tokenizer, chat template and limits of the model the gateway serves.
Expected<gateway::ServedModel> load_served_model(const std::filesystem::path& dir,
                                                 const std::string& served_model_name,
                                                 int64_t max_model_len);

// Blocks SIGTERM and SIGINT in this thread and every thread started after it (call first).
sigset_t block_stop_signals();

// Waits for SIGTERM or SIGINT (returns true; the signal in *received), or for the actor `watched`
// to go down (returns false; `what` names it in the log).
bool wait_for_stop(caf::actor_system& system, const sigset_t& signals, const caf::actor& watched,
                   const std::string& what, int* received = nullptr);

// --cpus of a process: binds this process to the list (call before it starts any thread, so that
// every thread inherits it) and returns it for the compute pool; an empty flag binds nothing.
Expected<CpuList> bind_process_cpus(const std::string& flag);

// "ROLE-PID@HOST"
std::string node_name(const std::string& role);
std::string host_name();

// The data-plane fault-injection spec of a test build: MOEMESH_FAULTS, or "" when unset
// (transport/detail/faults.h; a build without fault injection refuses a non-empty one).
std::string fault_spec_from_environment();

}  // namespace moemesh::apps

#include "actors/router.h"

namespace moemesh::apps {

struct StartedRouter {
  actors::router_actor router;
  std::string join;  // HOST:PORT workers join
  uint16_t port = 0;
};

// Spawns the router and publishes it on bind_host:port (0: any free port). `advertise_host` is the
// host written into the join address (default: bind_host).
Expected<StartedRouter> start_router(caf::actor_system& system, actors::RouterOptions options,
                                     const std::string& bind_host, uint16_t port,
                                     const std::string& advertise_host);

// Unpublishes and stops the router (before the actor system shuts down).
void stop_router(caf::actor_system& system, StartedRouter& router);

}  // namespace moemesh::apps
