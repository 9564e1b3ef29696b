// The engine behind its actor interface (actors/engine_interface.h).
#pragma once

#include "actors/engine_interface.h"
#include "attention_worker/engine.h"

namespace moemesh {

// Spawns an actor that serves `engine` (not owned; it must outlive the actor). Deltas reach each
// request's sink as (delta_atom, SequenceDelta bytes), sent from the engine's loop thread.
actors::engine_actor spawn_engine_actor(caf::actor_system& system, Engine* engine);

}  // namespace moemesh
