#include "actors/introspection.h"

#include <fmt/format.h>
#include <unistd.h>

namespace moemesh::actors {

std::string this_node() {
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) != 0) return fmt::format("localhost:{}", getpid());
  return fmt::format("{}:{}", host, getpid());
}

proto::ActorStatus actor_status(const ActorCounters& counters, std::string role, std::string name,
                                uint64_t actor_id, std::size_t mailbox_depth) {
  proto::ActorStatus s;
  s.set_role(std::move(role));
  s.set_node(this_node());
  s.set_actor_id(actor_id);
  s.set_name(std::move(name));
  s.set_uptime_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - counters.started).count());
  s.set_mailbox_depth(mailbox_depth);
  s.set_messages_handled(counters.handled);
  s.set_errors_total(counters.errors);
  s.set_state("up");
  return s;
}

}  // namespace moemesh::actors
