#include "actors/placement.h"

#include <algorithm>
#include <numeric>

namespace moemesh::actors {

proto::Placement plan_placement(const proto::Placement& current, const PlacementRequest& request) {
  const std::set<int32_t> live(request.live_workers.begin(), request.live_workers.end());
  std::map<int32_t, const proto::LayerPlacement*> old;
  for (const proto::LayerPlacement& l : current.layers()) old[l.layer()] = &l;

  // Copies kept from the current placement.
  std::vector<std::vector<std::vector<int32_t>>> holders(request.moe_layers.size());
  std::map<int32_t, int64_t> total;  // experts held per live worker, over all layers
  for (int32_t w : live) total[w] = 0;
  for (std::size_t li = 0; li < request.moe_layers.size(); ++li) {
    holders[li].resize(static_cast<std::size_t>(request.num_experts));
    auto it = old.find(request.moe_layers[li]);
    if (it == old.end()) continue;
    for (int32_t e = 0; e < request.num_experts && e < it->second->experts_size(); ++e)
      for (int32_t w : it->second->experts(e).workers())
        if (live.count(w)) {
          holders[li][static_cast<std::size_t>(e)].push_back(w);
          ++total[w];
        }
  }

  const auto want = static_cast<std::size_t>(
      std::max<int64_t>(0, std::min<int64_t>(request.replicas, static_cast<int64_t>(live.size()))));
  if (request.fill) {
    for (std::size_t li = 0; li < holders.size(); ++li) {
      std::map<int32_t, int64_t> in_layer;
      for (int32_t w : live) in_layer[w] = 0;
      for (const auto& h : holders[li])
        for (int32_t w : h) ++in_layer[w];
      for (auto& h : holders[li]) {
        while (h.size() < want) {
          int32_t best = -1;
          for (int32_t w : live) {
            if (std::find(h.begin(), h.end(), w) != h.end()) continue;
            if (best < 0 || in_layer[w] < in_layer[best] ||
                (in_layer[w] == in_layer[best] && total[w] < total[best]))
              best = w;
          }
          if (best < 0) break;
          h.push_back(best);
          ++in_layer[best];
          ++total[best];
        }
      }
    }
  }

  proto::Placement out;
  for (std::size_t li = 0; li < holders.size(); ++li) {
    proto::LayerPlacement* l = out.add_layers();
    l->set_layer(request.moe_layers[li]);
    for (auto& h : holders[li]) {
      std::sort(h.begin(), h.end());
      *l->add_experts()->mutable_workers() = {h.begin(), h.end()};
    }
  }
  return out;
}

std::map<int32_t, std::set<std::pair<int32_t, int32_t>>> experts_by_worker(
    const proto::Placement& placement) {
  std::map<int32_t, std::set<std::pair<int32_t, int32_t>>> out;
  for (const proto::LayerPlacement& l : placement.layers())
    for (int32_t e = 0; e < l.experts_size(); ++e)
      for (int32_t w : l.experts(e).workers()) out[w].insert({l.layer(), e});
  return out;
}

bool placement_complete(const proto::Placement& placement, int32_t num_experts) {
  if (placement.layers_size() == 0) return false;
  for (const proto::LayerPlacement& l : placement.layers()) {
    if (l.experts_size() != num_experts) return false;
    for (const proto::ExpertReplicas& r : l.experts())
      if (r.workers_size() == 0) return false;
  }
  return true;
}

double balancedness(const std::vector<uint64_t>& counts) {
  if (counts.empty()) return 1.0;
  const uint64_t max = *std::max_element(counts.begin(), counts.end());
  if (max == 0) return 1.0;
  const double mean =
      static_cast<double>(std::accumulate(counts.begin(), counts.end(), uint64_t{0})) /
      static_cast<double>(counts.size());
  return mean / static_cast<double>(max);
}

}  // namespace moemesh::actors
