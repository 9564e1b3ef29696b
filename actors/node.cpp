#include "actors/node.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <caf/io/all.hpp>
#include <charconv>
#include <cstdlib>
#include <thread>

namespace moemesh::actors {

void configure_control_plane(caf::actor_system_config& cfg) {
  cfg.load<caf::io::middleman>();
  cfg.set("scheduler.max-threads", 2);
  cfg.set("middleman.heartbeat-interval", caf::timespan{std::chrono::milliseconds(500)});
  cfg.set("middleman.connection-timeout", caf::timespan{std::chrono::seconds(3)});
}

Expected<std::pair<std::string, uint16_t>> parse_host_port(std::string_view text,
                                                           std::string_view flag) {
  const auto colon = text.rfind(':');
  auto bad = [&] {
    return Error(fmt::format("{} \"{}\": expected HOST:PORT, e.g. 127.0.0.1:7100", flag, text));
  };
  if (colon == std::string_view::npos || colon == 0 || colon + 1 == text.size()) return bad();
  std::string host(text.substr(0, colon));
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  unsigned port = 0;
  const std::string_view p = text.substr(colon + 1);
  auto [ptr, ec] = std::from_chars(p.data(), p.data() + p.size(), port);
  if (ec != std::errc() || ptr != p.data() + p.size() || port == 0 || port > 65535) return bad();
  return std::make_pair(host, static_cast<uint16_t>(port));
}

std::string cluster_token_from(const std::string& flag_value) {
  if (!flag_value.empty()) return flag_value;
  const char* env = std::getenv("MOEMESH_CLUSTER_TOKEN");
  return env ? env : "";
}

Expected<router_actor> connect_router(caf::actor_system& system, const std::string& join,
                                      std::chrono::milliseconds timeout) {
  Expected<std::pair<std::string, uint16_t>> target = parse_host_port(join, "--join");
  if (!target) return target.error();
  const auto& [host, port] = *target;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  caf::scoped_actor self{system};
  std::string last_error;
  for (int attempt = 0;; ++attempt) {
    caf::strong_actor_ptr found;
    self->request(system.middleman().actor_handle(), std::chrono::seconds(5),
                  caf::connect_atom::value, host, port)
        .receive([&](const caf::node_id&, caf::strong_actor_ptr& ptr,
                     const std::set<std::string>&) { found = std::move(ptr); },
                 [&](caf::error& err) { last_error = system.render(err); });
    if (found) return caf::actor_cast<router_actor>(found);
    if (std::chrono::steady_clock::now() >= deadline)
      return Error(
          fmt::format("cannot reach the router at {}:{} ({}); check --join and that "
                      "`moemesh serve` or `moemesh router` runs there",
                      host, port, last_error.empty() ? "nothing published" : last_error));
    if (attempt == 0) spdlog::info("waiting for the router at {}:{}: {}", host, port, last_error);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

Expected<Joined> join_cluster(caf::actor_system& system, const JoinOptions& options,
                              proto::NodeInfo info, const caf::actor& role) {
  Expected<std::pair<std::string, uint16_t>> target = parse_host_port(options.join, "--join");
  if (!target) return target.error();
  const auto& [host, port] = *target;

  Joined out;
  // The directory: this node's liveness signal and self-description.
  const std::string info_bytes_for_directory = info.SerializeAsString();
  out.directory = system.spawn(
      [](directory_actor::pointer, std::string bytes) -> directory_actor::behavior_type {
        return {[bytes](status_atom) { return bytes; }};
      },
      info_bytes_for_directory);
  auto published = system.middleman().publish(out.directory, options.control_port,
                                              options.bind_host.c_str(), true);
  if (!published) {
    caf::anon_send_exit(out.directory, caf::exit_reason::user_shutdown);
    return Error(
        fmt::format("cannot publish this node's directory on {}:{}: {} (choose another "
                    "--control-port or --bind-host)",
                    options.bind_host, options.control_port, system.render(published.error())));
  }
  out.directory_address = fmt::format("{}:{}", options.bind_host, *published);
  info.set_directory(out.directory_address);

  Expected<router_actor> router = connect_router(system, options.join, options.timeout);
  if (!router) {
    leave_cluster(system, out);
    return router.error();
  }
  out.router = *router;
  caf::scoped_actor self{system};

  std::string reply_bytes;
  std::string error;
  self->request(out.router, kJoinTimeout, join_atom::value, options.cluster_token,
                info.SerializeAsString(), role)
      .receive([&](const std::string& bytes) { reply_bytes = bytes; },
               [&](caf::error& err) { error = system.render(err); });
  auto give_up = [&](std::string message) {
    leave_cluster(system, out);
    return Error(std::move(message));
  };
  if (!error.empty())
    return give_up(
        fmt::format("the router at {}:{} did not answer the join: {}", host, port, error));
  if (!out.reply.ParseFromString(reply_bytes))
    return give_up("the router's join reply is malformed (different moemesh versions?)");
  if (!out.reply.accepted())
    return give_up(
        fmt::format("the router at {}:{} refused this node: {}", host, port, out.reply.error()));
  spdlog::info("joined cluster router={}:{} worker_id={} directory={}", host, port,
               out.reply.worker_id(), out.directory_address);
  return out;
}

void leave_cluster(caf::actor_system& system, Joined& joined) {
  if (joined.directory) {
    system.middleman().unpublish(joined.directory, 0);
    caf::anon_send_exit(joined.directory, caf::exit_reason::user_shutdown);
  }
  joined.directory = nullptr;
  joined.router = nullptr;
}

}  // namespace moemesh::actors
