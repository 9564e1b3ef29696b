#include "attention_worker/attention_actor.h"

#include <spdlog/spdlog.h>

#include "actors/introspection.h"
#include "proto/cluster.pb.h"

namespace moemesh {

actors::attention_actor spawn_attention_actor(caf::actor_system& system, Engine* served,
                                              RemoteExperts* remote_experts) {
  return system.spawn(
      [](actors::attention_actor::pointer self, Engine* engine,
         RemoteExperts* remote) -> actors::attention_actor::behavior_type {
        auto counters = std::make_shared<actors::ActorCounters>();
        using actors::counted;
        return {
            counted(counters,
                    [self, engine, counters](actors::submit_atom, const std::string& bytes,
                                             const caf::actor& sink) -> std::string {
                      proto::GenerateRequest request;
                      if (!request.ParseFromString(bytes)) {
                        ++counters->errors;
                        return "malformed GenerateRequest";
                      }
                      // The router submits; it hears when the request is done.
                      caf::actor router = caf::actor_cast<caf::actor>(self->current_sender());
                      auto remaining = std::make_shared<int>(std::max(1, request.n()));
                      const std::string id = request.request_id();
                      Status s = engine->submit(request, [sink, router, remaining,
                                                          id](proto::SequenceDelta delta) {
                        const bool final = !delta.finish_reason().empty();
                        caf::anon_send(sink, actors::delta_atom::value, delta.SerializeAsString());
                        if (final && --*remaining == 0 && router)
                          caf::anon_send(router, actors::done_atom::value, id);
                      });
                      if (!s) ++counters->errors;
                      return s ? std::string() : s.error().message();
                    }),
            counted(counters, [engine](actors::cancel_atom, const std::string& id,
                                       int32_t index) { engine->cancel(id, index); }),
            counted(counters,
                    [engine](actors::stats_atom) -> std::string {
                      return engine->stats().SerializeAsString();
                    }),
            counted(counters,
                    [remote, counters](actors::placement_atom, const std::string& bytes) {
                      proto::Placement p;
                      if (!p.ParseFromString(bytes)) {
                        ++counters->errors;
                        spdlog::error("malformed placement from the router ignored");
                        return;
                      }
                      spdlog::info("placement received version={}", p.version());
                      remote->set_placement(p);
                    }),
            counted(counters,
                    [self, engine, remote, counters](actors::status_atom) -> std::string {
                      proto::ActorStatus s = actors::actor_status(
                          *counters, "attention", "attention", self->id(), self->mailbox().size());
                      proto::AttentionWorkerStats* a = s.mutable_attention();
                      *a->mutable_engine() = engine->stats();
                      *a->mutable_dispatch() = remote->stats();
                      return s.SerializeAsString();
                    }),
        };
      },
      served, remote_experts);
}

}  // namespace moemesh
