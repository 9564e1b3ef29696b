// Internal: computes one batch of dispatches on an expert shard (the algorithm of expert_worker.h:
// validation, capacity, one run per expert over the rows of all senders, weighted scatter).
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <vector>

#include "core/config.h"
#include "core/expert_shard.h"
#include "expert_worker/detail/expert_counters.h"
#include "transport/data_plane.h"

namespace moemesh::detail {

// Owned by the data-plane server thread (its scratch buffers are reused across batches).
class BatchCompute {
 public:
  explicit BatchCompute(const ModelConfig& config) : config_(config) {}

  // Computes `batch` with `shard` (the caller holds the shard's mutex). Dispatches that fail
  // validation get their error set and are not computed. Appends to `runs` one ExpertRun per
  // expert that was named by at least one slot. capacity_factor <= 0: no limit.
  void run(std::span<transport::Dispatch> batch, ExpertShard& shard, double capacity_factor,
           std::vector<ExpertRun>& runs);

 private:
  // Empty when `d` may be computed; otherwise why not.
  std::string validate(const transport::Dispatch& d, const ExpertShard& shard) const;
  void run_layer(std::span<transport::Dispatch> batch, std::span<const int32_t> dispatches,
                 ExpertShard& shard, double capacity_factor, std::vector<ExpertRun>& runs);

  struct Slot {
    int32_t dispatch;  // index into the batch
    int64_t slot;      // index into that dispatch's [n_tokens, slots] arrays
  };

  const ModelConfig& config_;
  std::vector<int32_t> order_;      // valid dispatches, grouped by layer (arrival order within)
  std::vector<int64_t> count_;      // per expert + 1: counting-sort offsets
  std::vector<int64_t> fill_;       // per expert, then per output row: next free position
  std::vector<Slot> slots_;         // the layer's slots grouped by expert, arrival order within
  std::vector<ExpertRows> groups_;  // the layer's experts with kept rows, in gathered_
  std::vector<std::size_t> group_runs_;  // per group: its entry of `runs`
  std::vector<float> gathered_;          // [kept rows of the layer, hidden], expert order
  std::vector<uint16_t> gathered_bf16_;  // the same as bf16, when every row arrived as bf16
  // The layer's combine (ExpertShard::run_layer_combined): each valid dispatch's first output row
  // (indexed by batch position), and per output row its gathered rows and weights.
  std::vector<int64_t> out_base_;
  std::vector<int64_t> plan_offsets_;
  std::vector<int32_t> plan_rows_;
  std::vector<float> plan_weights_;
  std::vector<float> combined_;          // [the layer's tokens, hidden] sums
  std::vector<uint16_t> combined_bf16_;  // the same rounded to bf16 (every partial bf16)
};

}  // namespace moemesh::detail
