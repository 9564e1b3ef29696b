// The moemesh binary: one executable, one subcommand per role or tool.
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <iostream>
#include <map>

#include "apps/commands.h"
#include "transport/data_plane.h"

int main(int argc, char** argv) {
  CLI::App app{"moemesh: a serving cluster for Mixture-of-Experts language models"};
  app.require_subcommand(0, 1);
  app.fallthrough();  // --log-level may follow the subcommand: `moemesh expert --log-level info` //
                      // a missing one is reported below, after unknown arguments
  std::string log_level = "warn";
  app.add_option("--log-level", log_level, "Log level: trace, debug, info, warn, error, off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}))
      ->capture_default_str();
  app.set_version_flag(
      "--version",
      std::string("moemesh " MOEMESH_VERSION "\nfault injection: ") +
          (moemesh::transport::fault_injection_available() ? "on (MOEMESH_FAULTS)" : "off"),
      "Print the version and build options, then exit");

  std::map<CLI::App*, moemesh::apps::Runner> runners;
  auto* gen = app.add_subcommand("generate", "Run a model offline on one prompt (one process)");
  runners[gen] = moemesh::apps::add_generate(*gen);
  auto* serve = app.add_subcommand("serve", "Serve the OpenAI-compatible API on this machine");
  runners[serve] = moemesh::apps::add_serve(*serve);
  auto* gateway =
      app.add_subcommand("gateway", "The HTTP gateway of a cluster, joining its router");
  runners[gateway] = moemesh::apps::add_gateway(*gateway);
  auto* router = app.add_subcommand("router", "The router of a multi-node cluster");
  runners[router] = moemesh::apps::add_router(*router);
  auto* attention =
      app.add_subcommand("attention", "An attention worker joining a cluster (--join HOST:PORT)");
  runners[attention] = moemesh::apps::add_attention(*attention);
  auto* expert =
      app.add_subcommand("expert", "An expert worker joining a cluster (--join HOST:PORT)");
  runners[expert] = moemesh::apps::add_expert(*expert);
  auto* plan = app.add_subcommand(
      "plan", "Parameters, memory and the smallest GPU layout of a model (from config.json)");
  runners[plan] = moemesh::apps::add_plan(*plan);
  auto* top = app.add_subcommand("top", "The operations console in a terminal (--url URL)");
  runners[top] = moemesh::apps::add_top(*top);

  // An unknown subcommand is an error even with --help (which CLI11 would otherwise honour first).
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--log-level") {
      ++i;
      continue;
    }
    if (arg.rfind("-", 0) == 0) continue;
    const auto subs = app.get_subcommands({});
    if (std::none_of(subs.begin(), subs.end(),
                     [&](const CLI::App* s) { return s->get_name() == arg; })) {
      std::cerr << "moemesh: error: unknown subcommand \"" << arg << "\"; available:";
      for (const CLI::App* sub : subs) std::cerr << ' ' << sub->get_name();
      std::cerr << "\nRun with --help for more information.\n";
      return 2;
    }
    break;
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  auto logger = spdlog::stderr_color_mt("moemesh");
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(log_level));
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v");

  for (auto& [sub, run] : runners)
    if (sub->parsed()) return run();
  std::cerr << app.help() << "\nmoemesh: error: a subcommand is required\n";
  return 2;
}
