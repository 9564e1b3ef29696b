// Subcommands of the moemesh binary. Each registers its flags on the CLI11 app and returns the
// function that runs it (exit status as the result).
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

namespace moemesh::apps {

using Runner = std::function<int()>;

Runner add_generate(CLI::App& app);
Runner add_serve(CLI::App& app);
Runner add_attention(CLI::App& app);
Runner add_expert(CLI::App& app);
Runner add_router(CLI::App& app);
Runner add_gateway(CLI::App& app);
Runner add_plan(CLI::App& app);
Runner add_top(CLI::App& app);

}  // namespace moemesh::apps
