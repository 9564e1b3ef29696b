// Introspection: every actor of the cluster answers one status request with a proto::ActorStatus
// (role, node, actor id and name, uptime, mailbox depth, messages handled, errors, and its role's
// figures). CAF 0.17 keeps no per-actor metrics, so each actor counts its own messages by wrapping
// its handlers with counted().
//
// Threads: an ActorCounters belongs to the one actor whose handlers update it (CAF runs an actor's
// handlers one at a time), so it needs no lock.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "proto/cluster.pb.h"

namespace moemesh::actors {

struct ActorCounters {
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  uint64_t handled = 0;
  uint64_t errors = 0;
};

namespace detail {
template <class F, class R, class... Args>
auto counted_impl(std::shared_ptr<ActorCounters> c, F f, R (F::*)(Args...) const) {
  return [c = std::move(c), f = std::move(f)](Args... args) -> R {
    ++c->handled;
    return f(std::forward<Args>(args)...);
  };
}
template <class F, class R, class... Args>
auto counted_impl(std::shared_ptr<ActorCounters> c, F f, R (F::*)(Args...)) {
  return [c = std::move(c), f = std::move(f)](Args... args) mutable -> R {
    ++c->handled;
    return f(std::forward<Args>(args)...);
  };
}
}  // namespace detail

// A handler with the same signature as `f` that counts each message it handles in `c`.
template <class F>
auto counted(std::shared_ptr<ActorCounters> c, F f) {
  return detail::counted_impl(std::move(c), std::move(f), &F::operator());
}

// "HOST:PID" of this process.
std::string this_node();

// The common part of an actor's status; the caller adds its role's figures.
proto::ActorStatus actor_status(const ActorCounters& counters, std::string role, std::string name,
                                uint64_t actor_id, std::size_t mailbox_depth);

}  // namespace moemesh::actors
