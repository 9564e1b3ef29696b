// moemesh attention: an attention worker joining a cluster. It loads every tensor but the routed
// experts, runs the engine, and sends each MoE layer's tokens to the expert workers of the
// router's placement over the UCX data plane.
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <caf/io/all.hpp>
#include <iostream>

#include "actors/node.h"
#include "apps/commands.h"
#include "apps/flags.h"
#include "apps/role_common.h"
#include "attention_worker/attention_actor.h"

namespace moemesh::apps {
namespace {

struct AttentionFlags {
  WorkerFlags worker;
  EngineFlags engine;
  RemoteExpertFlags remote;
  DeviceFlags device;
};

int run_attention(const AttentionFlags& f) {
  auto fail = [](const std::string& message) {
    std::cerr << "moemesh attention: error: " << message << "\n";
    return 1;
  };
  if (std::string e = f.device.conflict(f.engine.options()); !e.empty()) return fail(e);
  Expected<CpuList> cpus = bind_process_cpus(f.worker.cpus);
  if (!cpus) return fail(cpus.error().message());
  const sigset_t signals = block_stop_signals();
  const auto model_dir = model_dir_or_demo(f.worker.model);

  ModelOptions mo;
  mo.threads = f.worker.threads;
  mo.cpus = *cpus;
  mo.routed_experts = false;
  f.device.apply(mo, f.engine.options());
  Expected<std::unique_ptr<Model>> model = Model::load(model_dir, mo);
  if (!model) return fail(model.error().message());
  const ModelConfig config = (*model)->config();

  RemoteExpertsOptions ro;
  ro.data_plane.transports = f.worker.transports;
  ro.data_plane.net_devices = f.worker.net_devices;
  ro.data_plane.token = actors::cluster_token_from(f.worker.cluster_token);
  ro.data_plane.faults = fault_spec_from_environment();
  ro.data_plane.node_name = f.worker.name;
  ro.data_plane.bf16_views = true;  // a bf16 wire's bits reach the worker unconverted
  ro.data_plane.dtype =
      f.remote.wire_dtype == "bf16" ? transport::WireDtype::BF16 : transport::WireDtype::F32;
  ro.timeout = std::chrono::milliseconds(static_cast<int64_t>(f.remote.dispatch_timeout_ms));
  ro.device_rows = f.remote.from_gpu_memory == "auto";
  Expected<std::unique_ptr<RemoteExperts>> remote = RemoteExperts::create(config, ro);
  if (!remote) return fail(remote.error().message());
  (*model)->set_expert_backend(remote->get());

  Expected<std::unique_ptr<Engine>> started = Engine::start(std::move(*model), f.engine.options());
  if (!started) return fail(started.error().message());
  std::unique_ptr<Engine> engine = std::move(*started);

  caf::actor_system_config cfg;
  actors::configure_control_plane(cfg);
  caf::actor_system system{cfg};
  actors::attention_actor self = spawn_attention_actor(system, engine.get(), remote->get());

  const proto::NodeInfo info = f.worker.node_info("attention", model_dir, config);
  Expected<actors::Joined> joined = actors::join_cluster(system, f.worker.join_options(), info,
                                                         caf::actor_cast<caf::actor>(self));
  if (!joined) {
    caf::anon_send_exit(self, caf::exit_reason::user_shutdown);
    engine.reset();
    return fail(joined.error().message());
  }
  if (joined->reply.placement().version() > 0) (*remote)->set_placement(joined->reply.placement());
  std::cerr << fmt::format("moemesh attention: joined {} as worker {} ({})\n", f.worker.join,
                           joined->reply.worker_id(), info.name());

  const bool clean =
      wait_for_stop(system, signals, caf::actor_cast<caf::actor>(joined->router), "router");
  actors::leave_cluster(system, *joined);
  caf::anon_send_exit(self, caf::exit_reason::user_shutdown);
  engine.reset();
  return clean ? 0 : 1;
}

}  // namespace

Runner add_attention(CLI::App& app) {
  auto f = std::make_shared<AttentionFlags>();
  f->worker.add(app);
  f->engine.add(app);
  f->remote.add(app);
  f->device.add(app);
  return [f] { return run_attention(*f); };
}

}  // namespace moemesh::apps
