// moemesh router and moemesh gateway: the two control roles started on their own, for a cluster
// over several nodes (`moemesh serve` runs both in one process). The router publishes itself on
// its control port; workers and gateways join it there.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <caf/io/all.hpp>
#include <iostream>

#include "actors/node.h"
#include "apps/commands.h"
#include "apps/flags.h"
#include "apps/role_common.h"

namespace moemesh::apps {
namespace {

struct RouterFlags {
  std::string model;
  std::string bind_host = "127.0.0.1";
  std::string advertise_host;
  uint16_t port = 7100;
  std::string cluster_token;
  int min_expert_workers = 1;
  int expert_replicas = 1;
  double capacity_factor = 0;
  ElasticFlags elastic;
};

int run_router(const RouterFlags& f) {
  auto fail = [](const std::string& message) {
    std::cerr << "moemesh router: error: " << message << "\n";
    return 1;
  };
  const sigset_t signals = block_stop_signals();
  const auto model_dir = model_dir_or_demo(f.model);
  Expected<ModelConfig> config = load_model_config(model_dir);
  if (!config) return fail(config.error().message());
  const std::string token = actors::cluster_token_from(f.cluster_token);
  if (token.empty())
    return fail("a cluster token is required: --cluster-token or MOEMESH_CLUSTER_TOKEN");
  std::string advertise = f.advertise_host;
  if (advertise.empty()) advertise = f.bind_host == "0.0.0.0" ? host_name() : f.bind_host;

  caf::actor_system_config cfg;
  actors::configure_control_plane(cfg);
  caf::actor_system system{cfg};
  actors::RouterOptions ro;
  ro.cluster_token = token;
  ro.model = model_dir.string();
  ro.config = *config;
  ro.expert_replicas = f.expert_replicas;
  ro.min_expert_workers = f.min_expert_workers;
  ro.capacity_factor = f.capacity_factor;
  f.elastic.apply(ro);
  Expected<StartedRouter> router = start_router(system, ro, f.bind_host, f.port, advertise);
  if (!router) return fail(router.error().message());
  std::cerr << fmt::format("moemesh router: workers join with --join {}\n", router->join);
  wait_for_stop(system, signals, caf::actor(), "");
  stop_router(system, *router);
  return 0;
}

struct GatewayFlags {
  std::string model;
  std::string join;
  std::string served_model_name;
  GatewayOptions gateway;
  int64_t max_model_len = 0;
  double join_timeout_s = 60;
  double shutdown_grace_s = 30;
};

int run_gateway(GatewayFlags f) {
  auto fail = [](const std::string& message) {
    std::cerr << "moemesh gateway: error: " << message << "\n";
    return 1;
  };
  const sigset_t signals = block_stop_signals();
  const auto model_dir = model_dir_or_demo(f.model);
  Expected<gateway::ServedModel> served =
      load_served_model(model_dir, f.served_model_name, f.max_model_len);
  if (!served) return fail(served.error().message());

  caf::actor_system_config cfg;
  actors::configure_control_plane(cfg);
  caf::actor_system system{cfg};
  Expected<std::unique_ptr<Gateway>> gw = Gateway::start(system, f.gateway);
  if (!gw) return fail(gw.error().message());
  Expected<actors::router_actor> router = actors::connect_router(
      system, f.join, std::chrono::milliseconds(static_cast<int64_t>(f.join_timeout_s * 1000)));
  if (!router) return fail(router.error().message());
  (*gw)->set_router(*router);
  (*gw)->serve_model(std::move(*served), caf::actor_cast<actors::engine_actor>(*router));
  std::cerr << fmt::format("moemesh gateway: listening on http://{}:{}, router {}\n",
                           f.gateway.host, (*gw)->port(), f.join);
  const bool clean = wait_for_stop(system, signals, caf::actor_cast<caf::actor>(*router), "router");
  (*gw)->shutdown(
      std::chrono::milliseconds(clean ? static_cast<int64_t>(f.shutdown_grace_s * 1000) : 0));
  return clean ? 0 : 1;
}

}  // namespace

Runner add_router(CLI::App& app) {
  auto f = std::make_shared<RouterFlags>();
  app.add_option("--model", f->model,
                 "Checkpoint directory (its config.json; default: the built-in demo model)");
  app.add_option("--bind-host", f->bind_host, "Interface of the control port")
      ->capture_default_str();
  app.add_option("--advertise-host", f->advertise_host,
                 "Host name workers reach the router by (default: --bind-host, or this host's "
                 "name when binding 0.0.0.0)");
  app.add_option("--port", f->port, "Control port that workers join")->capture_default_str();
  app.add_option("--cluster-token", f->cluster_token,
                 "Shared secret of the cluster (default: $MOEMESH_CLUSTER_TOKEN)");
  app.add_option("--min-expert-workers", f->min_expert_workers,
                 "Expert workers to wait for before the first placement")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--expert-replicas", f->expert_replicas, "Copies of every expert")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--capacity-factor", f->capacity_factor,
                 "Per-expert, per-step capacity as a multiple of the even share (0: no limit)")
      ->check(CLI::Range(0.0, 1e6))
      ->capture_default_str();
  f->elastic.add(app);
  return [f] { return run_router(*f); };
}

Runner add_gateway(CLI::App& app) {
  auto f = std::make_shared<GatewayFlags>();
  app.add_option("--join", f->join, "HOST:PORT of the router")->required();
  app.add_option("--model", f->model,
                 "Checkpoint directory (tokenizer and chat template; default: the demo model)");
  app.add_option("--served-model-name", f->served_model_name,
                 "Model id clients use (default: the folder's name)");
  add_http_flags(app, f->gateway);
  app.add_option("--max-model-len", f->max_model_len,
                 "Cap on prompt + completion tokens (0: the model's)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 32));
  app.add_option("--join-timeout", f->join_timeout_s, "Seconds to keep trying to reach the router")
      ->check(CLI::Range(0.0, 3600.0))
      ->capture_default_str();
  app.add_option("--shutdown-grace", f->shutdown_grace_s,
                 "Seconds SIGTERM waits for requests in flight")
      ->check(CLI::Range(0.0, 3600.0))
      ->capture_default_str();
  return [f] { return run_gateway(*f); };
}

}  // namespace moemesh::apps
