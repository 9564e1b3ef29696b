// Fault injection for the data plane: drops, delays and corrupts chosen messages, and stalls an
// expert worker, so that tests can show what the cluster does when the network or a peer
// misbehaves. Compiled into the data plane only with -DMOEMESH_FAULT_INJECTION=ON (a test
// build); otherwise a non-empty DataPlaneOptions::faults is refused at start-up.
//
// Spec (DataPlaneOptions::faults, from MOEMESH_FAULTS in the role processes): rules separated by
// ';', each  [NAME/]POINT.KIND[=DURATION]@WHEN
//   NAME   the rule applies only in the process whose node name (DataPlaneOptions::node_name,
//          a worker's --name) is NAME; without it, in every process
//   POINT  dispatch  a dispatch as the attention worker sends it (client)
//          reply     a reply as the expert worker sends it (server)
//          expert    the expert worker's handler call for one batch of dispatches (server)
//   KIND   drop      the message is never sent (dispatch, reply)
//          delay     the message goes out DURATION late (dispatch, reply); on the server the
//                    delay holds its thread, so replies queued behind it are late as well
//          corrupt   one bit of the message's header is flipped after it was sealed, so its
//                    checksum (and authentication tag) no longer match (dispatch, reply)
//          stall     the handler starts DURATION late (expert)
//   DURATION  e.g. 250ms, 2s (required for delay and stall)
//   WHEN   N         the N-th message at that point (1-based), or N,M,... several of them
//          every:N   every N-th message
//          p:X       each message with probability X (0..1), from a generator seeded by the
//                    rule `seed=S` (default 1)
// Example: "reply.drop@5;dispatch.corrupt@every:50;expert.stall=1500ms@20;seed=7".
// Every side counts the faults it injected (FaultCounts in ServerStats and ClientStats).
//
// Thread-safety: next() is called by the one thread that owns the client or the server.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"
#include "transport/data_plane.h"

namespace moemesh::transport::detail {

enum class FaultPoint { Dispatch, Reply, Expert };

// What to do to one message.
struct FaultAction {
  bool drop = false;
  bool corrupt = false;
  std::chrono::milliseconds delay{0};  // delay (dispatch, reply) or stall (expert)
  explicit operator bool() const { return drop || corrupt || delay.count() > 0; }
};

class FaultInjector {
 public:
  // The rules for node `node_name` (see NAME/ above); nullptr when none is left; an error naming
  // the rule that does not parse (rules for other nodes are checked too).
  static Expected<std::unique_ptr<FaultInjector>> parse(std::string_view spec,
                                                        std::string_view node_name = {});

  // The action for the next message at `point` (counts it).
  FaultAction next(FaultPoint point);
  const FaultCounts& counts() const { return counts_; }
  // Whether any rule concerns `point` (a side injects only at its own points).
  bool has(FaultPoint point) const;

 private:
  enum class Kind { Drop, Delay, Corrupt, Stall };
  struct Rule {
    FaultPoint point = FaultPoint::Dispatch;
    Kind kind = Kind::Drop;
    std::chrono::milliseconds duration{0};
    std::vector<uint64_t> nth;  // 1-based message numbers
    uint64_t every = 0;
    double probability = -1;  // < 0: not a probability rule
  };
  std::vector<Rule> rules_;
  uint64_t seen_[3] = {0, 0, 0};  // messages per point
  std::mt19937_64 rng_{1};
  FaultCounts counts_;
};

// Flips one bit of a sealed header (chosen by `salt`), outside its checksum trailer when it has
// one, so that the checksum catches it.
void corrupt_header(std::string& sealed, uint64_t salt);

// Whether this build can inject faults (-DMOEMESH_FAULT_INJECTION=ON).
bool fault_injection_built();

// The injector for `options` on side `side` ("client" or "server"): nullptr when options.faults is
// empty; an error when the spec does not parse or this build has no fault injection.
Expected<std::unique_ptr<FaultInjector>> make_fault_injector(const DataPlaneOptions& options,
                                                             const char* side);

}  // namespace moemesh::transport::detail
