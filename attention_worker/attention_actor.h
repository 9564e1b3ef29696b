// The attention worker's role actor (actors/cluster_interface.h: attention_actor): the engine's
// submit/cancel/stats, plus the expert placement from the router and a status with data-plane
// figures. When every sequence of a request has ended it tells the router (done), so the router
// can count the worker's load and fail exactly the requests still running here if it is lost.
#pragma once

#include "actors/cluster_interface.h"
#include "attention_worker/engine.h"
#include "attention_worker/remote_experts.h"

namespace moemesh {

// `engine` and `remote` are not owned and must outlive the actor.
actors::attention_actor spawn_attention_actor(caf::actor_system& system, Engine* engine,
                                              RemoteExperts* remote);

}  // namespace moemesh
