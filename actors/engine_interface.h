// The control-plane interface of an engine (the attention worker's model runner), as a typed CAF
// actor. Payloads are serialized protobuf messages (proto/engine.proto) carried as bytes, so the
// same interface works in one process and, through CAF's middleman, across nodes.
//
//   submit(GenerateRequest bytes, sink) -> "" when queued, else the error message
//       The sink (any actor) then receives (delta_atom, SequenceDelta bytes) for every new token of
//       every sequence, the last one of each sequence carrying its finish_reason.
//   cancel(request id, sequence index or -1 for all)
//   stats() -> EngineStats bytes
//
// Callers must use a finite timeout on submit and stats (see kEngineRequestTimeout).
#pragma once

#include <caf/all.hpp>
#include <chrono>
#include <string>

namespace moemesh::actors {

using submit_atom = caf::atom_constant<caf::atom("submit")>;
using cancel_atom = caf::atom_constant<caf::atom("cancel")>;
using stats_atom = caf::atom_constant<caf::atom("stats")>;
using delta_atom = caf::atom_constant<caf::atom("delta")>;

using engine_actor =
    caf::typed_actor<caf::replies_to<submit_atom, std::string, caf::actor>::with<std::string>,
                     caf::reacts_to<cancel_atom, std::string, int32_t>,
                     caf::replies_to<stats_atom>::with<std::string>>;

inline constexpr std::chrono::seconds kEngineRequestTimeout{10};

}  // namespace moemesh::actors
