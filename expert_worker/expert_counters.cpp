#include <algorithm>

#include "expert_worker/detail/expert_counters.h"

namespace moemesh::detail {

ExpertCounterTable::ExpertCounterTable(double window_seconds, Clock::time_point origin)
    : window_seconds_(window_seconds),
      bucket_seconds_(window_seconds / kBuckets),
      origin_(origin) {}

int64_t ExpertCounterTable::bucket_of(Clock::time_point t) const {
  const double s = std::chrono::duration<double>(t - origin_).count();
  return std::max<int64_t>(0, static_cast<int64_t>(s / bucket_seconds_));
}

void ExpertCounterTable::record(const ExpertRun& run, Clock::time_point now) {
  Entry& e = entries_[run.ref];
  e.tokens_total += run.tokens;
  e.overflows_total += run.overflows;
  e.compute_seconds += run.compute_seconds;
  e.queue_seconds += run.queue_seconds;
  if (run.tokens == 0) return;
  const int64_t b = bucket_of(now);
  const auto slot = static_cast<std::size_t>(b % kBuckets);
  if (e.bucket_index[slot] != b) {
    e.bucket_index[slot] = b;
    e.bucket_tokens[slot] = 0;
  }
  e.bucket_tokens[slot] += run.tokens;
}

void ExpertCounterTable::fill(proto::ExpertWorkerStats& out, Clock::time_point now) const {
  const int64_t current = bucket_of(now);
  for (const auto& [ref, e] : entries_) {
    proto::ExpertCounters* c = out.add_experts();
    c->set_layer(ref.layer);
    c->set_expert(ref.expert);
    c->set_tokens_total(e.tokens_total);
    uint64_t window = 0;
    for (int i = 0; i < kBuckets; ++i) {
      const int64_t age = current - e.bucket_index[i];
      if (age >= 0 && age < kBuckets) window += e.bucket_tokens[i];
    }
    c->set_tokens_window(window);
    c->set_overflows_total(e.overflows_total);
    c->set_compute_seconds(e.compute_seconds);
    c->set_queue_seconds(e.queue_seconds);
  }
}

}  // namespace moemesh::detail
