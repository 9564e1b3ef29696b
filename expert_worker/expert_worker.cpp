#include "expert_worker/expert_worker.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cmath>
#include <mutex>
#include <vector>

#include "core/expert_shard.h"
#include "expert_worker/detail/batch_compute.h"
#include "expert_worker/detail/expert_counters.h"

namespace moemesh {

namespace {
using Clock = std::chrono::steady_clock;
}  // namespace

struct ExpertWorker::Impl {
  Impl(const ModelConfig& config, std::unique_ptr<ExpertShard> s, const ExpertWorkerOptions& o)
      : shard(std::move(s)),
        batch(config),
        capacity_factor(o.capacity_factor),
        started(Clock::now()),
        counters(o.window_seconds, started) {}

  void handle(std::span<transport::Dispatch> dispatches);

  // Guarded by shard_mutex (the server thread holds it for a whole batch).
  std::mutex shard_mutex;
  std::unique_ptr<ExpertShard> shard;
  detail::BatchCompute batch;           // scratch of the batch in progress
  std::vector<detail::ExpertRun> runs;  // the batch's per-expert figures

  std::atomic<double> capacity_factor;
  const Clock::time_point started;

  // Guarded by stats_mutex.
  mutable std::mutex stats_mutex;
  detail::ExpertCounterTable counters;
  double busy_seconds = 0;
  int64_t weight_bytes = 0;

  // Started last, stopped first (~Impl destroys members in reverse order): the handler uses
  // everything above.
  std::unique_ptr<transport::DispatchServer> server;
};

void ExpertWorker::Impl::handle(std::span<transport::Dispatch> dispatches) {
  const double cf = capacity_factor.load(std::memory_order_relaxed);
  const Clock::time_point begin = Clock::now();
  {
    std::lock_guard lock(shard_mutex);
    runs.clear();
    batch.run(dispatches, *shard, cf, runs);
  }
  const Clock::time_point end = Clock::now();
  for (const transport::Dispatch& d : dispatches)
    if (d.error != nullptr && !d.error->empty())
      spdlog::warn("expert_worker dispatch_error layer={} epoch={} step={} error=\"{}\"", d.layer,
                   d.epoch, d.step, *d.error);
  std::lock_guard lock(stats_mutex);
  busy_seconds += std::chrono::duration<double>(end - begin).count();
  for (const detail::ExpertRun& r : runs) counters.record(r, end);
}

ExpertWorker::ExpertWorker(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ExpertWorker::~ExpertWorker() {
  if (impl_) impl_->server.reset();
}

Expected<std::unique_ptr<ExpertWorker>> ExpertWorker::start(const std::filesystem::path& model_dir,
                                                            const ExpertWorkerOptions& options) {
  if (options.threads < 0)
    return Error(
        fmt::format("expert worker: threads must be >= 0 (0: one per CPU the process may use), "
                    "got {}",
                    options.threads));
  if (!(options.window_seconds > 0) || !std::isfinite(options.window_seconds))
    return Error(
        fmt::format("expert worker: window_seconds must be a positive number of seconds, "
                    "got {}",
                    options.window_seconds));
  if (!(options.capacity_factor >= 0) || !std::isfinite(options.capacity_factor))
    return Error(fmt::format("expert worker: capacity_factor must be >= 0 (0: no limit), got {}",
                             options.capacity_factor));
  Expected<std::unique_ptr<ExpertShard>> shard =
      ExpertShard::load(model_dir, {},
                        ExpertShardOptions{.threads = options.threads,
                                           .cpus = options.cpus,
                                           .device = options.device,
                                           .quantization = options.quantization});
  if (!shard) return Error("expert worker: " + shard.error().message());
  if ((*shard)->config().num_moe_layers() == 0)
    return Error(
        fmt::format("expert worker: the model in {} has no MoE layer, so no experts to "
                    "serve",
                    model_dir.string()));

  auto impl = std::make_unique<Impl>((*shard)->config(), std::move(*shard), options);
  Impl* raw = impl.get();
  Expected<std::unique_ptr<transport::DispatchServer>> server = transport::DispatchServer::start(
      options.data_plane, [raw](std::span<transport::Dispatch> batch) { raw->handle(batch); });
  if (!server) return Error("expert worker: data plane: " + server.error().message());
  impl->server = std::move(*server);
  if (spdlog::should_log(spdlog::level::debug))  // for tools that reach it from outside
    spdlog::debug("expert_worker event=data_plane_listening address={}",
                  transport::address_to_hex(impl->server->address()));
  const ModelConfig& c = impl->shard->config();
  spdlog::info("expert_worker started model={} arch={} layers={} experts={} capacity_factor={}",
               model_dir.string(), c.model_type, c.num_layers, c.num_experts,
               options.capacity_factor);
  return std::unique_ptr<ExpertWorker>(new ExpertWorker(std::move(impl)));
}

const ModelConfig& ExpertWorker::config() const {
  return impl_->shard->config();
}

const std::string& ExpertWorker::data_address() const {
  return impl_->server->address();
}

Status ExpertWorker::assign(const proto::Assignment& assignment) {
  const proto::ExpertRefs& e = assignment.experts();
  if (e.layer_size() != e.expert_size())
    return Error(
        fmt::format("assignment version {}: experts.layer has {} entries but "
                    "experts.expert has {}: they must pair up",
                    assignment.version(), e.layer_size(), e.expert_size()));
  std::vector<ExpertRef> refs;
  refs.reserve(static_cast<std::size_t>(e.layer_size()));
  for (int i = 0; i < e.layer_size(); ++i) refs.push_back({e.layer(i), e.expert(i)});

  int64_t bytes = 0;
  std::size_t held = 0;
  {
    std::lock_guard lock(impl_->shard_mutex);
    if (Status s = impl_->shard->add(refs); !s)
      return Error(
          fmt::format("assignment version {}: {}", assignment.version(), s.error().message()));
    bytes = impl_->shard->weight_bytes();
    held = impl_->shard->experts().size();
  }
  {
    std::lock_guard lock(impl_->stats_mutex);
    for (const ExpertRef& r : refs) impl_->counters.ensure(r);
    impl_->weight_bytes = bytes;
  }
  spdlog::info("expert_worker assigned version={} listed={} held={} weight_bytes={}",
               assignment.version(), refs.size(), held, bytes);
  return {};
}

Status ExpertWorker::release(const proto::Assignment& assignment) {
  const proto::ExpertRefs& e = assignment.experts();
  if (e.layer_size() != e.expert_size())
    return Error(
        fmt::format("release version {}: experts.layer has {} entries but experts.expert "
                    "has {}: they must pair up",
                    assignment.version(), e.layer_size(), e.expert_size()));
  std::vector<ExpertRef> refs;
  for (int i = 0; i < e.layer_size(); ++i) refs.push_back({e.layer(i), e.expert(i)});
  int64_t bytes = 0;
  std::size_t held = 0;
  {
    std::lock_guard lock(impl_->shard_mutex);
    impl_->shard->release(refs);
    bytes = impl_->shard->weight_bytes();
    held = impl_->shard->experts().size();
  }
  {
    std::lock_guard lock(impl_->stats_mutex);
    impl_->weight_bytes = bytes;
  }
  spdlog::info("expert_worker released version={} listed={} held={} weight_bytes={}",
               assignment.version(), refs.size(), held, bytes);
  return {};
}

void ExpertWorker::set_capacity_factor(double factor) {
  if (!(factor >= 0) || !std::isfinite(factor)) factor = 0;
  impl_->capacity_factor.store(factor, std::memory_order_relaxed);
}

proto::ExpertWorkerStats ExpertWorker::stats() const {
  proto::ExpertWorkerStats out;
  const transport::ServerStats s = impl_->server->stats();
  out.set_dispatches_total(s.dispatches);
  out.set_replies_total(s.replies);
  out.set_errors_total(s.errors);
  out.set_bytes_in(s.bytes_in);
  out.set_bytes_out(s.bytes_out);
  out.set_queue_depth(s.last_batch);
  out.set_auth_failures_total(s.auth_failures);
  out.set_checksum_failures_total(s.checksum_failures);
  out.set_buffers_total(s.buffers);
  proto::FaultCounts* f = out.mutable_faults();
  f->set_drops(s.faults.drops);
  f->set_delays(s.faults.delays);
  f->set_corruptions(s.faults.corruptions);
  f->set_stalls(s.faults.stalls);
  out.set_capacity_factor(impl_->capacity_factor.load(std::memory_order_relaxed));
  const Clock::time_point now = Clock::now();
  out.set_uptime_seconds(std::chrono::duration<double>(now - impl_->started).count());
  std::lock_guard lock(impl_->stats_mutex);
  out.set_weight_bytes(impl_->weight_bytes);
  out.set_window_seconds(impl_->counters.window_seconds());
  out.set_busy_seconds(impl_->busy_seconds);
  impl_->counters.fill(out, now);
  return out;
}

}  // namespace moemesh
