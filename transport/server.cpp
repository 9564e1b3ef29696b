// DispatchServer: the expert-worker side of the data plane (contract in data_plane.h).
//
// Everything below `Owned by the server thread` is touched only by the thread started in start();
// the atomics are the stats, read by any thread. A received message becomes an Inbound taken from
// a pool; the Inbound lives until its reply send completes (or fails), then returns to the pool.
#include <sched.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <future>
#include <mutex>
#include <thread>
#include <unordered_set>

#include "transport/data_plane.h"
#include "transport/detail/auth.h"
#include "transport/detail/faults.h"
#include "transport/detail/ucx.h"
#include "transport/detail/wire.h"

namespace moemesh::transport {

using detail::ByteBuffer;
using Clock = std::chrono::steady_clock;

namespace {

// Busy-poll this long after the last event before sleeping on the event fd: long enough for the
// next dispatch of a burst, short enough not to take a core from the attention worker's compute
// between layers where roles share cores (decode of the demo cluster on 2 cores at batch 16:
// 0.87 of single-process throughput with 100 us, 0.77 with 1 ms).
constexpr auto kSpin = std::chrono::microseconds(100);
// Within kSpin, poll without yielding this long after the last event, then yield between polls.
constexpr auto kYieldAfter = std::chrono::microseconds(20);
// Longest sleep on the event fd; bounds how late the stop flag is seen if a signal is missed.
constexpr int kSleepMs = 50;
// How long shutdown waits for replies in flight and endpoint closes.
constexpr auto kDrain = std::chrono::milliseconds(100);
// Error texts are cut to this length: they travel in the AM header, whose size UCX limits.
constexpr size_t kMaxErrorBytes = 1024;
// Idle polls zero released reply buffers in pieces of this size (~5 us each), so that a message
// arriving meanwhile waits at most that long.
constexpr size_t kZeroChunk = size_t{128} << 10;

}  // namespace

class DispatchServer::Impl {
 public:
  Impl(DataPlaneOptions options, Handler handler)
      : options_(std::move(options)), handler_(std::move(handler)) {}
  ~Impl();

  Status start();
  const std::string& address() const { return address_; }
  ServerStats stats() const;

 private:
  enum class State { kFree, kReceiving, kReady, kReplying };
  struct Inbound {
    Impl* server = nullptr;
    State state = State::kFree;
    // From the header.
    uint64_t epoch = 0, step = 0, seq = 0;
    int32_t layer = 0, micro_batch = 0, slots = 0;
    int64_t n_tokens = 0, step_tokens = 0, hidden = 0;
    WireDtype dtype = WireDtype::F32;
    bool views_bf16 = false;  // handed to the handler as on the wire (bf16_views, bf16 wire)
    detail::DispatchLayout layout;
    ucp_ep_h reply_ep = nullptr;
    Clock::time_point received;
    // The payload: eager data held from UCX (am_data) or a rendezvous copy in `payload_buf`.
    void* am_data = nullptr;
    const std::byte* payload = nullptr;
    ByteBuffer payload_buf;
    void* request = nullptr;   // receive or reply send in flight
    ByteBuffer x_f32;          // x converted from bf16
    bool x_converted = false;  // the receive already filled x_f32 (fused, see Bf16Message)
    // partial [n, hidden] (f32, or bf16 with views_bf16) then rejected [n, slots]
    ByteBuffer reply;
    // Bytes [0, zeroed) of `reply` are zero, and so are bytes from dirty_end on (no dirty bytes
    // when both are 0).
    size_t zeroed = 0, dirty_end = 0;
    bool in_dirty = false;     // listed in dirty_ (at most once)
    detail::Bf16Message wire;  // a fused bf16 receive or reply in flight
    std::string reply_header;
    std::string error;
    bool malformed = false;        // answered with `error` without calling the handler
    bool unauthenticated = false;  // refused for its tag: the refusal goes out unsigned
  };

  void run(std::promise<Status>* ready);
  void serve();
  void shutdown();

  static ucs_status_t on_dispatch_am(void* arg, const void* header, size_t header_length,
                                     void* data, size_t length, const ucp_am_recv_param_t* param);
  ucs_status_t on_dispatch(const void* header, size_t header_length, void* data, size_t length,
                           const ucp_am_recv_param_t* param);
  static void on_receive_done(void* request, ucs_status_t status, size_t length, void* user);
  static void on_send_done(void* request, ucs_status_t status, void* user);

  Inbound* acquire(size_t reply_bytes);
  void release(Inbound* in);
  void reject(Inbound* in, std::string message, bool log = true);
  void refuse_unauthenticated(Inbound* in, ucp_ep_h peer);
  void handle_ready();
  bool prepare(Inbound& in, Dispatch& d);
  bool zero_some();
  void send_reply(Inbound& in);
  detail::FaultAction inject(detail::FaultPoint point);
  void pause(std::chrono::milliseconds d);
  void count_buffer(bool grew) {
    if (grew) buffers_.fetch_add(1, std::memory_order_relaxed);
  }

  const DataPlaneOptions options_;
  bool fused_ = false;  // set by run() once UCX's settings are in place (see detail::fused_ok())
  const Handler handler_;
  std::unique_ptr<detail::HeaderAuth> auth_;       // used by the server thread only
  std::unique_ptr<detail::FaultInjector> faults_;  // server thread only; null without a spec
  std::string address_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::mutex signal_mu_;  // the destructor wakes the worker while the server thread may end it
  detail::UcxWorker* signal_target_ = nullptr;  // guarded by signal_mu_; null when no worker

  // Owned by the server thread.
  std::unique_ptr<detail::UcxWorker> ucx_;
  std::vector<std::unique_ptr<Inbound>> all_;
  std::vector<Inbound*> free_;
  std::vector<Inbound*> ready_;
  std::vector<Inbound*> batch_;
  std::vector<Inbound*> handled_;
  std::vector<Inbound*> dirty_;  // released with a reply buffer not yet zeroed
  std::vector<Dispatch> views_;
  size_t busy_ = 0;  // Inbounds receiving or replying
  proto::DispatchHeader in_header_;
  proto::ReplyHeader out_header_;
  std::unordered_set<ucp_ep_h> auth_logged_;  // peers whose refused dispatch was logged

  std::atomic<uint64_t> last_batch_{0};
  std::atomic<uint64_t> dispatches_{0}, replies_{0}, bytes_in_{0}, bytes_out_{0}, errors_{0},
      buffers_{0}, auth_failures_{0}, checksum_failures_{0};
  // Copies of faults_->counts() for stats(), written by the server thread.
  std::atomic<uint64_t> fault_drops_{0}, fault_delays_{0}, fault_corruptions_{0}, fault_stalls_{0};
};

Status DispatchServer::Impl::start() {
  auto auth = detail::HeaderAuth::create(options_.token);
  if (!auth) return auth.error();
  auth_ = std::move(*auth);
  auto faults = detail::make_fault_injector(options_, "server");
  if (!faults) return Error("DispatchServer: " + faults.error().message());
  faults_ = std::move(*faults);
  if (!auth_->enabled())
    spdlog::debug("transport=server event=no_authentication reason=\"no cluster token\"");
  std::promise<Status> ready;
  std::future<Status> started = ready.get_future();
  thread_ = std::thread([this, &ready] { run(&ready); });
  Status st = started.get();
  if (!st.ok()) thread_.join();
  return st;
}

DispatchServer::Impl::~Impl() {
  {
    std::lock_guard<std::mutex> lock(signal_mu_);
    stop_.store(true);
    if (signal_target_ != nullptr) signal_target_->signal();
  }
  if (thread_.joinable()) thread_.join();
}

ServerStats DispatchServer::Impl::stats() const {
  ServerStats s;
  s.dispatches = dispatches_.load(std::memory_order_relaxed);
  s.replies = replies_.load(std::memory_order_relaxed);
  s.bytes_in = bytes_in_.load(std::memory_order_relaxed);
  s.bytes_out = bytes_out_.load(std::memory_order_relaxed);
  s.errors = errors_.load(std::memory_order_relaxed);
  s.buffers = buffers_.load(std::memory_order_relaxed);
  s.last_batch = last_batch_.load(std::memory_order_relaxed);
  s.auth_failures = auth_failures_.load(std::memory_order_relaxed);
  s.checksum_failures = checksum_failures_.load(std::memory_order_relaxed);
  s.faults.drops = fault_drops_.load(std::memory_order_relaxed);
  s.faults.delays = fault_delays_.load(std::memory_order_relaxed);
  s.faults.corruptions = fault_corruptions_.load(std::memory_order_relaxed);
  s.faults.stalls = fault_stalls_.load(std::memory_order_relaxed);
  return s;
}

void DispatchServer::Impl::run(std::promise<Status>* ready) {
  auto created = detail::UcxWorker::create(options_, "server", /*wakeup=*/true);
  if (!created.ok()) {
    ready->set_value(created.error());
    return;
  }
  ucx_ = std::move(created.value());
  fused_ = detail::fused_ok(options_.transports);
  if (Status st = ucx_->set_am_handler(detail::kDispatchAmId, &on_dispatch_am, this); !st.ok()) {
    ucx_.reset();
    ready->set_value(st);
    return;
  }
  address_ = ucx_->address();
  {
    std::lock_guard<std::mutex> lock(signal_mu_);
    signal_target_ = ucx_.get();
  }
  ready->set_value(Status{});  // `ready` dies with start(); not touched again
  spdlog::debug("transport=server event=started {}", ucx_->describe());
  serve();
  shutdown();
}

void DispatchServer::Impl::serve() {
  auto last_event = Clock::now();
  while (!stop_.load(std::memory_order_relaxed)) {
    // One progress call, then the replies for what it completed: a reply endpoint given by UCX is
    // only used before the next progress call, which could destroy it if its peer failed.
    const unsigned events = ucp_worker_progress(ucx_->worker());
    if (!ready_.empty()) handle_ready();
    const auto now = Clock::now();
    if (events != 0) {
      last_event = now;
    } else if (zero_some()) {
      // Idle: zeroed a piece of a free reply buffer (no sleep or yield while there is more).
    } else if (now - last_event > kSpin) {
      ucx_->wait_for_events(kSleepMs);
      last_event = Clock::now();
    } else if (now - last_event >= kYieldAfter) {
      sched_yield();  // spinning: give way to other runnable threads where cores are shared
    }
  }
}

void DispatchServer::Impl::shutdown() {
  // Cancel what is in flight and give the callbacks a moment to run; then destroy the worker.
  for (auto& in : all_)
    if (in->request != nullptr) ucp_request_cancel(ucx_->worker(), in->request);
  const auto deadline = Clock::now() + kDrain;
  while (busy_ > 0 && Clock::now() < deadline) ucp_worker_progress(ucx_->worker());
  if (busy_ > 0) {
    // Requests UCX could not cancel (a rendezvous reply whose client is gone never completes):
    // closing their endpoints by force completes them, which UCX requires before the worker goes.
    std::vector<ucp_ep_h> closed;
    for (auto& in : all_) {
      if (in->request == nullptr || in->reply_ep == nullptr ||
          std::find(closed.begin(), closed.end(), in->reply_ep) != closed.end())
        continue;
      closed.push_back(in->reply_ep);
      ucx_->close_endpoint(in->reply_ep, kDrain);
    }
  }
  for (auto& in : all_) {
    if (in->am_data != nullptr) ucp_am_data_release(ucx_->worker(), in->am_data);
    in->am_data = nullptr;
  }
  if (busy_ > 0) spdlog::debug("transport=server event=shutdown in_flight={}", busy_);
  {
    std::lock_guard<std::mutex> lock(signal_mu_);
    signal_target_ = nullptr;
  }
  ucx_.reset();
}

DispatchServer::Impl::Inbound* DispatchServer::Impl::acquire(size_t reply_bytes) {
  Inbound* in = detail::take_best_fit(free_, reply_bytes,
                                      [](const Inbound& i) { return i.reply.capacity(); });
  if (in == nullptr) {
    all_.push_back(std::make_unique<Inbound>());
    in = all_.back().get();
    in->server = this;
    dirty_.reserve(all_.size());  // release() then never allocates
    count_buffer(true);
  }
  in->am_data = nullptr;
  in->payload = nullptr;
  in->request = nullptr;
  in->reply_ep = nullptr;
  in->x_converted = false;
  in->malformed = false;
  in->unauthenticated = false;
  in->error.clear();
  return in;
}

void DispatchServer::Impl::release(Inbound* in) {
  if (in->am_data != nullptr) ucp_am_data_release(ucx_->worker(), in->am_data);
  in->am_data = nullptr;
  in->state = State::kFree;
  free_.push_back(in);
  if (in->zeroed < in->dirty_end && !in->in_dirty) {
    in->in_dirty = true;
    dirty_.push_back(in);
  }
}

// Zeroes the next piece of a free reply buffer, off the critical path: the next dispatch that
// takes the buffer finds its partial sums zero already (prepare() zeroes whatever is left).
// Returns false when there was nothing to zero.
bool DispatchServer::Impl::zero_some() {
  while (!dirty_.empty()) {
    Inbound* in = dirty_.back();
    if (in->state != State::kFree || in->zeroed >= in->dirty_end) {
      in->in_dirty = false;  // taken again meanwhile (listed again at its release) or clean
      dirty_.pop_back();
      continue;
    }
    const size_t n = std::min(kZeroChunk, in->dirty_end - in->zeroed);
    std::memset(in->reply.data() + in->zeroed, 0, n);
    in->zeroed += n;
    if (in->zeroed == in->dirty_end) in->zeroed = in->dirty_end = 0;  // all of it is zero
    return true;
  }
  return false;
}

void DispatchServer::Impl::reject(Inbound* in, std::string message, bool log) {
  if (log) spdlog::warn("transport=server event=malformed_dispatch reason=\"{}\"", message);
  in->malformed = true;
  in->error = std::move(message);
  in->state = State::kReady;
  ready_.push_back(in);
}

// A dispatch without a valid tag: an error reply, counted; logged once per peer endpoint (a peer
// that keeps trying does not flood the log). Its payload is never received.
void DispatchServer::Impl::refuse_unauthenticated(Inbound* in, ucp_ep_h peer) {
  auth_failures_.fetch_add(1, std::memory_order_relaxed);
  in->unauthenticated = true;  // no signed answer for a sender without the token
  constexpr size_t kMaxLoggedPeers = 4096;
  if (auth_logged_.size() < kMaxLoggedPeers && auth_logged_.insert(peer).second)
    spdlog::warn(
        "transport=server event=unauthenticated_dispatch peer_ep={} refused_total={} "
        "reason=\"the dispatch's tag does not verify with this worker's cluster token\"",
        static_cast<const void*>(peer), auth_failures_.load(std::memory_order_relaxed));
  reject(in,
         "dispatch refused: its authentication tag does not verify with this expert worker's "
         "cluster token (every worker needs the same --cluster-token or MOEMESH_CLUSTER_TOKEN)",
         /*log=*/false);
}

ucs_status_t DispatchServer::Impl::on_dispatch_am(void* arg, const void* header,
                                                  size_t header_length, void* data, size_t length,
                                                  const ucp_am_recv_param_t* param) {
  return static_cast<Impl*>(arg)->on_dispatch(header, header_length, data, length, param);
}

ucs_status_t DispatchServer::Impl::on_dispatch(const void* header, size_t header_length, void* data,
                                               size_t length, const ucp_am_recv_param_t* param) {
  const auto received = Clock::now();
  const bool has_reply_ep = (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) != 0;
  in_header_.Clear();
  const detail::Unsealed sealed = detail::unseal_header(header, header_length);
  if (!sealed.intact) checksum_failures_.fetch_add(1, std::memory_order_relaxed);
  if (!has_reply_ep || sealed.body == 0 ||
      !in_header_.ParseFromArray(header, static_cast<int>(sealed.body))) {
    // Nobody to answer, or no seq to answer with: count and drop.
    errors_.fetch_add(1, std::memory_order_relaxed);
    spdlog::warn("transport=server event=dropped_dispatch reason=\"{}\" header_bytes={}",
                 !has_reply_ep   ? "sent without UCP_AM_SEND_FLAG_REPLY"
                 : sealed.intact ? "header does not parse as DispatchHeader"
                                 : "header checksum does not match and it does not parse",
                 header_length);
    return UCS_OK;
  }
  const auto expected = detail::reply_layout(in_header_.n_tokens(), in_header_.slots(),
                                             in_header_.hidden(), WireDtype::F32);
  Inbound* in = acquire(expected ? expected->total : 0);
  in->received = received;
  in->reply_ep = param->reply_ep;
  in->epoch = in_header_.epoch();
  in->step = in_header_.step();
  in->seq = in_header_.seq();
  in->layer = in_header_.layer();
  in->micro_batch = in_header_.micro_batch();
  in->n_tokens = in_header_.n_tokens();
  in->slots = in_header_.slots();
  in->step_tokens = in_header_.step_tokens();
  in->hidden = in_header_.hidden();

  if (!sealed.intact) {
    // Answered with an error under the seq it names (a wrong seq is dropped by the client).
    reject(in,
           "dispatch refused: its header checksum does not match (corrupted between the attention "
           "worker and this expert worker)");
    return UCS_OK;  // a rendezvous payload is dropped by UCX, never received
  }
  if (!auth_->verify(in_header_)) {
    refuse_unauthenticated(in, param->reply_ep);
    return UCS_OK;  // a rendezvous payload is dropped by UCX, never received
  }
  if (in_header_.version() != detail::kWireVersion) {
    reject(in, "dispatch wire version " + std::to_string(in_header_.version()) +
                   ", this expert worker reads version " + std::to_string(detail::kWireVersion));
    return UCS_OK;
  }
  const auto dtype = detail::from_proto(in_header_.dtype());
  if (!dtype) {
    reject(in, "dispatch dtype " + std::to_string(in_header_.dtype()) + " is unknown");
    return UCS_OK;
  }
  in->dtype = *dtype;
  in->views_bf16 = options_.bf16_views && in->dtype == WireDtype::BF16;
  const auto layout = detail::dispatch_layout(in->n_tokens, in->slots, in->hidden, in->dtype);
  if (!layout || layout->total != length) {
    reject(in, "dispatch payload of " + std::to_string(length) +
                   " bytes does not match n_tokens=" + std::to_string(in->n_tokens) +
                   " slots=" + std::to_string(in->slots) + " hidden=" + std::to_string(in->hidden) +
                   " dtype=" + detail::dtype_name(in->dtype));
    return UCS_OK;
  }
  in->layout = *layout;
  bytes_in_.fetch_add(length, std::memory_order_relaxed);

  if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.recv_am = &on_receive_done;
    p.user_data = in;
    void* buffer = nullptr;
    size_t count = length;
    if (fused_ && in->dtype == WireDtype::BF16 && !in->views_bf16) {
      // Routing lands in payload_buf, x straight in x_f32 as f32 (no staging copy, no pass).
      const size_t x_elems = (length - layout->x) / 2;
      count_buffer(in->payload_buf.reserve(layout->x));
      count_buffer(in->x_f32.reserve(x_elems * 4));
      in->wire = {in->payload_buf.data(),
                  layout->x,
                  reinterpret_cast<float*>(in->x_f32.data()),
                  x_elems,
                  nullptr,
                  0};
      in->x_converted = true;
      p.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
      p.datatype = detail::bf16_message_datatype();
      buffer = &in->wire;
      count = 1;
    } else {
      count_buffer(in->payload_buf.reserve(length));
      buffer = in->payload_buf.data();
    }
    in->payload = in->payload_buf.data();
    in->state = State::kReceiving;
    void* req = ucp_am_recv_data_nbx(ucx_->worker(), data, buffer, count, &p);
    if (req == nullptr) {
      in->state = State::kReady;
      ready_.push_back(in);
    } else if (UCS_PTR_IS_ERR(req)) {
      errors_.fetch_add(1, std::memory_order_relaxed);
      spdlog::warn("transport=server event=receive_failed status={}",
                   detail::ucs_text(UCS_PTR_STATUS(req)));
      release(in);
    } else {
      in->request = req;
      ++busy_;
    }
    return UCS_OK;
  }

  // Eager: keep UCX's buffer until the reply is built; copy it when it is not 4-byte aligned
  // (or, which PERSISTENT_DATA rules out, when UCX does not let us keep it).
  const bool persistent = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA) != 0;
  if (length == 0) {
    in->payload = nullptr;
  } else if (persistent && reinterpret_cast<uintptr_t>(data) % 4 == 0) {
    in->payload = static_cast<const std::byte*>(data);
    in->am_data = data;
  } else {
    count_buffer(in->payload_buf.reserve(length));
    std::memcpy(in->payload_buf.data(), data, length);
    in->payload = in->payload_buf.data();
  }
  in->state = State::kReady;
  ready_.push_back(in);
  return in->am_data != nullptr ? UCS_INPROGRESS : UCS_OK;
}

void DispatchServer::Impl::on_receive_done(void* request, ucs_status_t status, size_t, void* user) {
  auto* in = static_cast<Inbound*>(user);
  Impl* self = in->server;
  ucp_request_free(request);
  in->request = nullptr;
  --self->busy_;
  if (status != UCS_OK) {
    self->errors_.fetch_add(1, std::memory_order_relaxed);
    spdlog::debug("transport=server event=receive_failed status={}", detail::ucs_text(status));
    self->release(in);
    return;
  }
  in->state = State::kReady;
  self->ready_.push_back(in);
}

void DispatchServer::Impl::on_send_done(void* request, ucs_status_t status, void* user) {
  auto* in = static_cast<Inbound*>(user);
  Impl* self = in->server;
  ucp_request_free(request);
  in->request = nullptr;
  --self->busy_;
  if (status != UCS_OK) {
    self->errors_.fetch_add(1, std::memory_order_relaxed);
    spdlog::debug("transport=server event=reply_failed status={}", detail::ucs_text(status));
  }
  self->release(in);
}

// Points the view at the payload, converting x to f32 when the wire was bf16 (unless the handler
// takes bf16 views), and zeroes the outputs (mostly done already by zero_some() while the server
// was idle). Returns false (with in.error set) when the reply buffer cannot be laid out.
bool DispatchServer::Impl::prepare(Inbound& in, Dispatch& d) {
  const auto rl = detail::reply_layout(in.n_tokens, in.slots, in.hidden,
                                       in.views_bf16 ? WireDtype::BF16 : WireDtype::F32);
  if (!rl) {
    in.error = "reply of n_tokens=" + std::to_string(in.n_tokens) +
               " hidden=" + std::to_string(in.hidden) + " is too large";
    return false;
  }
  const size_t x_elems = static_cast<size_t>(in.n_tokens * in.hidden);
  d = Dispatch{};
  d.epoch = in.epoch;
  d.step = in.step;
  d.layer = in.layer;
  d.micro_batch = in.micro_batch;
  d.n_tokens = in.n_tokens;
  d.slots = in.slots;
  d.step_tokens = in.step_tokens;
  d.hidden = in.hidden;
  d.received = in.received;
  d.experts = reinterpret_cast<const int32_t*>(in.payload + in.layout.experts);
  d.weights = reinterpret_cast<const float*>(in.payload + in.layout.weights);
  if (in.views_bf16) {
    d.x_bf16 = reinterpret_cast<const uint16_t*>(in.payload + in.layout.x);
  } else if (in.x_converted) {
    d.x = reinterpret_cast<const float*>(in.x_f32.data());
  } else if (in.dtype == WireDtype::BF16) {
    count_buffer(in.x_f32.reserve(x_elems * 4));
    detail::bf16_to_f32_n(in.payload + in.layout.x, reinterpret_cast<float*>(in.x_f32.data()),
                          x_elems);
    d.x = reinterpret_cast<const float*>(in.x_f32.data());
  } else {
    d.x = reinterpret_cast<const float*>(in.payload + in.layout.x);
  }
  if (in.reply.reserve(rl->total)) {  // fresh memory: nothing known to be zero
    count_buffer(true);
    in.zeroed = 0;
    in.dirty_end = in.reply.capacity();
  }
  // Zero what zero_some() has not: bytes [zeroed, min(total, dirty_end)).
  const size_t end = std::min(rl->total, in.dirty_end);
  if (in.zeroed < end) std::memset(in.reply.data() + in.zeroed, 0, end - in.zeroed);
  // The handler (and an in-place bf16 conversion) may write all of [0, total).
  in.dirty_end = std::max(in.dirty_end, rl->total);
  in.zeroed = 0;
  if (in.views_bf16)
    d.partial_bf16 = reinterpret_cast<uint16_t*>(in.reply.data());
  else
    d.partial = reinterpret_cast<float*>(in.reply.data());
  d.rejected = reinterpret_cast<uint8_t*>(in.reply.data() + rl->rejected);
  d.error = &in.error;
  return true;
}

void DispatchServer::Impl::handle_ready() {
  batch_.clear();
  handled_.clear();
  batch_.swap(ready_);  // callbacks during the handler cannot happen (no progress), but be tidy
  views_.clear();
  for (Inbound* in : batch_) {
    if (in->malformed) continue;
    Dispatch d;
    if (prepare(*in, d)) {
      views_.push_back(d);
      handled_.push_back(in);
    }
  }
  if (!views_.empty()) {
    dispatches_.fetch_add(views_.size(), std::memory_order_relaxed);
    last_batch_.store(views_.size(), std::memory_order_relaxed);
    if (faults_) {
      const detail::FaultAction stall = inject(detail::FaultPoint::Expert);
      if (stall.delay.count() > 0) pause(stall.delay);
    }
    try {
      handler_(std::span<Dispatch>(views_));
    } catch (const std::exception& e) {
      for (Inbound* in : handled_)
        if (in->error.empty()) in->error = std::string("expert handler failed: ") + e.what();
    } catch (...) {
      for (Inbound* in : handled_)
        if (in->error.empty()) in->error = "expert handler failed with a non-std exception";
    }
  }
  for (Inbound* in : batch_) {
    if (in->am_data != nullptr) ucp_am_data_release(ucx_->worker(), in->am_data);
    in->am_data = nullptr;
    send_reply(*in);
  }
  batch_.clear();
}

void DispatchServer::Impl::send_reply(Inbound& in) {
  out_header_.Clear();
  out_header_.set_version(detail::kWireVersion);
  out_header_.set_epoch(in.epoch);
  out_header_.set_step(in.step);
  out_header_.set_layer(in.layer);
  out_header_.set_micro_batch(in.micro_batch);
  out_header_.set_n_tokens(in.n_tokens);
  out_header_.set_slots(in.slots);
  out_header_.set_hidden(in.hidden);
  out_header_.set_dtype(detail::to_proto(in.dtype));
  out_header_.set_seq(in.seq);
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.send = &on_send_done;
  p.user_data = &in;
  const void* payload = nullptr;
  size_t count = 0, bytes = 0;
  if (!in.error.empty()) {
    errors_.fetch_add(1, std::memory_order_relaxed);
    if (in.error.size() > kMaxErrorBytes) in.error.resize(kMaxErrorBytes);
    out_header_.set_error(in.error);
  } else {
    const size_t partial_elems = static_cast<size_t>(in.n_tokens * in.hidden);
    const size_t rejected_bytes = static_cast<size_t>(in.n_tokens) * static_cast<size_t>(in.slots);
    bytes = partial_elems * detail::dtype_size(in.dtype) + rejected_bytes;
    payload = in.reply.data();
    count = bytes;
    if (in.views_bf16) {
      // The handler wrote bf16: sent as it is.
    } else if (in.dtype == WireDtype::BF16 && fused_) {
      // UCX's copy into its send buffers converts (no pass of our own).
      in.wire = {nullptr,
                 0,
                 reinterpret_cast<float*>(in.reply.data()),
                 partial_elems,
                 in.reply.data() + partial_elems * 4,
                 rejected_bytes};
      p.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
      p.datatype = detail::bf16_message_datatype();
      payload = &in.wire;
      count = 1;
    } else if (in.dtype == WireDtype::BF16) {
      detail::f32_to_bf16_in_place(in.reply.data(), partial_elems);
      std::memmove(in.reply.data() + partial_elems * 2, in.reply.data() + partial_elems * 4,
                   rejected_bytes);
    }
  }
  if (in.unauthenticated)
    out_header_.clear_auth();
  else
    auth_->sign(out_header_);
  count_buffer(detail::grows(in.reply_header, out_header_.ByteSizeLong()));
  detail::serialize_into(out_header_, in.reply_header);
  detail::seal_header(in.reply_header);

  if (faults_) {
    const detail::FaultAction fault = inject(detail::FaultPoint::Reply);
    if (fault.delay.count() > 0) pause(fault.delay);
    if (fault.corrupt) detail::corrupt_header(in.reply_header, in.seq);
    if (fault.drop) {
      release(&in);
      return;
    }
  }
  // Counted first: the client may have the reply before ucp_am_send_nbx returns here.
  replies_.fetch_add(1, std::memory_order_relaxed);
  bytes_out_.fetch_add(bytes, std::memory_order_relaxed);
  void* req = ucp_am_send_nbx(in.reply_ep, detail::kReplyAmId, in.reply_header.data(),
                              in.reply_header.size(), payload, count, &p);
  if (req == nullptr) {
    release(&in);
  } else if (UCS_PTR_IS_ERR(req)) {
    errors_.fetch_add(1, std::memory_order_relaxed);
    spdlog::debug("transport=server event=reply_failed status={}",
                  detail::ucs_text(UCS_PTR_STATUS(req)));
    release(&in);
  } else {
    in.request = req;
    in.state = State::kReplying;
    ++busy_;
  }
}

detail::FaultAction DispatchServer::Impl::inject(detail::FaultPoint point) {
  if (!faults_->has(point)) return {};
  const detail::FaultAction a = faults_->next(point);
  const FaultCounts& c = faults_->counts();
  fault_drops_.store(c.drops, std::memory_order_relaxed);
  fault_delays_.store(c.delays, std::memory_order_relaxed);
  fault_corruptions_.store(c.corruptions, std::memory_order_relaxed);
  fault_stalls_.store(c.stalls, std::memory_order_relaxed);
  if (a)
    spdlog::debug("transport=server event=fault_injected point={} drop={} corrupt={} delay_ms={}",
                  point == detail::FaultPoint::Expert ? "expert" : "reply", a.drop, a.corrupt,
                  a.delay.count());
  return a;
}

// Sleeps on the server thread (an injected delay or stall), waking early when the server stops.
void DispatchServer::Impl::pause(std::chrono::milliseconds d) {
  const auto until = Clock::now() + d;
  while (!stop_.load(std::memory_order_relaxed) && Clock::now() < until)
    std::this_thread::sleep_for(
        std::min<Clock::duration>(until - Clock::now(), std::chrono::milliseconds(10)));
}

DispatchServer::DispatchServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DispatchServer::~DispatchServer() = default;

Expected<std::unique_ptr<DispatchServer>> DispatchServer::start(const DataPlaneOptions& options,
                                                                Handler handler) {
  if (!handler) return Error("DispatchServer::start: the handler is empty");
  auto impl = std::make_unique<Impl>(options, std::move(handler));
  if (Status st = impl->start(); !st.ok()) return st.error();
  return std::unique_ptr<DispatchServer>(new DispatchServer(std::move(impl)));
}

const std::string& DispatchServer::address() const {
  return impl_->address();
}
ServerStats DispatchServer::stats() const {
  return impl_->stats();
}

}  // namespace moemesh::transport
