#include "actors/placement.h"

#include <gtest/gtest.h>

namespace moemesh::actors {
namespace {

PlacementRequest request(std::vector<int32_t> workers, int32_t replicas = 1) {
  PlacementRequest r;
  r.moe_layers = {0, 2, 3};
  r.num_experts = 8;
  r.replicas = replicas;
  r.live_workers = std::move(workers);
  return r;
}

TEST(Placement, FirstPlacementSpreadsEachLayerEvenly) {
  const proto::Placement p = plan_placement({}, request({1, 2}));
  ASSERT_EQ(p.layers_size(), 3);
  EXPECT_TRUE(placement_complete(p, 8));
  for (const proto::LayerPlacement& l : p.layers()) {
    std::map<int32_t, int> per_worker;
    for (const proto::ExpertReplicas& r : l.experts()) {
      ASSERT_EQ(r.workers_size(), 1);
      ++per_worker[r.workers(0)];
    }
    EXPECT_EQ(per_worker[1], 4);
    EXPECT_EQ(per_worker[2], 4);
  }
  const auto held = experts_by_worker(p);
  EXPECT_EQ(held.at(1).size(), 12u);
  EXPECT_EQ(held.at(2).size(), 12u);
}

TEST(Placement, ReplicasLandOnDistinctWorkersAndAreCappedByThePool) {
  const proto::Placement p = plan_placement({}, request({4, 5, 6}, 2));
  for (const proto::LayerPlacement& l : p.layers())
    for (const proto::ExpertReplicas& r : l.experts()) {
      ASSERT_EQ(r.workers_size(), 2);
      EXPECT_NE(r.workers(0), r.workers(1));
    }
  const proto::Placement capped = plan_placement({}, request({4}, 3));
  for (const proto::LayerPlacement& l : capped.layers())
    for (const proto::ExpertReplicas& r : l.experts()) EXPECT_EQ(r.workers_size(), 1);
}

TEST(Placement, LosingAWorkerOrphansExactlyItsExpertsWithoutFill) {
  const proto::Placement first = plan_placement({}, request({1, 2}));
  PlacementRequest drop = request({1});
  drop.fill = false;
  const proto::Placement after = plan_placement(first, drop);
  EXPECT_FALSE(placement_complete(after, 8));
  for (int li = 0; li < after.layers_size(); ++li)
    for (int e = 0; e < 8; ++e) {
      const bool was_on_2 = first.layers(li).experts(e).workers(0) == 2;
      EXPECT_EQ(after.layers(li).experts(e).workers_size(), was_on_2 ? 0 : 1);
    }
}

TEST(Placement, AWorkerJoiningLaterTakesTheOrphansAndNothingMoves) {
  const proto::Placement first = plan_placement({}, request({1, 2}));
  PlacementRequest drop = request({1});
  drop.fill = false;
  const proto::Placement orphaned = plan_placement(first, drop);
  const proto::Placement back = plan_placement(orphaned, request({1, 3}));
  EXPECT_TRUE(placement_complete(back, 8));
  for (int li = 0; li < back.layers_size(); ++li)
    for (int e = 0; e < 8; ++e) {
      const int32_t before = first.layers(li).experts(e).workers(0);
      EXPECT_EQ(back.layers(li).experts(e).workers(0), before == 2 ? 3 : 1);
    }
}

TEST(Placement, KeepsCopiesWhenNothingChanged) {
  const proto::Placement first = plan_placement({}, request({1, 2}, 2));
  const proto::Placement again = plan_placement(first, request({1, 2}, 2));
  EXPECT_EQ(first.SerializeAsString(), again.SerializeAsString());
}

TEST(Placement, Balancedness) {
  EXPECT_DOUBLE_EQ(balancedness({}), 1.0);
  EXPECT_DOUBLE_EQ(balancedness({0, 0}), 1.0);
  EXPECT_DOUBLE_EQ(balancedness({4, 4, 4, 4}), 1.0);
  EXPECT_DOUBLE_EQ(balancedness({8, 0, 0, 0}), 0.25);
  EXPECT_DOUBLE_EQ(balancedness({3, 1}), 2.0 / 3.0);
}

}  // namespace
}  // namespace moemesh::actors
