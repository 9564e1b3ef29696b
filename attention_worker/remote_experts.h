// RemoteExperts: the ExpertBackend of an attention worker whose routed experts live in expert
// workers (expert_worker/expert_worker.h), reached over the data plane (transport/data_plane.h).
//
// Placement. set_placement() hands over the router's table (proto::Placement: which workers hold
// a copy of each (layer, expert), and their data addresses); it takes effect at the next start(),
// a step boundary, where new workers are connected and removed ones disconnected. Its version is
// the epoch of every dispatch.
//
// One MoE layer. start() looks up the replicas of each (token, slot)'s expert, picks one per slot
// spreading the load ((token + call) % replicas, over the workers not lost), and sends ONE
// dispatch per destination worker holding each token once (a token routed to several experts of
// one worker travels once; its other slots are -1 for that worker). finish() waits until now +
// timeout, then:
//   - slots a worker rejected (over its capacity factor), and all slots of a worker that did not
//     answer in time or answered with an error, are sent again, in a second round, to another
//     replica when one exists (rerouted_slots);
//   - rejected slots with no other replica (or rejected again) are dropped (dropped_slots, and per
//     (layer, expert) drops): that token's routed output is scaled by (sum of its gate weights) /
//     (sum of its kept gate weights), or is 0 when every slot was dropped;
//   - slots of a worker that timed out or failed, with no other replica, fail the step with an
//     error naming the worker and the timeout (failed_steps).
// A worker that timed out (or whose send failed) is lost: it is not chosen (and a failed endpoint
// is closed; a silent one kept, its late replies dropped as late) until
// the next set_placement() or until its back-off ends (1 s, doubled at each failure up to 30 s,
// reset when it answers), when it is connected again and tried (worker_retries). Meanwhile an
// expert with no other copy still goes to a silent lost worker, as the last resort (a lost
// message or a short stall then fails one step, not every step of a back-off), and fails each
// step at once with "expert E of layer L has no live copy" when its worker's endpoint failed
// (UCX saw it die).
// Under a model on a GPU (start_device()), each worker's message is laid out in GPU memory and its
// device pointer handed to the data plane where UCX takes CUDA memory (device_dispatches_total);
// otherwise the model stages the rows through host memory and calls start().
// A worker that answered with an error (a refused or corrupted dispatch) stays in use. The partial
// sums are added into `out` in ascending worker id order (first round, then second), so the result
// does not depend on the order replies arrive in.
//
// Threads: start(), finish() and compute() run on the engine thread, which owns the client, the
// connections and every buffer (reused across calls: no allocation in steady state).
// set_placement() may be called from any thread: it stores the placement under placement_mutex_
// for the engine thread to pick up. stats() and placement_version() may be called from any thread:
// the counters are guarded by stats_mutex_.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>

#include "core/config.h"
#include "core/error.h"
#include "core/model.h"
#include "proto/cluster.pb.h"
#include "transport/data_plane.h"

namespace moemesh {

struct RemoteExpertsOptions {
  // bf16_views may be set (as `moemesh attention` does): bf16 partial sums are then converted as
  // they are copied out of the reply, with the same result.
  transport::DataPlaneOptions data_plane;
  std::chrono::milliseconds timeout{1000};  // deadline of one dispatch round
  // On a GPU: send the rows from device memory where UCX takes it, instead of staging them
  // through host memory (see takes_device_rows()).
  bool device_rows = true;
};

class RemoteExperts : public ExpertBackend {
 public:
  // Creates the data-plane client; no worker is known until set_placement().
  static Expected<std::unique_ptr<RemoteExperts>> create(const ModelConfig& config,
                                                         const RemoteExpertsOptions& options);
  ~RemoteExperts() override;
  RemoteExperts(const RemoteExperts&) = delete;
  RemoteExperts& operator=(const RemoteExperts&) = delete;

  // Takes effect at the next start() (a step boundary); connects to new workers then, and gives
  // workers lost under the previous placement another chance when they are listed again.
  void set_placement(const proto::Placement& placement);
  // The version of the placement last set (not necessarily applied yet).
  uint64_t placement_version() const;
  proto::DispatchStats stats() const;

  // ExpertBackend, on the engine thread only.
  Status compute(int64_t layer, const float* x, int64_t n, const int32_t* ids, const float* weights,
                 int64_t top_k, float* out) override;
  Status start(int64_t layer, const float* x, int64_t n, const int32_t* ids, const float* weights,
               int64_t top_k, float* out) override;
  Status finish() override;
  // Rows in GPU memory are sent from there (DispatchClient::send_payload) when options.device_rows
  // is set and, for CUDA memory, this side's UCX takes it (DispatchClient::cuda_memory()).
  bool takes_device_rows(bool cuda_memory) const override;
  Status start_device(int64_t layer, DeviceRows& x, int64_t n, const int32_t* ids,
                      const float* weights, int64_t top_k, float* out) override;

  struct Impl;

 private:
  Status begin(int64_t layer, const float* x, DeviceRows* device, int64_t n, const int32_t* ids,
               const float* weights, int64_t top_k, float* out);
  explicit RemoteExperts(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moemesh
