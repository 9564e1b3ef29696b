#include "apps/role_common.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <fmt/format.h>
#include <atomic>
#include <cstdlib>
#include <ctime>

#include "kernels/cpu/thread_pool.h"

namespace moemesh::apps {

namespace fs = std::filesystem;

fs::path demo_model_dir() {
  if (const char* env = std::getenv("MOEMESH_DEMO_MODEL")) return env;
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (fs::path dir = exe.parent_path(); !dir.empty() && dir != dir.root_path();
         dir = dir.parent_path())
      if (fs::exists(dir / "models/demo/config.json")) return dir / "models/demo";
  }
  return "models/demo";
}

Expected<CpuList> bind_process_cpus(const std::string& flag) {
  if (flag.empty()) return CpuList{};
  Expected<CpuList> cpus = parse_cpu_list(flag, kernels::allowed_cpus());
  if (!cpus) return cpus.error();
  if (!kernels::bind_current_thread(*cpus))
    return Error(fmt::format("--cpus {}: the system refused to bind this process to them",
                             format_cpu_list(*cpus)));
  return cpus;
}

fs::path model_dir_or_demo(const std::string& flag) {
  return flag.empty() ? demo_model_dir() : fs::path(flag);
}

Expected<gateway::ServedModel> load_served_model(const fs::path& dir,
                                                 const std::string& served_model_name,
                                                 int64_t max_model_len) {
  Expected<ModelConfig> config = load_model_config(dir);
  if (!config) return config.error();
  Expected<std::shared_ptr<const Tokenizer>> tokenizer = Tokenizer::load(dir / "tokenizer.json");
  if (!tokenizer) return tokenizer.error();
  std::shared_ptr<const ChatTemplateConfig> chat;
  if (Expected<ChatTemplateConfig> ct = load_chat_template(dir); ct) {
    chat = std::make_shared<const ChatTemplateConfig>(std::move(*ct));
  } else {
    spdlog::warn("no usable chat template, /v1/chat/completions is off: {}", ct.error().message());
  }
  gateway::ServedModel served;
  std::error_code ec;
  const fs::path canonical = fs::canonical(dir, ec);
  served.root = ec ? dir.string() : canonical.string();
  served.name =
      served_model_name.empty() ? fs::path(served.root).filename().string() : served_model_name;
  served.vocab_size = config->vocab_size;
  served.tokenizer = *tokenizer;
  served.chat_template = chat;
  served.created = static_cast<int64_t>(std::time(nullptr));
  served.max_model_len = max_model_len > 0
                             ? std::min(max_model_len, config->max_position_embeddings)
                             : config->max_position_embeddings;
  return served;
}

sigset_t block_stop_signals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGUSR1);  // raised by wait_for_stop when the watched actor goes down
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  return signals;
}

bool wait_for_stop(caf::actor_system& system, const sigset_t& signals, const caf::actor& watched,
                   const std::string& what, int* received) {
  caf::actor watcher;
  if (watched) {
    watcher = system.spawn(
        [](caf::event_based_actor* self, caf::actor target, std::string name) -> caf::behavior {
          self->monitor(target);
          self->set_down_handler([self, name](caf::down_msg& dm) {
            spdlog::error("lost the {} ({}); stopping", name, caf::to_string(dm.reason));
            kill(getpid(), SIGUSR1);
            self->quit();
          });
          return {[](int32_t) {}};
        },
        watched, what);
  }
  int sig = 0;
  sigwait(&signals, &sig);
  if (received) *received = sig;
  if (watcher) caf::anon_send_exit(watcher, caf::exit_reason::user_shutdown);
  if (sig == SIGUSR1) return false;
  spdlog::info("{} received, stopping", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  return true;
}

std::string host_name() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "localhost";
  return buf;
}

std::string fault_spec_from_environment() {
  const char* spec = std::getenv("MOEMESH_FAULTS");
  return spec == nullptr ? std::string() : std::string(spec);
}

std::string node_name(const std::string& role) {
  return fmt::format("{}-{}@{}", role, getpid(), host_name());
}

}  // namespace moemesh::apps

#include <caf/io/all.hpp>

namespace moemesh::apps {

Expected<StartedRouter> start_router(caf::actor_system& system, actors::RouterOptions options,
                                     const std::string& bind_host, uint16_t port,
                                     const std::string& advertise_host) {
  StartedRouter out;
  const std::string advertise = advertise_host.empty() ? bind_host : advertise_host;
  out.router = actors::spawn_router(system, std::move(options));
  auto published = system.middleman().publish(out.router, port, bind_host.c_str(), true);
  if (!published) {
    caf::anon_send_exit(out.router, caf::exit_reason::user_shutdown);
    return Error(
        fmt::format("cannot publish the router on {}:{}: {} (is the port in use? choose "
                    "another with --control-port)",
                    bind_host, port, system.render(published.error())));
  }
  out.port = *published;
  out.join = fmt::format("{}:{}", advertise, out.port);
  // The join address is known once the port is bound; the router shows it in /admin/cluster.
  caf::anon_send(out.router, actors::join_atom::value, out.join);
  spdlog::info("router published join={}", out.join);
  return out;
}

void stop_router(caf::actor_system& system, StartedRouter& router) {
  if (!router.router) return;
  system.middleman().unpublish(router.router, 0);
  caf::anon_send_exit(router.router, caf::exit_reason::user_shutdown);
  router.router = nullptr;
}

}  // namespace moemesh::apps
