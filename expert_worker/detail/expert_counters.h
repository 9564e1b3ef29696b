// Internal: the per (layer, expert) counters of an expert worker, with a sliding window of token
// counts kept in kBuckets time buckets.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <map>

#include "core/expert_shard.h"
#include "proto/cluster.pb.h"

namespace moemesh::detail {

// What one expert's run over one batch adds to its counters.
struct ExpertRun {
  ExpertRef ref;
  uint64_t tokens = 0;     // slots computed
  uint64_t overflows = 0;  // slots rejected over capacity
  double compute_seconds = 0;
  double queue_seconds = 0;  // summed over the dispatches that contributed slots
};

// Not thread-safe: its owner guards it (ExpertWorker's stats_mutex).
class ExpertCounterTable {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr int kBuckets = 30;

  // window_seconds > 0.
  ExpertCounterTable(double window_seconds, Clock::time_point origin);

  double window_seconds() const { return window_seconds_; }
  // Lists `ref` in snapshots even before it sees a token.
  void ensure(ExpertRef ref) { entries_.try_emplace(ref); }
  void record(const ExpertRun& run, Clock::time_point now);
  // Appends one ExpertCounters per listed expert, sorted by (layer, expert).
  void fill(proto::ExpertWorkerStats& out, Clock::time_point now) const;

 private:
  struct Entry {
    Entry() { bucket_index.fill(-1); }
    uint64_t tokens_total = 0;
    uint64_t overflows_total = 0;
    double compute_seconds = 0;
    double queue_seconds = 0;
    std::array<uint64_t, kBuckets> bucket_tokens{};
    std::array<int64_t, kBuckets> bucket_index{};  // which time bucket the slot counts (-1: none)
  };
  int64_t bucket_of(Clock::time_point t) const;

  double window_seconds_;
  double bucket_seconds_;
  Clock::time_point origin_;
  std::map<ExpertRef, Entry> entries_;
};

}  // namespace moemesh::detail
