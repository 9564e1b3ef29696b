#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "expert_worker/detail/batch_compute.h"

namespace moemesh::detail {

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

}  // namespace

std::string BatchCompute::validate(const transport::Dispatch& d, const ExpertShard& shard) const {
  const ModelConfig& c = config_;
  if (d.layer < 0 || d.layer >= c.num_layers || !c.layer_is_moe[static_cast<std::size_t>(d.layer)])
    return fmt::format(
        "layer {} has no routed experts in this model ({}, {} layers): the sender's model does "
        "not match the expert worker's",
        d.layer, c.model_type, c.num_layers);
  if (d.hidden != c.hidden_size)
    return fmt::format(
        "the dispatch for layer {} has hidden size {}, the expert worker's model has {}: the "
        "sender's model does not match",
        d.layer, d.hidden, c.hidden_size);
  if (d.slots < 1 || d.n_tokens < 0)
    return fmt::format("the dispatch for layer {} has {} tokens and {} slots per token", d.layer,
                       d.n_tokens, d.slots);
  const int64_t total = d.n_tokens * d.slots;
  for (int64_t i = 0; i < total; ++i) {
    const int32_t e = d.experts[i];
    if (e == -1) continue;
    if (e < -1 || e >= c.num_experts)
      return fmt::format("expert id {} is out of range for layer {} ({} experts)", e, d.layer,
                         c.num_experts);
    if (!shard.holds(d.layer, e))
      return fmt::format(
          "expert {} of layer {} is not held by this expert worker (the sender's placement, "
          "version {}, is stale or the expert was not assigned here)",
          e, d.layer, d.epoch);
  }
  return {};
}

void BatchCompute::run(std::span<transport::Dispatch> batch, ExpertShard& shard,
                       double capacity_factor, std::vector<ExpertRun>& runs) {
  order_.clear();
  for (std::size_t i = 0; i < batch.size(); ++i) {
    std::string why = validate(batch[i], shard);
    if (why.empty()) {
      order_.push_back(static_cast<int32_t>(i));
    } else if (batch[i].error != nullptr) {
      *batch[i].error = std::move(why);
    }
  }
  std::stable_sort(order_.begin(), order_.end(),
                   [&](int32_t a, int32_t b) { return batch[a].layer < batch[b].layer; });
  for (std::size_t begin = 0; begin < order_.size();) {
    std::size_t end = begin + 1;
    while (end < order_.size() && batch[order_[end]].layer == batch[order_[begin]].layer) ++end;
    run_layer(batch, std::span<const int32_t>(order_).subspan(begin, end - begin), shard,
              capacity_factor, runs);
    begin = end;
  }
}

void BatchCompute::run_layer(std::span<transport::Dispatch> batch,
                             std::span<const int32_t> dispatches, ExpertShard& shard,
                             double capacity_factor, std::vector<ExpertRun>& runs) {
  const int32_t layer = batch[dispatches.front()].layer;
  const int64_t n_experts = config_.num_experts;
  const int64_t H = config_.hidden_size;

  // Bucket every slot of the layer's dispatches by expert; a counting sort keeps arrival order.
  count_.assign(static_cast<std::size_t>(n_experts + 1), 0);
  double step_slots = 0;
  for (int32_t di : dispatches) {
    const transport::Dispatch& d = batch[di];
    step_slots += static_cast<double>(d.step_tokens) * d.slots;
    for (int64_t i = 0; i < d.n_tokens * d.slots; ++i)
      if (d.experts[i] >= 0) ++count_[d.experts[i] + 1];
  }
  for (int64_t e = 0; e < n_experts; ++e) count_[e + 1] += count_[e];
  fill_.assign(count_.begin(), count_.end() - 1);
  slots_.resize(static_cast<std::size_t>(count_[n_experts]));
  for (int32_t di : dispatches) {
    const transport::Dispatch& d = batch[di];
    for (int64_t i = 0; i < d.n_tokens * d.slots; ++i)
      if (d.experts[i] >= 0) slots_[fill_[d.experts[i]]++] = {di, i};
  }

  int64_t capacity = std::numeric_limits<int64_t>::max();
  if (capacity_factor > 0)
    capacity = std::max<int64_t>(
        1, static_cast<int64_t>(std::ceil(capacity_factor * step_slots / n_experts)));

  // Every expert's kept rows, gathered in expert order into one batch (over-capacity slots are
  // rejected), then computed by the shard in one call: a GPU shard moves the layer's rows once
  // each way and multiplies them in grouped GEMMs.
  groups_.clear();
  group_runs_.clear();
  int64_t total = 0;
  for (int64_t e = 0; e < n_experts; ++e) {
    const int64_t m = count_[e + 1] - count_[e];
    if (m == 0) continue;
    ExpertRun run;
    run.ref = {layer, static_cast<int32_t>(e)};
    const int64_t kept = std::min(m, capacity);
    for (int64_t r = kept; r < m; ++r) {
      const Slot& s = slots_[count_[e] + r];
      batch[s.dispatch].rejected[s.slot] = 1;
    }
    run.overflows = static_cast<uint64_t>(m - kept);
    run.tokens = static_cast<uint64_t>(kept);
    runs.push_back(run);
    if (kept == 0) continue;
    groups_.push_back({static_cast<int32_t>(e), total, kept});
    group_runs_.push_back(runs.size() - 1);
    total += kept;
  }
  if (groups_.empty()) return;
  // Rows that all arrived as bf16 (bf16 views) are gathered as they are, for the shard to take as
  // bf16 (a GPU copies them up unconverted); otherwise as float32.
  bool bf16 = true;
  for (int32_t di : dispatches) bf16 = bf16 && batch[di].x_bf16 != nullptr;
  (bf16 ? gathered_bf16_.resize(static_cast<std::size_t>(total * H))
        : gathered_.resize(static_cast<std::size_t>(total * H)));
  for (const ExpertRows& g : groups_)
    for (int64_t r = 0; r < g.rows; ++r) {
      const Slot& s = slots_[count_[g.expert] + r];
      const transport::Dispatch& d = batch[s.dispatch];
      const int64_t at = (s.slot / d.slots) * H;
      if (bf16) {
        std::copy(d.x_bf16 + at, d.x_bf16 + at + H, gathered_bf16_.data() + (g.offset + r) * H);
        continue;
      }
      float* dst = gathered_.data() + (g.offset + r) * H;
      if (d.x != nullptr)
        std::copy(d.x + at, d.x + at + H, dst);
      else
        transport::bf16_to_f32(d.x_bf16 + at, dst, static_cast<std::size_t>(H));
    }
  // Each dispatch's tokens are output rows [base, base + n_tokens) of the layer's combined sums:
  // row o sums weight * the expert's output over the token's kept slots, in expert order.
  out_base_.resize(batch.size());
  int64_t n_out = 0;
  bool bf16_out = true;  // every dispatch of the layer takes bf16 partial sums
  for (int32_t di : dispatches) {
    out_base_[di] = n_out;
    n_out += batch[di].n_tokens;
    bf16_out = bf16_out && batch[di].partial == nullptr && batch[di].partial_bf16 != nullptr;
  }
  plan_offsets_.assign(static_cast<std::size_t>(n_out + 1), 0);
  auto out_row = [&](const Slot& s) {
    return out_base_[s.dispatch] + s.slot / batch[s.dispatch].slots;
  };
  for (const ExpertRows& g : groups_)
    for (int64_t r = 0; r < g.rows; ++r) ++plan_offsets_[out_row(slots_[count_[g.expert] + r]) + 1];
  for (int64_t o = 0; o < n_out; ++o) plan_offsets_[o + 1] += plan_offsets_[o];
  fill_.assign(plan_offsets_.begin(), plan_offsets_.end() - 1);
  plan_rows_.resize(static_cast<std::size_t>(total));
  plan_weights_.resize(static_cast<std::size_t>(total));
  for (const ExpertRows& g : groups_)
    for (int64_t r = 0; r < g.rows; ++r) {
      const Slot& sl = slots_[count_[g.expert] + r];
      const int64_t at = fill_[out_row(sl)]++;
      plan_rows_[at] = static_cast<int32_t>(g.offset + r);
      plan_weights_[at] = batch[sl.dispatch].weights[sl.slot];
    }
  (bf16_out ? combined_bf16_.resize(static_cast<std::size_t>(n_out * H))
            : combined_.resize(static_cast<std::size_t>(n_out * H)));

  const Clock::time_point started = Clock::now();
  // Slots are grouped by dispatch (arrival order), so each contributing dispatch counts once.
  for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
    const int64_t begin = count_[groups_[gi].expert];
    for (int64_t r = 0; r < groups_[gi].rows; ++r)
      if (r == 0 || slots_[begin + r].dispatch != slots_[begin + r - 1].dispatch)
        runs[group_runs_[gi]].queue_seconds +=
            std::max(0.0, seconds(started - batch[slots_[begin + r].dispatch].received));
  }
  Status s = shard.run_layer_combined(
      layer, groups_, bf16 ? nullptr : gathered_.data(), bf16 ? gathered_bf16_.data() : nullptr,
      total, RowCombine{plan_offsets_, plan_rows_, plan_weights_},
      bf16_out ? nullptr : combined_.data(), bf16_out ? combined_bf16_.data() : nullptr);
  // The layer's compute time, shared among its experts by their rows.
  const double compute = seconds(Clock::now() - started);
  for (std::size_t gi = 0; gi < groups_.size(); ++gi)
    runs[group_runs_[gi]].compute_seconds =
        compute * static_cast<double>(groups_[gi].rows) / static_cast<double>(total);
  if (!s) {
    // Validation checked that the experts are held, so this is unexpected: fail the dispatches
    // that needed them rather than answer with partial sums that lack them.
    for (std::size_t gi = 0; gi < groups_.size(); ++gi) {
      const int32_t e = groups_[gi].expert;
      for (int64_t r = count_[e]; r < count_[e + 1]; ++r) {
        transport::Dispatch& d = batch[slots_[r].dispatch];
        if (d.error != nullptr && d.error->empty())
          *d.error = fmt::format("expert {} of layer {} failed: {}", e, layer, s.error().message());
      }
      runs[group_runs_[gi]].tokens = 0;
    }
    return;
  }
  // Each dispatch's sums into its partial rows (the server zeroed them: a dispatch that is not
  // computed answers zeros); bf16 ones are rounded once, on the GPU when all of them are bf16.
  for (int32_t di : dispatches) {
    transport::Dispatch& d = batch[di];
    const int64_t at = out_base_[di] * H;
    const int64_t n = d.n_tokens * H;
    if (bf16_out)
      std::copy(combined_bf16_.data() + at, combined_bf16_.data() + at + n, d.partial_bf16);
    else if (d.partial != nullptr)
      std::copy(combined_.data() + at, combined_.data() + at + n, d.partial);
    else
      transport::f32_to_bf16(combined_.data() + at, d.partial_bf16, static_cast<std::size_t>(n));
  }
}

}  // namespace moemesh::detail
