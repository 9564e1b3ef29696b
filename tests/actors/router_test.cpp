// The router on CAF's deterministic test scheduler: every message is delivered by sched.run(),
// so each test sees exactly the messages the router sent. Workers are local fake actors that
// implement the role interfaces and record what they receive.
#include "actors/router.h"

#include <gtest/gtest.h>
#include <caf/scheduler/test_coordinator.hpp>

#include "actors/placement.h"
#include "proto/cluster.pb.h"
#include "proto/engine.pb.h"

namespace moemesh::actors {
namespace {

ModelConfig tiny_config() {
  ModelConfig c;
  c.arch = Arch::Qwen2Moe;
  c.num_layers = 3;
  c.layer_is_moe = {true, false, true};
  c.num_experts = 4;
  c.top_k = 2;
  c.hidden_size = 16;
  c.vocab_size = 32;
  return c;
}

// What a fake worker saw.
struct Record {
  std::vector<proto::Assignment> assignments;
  std::vector<proto::Assignment> releases;
  std::vector<proto::Placement> placements;
  std::vector<proto::GenerateRequest> submitted;
  std::vector<double> capacity;
  proto::ExpertWorkerStats stats;  // what status() answers
  bool silent = false;             // status() never answers (a hung actor)
  std::vector<caf::response_promise> unanswered;
};

// What a fake role actor answers to status(): an ActorStatus, or nothing when silent.
template <class Self>
caf::result<std::string> fake_status(Self* self, Record& r, proto::ActorStatus s) {
  if (r.silent) {
    r.unanswered.push_back(self->make_response_promise());
    return r.unanswered.back();
  }
  s.set_state("up");
  s.set_messages_handled(1);
  return s.SerializeAsString();
}

class RouterTest : public ::testing::Test {
 protected:
  RouterTest()
      : sys_(config()),
        sched_(dynamic_cast<caf::scheduler::test_coordinator&>(sys_.scheduler())),
        self_(sys_) {}

  static caf::actor_system_config& config() {
    static caf::actor_system_config cfg = [] {
      caf::actor_system_config c;
      c.set("scheduler.policy", caf::atom("testing"));
      return c;
    }();
    return cfg;
  }

  ~RouterTest() override {
    // Every actor must end before the system can shut down.
    for (const caf::actor& a : spawned_) caf::anon_send_exit(a, caf::exit_reason::kill);
    if (router_) caf::anon_send_exit(router_, caf::exit_reason::kill);
    sched_.run();
  }

  router_actor start(int32_t min_experts, int32_t replicas = 1) {
    RouterOptions o;
    o.cluster_token = "secret";
    o.config = tiny_config();
    o.min_expert_workers = min_experts;
    o.expert_replicas = replicas;
    o.join_address = "127.0.0.1:7100";
    router_ = spawn_router(sys_, o);
    sched_.run();
    return router_;
  }

  caf::actor fake_expert(std::shared_ptr<Record> rec) {
    auto a = sys_.spawn(
        [](expert_actor::pointer self, std::shared_ptr<Record> r) -> expert_actor::behavior_type {
          return {
              [r](assign_atom, const std::string& bytes) -> std::string {
                proto::Assignment assignment;
                assignment.ParseFromString(bytes);
                r->assignments.push_back(assignment);
                return {};
              },
              [r](release_atom, const std::string& bytes) -> std::string {
                proto::Assignment released;
                released.ParseFromString(bytes);
                r->releases.push_back(released);
                return {};
              },
              [self, r](status_atom) -> caf::result<std::string> {
                proto::ActorStatus s;
                s.set_role("expert");
                *s.mutable_expert() = r->stats;
                return fake_status(self, *r, s);
              },
              [r](capacity_atom, double f) { r->capacity.push_back(f); },
          };
        },
        rec);
    spawned_.push_back(caf::actor_cast<caf::actor>(a));
    return spawned_.back();
  }

  caf::actor fake_attention(std::shared_ptr<Record> rec) {
    auto a = sys_.spawn(
        [](attention_actor::pointer self,
           std::shared_ptr<Record> r) -> attention_actor::behavior_type {
          return {
              [r](submit_atom, const std::string& bytes, const caf::actor&) -> std::string {
                proto::GenerateRequest g;
                g.ParseFromString(bytes);
                r->submitted.push_back(g);
                return {};
              },
              [](cancel_atom, const std::string&, int32_t) {},
              [](stats_atom) -> std::string { return proto::EngineStats().SerializeAsString(); },
              [r](placement_atom, const std::string& bytes) {
                proto::Placement p;
                p.ParseFromString(bytes);
                r->placements.push_back(p);
              },
              [self, r](status_atom) -> caf::result<std::string> {
                proto::ActorStatus s;
                s.set_role("attention");
                s.mutable_attention()->mutable_engine()->set_kv_cache_tokens(100);
                return fake_status(self, *r, s);
              },
          };
        },
        rec);
    spawned_.push_back(caf::actor_cast<caf::actor>(a));
    return spawned_.back();
  }

  // Sends a join and returns the reply.
  proto::JoinReply join(const std::string& role, const caf::actor& handle,
                        const std::string& token = "secret", const std::string& name = "") {
    proto::NodeInfo info;
    info.set_role(role);
    info.set_name(name.empty() ? role : name);
    info.set_model_fingerprint(model_fingerprint(tiny_config()));
    info.set_data_address("ucx-address-of-" + info.name());
    self_->send(router_, join_atom::value, token, info.SerializeAsString(), handle);
    sched_.run();
    proto::JoinReply reply;
    self_->receive([&](const std::string& bytes) { reply.ParseFromString(bytes); },
                   caf::after(std::chrono::seconds(0)) >> [] { ADD_FAILURE() << "no join reply"; });
    return reply;
  }

  template <class Message, class Atom>
  Message ask(Atom atom) {
    self_->send(router_, atom);
    sched_.run();
    Message m;
    self_->receive([&](const std::string& bytes) { m.ParseFromString(bytes); },
                   caf::after(std::chrono::seconds(0)) >> [] { ADD_FAILURE() << "no reply"; });
    return m;
  }

  std::string submit(const std::string& id, const caf::actor& sink) {
    proto::GenerateRequest g;
    g.set_request_id(id);
    g.add_prompt_ids(1);
    g.set_n(2);
    self_->send(router_, submit_atom::value, g.SerializeAsString(), sink);
    sched_.run();
    std::string error = "no reply";
    self_->receive([&](const std::string& e) { error = e; },
                   caf::after(std::chrono::seconds(0)) >> [] {});
    return error;
  }

  caf::actor_system sys_;
  caf::scheduler::test_coordinator& sched_;
  caf::scoped_actor self_;
  router_actor router_;
  std::vector<caf::actor> spawned_;
};

TEST_F(RouterTest, RefusesAWrongTokenAndAnotherModel) {
  start(1);
  auto rec = std::make_shared<Record>();
  proto::JoinReply r = join("expert", fake_expert(rec), "wrong");
  EXPECT_FALSE(r.accepted());
  EXPECT_NE(r.error().find("wrong cluster token"), std::string::npos) << r.error();

  proto::NodeInfo info;
  info.set_role("expert");
  info.set_model_fingerprint("another model");
  self_->send(router_, join_atom::value, std::string("secret"), info.SerializeAsString(),
              fake_expert(rec));
  sched_.run();
  self_->receive([&](const std::string& bytes) { r.ParseFromString(bytes); });
  EXPECT_FALSE(r.accepted());
  EXPECT_NE(r.error().find("another model"), std::string::npos) << r.error();

  auto snap = ask<proto::ClusterSnapshot>(cluster_atom::value);
  EXPECT_EQ(snap.joins_refused_total(), 2u);
  EXPECT_EQ(snap.members_size(), 0);
  EXPECT_TRUE(rec->assignments.empty());
}

TEST_F(RouterTest, FirstPlacementWaitsForThePoolThenSplitsExperts) {
  start(2);
  auto att = std::make_shared<Record>();
  EXPECT_TRUE(join("attention", fake_attention(att)).accepted());
  auto e1 = std::make_shared<Record>(), e2 = std::make_shared<Record>();
  EXPECT_TRUE(join("expert", fake_expert(e1), "secret", "e1").accepted());
  EXPECT_TRUE(e1->assignments.empty()) << "placed before the expected pool joined";
  auto not_ready = ask<proto::ClusterSnapshot>(cluster_atom::value);
  EXPECT_FALSE(not_ready.ready());
  EXPECT_NE(not_ready.not_ready_reason().find("1 of 2"), std::string::npos);

  EXPECT_TRUE(join("expert", fake_expert(e2), "secret", "e2").accepted());
  ASSERT_EQ(e1->assignments.size(), 1u);
  ASSERT_EQ(e2->assignments.size(), 1u);
  // 2 MoE layers x 4 experts, half each, disjoint.
  EXPECT_EQ(e1->assignments[0].experts().layer_size(), 4);
  EXPECT_EQ(e2->assignments[0].experts().layer_size(), 4);
  ASSERT_EQ(att->placements.size(), 1u);
  const proto::Placement& p = att->placements[0];
  EXPECT_EQ(p.version(), 1u);
  EXPECT_TRUE(placement_complete(p, 4));
  EXPECT_EQ(p.workers_size(), 2);
  EXPECT_EQ(p.layers(0).layer(), 0);
  EXPECT_EQ(p.layers(1).layer(), 2);
  for (const auto& w : p.workers()) EXPECT_EQ(w.data_address(), "ucx-address-of-" + w.name());

  auto snap = ask<proto::ClusterSnapshot>(cluster_atom::value);
  EXPECT_TRUE(snap.ready()) << snap.not_ready_reason();
  EXPECT_EQ(snap.join(), "127.0.0.1:7100");
  EXPECT_EQ(snap.members_size(), 3);
}

TEST_F(RouterTest, PlacesRequestsOnTheLeastLoadedAttentionWorker) {
  start(1);
  auto a1 = std::make_shared<Record>(), a2 = std::make_shared<Record>();
  auto e = std::make_shared<Record>();
  join("attention", fake_attention(a1), "secret", "a1");
  join("attention", fake_attention(a2), "secret", "a2");
  join("expert", fake_expert(e));
  caf::scoped_actor sink{sys_};
  EXPECT_EQ(submit("r1", sink), "");
  EXPECT_EQ(submit("r2", sink), "");
  EXPECT_EQ(a1->submitted.size(), 1u);
  EXPECT_EQ(a2->submitted.size(), 1u);
  // r1 finishes on its worker: the next request goes there.
  const std::string r1_on = a1->submitted[0].request_id() == "r1" ? "a1" : "a2";
  self_->send(router_, done_atom::value, std::string("r1"));
  sched_.run();
  EXPECT_EQ(submit("r3", sink), "");
  auto& where = r1_on == "a1" ? a1 : a2;
  EXPECT_EQ(where->submitted.back().request_id(), "r3");
}

TEST_F(RouterTest, NotReadyAnswersUnavailable) {
  start(1);
  caf::scoped_actor sink{sys_};
  const std::string error = submit("r1", sink);
  EXPECT_EQ(error.rfind(std::string(kUnavailable), 0), 0u) << error;
}

TEST_F(RouterTest, LosingAnAttentionWorkerFailsItsRequestsCleanly) {
  start(1);
  auto a1 = std::make_shared<Record>();
  auto e = std::make_shared<Record>();
  caf::actor att = fake_attention(a1);
  join("attention", att);
  join("expert", fake_expert(e));
  caf::scoped_actor sink{sys_};
  ASSERT_EQ(submit("r1", sink), "");
  caf::anon_send_exit(att, caf::exit_reason::kill);
  sched_.run();
  std::vector<proto::SequenceDelta> got;
  for (int i = 0; i < 2; ++i)
    sink->receive(
        [&](delta_atom, const std::string& bytes) {
          proto::SequenceDelta d;
          d.ParseFromString(bytes);
          got.push_back(d);
        },
        caf::after(std::chrono::seconds(0)) >> [] {});
  ASSERT_EQ(got.size(), 2u) << "one final delta per sequence";
  for (const auto& d : got) {
    EXPECT_EQ(d.request_id(), "r1");
    EXPECT_EQ(d.finish_reason(), "error");
    EXPECT_TRUE(d.unavailable());
  }
  auto snap = ask<proto::ClusterSnapshot>(cluster_atom::value);
  EXPECT_EQ(snap.requests_failed_by_worker_loss_total(), 1u);
  EXPECT_EQ(snap.members_lost_total(), 1u);
  EXPECT_FALSE(snap.ready());
}

TEST_F(RouterTest, ALostExpertWorkersExpertsGoToTheSurvivorsAndAJoinTakesItsShareBack) {
  start(2);
  auto att = std::make_shared<Record>();
  join("attention", fake_attention(att));
  auto e1 = std::make_shared<Record>(), e2 = std::make_shared<Record>();
  join("expert", fake_expert(e1), "secret", "e1");
  caf::actor second = fake_expert(e2);
  join("expert", second, "secret", "e2");
  ASSERT_EQ(att->placements.size(), 1u);
  caf::anon_send_exit(second, caf::exit_reason::kill);
  sched_.run();
  // At once a placement without it (its experts have no copy for a moment), then the survivor
  // binds them and a complete placement follows.
  ASSERT_EQ(att->placements.size(), 3u);
  EXPECT_FALSE(placement_complete(att->placements[1], 4));
  EXPECT_EQ(att->placements[1].workers_size(), 1);
  ASSERT_EQ(e1->assignments.size(), 2u);
  EXPECT_EQ(e1->assignments[1].experts().layer_size(), 8) << "the survivor now holds every expert";
  EXPECT_TRUE(placement_complete(att->placements[2], 4));
  EXPECT_TRUE(ask<proto::ClusterSnapshot>(cluster_atom::value).ready());

  // A worker joining later takes its share (half of each layer) and the survivor releases it
  // once the grace period is over.
  auto e3 = std::make_shared<Record>();
  join("expert", fake_expert(e3), "secret", "e3");
  ASSERT_EQ(e3->assignments.size(), 1u);
  EXPECT_EQ(e3->assignments[0].experts().layer_size(), 4);
  ASSERT_EQ(att->placements.size(), 4u);
  EXPECT_TRUE(placement_complete(att->placements[3], 4));
  EXPECT_TRUE(e1->releases.empty()) << "released before the grace period";
  sched_.advance_time(std::chrono::seconds(4));
  sched_.run();
  ASSERT_EQ(e1->releases.size(), 1u);
  EXPECT_EQ(e1->releases[0].experts().SerializeAsString(),
            e3->assignments[0].experts().SerializeAsString());
}

TEST_F(RouterTest, WithReplicasALostWorkerKeepsThePlacementComplete) {
  start(2, 2);
  auto att = std::make_shared<Record>();
  join("attention", fake_attention(att));
  auto e1 = std::make_shared<Record>(), e2 = std::make_shared<Record>();
  join("expert", fake_expert(e1), "secret", "e1");
  caf::actor second = fake_expert(e2);
  join("expert", second, "secret", "e2");
  EXPECT_EQ(e1->assignments[0].experts().layer_size(), 8);
  EXPECT_EQ(e2->assignments[0].experts().layer_size(), 8);
  caf::anon_send_exit(second, caf::exit_reason::kill);
  sched_.run();
  EXPECT_TRUE(placement_complete(att->placements.back(), 4));
  EXPECT_TRUE(ask<proto::ClusterSnapshot>(cluster_atom::value).ready());
}

TEST_F(RouterTest, CapacityFactorReachesEveryExpertWorker) {
  start(1);
  auto e1 = std::make_shared<Record>();
  join("expert", fake_expert(e1));
  self_->send(router_, capacity_atom::value, 1.5);
  sched_.run();
  self_->receive([](const std::string& e) { EXPECT_EQ(e, ""); });
  ASSERT_EQ(e1->capacity.size(), 1u);
  EXPECT_DOUBLE_EQ(e1->capacity[0], 1.5);
  self_->send(router_, capacity_atom::value, -1.0);
  sched_.run();
  self_->receive(
      [](const std::string& e) { EXPECT_NE(e.find("out of range"), std::string::npos); });
  EXPECT_EQ(e1->capacity.size(), 1u);
}

TEST_F(RouterTest, ExpertStatisticsAreGatheredPerLayerAndExpert) {
  start(1);
  auto e1 = std::make_shared<Record>();
  auto add = [&](int32_t layer, int32_t expert, uint64_t window, uint64_t overflows) {
    proto::ExpertCounters* c = e1->stats.add_experts();
    c->set_layer(layer);
    c->set_expert(expert);
    c->set_tokens_total(window * 10);
    c->set_tokens_window(window);
    c->set_overflows_total(overflows);
  };
  add(0, 0, 8, 0);
  add(0, 1, 0, 3);
  add(2, 3, 4, 0);
  e1->stats.set_window_seconds(60);
  join("expert", fake_expert(e1), "secret", "e1");
  self_->send(router_, tick_atom::value);  // poll now
  sched_.run();
  auto snap = ask<proto::ExpertsSnapshot>(experts_atom::value);
  ASSERT_EQ(snap.layers_size(), 2);
  const proto::LayerSnapshot& l0 = snap.layers(0);
  ASSERT_EQ(l0.experts_size(), 4);
  EXPECT_EQ(l0.experts(0).tokens_window(), 8u);
  EXPECT_EQ(l0.experts(0).tokens_total(), 80u);
  EXPECT_EQ(l0.experts(1).overflows_total(), 3u);
  ASSERT_EQ(l0.experts(0).workers_size(), 1);
  EXPECT_EQ(l0.experts(0).workers(0), "e1");
  EXPECT_DOUBLE_EQ(l0.balancedness(), 2.0 / 8.0);  // mean 2, max 8
  EXPECT_EQ(snap.layers(1).experts(3).tokens_window(), 4u);
  EXPECT_DOUBLE_EQ(snap.window_seconds(), 60);
}

const proto::ActorStatus* find_actor(const proto::ClusterSnapshot& s, const std::string& name) {
  for (const proto::ActorStatus& a : s.actors())
    if (a.name() == name) return &a;
  return nullptr;
}

TEST_F(RouterTest, AnUnresponsiveActorIsShownUnreachableAndDoesNotHoldTheSnapshotUp) {
  start(2);
  auto att = std::make_shared<Record>();
  auto e1 = std::make_shared<Record>(), e2 = std::make_shared<Record>();
  join("attention", fake_attention(att), "secret", "a1");
  join("expert", fake_expert(e1), "secret", "e1");
  join("expert", fake_expert(e2), "secret", "e2");
  e2->silent = true;
  self_->send(router_, tick_atom::value);
  sched_.run();
  // The status request to e2 is still pending: the snapshot answers at once regardless.
  auto before = ask<proto::ClusterSnapshot>(cluster_atom::value);
  ASSERT_EQ(before.actors_size(), 4) << "router, a1, e1, e2";
  EXPECT_EQ(before.actors(0).role(), "router");
  EXPECT_TRUE(before.actors(0).has_router());
  EXPECT_EQ(before.actors(0).router().members(), 3);
  EXPECT_GT(before.actors(0).messages_handled(), 0u);
  ASSERT_NE(find_actor(before, "e1"), nullptr);
  EXPECT_EQ(find_actor(before, "e1")->state(), "up");
  EXPECT_TRUE(find_actor(before, "e1")->has_expert());
  EXPECT_TRUE(find_actor(before, "a1")->has_attention());

  // Past the status timeout, e2 is unreachable; the others stay up.
  sched_.advance_time(kStatusTimeout + std::chrono::milliseconds(100));
  sched_.run();
  auto after = ask<proto::ClusterSnapshot>(cluster_atom::value);
  ASSERT_NE(find_actor(after, "e2"), nullptr);
  EXPECT_EQ(find_actor(after, "e2")->state(), "unreachable");
  EXPECT_EQ(find_actor(after, "e1")->state(), "up");
  EXPECT_EQ(find_actor(after, "a1")->state(), "up");
  bool member_unreachable = false;
  for (const auto& m : after.members())
    if (m.name() == "e2") member_unreachable = m.state() == "unreachable";
  EXPECT_TRUE(member_unreachable);
}

TEST_F(RouterTest, ALostWorkerStaysListedAsLost) {
  start(1);
  auto e1 = std::make_shared<Record>();
  caf::actor gone = fake_expert(e1);
  join("expert", gone, "secret", "e1");
  caf::anon_send_exit(gone, caf::exit_reason::kill);
  sched_.run();
  auto snap = ask<proto::ClusterSnapshot>(cluster_atom::value);
  EXPECT_EQ(snap.members_size(), 0);
  ASSERT_NE(find_actor(snap, "e1"), nullptr);
  EXPECT_EQ(find_actor(snap, "e1")->state(), "lost");
}

TEST_F(RouterTest, DrainMovesAWorkersExpertsToTheOthers) {
  start(2);
  auto att = std::make_shared<Record>();
  join("attention", fake_attention(att));
  auto e1 = std::make_shared<Record>(), e2 = std::make_shared<Record>();
  join("expert", fake_expert(e1), "secret", "e1");
  join("expert", fake_expert(e2), "secret", "e2");
  ASSERT_EQ(att->placements.size(), 1u);

  auto drain = [&](const std::string& which) {
    self_->send(router_, drain_atom::value, which);
    sched_.run();
    std::string error = "no reply";
    self_->receive([&](const std::string& e) { error = e; },
                   caf::after(std::chrono::seconds(0)) >> [] {});
    return error;
  };
  EXPECT_NE(drain("nobody").find("no expert worker \"nobody\""), std::string::npos);
  EXPECT_EQ(drain("e2"), "");
  ASSERT_EQ(e1->assignments.size(), 2u) << "e1 binds e2's experts";
  EXPECT_EQ(e1->assignments[1].experts().layer_size(), 8);
  ASSERT_EQ(att->placements.size(), 2u);
  const proto::Placement& p = att->placements.back();
  EXPECT_TRUE(placement_complete(p, 4));
  ASSERT_EQ(p.workers_size(), 1);
  EXPECT_EQ(p.workers(0).name(), "e1");
  auto snap = ask<proto::ClusterSnapshot>(cluster_atom::value);
  for (const auto& m : snap.members()) {
    if (m.name() == "e2") {
      EXPECT_EQ(m.state(), "drained");
    }
  }
  EXPECT_NE(drain("e1").find("only expert worker"), std::string::npos);
}

TEST_F(RouterTest, RebalanceFollowsTheLoadAndIsSkippedWhenBalanced) {
  start(2);
  auto att = std::make_shared<Record>();
  join("attention", fake_attention(att));
  auto e1 = std::make_shared<Record>(), e2 = std::make_shared<Record>();
  join("expert", fake_expert(e1), "secret", "e1");
  join("expert", fake_expert(e2), "secret", "e2");
  // e1 carries all the load: its experts are hot, e2's are cold.
  const proto::Assignment& held = e1->assignments.at(0);
  for (int i = 0; i < held.experts().layer_size(); ++i) {
    proto::ExpertCounters* c = e1->stats.add_experts();
    c->set_layer(held.experts().layer(i));
    c->set_expert(held.experts().expert(i));
    c->set_tokens_window(100 + 10 * static_cast<uint64_t>(i));
  }
  self_->send(router_, tick_atom::value);
  sched_.run();

  auto rebalance = [&](double threshold) {
    self_->send(router_, rebalance_atom::value, threshold);
    sched_.run();
    proto::RebalanceReply r;
    self_->receive([&](const std::string& bytes) { r.ParseFromString(bytes); },
                   caf::after(std::chrono::seconds(0)) >> [] { ADD_FAILURE() << "no reply"; });
    return r;
  };
  proto::RebalanceReply skipped = rebalance(0.1);
  EXPECT_TRUE(skipped.skipped());
  EXPECT_DOUBLE_EQ(skipped.balancedness_before(), 0.5);  // one worker carries everything
  EXPECT_EQ(att->placements.size(), 1u);

  proto::RebalanceReply r = rebalance(1.0);
  EXPECT_EQ(r.error(), "");
  EXPECT_FALSE(r.skipped());
  EXPECT_GT(r.balancedness_after(), 0.9);
  EXPECT_GT(r.copies_moved(), 0);
  ASSERT_EQ(att->placements.size(), 2u);
  EXPECT_TRUE(placement_complete(att->placements.back(), 4));
  auto snap = ask<proto::ClusterSnapshot>(cluster_atom::value);
  EXPECT_EQ(snap.actors(0).router().rebalances_total(), 1u);
}

}  // namespace
}  // namespace moemesh::actors
