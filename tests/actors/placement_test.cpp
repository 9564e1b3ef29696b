#include "actors/placement.h"

#include <gtest/gtest.h>

#include <set>

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

// A skewed load: in every layer, expert e carries 2^e tokens (a few experts dominate).
std::map<std::pair<int32_t, int32_t>, uint64_t> skewed(const PlacementRequest& r) {
  std::map<std::pair<int32_t, int32_t>, uint64_t> load;
  for (int32_t layer : r.moe_layers)
    for (int32_t e = 0; e < r.num_experts; ++e) load[{layer, e}] = uint64_t{1} << e;
  return load;
}

TEST(Placement, BalancedPlanIsValidAndBetterOnSkewedLoads) {
  for (int32_t replicas : {1, 2}) {
    const PlacementRequest r = request({1, 2, 3}, replicas);
    const proto::Placement before = plan_placement({}, r);
    const auto load = skewed(r);
    const proto::Placement after = plan_balanced(r, load, before);
    EXPECT_TRUE(placement_complete(after, 8));
    for (const proto::LayerPlacement& l : after.layers())
      for (const proto::ExpertReplicas& x : l.experts()) {
        ASSERT_EQ(x.workers_size(), replicas);
        std::set<int32_t> distinct(x.workers().begin(), x.workers().end());
        EXPECT_EQ(distinct.size(), static_cast<std::size_t>(replicas));
        for (int32_t w : x.workers()) EXPECT_TRUE(w >= 1 && w <= 3) << w;
      }
    EXPECT_GT(worker_balancedness(after, load), worker_balancedness(before, load))
        << "replicas " << replicas;
  }
}

TEST(Placement, BalancedPlanMovesNothingWhenTheLoadIsAlreadyEven) {
  const PlacementRequest r = request({1, 2});
  const proto::Placement before = plan_placement({}, r);
  std::map<std::pair<int32_t, int32_t>, uint64_t> even;
  for (int32_t layer : r.moe_layers)
    for (int32_t e = 0; e < r.num_experts; ++e) even[{layer, e}] = 50;
  EXPECT_DOUBLE_EQ(worker_balancedness(before, even), 1.0);
  const proto::Placement after = plan_balanced(r, even, before);
  EXPECT_EQ(copies_moved(before, after), 0);
}

TEST(Placement, BalancedPlanMovesFewCopiesForOneHotExpert) {
  const PlacementRequest r = request({1, 2});
  const proto::Placement before = plan_placement({}, r);
  std::map<std::pair<int32_t, int32_t>, uint64_t> load;
  for (int32_t layer : r.moe_layers)
    for (int32_t e = 0; e < r.num_experts; ++e) load[{layer, e}] = e == 0 ? 400 : 100;
  const proto::Placement after = plan_balanced(r, load, before);
  EXPECT_GE(worker_balancedness(after, load), worker_balancedness(before, load));
  // 24 copies in all: far fewer than a reshuffle moves.
  EXPECT_LE(copies_moved(before, after), 3 * 3);
}

TEST(Placement, CopiesMovedCountsOnlyNewCopies) {
  const PlacementRequest r = request({1, 2});
  const proto::Placement a = plan_placement({}, r);
  EXPECT_EQ(copies_moved(a, a), 0);
  EXPECT_EQ(copies_moved({}, a), 24);
}

std::map<int32_t, int> copies_per_worker(const proto::LayerPlacement& l) {
  std::map<int32_t, int> n;
  for (const proto::ExpertReplicas& r : l.experts())
    for (int32_t w : r.workers()) ++n[w];
  return n;
}

TEST(Placement, AJoiningWorkerTakesItsShareAndNothingElseMoves) {
  const proto::Placement before = plan_placement({}, request({1, 2}));
  const proto::Placement after = plan_balanced(request({1, 2, 3}), {}, before);
  EXPECT_TRUE(placement_complete(after, 8));
  for (const proto::LayerPlacement& l : after.layers()) {
    auto n = copies_per_worker(l);
    EXPECT_EQ(n[1] + n[2] + n[3], 8);
    EXPECT_GE(n[3], 2) << "the new worker takes its share";
    EXPECT_LE(std::max({n[1], n[2], n[3]}) - std::min({n[1], n[2], n[3]}), 1);
  }
  // 8 experts over 3 workers: 2 copies per layer is the least that balances (4,4,0 -> 3,3,2).
  EXPECT_EQ(copies_moved(before, after), 2 * 3);
}

TEST(Placement, ALeavingWorkersCopiesLandOnTheOthersAndNothingElseMoves) {
  const proto::Placement before = plan_placement({}, request({1, 2, 3}));
  const auto held_before = experts_by_worker(before);
  const proto::Placement after = plan_balanced(request({1, 2}), {}, before);
  EXPECT_TRUE(placement_complete(after, 8));
  const auto held_after = experts_by_worker(after);
  EXPECT_EQ(held_after.count(3), 0u);
  for (int32_t w : {1, 2})
    for (const auto& x : held_before.at(w)) EXPECT_TRUE(held_after.at(w).count(x)) << w;
  EXPECT_EQ(copies_moved(before, after), static_cast<int64_t>(held_before.at(3).size()));
}

TEST(Placement, RedundantCopiesGoToTheHeaviestExperts) {
  PlacementRequest r = request({1, 2, 3, 4});
  r.redundant = 2;
  const proto::Placement p = plan_balanced(r, skewed(r), plan_placement({}, request({1, 2, 3, 4})));
  for (const proto::LayerPlacement& l : p.layers())
    for (int32_t e = 0; e < 8; ++e) {
      const auto& w = l.experts(e).workers();
      EXPECT_EQ(w.size(), e >= 6 ? 2 : 1) << "expert " << e;
      EXPECT_EQ(std::set<int32_t>(w.begin(), w.end()).size(), static_cast<std::size_t>(w.size()));
    }
}

}  // namespace
}  // namespace moemesh::actors
