#include "actors/placement.h"

#include <algorithm>
#include <cmath>
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

proto::Placement plan_balanced(const PlacementRequest& request,
                               const std::map<std::pair<int32_t, int32_t>, uint64_t>& load,
                               const proto::Placement& current) {
  std::vector<int32_t> live = request.live_workers;
  std::sort(live.begin(), live.end());
  live.erase(std::unique(live.begin(), live.end()), live.end());
  const auto W = static_cast<int32_t>(live.size());
  const int32_t E = request.num_experts;
  const int32_t base = std::max(0, std::min(request.replicas, W));
  std::map<int32_t, const proto::LayerPlacement*> old;
  for (const proto::LayerPlacement& l : current.layers()) old[l.layer()] = &l;

  proto::Placement out;
  for (int32_t layer : request.moe_layers) {
    proto::LayerPlacement* lp = out.add_layers();
    lp->set_layer(layer);
    for (int32_t e = 0; e < E; ++e) lp->add_experts();
    if (base == 0) continue;

    // Loads; a layer with no statistics yet is treated as evenly loaded.
    std::vector<double> l(static_cast<std::size_t>(E), 0.0);
    double sum = 0;
    for (int32_t e = 0; e < E; ++e) {
      auto it = load.find({layer, e});
      l[e] = it == load.end() ? 0.0 : static_cast<double>(it->second);
      sum += l[e];
    }
    if (sum == 0) std::fill(l.begin(), l.end(), 1.0);

    // Copies per expert: `base` each, the redundant ones to the heaviest per copy.
    std::vector<int32_t> r(static_cast<std::size_t>(E), base);
    for (int32_t k = 0; k < request.redundant; ++k) {
      int32_t best = -1;
      for (int32_t e = 0; e < E; ++e)
        if (r[e] < W && (best < 0 || l[e] / r[e] > l[best] / r[best])) best = e;
      if (best < 0) break;
      ++r[best];
    }

    // Start from the current copies on live workers (at most r[e] of them).
    std::vector<std::vector<int32_t>> holders(static_cast<std::size_t>(E));
    std::map<int32_t, double> carried;
    std::map<int32_t, int32_t> copies;
    for (int32_t w : live) carried[w] = 0, copies[w] = 0;
    auto add = [&](int32_t e, int32_t w) {
      holders[e].push_back(w);
      carried[w] += l[e] / r[e];
      ++copies[w];
    };
    if (auto it = old.find(layer); it != old.end())
      for (int32_t e = 0; e < E && e < it->second->experts_size(); ++e)
        for (int32_t w : it->second->experts(e).workers())
          if (carried.count(w) && static_cast<int32_t>(holders[e].size()) < r[e] &&
              std::find(holders[e].begin(), holders[e].end(), w) == holders[e].end())
            add(e, w);

    // Missing copies, heaviest first, each on the least loaded worker without one.
    std::vector<int32_t> order(static_cast<std::size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return l[a] / r[a] > l[b] / r[b]; });
    for (int32_t e : order)
      while (static_cast<int32_t>(holders[e].size()) < r[e]) {
        int32_t best = -1;
        for (int32_t w : live) {
          if (std::find(holders[e].begin(), holders[e].end(), w) != holders[e].end()) continue;
          if (best < 0 || carried[w] < carried[best] ||
              (carried[w] == carried[best] && copies[w] < copies[best]))
            best = w;
        }
        add(e, best);
      }

    // Moves from the most to the least loaded worker while one lowers the larger of the two:
    // each move takes the copy whose share is closest to half the gap, so few copies move.
    for (int32_t step = 0; step < E * W; ++step) {
      int32_t hi = live[0], lo = live[0];
      for (int32_t w : live) {
        if (carried[w] > carried[hi]) hi = w;
        if (carried[w] < carried[lo]) lo = w;
      }
      const double gap = carried[hi] - carried[lo];
      int32_t pick = -1;
      double pick_score = 0;
      for (int32_t e = 0; e < E; ++e) {
        const auto& h = holders[e];
        if (std::find(h.begin(), h.end(), hi) == h.end() ||
            std::find(h.begin(), h.end(), lo) != h.end())
          continue;
        const double share = l[e] / r[e];
        if (!(share > 0 && share < gap * (1 - 1e-9))) continue;
        const double score = std::abs(share - gap / 2);
        if (pick < 0 || score < pick_score) pick = e, pick_score = score;
      }
      if (pick < 0) break;
      auto& h = holders[pick];
      *std::find(h.begin(), h.end(), hi) = lo;
      const double share = l[pick] / r[pick];
      carried[hi] -= share, carried[lo] += share;
      --copies[hi], ++copies[lo];
    }
    for (int32_t e = 0; e < E; ++e) {
      std::sort(holders[e].begin(), holders[e].end());
      for (int32_t w : holders[e]) lp->mutable_experts(e)->add_workers(w);
    }
  }
  return out;
}

double worker_balancedness(const proto::Placement& placement,
                           const std::map<std::pair<int32_t, int32_t>, uint64_t>& load) {
  double worst = 1.0;
  for (const proto::LayerPlacement& l : placement.layers()) {
    std::map<int32_t, double> carried;
    for (const proto::ExpertReplicas& r : l.experts())
      for (int32_t w : r.workers()) carried[w] = 0;
    for (int32_t e = 0; e < l.experts_size(); ++e) {
      const auto& workers = l.experts(e).workers();
      auto it = load.find({l.layer(), e});
      if (it == load.end() || workers.empty()) continue;
      for (int32_t w : workers)
        carried[w] += static_cast<double>(it->second) / static_cast<double>(workers.size());
    }
    double sum = 0, max = 0;
    for (const auto& [w, c] : carried) sum += c, max = std::max(max, c);
    if (max > 0) worst = std::min(worst, sum / static_cast<double>(carried.size()) / max);
  }
  return worst;
}

int64_t copies_moved(const proto::Placement& from, const proto::Placement& to) {
  const auto before = experts_by_worker(from);
  int64_t moved = 0;
  for (const auto& [w, experts] : experts_by_worker(to)) {
    auto it = before.find(w);
    for (const auto& x : experts)
      if (it == before.end() || !it->second.count(x)) ++moved;
  }
  return moved;
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
