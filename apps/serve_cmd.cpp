// moemesh serve: the gateway and an engine in this process (the roles split into processes with
// the cluster work). The HTTP port opens first; /health answers 503 until the model is loaded.
#include <fmt/format.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <ctime>
#include <filesystem>
#include <iostream>

#include "apps/commands.h"
#include "attention_worker/engine_actor.h"
#include "core/core.h"
#include "gateway/gateway.h"

namespace moemesh::apps {
namespace {

namespace fs = std::filesystem;

struct ServeFlags {
  std::string model;
  std::string served_model_name;
  GatewayOptions gateway;
  EngineOptions engine;
  double kv_cache_gib = 2.0;
  int threads = 0;
  double shutdown_grace_s = 30;
};

// The built-in demo model: models/demo of the source tree the binary was built from
// (build/bin/moemesh -> models/demo), or $MOEMESH_DEMO_MODEL.
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

int run_serve(ServeFlags f) {
  auto fail = [](const std::string& message) {
    std::cerr << "moemesh serve: error: " << message << "\n";
    return 1;
  };
  const fs::path model_dir = f.model.empty() ? demo_model_dir() : fs::path(f.model);
  // SIGTERM and SIGINT are taken by sigwait() below; block them before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  caf::actor_system_config cfg;
  cfg.set("scheduler.max-threads", 2);
  caf::actor_system system{cfg};

  Expected<std::unique_ptr<Gateway>> gw = Gateway::start(system, f.gateway);
  if (!gw) return fail(gw.error().message());
  std::cerr << fmt::format("moemesh serve: listening on http://{}:{} (loading {})\n",
                           f.gateway.host, (*gw)->port(), model_dir.string());

  ModelOptions mo;
  mo.threads = f.threads;
  Expected<std::unique_ptr<Model>> model = Model::load(model_dir, mo);
  if (!model) return fail(model.error().message());
  Expected<std::shared_ptr<const Tokenizer>> tokenizer =
      Tokenizer::load(model_dir / "tokenizer.json");
  if (!tokenizer) return fail(tokenizer.error().message());
  std::shared_ptr<const ChatTemplateConfig> chat;
  if (Expected<ChatTemplateConfig> ct = load_chat_template(model_dir); ct) {
    chat = std::make_shared<const ChatTemplateConfig>(std::move(*ct));
  } else {
    spdlog::warn("no usable chat template, /v1/chat/completions is off: {}", ct.error().message());
  }

  gateway::ServedModel served;
  std::error_code ec;
  const fs::path canonical = fs::canonical(model_dir, ec);
  served.root = ec ? model_dir.string() : canonical.string();
  served.name =
      f.served_model_name.empty() ? fs::path(served.root).filename().string() : f.served_model_name;
  served.vocab_size = (*model)->config().vocab_size;
  served.tokenizer = *tokenizer;
  served.chat_template = chat;
  served.created = static_cast<int64_t>(std::time(nullptr));

  f.engine.kv_cache_bytes = static_cast<int64_t>(f.kv_cache_gib * double(int64_t{1} << 30));
  std::unique_ptr<Engine> engine = Engine::start(std::move(*model), f.engine);
  served.max_model_len = engine->max_model_len();
  actors::engine_actor engine_actor = spawn_engine_actor(system, engine.get());
  (*gw)->serve_model(std::move(served), engine_actor);
  std::cerr << fmt::format("moemesh serve: ready, serving {} on http://{}:{}\n", model_dir.string(),
                           f.gateway.host, (*gw)->port());

  int sig = 0;
  sigwait(&signals, &sig);
  std::cerr << fmt::format("moemesh serve: {} received, draining requests (up to {} s)\n",
                           sig == SIGTERM ? "SIGTERM" : "SIGINT", f.shutdown_grace_s);
  (*gw)->shutdown(std::chrono::milliseconds(static_cast<int64_t>(f.shutdown_grace_s * 1000)));
  caf::anon_send_exit(engine_actor, caf::exit_reason::user_shutdown);
  engine.reset();
  return 0;
}

}  // namespace

Runner add_serve(CLI::App& app) {
  auto f = std::make_shared<ServeFlags>();
  app.add_option("--model", f->model,
                 "Hugging Face checkpoint directory (default: the built-in demo model)");
  app.add_option("--served-model-name", f->served_model_name,
                 "Model id clients use (default: the folder's name)");
  app.add_option("--host", f->gateway.host, "Address to listen on")->capture_default_str();
  app.add_option("--port", f->gateway.port, "HTTP port (0: any free port)")->capture_default_str();
  app.add_option("--api-key", f->gateway.api_key,
                 "Require \"Authorization: Bearer KEY\" on the API");
  app.add_option("--max-num-seqs", f->engine.max_num_seqs, "Sequences decoded together")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--max-model-len", f->engine.max_model_len,
                 "Cap on prompt + completion tokens (0: the model's)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 32));
  app.add_option("--kv-cache-gib", f->kv_cache_gib, "Memory for the KV cache, GiB")
      ->check(CLI::Range(0.001, 4096.0))
      ->capture_default_str();
  app.add_option("--max-body-bytes", f->gateway.max_body_bytes, "Largest request body accepted")
      ->check(CLI::Range(std::size_t{1024}, std::size_t{1} << 30))
      ->capture_default_str();
  app.add_option("--threads", f->threads, "Compute threads (0: one per hardware thread)")
      ->check(CLI::Range(0, 4096));
  app.add_option("--shutdown-grace", f->shutdown_grace_s,
                 "Seconds SIGTERM waits for requests in flight")
      ->check(CLI::Range(0.0, 3600.0))
      ->capture_default_str();
  return [f] { return run_serve(*f); };
}

}  // namespace moemesh::apps
