#include "attention_worker/engine_actor.h"

namespace moemesh {

actors::engine_actor spawn_engine_actor(caf::actor_system& system, Engine* served) {
  // The engine travels as a spawn argument: CAF 0.17 dereferences an empty argument tuple
  // (undefined behaviour that UBSan reports) when a function actor takes none.
  return system.spawn(
      [](actors::engine_actor::pointer, Engine* engine) -> actors::engine_actor::behavior_type {
        return {
            [engine](actors::submit_atom, const std::string& bytes,
                     const caf::actor& sink) -> std::string {
              proto::GenerateRequest request;
              if (!request.ParseFromString(bytes)) return "malformed GenerateRequest";
              Status s = engine->submit(request, [sink](proto::SequenceDelta delta) {
                caf::anon_send(sink, actors::delta_atom::value, delta.SerializeAsString());
              });
              return s ? std::string() : s.error().message();
            },
            [engine](actors::cancel_atom, const std::string& id, int32_t index) {
              engine->cancel(id, index);
            },
            [engine](actors::stats_atom) -> std::string {
              return engine->stats().SerializeAsString();
            },
        };
      },
      served);
}

}  // namespace moemesh
