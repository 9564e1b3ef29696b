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
#include "apps/role_common.h"
#include "apps/worker_flags.h"
#include "attention_worker/attention_actor.h"

namespace moemesh::apps {
namespace {

struct AttentionFlags {
  WorkerFlags worker;
  EngineOptions engine;
  double kv_cache_gib = 2.0;
  double dispatch_timeout_ms = 1000;
  std::string wire_dtype = "f32";
};

int run_attention(const AttentionFlags& f) {
  auto fail = [](const std::string& message) {
    std::cerr << "moemesh attention: error: " << message << "\n";
    return 1;
  };
  const sigset_t signals = block_stop_signals();
  const auto model_dir = model_dir_or_demo(f.worker.model);

  ModelOptions mo;
  mo.threads = f.worker.threads;
  mo.routed_experts = false;
  Expected<std::unique_ptr<Model>> model = Model::load(model_dir, mo);
  if (!model) return fail(model.error().message());
  const ModelConfig config = (*model)->config();

  RemoteExpertsOptions ro;
  ro.data_plane.transports = f.worker.transports;
  ro.data_plane.net_devices = f.worker.net_devices;
  ro.data_plane.dtype =
      f.wire_dtype == "bf16" ? transport::WireDtype::BF16 : transport::WireDtype::F32;
  ro.timeout = std::chrono::milliseconds(static_cast<int64_t>(f.dispatch_timeout_ms));
  Expected<std::unique_ptr<RemoteExperts>> remote = RemoteExperts::create(config, ro);
  if (!remote) return fail(remote.error().message());
  (*model)->set_expert_backend(remote->get());

  EngineOptions eo = f.engine;
  eo.kv_cache_bytes = static_cast<int64_t>(f.kv_cache_gib * double(int64_t{1} << 30));
  std::unique_ptr<Engine> engine = Engine::start(std::move(*model), eo);

  caf::actor_system_config cfg;
  cfg.load<caf::io::middleman>();
  cfg.set("scheduler.max-threads", 2);
  actors::configure_control_plane(cfg);
  caf::actor_system system{cfg};
  actors::attention_actor self = spawn_attention_actor(system, engine.get(), remote->get());

  proto::NodeInfo info;
  info.set_role("attention");
  info.set_name(f.worker.name.empty() ? node_name("attention") : f.worker.name);
  info.set_host(host_name());
  info.set_pid(getpid());
  info.set_model(model_dir.string());
  info.set_model_fingerprint(actors::model_fingerprint(config));
  info.set_threads(f.worker.threads);
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
  app.add_option("--max-num-seqs", f->engine.max_num_seqs, "Sequences decoded together")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--max-model-len", f->engine.max_model_len,
                 "Cap on prompt + completion tokens (0: the model's)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 32));
  app.add_option("--kv-cache-gib", f->kv_cache_gib, "Memory for the KV cache, GiB")
      ->check(CLI::Range(0.001, 4096.0))
      ->capture_default_str();
  app.add_option("--dispatch-timeout-ms", f->dispatch_timeout_ms,
                 "Deadline of one MoE layer's round trip to the expert workers")
      ->check(CLI::Range(1.0, 600000.0))
      ->capture_default_str();
  app.add_option("--wire-dtype", f->wire_dtype,
                 "Hidden states on the data plane: f32 (exact) or bf16 (half the bytes)")
      ->check(CLI::IsMember({"f32", "bf16"}))
      ->capture_default_str();
  return [f] { return run_attention(*f); };
}

}  // namespace moemesh::apps
