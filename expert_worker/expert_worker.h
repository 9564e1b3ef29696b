// The expert worker role: holds a shard of a checkpoint's routed experts and computes them for the
// token batches that attention workers send over the data plane (transport/data_plane.h).
//
// ExpertWorker::start reads config.json, maps the checkpoint (no expert is bound yet) and starts
// a DispatchServer whose address (data_address()) the router publishes in its placement. assign()
// binds the experts the router places here; experts already held stay held.
//
// Every batch the server hands over (the dispatches complete at that moment, from any number of
// attention workers and layers) is computed as follows. Per layer, for each held expert in
// ascending id order, the rows of all the batch's dispatches whose slots name that expert are
// gathered, and one ExpertShard::run_layer_combined call computes every expert over its rows and
// each token's partial sum of w * E(x) over its kept slots, in ascending expert id order (on a
// GPU: one copy up, grouped GEMMs, the sums added on the GPU and only the tokens' rows copied
// back). With bf16 views (data_plane.bf16_views, as `moemesh expert` runs) and a bf16 wire, a
// layer's rows are gathered as bf16 and handed over as they are (a GPU copies them up
// unconverted, the CPU widens them to f32), and the f32 sums are rounded to bf16 once per
// dispatch (on a GPU before they come back): the same bits as the data plane's own conversions
// give. A dispatch that names an expert this worker does not hold (a
// stale placement), a dense layer, an expert id out of range or a hidden size that is not the
// model's is answered with an error naming the problem, and none of its slots is computed.
//
// Capacity factor cf > 0: per layer and batch, each expert takes at most
//   capacity = ceil(cf * sum over the batch's dispatches of (step_tokens * slots) / num_experts)
// slots, in arrival order (dispatch order, then token order); the rest are marked rejected in the
// reply (the sender reroutes or drops them) and counted as overflows. cf = 0: no limit.
//
// Statistics per (layer, expert) held at some point: token-slots computed (total and in a sliding
// window of window_seconds, kept in 30 buckets, so the window is exact to 1/30 of its length),
// overflows, compute seconds (the layer's compute time shared among its experts by their rows),
// and queue seconds (arrival of a dispatch to the start of the layer's computation, summed over
// dispatches). Worker totals come from the server.
//
// Threads: the data-plane server thread computes every batch. assign(), set_capacity_factor() and
// stats() may be called from any thread: the shard (and the set of held experts) is guarded by
// one mutex (shard_mutex), which the server thread holds while it computes a batch; the counters
// by another (stats_mutex), taken briefly after each batch (never while holding it does a thread
// take shard_mutex). assign() therefore waits for the batch in progress.
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "core/config.h"
#include "core/error.h"
#include "proto/cluster.pb.h"
#include "transport/data_plane.h"

namespace moemesh {

struct ExpertWorkerOptions {
  int threads = 0;             // compute threads (0: one per CPU the process may use)
  std::vector<int> cpus = {};  // CPUs the compute threads are pinned to (ExpertShardOptions::cpus)
  std::string device = "cpu";  // where the experts compute: cpu, cuda or cuda:N
  std::string quantization = "none";  // the experts' weights: none or int8 (ExpertShardOptions)
  transport::DataPlaneOptions data_plane;
  double capacity_factor = 0;  // 0: no limit, no token ever rejected
  double window_seconds = 60;  // sliding window of the token counters
};

class ExpertWorker {
 public:
  // Reads config.json, maps the checkpoint (no experts bound yet), starts the data-plane server.
  // Fails naming the problem: a bad model directory, a bad option, or a server that cannot start.
  static Expected<std::unique_ptr<ExpertWorker>> start(const std::filesystem::path& model_dir,
                                                       const ExpertWorkerOptions& options);
  // Stops the server (dispatches in flight get no reply: their senders time out).
  ~ExpertWorker();
  ExpertWorker(const ExpertWorker&) = delete;
  ExpertWorker& operator=(const ExpertWorker&) = delete;

  const ModelConfig& config() const;
  // The data-plane address (UCX worker address bytes) for ExpertWorkerAddress::data_address.
  const std::string& data_address() const;

  // Binds the experts of the assignment not yet held; keeps the experts already held. All or
  // nothing: on an error (a layer that is not MoE, an expert id out of range, a missing tensor,
  // layer and expert lists of different lengths) nothing is bound. Dispatches for experts not held
  // are answered with an error naming layer and expert.
  Status assign(const proto::Assignment& assignment);
  // Unbinds the listed experts (their weights are unmapped; their counters stay). Experts not held
  // are ignored. Waits for the batch in progress.
  Status release(const proto::Assignment& assignment);
  // Takes effect with the next batch; values < 0 or not finite are treated as 0 (no limit).
  void set_capacity_factor(double factor);
  // Counters and totals; the caller fills worker_id and name.
  proto::ExpertWorkerStats stats() const;

  struct Impl;

 private:
  explicit ExpertWorker(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moemesh
