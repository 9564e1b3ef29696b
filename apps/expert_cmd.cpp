// moemesh expert: an expert worker joining a cluster. It maps the checkpoint, binds the routed
// experts the router assigns it, and computes the token batches attention workers send over the
// UCX data plane.
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <caf/io/all.hpp>
#include <csignal>
#include <iostream>
#include <thread>

#include "actors/introspection.h"
#include "actors/node.h"
#include "apps/commands.h"
#include "apps/flags.h"
#include "apps/role_common.h"
#include "expert_worker/expert_worker.h"
#include "proto/cluster.pb.h"

namespace moemesh::apps {
namespace {

struct ExpertFlags {
  WorkerFlags worker;
  double drain_timeout_s = 60;
  double window_s = 60;
  std::string device = "cpu";
  std::string quantization = "none";
};

actors::expert_actor spawn_expert_actor(caf::actor_system& system, ExpertWorker* worker) {
  return system.spawn(
      [](actors::expert_actor::pointer self,
         ExpertWorker* w) -> actors::expert_actor::behavior_type {
        auto counters = std::make_shared<actors::ActorCounters>();
        using actors::counted;
        return {
            counted(counters,
                    [w, counters](actors::assign_atom, const std::string& bytes) -> std::string {
                      proto::Assignment a;
                      Status s = a.ParseFromString(bytes) ? w->assign(a)
                                                          : Status(Error("malformed Assignment"));
                      if (!s) ++counters->errors;
                      return s ? std::string() : s.error().message();
                    }),
            counted(counters,
                    [w, counters](actors::release_atom, const std::string& bytes) -> std::string {
                      proto::Assignment a;
                      Status s = a.ParseFromString(bytes) ? w->release(a)
                                                          : Status(Error("malformed Assignment"));
                      if (!s) ++counters->errors;
                      return s ? std::string() : s.error().message();
                    }),
            counted(counters,
                    [self, w, counters](actors::status_atom) -> std::string {
                      proto::ActorStatus s = actors::actor_status(
                          *counters, "expert", "expert", self->id(), self->mailbox().size());
                      *s.mutable_expert() = w->stats();
                      return s.SerializeAsString();
                    }),
            counted(counters,
                    [w](actors::capacity_atom, double factor) { w->set_capacity_factor(factor); }),
        };
      },
      worker);
}

// SIGTERM: asks the router to move this worker's experts to the others and waits until a
// placement without it is published (then one more second, for the steps in flight), at most
// `timeout`. Refused (the last expert worker, an unknown worker) or unanswered: leaves at once.
void drain_before_leaving(caf::actor_system& system, const actors::router_actor& router,
                          const std::string& name, std::chrono::duration<double> timeout) {
  caf::scoped_actor self{system};
  std::string error = "no answer";
  self->request(router, std::chrono::seconds(5), actors::drain_atom::value, name)
      .receive([&](const std::string& e) { error = e; },
               [&](caf::error& e) { error = "no answer: " + system.render(e); });
  if (!error.empty()) {
    spdlog::warn("leaving without draining: {}", error);
    return;
  }
  std::cerr << "moemesh expert: draining (the router moves this worker's experts)\n";
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    std::string state;
    bool answered = false;
    self->request(router, std::chrono::seconds(2), actors::cluster_atom::value)
        .receive(
            [&](const std::string& bytes) {
              answered = true;
              proto::ClusterSnapshot s;
              if (!s.ParseFromString(bytes)) return;
              for (const proto::MemberSnapshot& m : s.members())
                if (m.name() == name) state = m.state();
            },
            [&](caf::error&) {});
    if (!answered) break;
    if (state == "drained") {
      std::this_thread::sleep_for(std::chrono::seconds(1));
      std::cerr << "moemesh expert: drained\n";
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  spdlog::warn("leaving before the drain finished (--drain-timeout)");
}

int run_expert(const ExpertFlags& f) {
  auto fail = [](const std::string& message) {
    std::cerr << "moemesh expert: error: " << message << "\n";
    return 1;
  };
  Expected<CpuList> cpus = bind_process_cpus(f.worker.cpus);
  if (!cpus) return fail(cpus.error().message());
  const sigset_t signals = block_stop_signals();
  const auto model_dir = model_dir_or_demo(f.worker.model);

  ExpertWorkerOptions wo;
  wo.threads = f.worker.threads;
  wo.cpus = *cpus;
  wo.device = f.device;
  wo.quantization = f.quantization;
  wo.data_plane.transports = f.worker.transports;
  wo.data_plane.net_devices = f.worker.net_devices;
  wo.data_plane.token = actors::cluster_token_from(f.worker.cluster_token);
  wo.data_plane.faults = fault_spec_from_environment();
  wo.data_plane.node_name = f.worker.name;
  wo.data_plane.bf16_views = true;  // a bf16 wire's bits reach the worker unconverted
  wo.window_seconds = f.window_s;
  Expected<std::unique_ptr<ExpertWorker>> worker = ExpertWorker::start(model_dir, wo);
  if (!worker) return fail(worker.error().message());

  caf::actor_system_config cfg;
  actors::configure_control_plane(cfg);
  caf::actor_system system{cfg};
  actors::expert_actor self = spawn_expert_actor(system, worker->get());

  proto::NodeInfo info = f.worker.node_info("expert", model_dir, (*worker)->config());
  info.set_data_address((*worker)->data_address());
  Expected<actors::Joined> joined = actors::join_cluster(system, f.worker.join_options(), info,
                                                         caf::actor_cast<caf::actor>(self));
  if (!joined) {
    caf::anon_send_exit(self, caf::exit_reason::user_shutdown);
    return fail(joined.error().message());
  }
  (*worker)->set_capacity_factor(joined->reply.capacity_factor());
  std::cerr << fmt::format("moemesh expert: joined {} as worker {} ({})\n", f.worker.join,
                           joined->reply.worker_id(), info.name());

  int sig = 0;
  const bool clean =
      wait_for_stop(system, signals, caf::actor_cast<caf::actor>(joined->router), "router", &sig);
  if (clean && sig == SIGTERM && f.drain_timeout_s > 0)
    drain_before_leaving(system, joined->router, info.name(),
                         std::chrono::duration<double>(f.drain_timeout_s));
  actors::leave_cluster(system, *joined);
  caf::anon_send_exit(self, caf::exit_reason::user_shutdown);
  return clean ? 0 : 1;
}

}  // namespace

Runner add_expert(CLI::App& app) {
  auto f = std::make_shared<ExpertFlags>();
  f->worker.add(app);
  app.add_option("--drain-timeout", f->drain_timeout_s,
                 "On SIGTERM, seconds to wait while the router moves this worker's experts "
                 "elsewhere (0: leave at once; SIGINT always leaves at once)")
      ->check(CLI::Range(0.0, 3600.0))
      ->capture_default_str();
  app.add_option("--stats-window", f->window_s, "Seconds of the sliding token-count window")
      ->check(CLI::Range(1.0, 86400.0))
      ->capture_default_str();
  app.add_option("--device", f->device,
                 "Where the experts compute: cpu, or cuda / cuda:N (a GPU; needs the CUDA backend)")
      ->capture_default_str();
  add_quantization_flag(app, f->quantization);
  return [f] { return run_expert(*f); };
}

}  // namespace moemesh::apps
