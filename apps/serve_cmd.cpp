// moemesh serve: a whole cluster on this machine. This process runs the gateway and the router;
// the attention and expert workers run as their own processes (`moemesh attention ...`,
// `moemesh expert ...`) that join it over loopback. --single-process keeps the engine and its
// experts in this process instead. The HTTP port opens first; /health answers 503 until the
// cluster can serve.
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <atomic>
#include <caf/io/all.hpp>
#include <iostream>
#include <random>
#include <thread>

#include "actors/node.h"
#include "apps/children.h"
#include "apps/commands.h"
#include "apps/flags.h"
#include "apps/role_common.h"
#include "attention_worker/engine_actor.h"
#include "kernels/cpu/thread_pool.h"
#include "proto/cluster.pb.h"

namespace moemesh::apps {
namespace {

namespace fs = std::filesystem;

struct ServeFlags {
  std::string model;
  std::string served_model_name;
  GatewayOptions gateway;
  EngineFlags engine;
  RemoteExpertFlags remote;
  DeviceFlags device;
  int threads = 0;
  std::string cpus = "auto";
  double shutdown_grace_s = 30;
  bool single_process = false;
  int attention_workers = 1;
  int expert_workers = 2;
  int expert_threads = 0;
  int expert_replicas = 1;
  double capacity_factor = 0;
  ElasticFlags elastic;
  std::string cluster_token;
  uint16_t control_port = 0;
  std::string transports;
  std::string net_devices = "lo";  // every role is on this machine
};

std::string random_token() {
  std::random_device rd;
  std::string s;
  for (int i = 0; i < 32; ++i) s += "0123456789abcdef"[rd() & 15];
  return s;
}

int fail(const std::string& message) {
  std::cerr << "moemesh serve: error: " << message << "\n";
  return 1;
}

// Lets the requests in flight finish for up to grace_s; a second SIGINT or SIGTERM meanwhile
// cancels them at once (as a second Ctrl-C does).
void drain(Gateway& gw, const sigset_t& signals, int sig, double grace_s) {
  std::cerr << fmt::format(
      "moemesh serve: {} received, draining requests (up to {} s; a second signal cancels them)\n",
      sig == SIGTERM ? "SIGTERM" : "SIGINT", grace_s);
  std::atomic<bool> drained{false};
  std::thread second([&] {
    const timespec tick{0, 100'000'000};
    while (!drained.load()) {
      siginfo_t info;
      const int got = sigtimedwait(&signals, &info, &tick);
      if (got == SIGTERM || got == SIGINT) {
        std::cerr << fmt::format(
            "moemesh serve: {} received again, cancelling the requests in "
            "flight\n",
            got == SIGTERM ? "SIGTERM" : "SIGINT");
        gw.end_grace();
        return;
      }
    }
  });
  gw.shutdown(std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000)));
  drained = true;
  second.join();
}

int run_single_process(ServeFlags f, const fs::path& model_dir, const sigset_t& signals,
                       const CpuList& cpus) {
  caf::actor_system_config cfg;
  cfg.set("scheduler.max-threads", 2);
  caf::actor_system system{cfg};

  Expected<std::unique_ptr<Gateway>> gw = Gateway::start(system, f.gateway);
  if (!gw) return fail(gw.error().message());
  std::cerr << fmt::format("moemesh serve: listening on http://{}:{} (loading {})\n",
                           f.gateway.host, (*gw)->port(), model_dir.string());

  ModelOptions mo;
  mo.threads = f.threads;
  mo.cpus = cpus;
  f.device.apply(mo, f.engine.options());
  Expected<std::unique_ptr<Model>> model = Model::load(model_dir, mo);
  if (!model) return fail(model.error().message());
  Expected<gateway::ServedModel> served =
      load_served_model(model_dir, f.served_model_name, f.engine.engine.max_model_len);
  if (!served) return fail(served.error().message());

  Expected<std::unique_ptr<Engine>> started = Engine::start(std::move(*model), f.engine.options());
  if (!started) return fail(started.error().message());
  std::unique_ptr<Engine> engine = std::move(*started);
  served->max_model_len = engine->max_model_len();
  actors::engine_actor engine_actor = spawn_engine_actor(system, engine.get());
  (*gw)->serve_model(std::move(*served), engine_actor);
  std::cerr << fmt::format("moemesh serve: ready, serving {} on http://{}:{} (single process)\n",
                           model_dir.string(), f.gateway.host, (*gw)->port());

  int sig = 0;
  sigwait(&signals, &sig);
  drain(**gw, signals, sig, f.shutdown_grace_s);
  caf::anon_send_exit(engine_actor, caf::exit_reason::user_shutdown);
  engine.reset();
  return 0;
}

int run_cluster(ServeFlags f, const fs::path& model_dir, const sigset_t& signals) {
  // The CPUs of each role: attention workers first, then expert workers (empty: not bound).
  Expected<std::vector<CpuList>> placement =
      plan_role_cpus(f.cpus, kernels::allowed_cpus(), f.attention_workers, f.expert_workers);
  if (!placement) return fail(placement.error().message());
  Expected<ModelConfig> config = load_model_config(model_dir);
  if (!config) return fail(config.error().message());
  Expected<gateway::ServedModel> served =
      load_served_model(model_dir, f.served_model_name, f.engine.engine.max_model_len);
  if (!served) return fail(served.error().message());
  const std::string token = [&] {
    std::string t = actors::cluster_token_from(f.cluster_token);
    return t.empty() ? random_token() : t;
  }();

  caf::actor_system_config cfg;
  actors::configure_control_plane(cfg);
  caf::actor_system system{cfg};

  Expected<std::unique_ptr<Gateway>> gw = Gateway::start(system, f.gateway);
  if (!gw) return fail(gw.error().message());

  actors::RouterOptions ro;
  ro.cluster_token = token;
  ro.model = served->root;
  ro.config = *config;
  ro.expert_replicas = std::min(f.expert_replicas, std::max(1, f.expert_workers));
  ro.min_expert_workers = std::max(1, f.expert_workers);
  ro.capacity_factor = f.capacity_factor;
  f.elastic.apply(ro);
  Expected<StartedRouter> router = start_router(system, ro, "127.0.0.1", f.control_port, "");
  if (!router) return fail(router.error().message());
  (*gw)->set_router(router->router);
  (*gw)->serve_model(std::move(*served), caf::actor_cast<actors::engine_actor>(router->router));
  std::cerr << fmt::format(
      "moemesh serve: listening on http://{}:{}; cluster join address {} (starting {} attention "
      "and {} expert workers on {})\n",
      f.gateway.host, (*gw)->port(), router->join, f.attention_workers, f.expert_workers,
      model_dir.string());

  Children children;
  const std::map<std::string, std::string> env = {{"MOEMESH_CLUSTER_TOKEN", token}};
  std::string level(spdlog::level::to_string_view(spdlog::get_level()).data());
  if (level == "warning") level = "warn";  // the flag's spelling
  auto role_cpus = [&](int role) {
    return placement->empty() ? std::string() : format_cpu_list((*placement)[role]);
  };
  auto common = [&](const std::string& role, int threads, const std::string& cpus) {
    // The role comes first, so `ps` shows `moemesh expert ...`.
    std::vector<std::string> a = {role,      "--log-level",     level, "--join", router->join,
                                  "--model", model_dir.string()};
    a.insert(a.end(), {"--threads", std::to_string(threads)});
    if (!cpus.empty()) a.insert(a.end(), {"--cpus", cpus});
    if (!f.transports.empty()) a.insert(a.end(), {"--transports", f.transports});
    if (!f.net_devices.empty()) a.insert(a.end(), {"--net-devices", f.net_devices});
    return a;
  };
  for (int i = 0; i < f.expert_workers; ++i) {
    const std::string cpus = role_cpus(f.attention_workers + i);
    spdlog::info("role placement role=expert-{} cpus={}", i, cpus.empty() ? "any" : cpus);
    auto a = common("expert", f.expert_threads, cpus);
    a.insert(a.end(), {"--name", fmt::format("expert-{}", i), "--device", f.device.device,
                       "--quantization", f.device.quantization});
    if (Expected<pid_t> pid = children.start(a, env); !pid) return fail(pid.error().message());
  }
  for (int i = 0; i < f.attention_workers; ++i) {
    const std::string cpus = role_cpus(i);
    spdlog::info("role placement role=attention-{} cpus={}", i, cpus.empty() ? "any" : cpus);
    auto a = common("attention", f.threads, cpus);
    a.insert(a.end(), {"--name", fmt::format("attention-{}", i), "--wire-dtype",
                       f.remote.wire_dtype, "--dispatch-from-gpu-memory", f.remote.from_gpu_memory,
                       "--dispatch-timeout-ms", fmt::format("{}", f.remote.dispatch_timeout_ms),
                       "--device", f.device.device, "--grouped-gemm", f.device.grouped_gemm,
                       "--tensor-parallel-size", std::to_string(f.device.tensor_parallel_size),
                       "--quantization", f.device.quantization});
    const std::vector<std::string> engine_args = f.engine.args();
    a.insert(a.end(), engine_args.begin(), engine_args.end());
    if (Expected<pid_t> pid = children.start(a, env); !pid) return fail(pid.error().message());
  }

  // Until the cluster is ready, a role process that fails ends serve with its reason (rather than
  // a server that never becomes healthy).
  int sig = 0;
  bool ready = false;
  caf::scoped_actor self{system};
  const timespec tick{0, 200'000'000};
  while (sig == 0) {
    siginfo_t info;
    const int got = sigtimedwait(&signals, &info, ready ? nullptr : &tick);
    if (got > 0) {
      sig = got;
      break;
    }
    if (ready) continue;
    // Once /health has said 200 (clients may act on it), a role that ends is the cluster's
    // business (the router replaces it), not a failed start: only poll on from here.
    ready = (*gw)->has_been_ready();
    if (const std::string failure = children.first_failure(); !ready && !failure.empty()) {
      std::cerr << "moemesh serve: error: a role process failed before the cluster was ready: "
                << failure << "; its log lines are above (--log-level info shows more)\n";
      (*gw)->shutdown(std::chrono::milliseconds(0));
      children.stop_all(std::chrono::seconds(5));
      stop_router(system, *router);
      return 1;
    }
    if (!ready)
      self->request(router->router, actors::kStatusTimeout, actors::cluster_atom::value)
          .receive(
              [&](const std::string& bytes) {
                proto::ClusterSnapshot snap;
                ready = snap.ParseFromString(bytes) && snap.ready();
              },
              [](caf::error&) {});
    if (ready)
      std::cerr << fmt::format("moemesh serve: ready, serving {} on http://{}:{}\n",
                               model_dir.string(), f.gateway.host, (*gw)->port());
  }
  drain(**gw, signals, sig, f.shutdown_grace_s);
  children.stop_all(std::chrono::seconds(5));
  stop_router(system, *router);
  return 0;
}

int run_serve(ServeFlags f) {
  const fs::path model_dir = model_dir_or_demo(f.model);
  if (std::string e = f.device.conflict(f.engine.options()); !e.empty()) return fail(e);
  CpuList cpus;  // --single-process: bound only to an explicit list, before any thread starts
  if (f.single_process && f.cpus != "auto" && f.cpus != "nobind") {
    Expected<CpuList> bound = bind_process_cpus(f.cpus);
    if (!bound) return fail(bound.error().message());
    cpus = std::move(*bound);
  }
  // SIGTERM and SIGINT are taken by sigwait(); block them before any thread starts.
  const sigset_t signals = block_stop_signals();
  return f.single_process ? run_single_process(std::move(f), model_dir, signals, cpus)
                          : run_cluster(std::move(f), model_dir, signals);
}

}  // namespace

Runner add_serve(CLI::App& app) {
  auto f = std::make_shared<ServeFlags>();
  app.add_option("--model", f->model,
                 "Hugging Face checkpoint directory (default: the built-in demo model)");
  app.add_option("--served-model-name", f->served_model_name,
                 "Model id clients use (default: the folder's name)");
  add_http_flags(app, f->gateway);
  app.add_flag("--single-process", f->single_process,
               "Run the engine and its experts in this process");
  app.add_option("--attention-workers", f->attention_workers, "Attention worker processes")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  app.add_option("--expert-workers", f->expert_workers, "Expert worker processes")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--expert-replicas", f->expert_replicas,
                 "Copies of every expert over the expert workers")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--capacity-factor", f->capacity_factor,
                 "Per-expert, per-step token capacity as a multiple of the even share (0: no "
                 "limit, no token dropped)")
      ->check(CLI::Range(0.0, 1e6))
      ->capture_default_str();
  f->elastic.add(app);
  app.add_option("--expert-threads", f->expert_threads,
                 "Compute threads of each expert worker (0: one per CPU it is bound to, see "
                 "--cpus, else one per CPU the process may use)")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str();
  app.add_option("--cluster-token", f->cluster_token,
                 "Shared secret workers join with (default: $MOEMESH_CLUSTER_TOKEN, else random)");
  app.add_option("--control-port", f->control_port,
                 "Port of the router that workers join (0: any free port)");
  app.add_option("--transports", f->transports,
                 "UCX transports of the data plane (UCX_TLS), e.g. tcp or sm,self");
  app.add_option("--net-devices", f->net_devices,
                 "Network devices of the data plane (UCX_NET_DEVICES); the roles of serve all run "
                 "here, so loopback by default (\"\": UCX's choice)")
      ->capture_default_str();
  f->remote.add(app);
  f->engine.add(app);
  f->device.add(app);
  app.add_option("--threads", f->threads,
                 "Compute threads of the engine, or of each attention worker (0: one per CPU the "
                 "process is bound to, else one per CPU the process may use)")
      ->check(CLI::Range(0, 4096));
  app.add_option("--cpus", f->cpus,
                 "How the role processes share this machine's CPUs: auto (each its own block of "
                 "CPUs, its compute threads pinned one per CPU; with fewer CPUs than roles, as "
                 "nobind), nobind (every role on every CPU), "
                 "or one taskset-style list per role separated by '|', attention workers first "
                 "(e.g. \"0-7|8-11|12-15\"). With --single-process: a CPU list binds the process, "
                 "auto and nobind leave it unbound")
      ->capture_default_str();
  app.add_option("--shutdown-grace", f->shutdown_grace_s,
                 "Seconds SIGTERM waits for requests in flight")
      ->check(CLI::Range(0.0, 3600.0))
      ->capture_default_str();
  return [f] { return run_serve(*f); };
}

}  // namespace moemesh::apps
