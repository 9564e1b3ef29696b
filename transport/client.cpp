// DispatchClient: the attention-worker side of the data plane (contract in data_plane.h).
//
// The whole object is owned by the caller's thread; UCX callbacks run inside the progress calls
// that send(), wait(), disconnect() and the destructor make, on that same thread.
//
// A round is every dispatch sent since the last wait(). Its dispatches have consecutive sequence
// numbers starting at round_base_, and pending_[seq - round_base_] tracks each one; a reply
// whose seq falls outside the round, or whose dispatch already has a reply, is late.
#include <fmt/format.h>
#include <sched.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <thread>
#include <unordered_map>
#include <utility>

#include "transport/data_plane.h"
#include "transport/detail/auth.h"
#include "transport/detail/faults.h"
#include "transport/detail/ucx.h"
#include "transport/detail/wire.h"

namespace moemesh::transport {

using detail::ByteBuffer;
using Clock = std::chrono::steady_clock;

namespace {
constexpr auto kCloseTimeout = std::chrono::milliseconds(100);
// wait() polls without yielding this long after the last event (a reply usually follows within
// microseconds; a yield there costs a system call of latency), then yields between polls.
constexpr auto kYieldAfter = std::chrono::microseconds(20);
}  // namespace

class DispatchClient::Impl {
 public:
  explicit Impl(DataPlaneOptions options) : options_(std::move(options)) {}
  ~Impl();

  Status init();
  Expected<int> connect(std::string_view address);
  void disconnect(int peer);
  bool peer_failed(int peer) const {
    return peer >= 0 && peer < static_cast<int>(peers_.size()) && peers_[peer]->connected &&
           peers_[peer]->failure != UCS_OK;
  }
  // x holds rows of `source` (F32, or BF16 for send_bf16()).
  Status send(int peer, uint64_t epoch, uint64_t step, int32_t layer, int32_t micro_batch,
              int64_t step_tokens, const std::byte* x, WireDtype source, int64_t hidden,
              std::span<const int32_t> tokens, const int32_t* experts, const float* weights,
              int32_t slots);
  Status send_payload(int peer, uint64_t epoch, uint64_t step, int32_t layer, int32_t micro_batch,
                      int64_t step_tokens, int64_t n, int32_t slots, int64_t hidden,
                      const void* payload, PayloadMemory memory);
  bool cuda_memory() const { return ucx_->cuda_memory(); }
  bool payload_in_flight(const void* payload) const {
    for (const auto& s : all_slots_)
      if (s->request != nullptr && s->external && s->external_payload == payload) return true;
    return false;
  }
  std::vector<int> wait(Clock::time_point deadline,
                        const std::function<void(const Reply&)>& on_reply);
  ClientStats stats() const {
    ClientStats s = stats_;
    if (faults_) s.faults = faults_->counts();
    return s;
  }

 private:
  struct Peer {
    Impl* self = nullptr;
    int index = 0;
    ucp_ep_h ep = nullptr;
    std::string address;
    bool connected = false;
    ucs_status_t failure = UCS_OK;  // set by the endpoint's error callback
  };
  // One dispatch in flight on the wire; lives until UCX completes the send.
  struct SendSlot {
    Impl* self = nullptr;
    ByteBuffer payload;  // the whole payload, or only its routing section when lazy
    std::string header;
    void* request = nullptr;
    uint64_t seq = 0;
    // Lazy (copying transports, see detail::fused_ok()): UCX packs the rows from the caller's x
    // (msg) while it sends; if the round ends before the send completes, the rows are copied into
    // `own` first (wait()).
    bool lazy = false;
    bool detached = false;  // no longer reads the caller's x (copied, or received whole)
    // The caller's own payload (send_payload()), which UCX reads until the send completes.
    bool external = false;
    const void* external_payload = nullptr;
    detail::GatherMessage msg;
    std::vector<int32_t> rows;
    ByteBuffer own;
  };
  // One reply being received or waiting to be delivered.
  struct ReplyBuf {
    Impl* self = nullptr;
    uint64_t seq = 0;
    void* am_data = nullptr;  // eager data held from UCX
    const std::byte* payload = nullptr;
    ByteBuffer buf;          // rendezvous or unaligned copy
    bool converted = false;  // buf holds partial as f32 then rejected (fused, see Bf16Message)
    detail::Bf16Message wire;
    size_t length = 0;
    void* request = nullptr;
    std::string error;
    bool orphan = false;  // its round ended while it was being received
  };
  enum class State { kWaiting, kReceiving, kReady, kDone, kFailed };
  struct Pending {
    int peer = 0;
    uint64_t epoch = 0, step = 0;
    int32_t layer = 0, micro_batch = 0, slots = 0;
    int64_t n_tokens = 0, hidden = 0;
    WireDtype dtype = WireDtype::F32;
    State state = State::kWaiting;
    ReplyBuf* reply = nullptr;
    bool answered = false;  // delivered without an error: the server had received every byte
  };

  static void on_peer_error(void* arg, ucp_ep_h ep, ucs_status_t status);
  static void on_send_done(void* request, ucs_status_t status, void* user);
  static ucs_status_t on_reply_am(void* arg, const void* header, size_t header_length, void* data,
                                  size_t length, const ucp_am_recv_param_t* param);
  ucs_status_t on_reply(const void* header, size_t header_length, void* data, size_t length,
                        const ucp_am_recv_param_t* param);
  static void on_receive_done(void* request, ucs_status_t status, size_t length, void* user);

  Pending* pending_for(uint64_t seq);
  void fail_pending(int peer);
  void finish(Pending& p, State state);
  void drop_late(ReplyBuf* r);
  void deliver(const std::function<void(const Reply&)>& on_reply);
  SendSlot* acquire_slot(size_t bytes);
  void release_slot(SendSlot* s);
  ReplyBuf* acquire_reply(size_t bytes);
  void release_reply(ReplyBuf* r);
  void materialize_unanswered();
  // The checks every send makes: the peer connected and not failed, the shape. `what` names the
  // call in messages.
  Expected<detail::DispatchLayout> check_send(const char* what, int peer, int64_t n, int32_t slots,
                                              int64_t hidden);
  // Fills the slot's header, applies injected faults and hands the message to UCX.
  struct Post {
    uint64_t epoch, step;
    int32_t layer, micro_batch;
    int64_t step_tokens, n;
    int32_t slots;
    int64_t hidden;
    size_t total;  // payload bytes
  };
  Status post(int peer, SendSlot* s, const Post& f, const void* buffer, size_t count,
              ucp_datatype_t datatype, ucs_memory_type_t memory, const char* what);

  const DataPlaneOptions options_;
  // Set by init() once UCX's settings are in place (see detail::fused_ok()).
  bool fused_ = false;
  // Rows packed by UCX straight from the caller's x (no gathered copy), where UCX copies anyway.
  bool lazy_ = false;
  std::unique_ptr<detail::UcxWorker> ucx_;
  std::unique_ptr<detail::HeaderAuth> auth_;
  std::unique_ptr<detail::FaultInjector> faults_;  // null unless a fault spec was given
  std::vector<std::unique_ptr<Peer>> peers_;
  std::unordered_map<std::string, int> by_address_;
  std::vector<std::unique_ptr<SendSlot>> all_slots_;
  std::vector<SendSlot*> free_slots_;
  std::vector<std::unique_ptr<ReplyBuf>> all_replies_;
  std::vector<ReplyBuf*> free_replies_;
  std::vector<Pending> pending_;
  std::vector<uint64_t> ready_;  // seqs of the round whose reply can be delivered
  uint64_t round_base_ = 1, next_seq_ = 1;
  size_t remaining_ = 0;  // dispatches of the round still waiting or receiving
  bool in_callback_ = false;
  std::exception_ptr callback_error_;  // the first exception thrown by on_reply in this wait()
  ByteBuffer partial_f32_;
  proto::DispatchHeader out_header_;
  proto::ReplyHeader in_header_;
  ClientStats stats_;
};

Status DispatchClient::Impl::init() {
  auto auth = detail::HeaderAuth::create(options_.token);
  if (!auth) return auth.error();
  auth_ = std::move(*auth);
  auto faults = detail::make_fault_injector(options_, "client");
  if (!faults) return Error("DispatchClient: " + faults.error().message());
  faults_ = std::move(*faults);
  auto created = detail::UcxWorker::create(options_, "client", /*wakeup=*/false);
  if (!created.ok()) return created.error();
  ucx_ = std::move(created.value());
  fused_ = detail::fused_ok(options_.transports);
  lazy_ = fused_ && detail::gather_message_datatype() != 0;
  return ucx_->set_am_handler(detail::kReplyAmId, &on_reply_am, this);
}

DispatchClient::Impl::~Impl() {
  if (!ucx_) return;
  // Sends of a round that was never waited for may point at arrays the caller has freed.
  for (auto& s : all_slots_)
    if (s->request != nullptr && s->lazy && !s->detached) s->msg.x = nullptr;
  for (auto& p : peers_)
    if (p->connected) ucx_->close_endpoint(p->ep, kCloseTimeout);
  for (auto& s : all_slots_)
    if (s->request != nullptr) ucp_request_cancel(ucx_->worker(), s->request);
  for (auto& r : all_replies_)
    if (r->request != nullptr) ucp_request_cancel(ucx_->worker(), r->request);
  const auto deadline = Clock::now() + kCloseTimeout;
  auto busy = [&] {
    for (auto& s : all_slots_)
      if (s->request != nullptr) return true;
    for (auto& r : all_replies_)
      if (r->request != nullptr) return true;
    return false;
  };
  while (busy() && Clock::now() < deadline) ucp_worker_progress(ucx_->worker());
  for (auto& r : all_replies_)
    if (r->am_data != nullptr) ucp_am_data_release(ucx_->worker(), r->am_data);
  ucx_.reset();
}

Expected<int> DispatchClient::Impl::connect(std::string_view address) {
  auto framed = detail::unframe_address(address);
  if (!framed.ok()) return Error("DispatchClient::connect: " + framed.error().message());
  if (Status fits = detail::check_transport_profile(framed->profile, ucx_->profile()); !fits.ok())
    return Error("DispatchClient::connect: " + fits.error().message());
  std::string key(address);
  if (auto it = by_address_.find(key); it != by_address_.end()) return it->second;

  auto peer = std::make_unique<Peer>();
  peer->self = this;
  peer->index = static_cast<int>(peers_.size());
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                  UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.address = reinterpret_cast<const ucp_address_t*>(framed->raw.data());
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = &on_peer_error;
  ep.err_handler.arg = peer.get();
  const ucs_status_t st = ucp_ep_create(ucx_->worker(), &ep, &peer->ep);
  if (st != UCS_OK)
    return Error("DispatchClient::connect: UCX cannot reach the expert worker at this address (" +
                 detail::ucs_text(st) + "); this client has " + ucx_->describe() +
                 ": both sides need a transport in common");
  peer->connected = true;
  peer->address = key;
  by_address_.emplace(std::move(key), peer->index);
  spdlog::debug("transport=client event=connected peer={} {}", peer->index, ucx_->describe());
  peers_.push_back(std::move(peer));
  return peers_.back()->index;
}

void DispatchClient::Impl::disconnect(int peer) {
  if (peer < 0 || peer >= static_cast<int>(peers_.size()) || !peers_[peer]->connected) return;
  Peer& p = *peers_[peer];
  p.connected = false;
  by_address_.erase(p.address);
  fail_pending(peer);
  // Forced close: sends in flight to it complete as cancelled (their slots come back).
  ucx_->close_endpoint(p.ep, kCloseTimeout);
  p.ep = nullptr;
  spdlog::debug("transport=client event=disconnected peer={}", peer);
}

void DispatchClient::Impl::on_peer_error(void* arg, ucp_ep_h, ucs_status_t status) {
  auto* p = static_cast<Peer*>(arg);
  if (p->failure != UCS_OK) return;
  p->failure = status;
  spdlog::warn("transport=client event=peer_failed peer={} status={}", p->index,
               detail::ucs_text(status));
  p->self->fail_pending(p->index);
}

// Dispatches of the round to `peer` that have no reply yet will not get one.
void DispatchClient::Impl::fail_pending(int peer) {
  for (Pending& p : pending_)
    if (p.peer == peer && (p.state == State::kWaiting || p.state == State::kReceiving)) {
      if (p.reply != nullptr) p.reply->orphan = true;  // its receive completes or is cancelled
      p.reply = nullptr;
      finish(p, State::kFailed);
    }
}

void DispatchClient::Impl::finish(Pending& p, State state) {
  if (p.state == State::kWaiting || p.state == State::kReceiving || p.state == State::kReady)
    --remaining_;
  p.state = state;
}

DispatchClient::Impl::Pending* DispatchClient::Impl::pending_for(uint64_t seq) {
  if (seq < round_base_ || seq - round_base_ >= pending_.size()) return nullptr;
  return &pending_[seq - round_base_];
}

DispatchClient::Impl::SendSlot* DispatchClient::Impl::acquire_slot(size_t bytes) {
  if (SendSlot* s = detail::take_best_fit(free_slots_, bytes,
                                          [](const SendSlot& x) { return x.payload.capacity(); }))
    return s;
  all_slots_.push_back(std::make_unique<SendSlot>());
  all_slots_.back()->self = this;
  ++stats_.buffers;
  return all_slots_.back().get();
}

void DispatchClient::Impl::release_slot(SendSlot* s) {
  s->request = nullptr;
  free_slots_.push_back(s);
}

DispatchClient::Impl::ReplyBuf* DispatchClient::Impl::acquire_reply(size_t bytes) {
  ReplyBuf* r = detail::take_best_fit(free_replies_, bytes,
                                      [](const ReplyBuf& x) { return x.buf.capacity(); });
  if (r == nullptr) {
    all_replies_.push_back(std::make_unique<ReplyBuf>());
    r = all_replies_.back().get();
    r->self = this;
    ++stats_.buffers;
  }
  r->am_data = nullptr;
  r->payload = nullptr;
  r->length = 0;
  r->converted = false;
  r->request = nullptr;
  r->error.clear();
  r->orphan = false;
  return r;
}

void DispatchClient::Impl::release_reply(ReplyBuf* r) {
  if (r->am_data != nullptr) ucp_am_data_release(ucx_->worker(), r->am_data);
  r->am_data = nullptr;
  free_replies_.push_back(r);
}

void DispatchClient::Impl::drop_late(ReplyBuf* r) {
  ++stats_.late_replies;
  release_reply(r);
}

Status DispatchClient::Impl::send(int peer, uint64_t epoch, uint64_t step, int32_t layer,
                                  int32_t micro_batch, int64_t step_tokens, const std::byte* x,
                                  WireDtype source, int64_t hidden, std::span<const int32_t> tokens,
                                  const int32_t* experts, const float* weights, int32_t slots) {
  if (in_callback_)
    return Error("DispatchClient::send called from inside on_reply; send after wait() returns");
  if (source == WireDtype::BF16 && options_.dtype != WireDtype::BF16)
    return Error(
        "DispatchClient::send_bf16: this client puts f32 on the wire; create it with dtype BF16 "
        "to send bf16 rows, or send() f32 rows");
  const int64_t n = static_cast<int64_t>(tokens.size());
  const auto layout = check_send("send", peer, n, slots, hidden);
  if (!layout) return layout.error();
  if (n > 0 && (x == nullptr || (slots > 0 && (experts == nullptr || weights == nullptr))))
    return Error("DispatchClient::send: x, experts and weights must be non-null for " +
                 std::to_string(n) + " tokens");
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0)
      return Error("DispatchClient::send: tokens[" + std::to_string(i) +
                   "] = " + std::to_string(tokens[i]) + " is negative");

  const bool lazy = lazy_ && n > 0;
  const size_t own_bytes = lazy ? layout->x : layout->total;  // what the slot's payload holds
  SendSlot* s = acquire_slot(own_bytes);
  if (s->payload.reserve(own_bytes)) ++stats_.buffers;
  std::byte* out = s->payload.data();
  const size_t routing = static_cast<size_t>(n) * static_cast<size_t>(slots) * 4;
  if (routing > 0) {
    std::memcpy(out + layout->experts, experts, routing);
    std::memcpy(out + layout->weights, weights, routing);
  }
  s->lazy = lazy;
  s->detached = false;
  const size_t row = static_cast<size_t>(hidden);
  if (lazy) {
    if (s->rows.capacity() < tokens.size()) ++stats_.buffers;
    s->rows.assign(tokens.begin(), tokens.end());
    s->msg = detail::GatherMessage{.head = out,
                                   .head_bytes = layout->x,
                                   .x = x,
                                   .rows = s->rows.data(),
                                   .n_rows = static_cast<size_t>(n),
                                   .hidden = row,
                                   .dtype = options_.dtype,
                                   .source = source};
  } else {
    const size_t src_row = row * detail::dtype_size(source);
    const size_t wire_row = row * detail::dtype_size(options_.dtype);
    for (int64_t i = 0; i < n; ++i) {
      const std::byte* src = x + static_cast<size_t>(tokens[i]) * src_row;
      std::byte* dst = out + layout->x + static_cast<size_t>(i) * wire_row;
      if (source != options_.dtype)
        detail::f32_to_bf16_n(reinterpret_cast<const float*>(src), dst, row);
      else
        std::memcpy(dst, src, wire_row);
    }
  }

  s->external = false;
  s->external_payload = nullptr;
  const Post f{epoch, step, layer, micro_batch, step_tokens, n, slots, hidden, layout->total};
  if (lazy)
    return post(peer, s, f, &s->msg, 1, detail::gather_message_datatype(), UCS_MEMORY_TYPE_HOST,
                "send");
  return post(peer, s, f, layout->total > 0 ? out : nullptr, layout->total, ucp_dt_make_contig(1),
              UCS_MEMORY_TYPE_HOST, "send");
}

Expected<detail::DispatchLayout> DispatchClient::Impl::check_send(const char* what, int peer,
                                                                  int64_t n, int32_t slots,
                                                                  int64_t hidden) {
  if (peer < 0 || peer >= static_cast<int>(peers_.size()) || !peers_[peer]->connected)
    return Error(fmt::format(
        "DispatchClient::{}: peer {} is not connected (connect() the expert worker's address "
        "first)",
        what, peer));
  const Peer& p = *peers_[peer];
  if (p.failure != UCS_OK) {
    ++stats_.send_errors;
    return Error(fmt::format(
        "DispatchClient::{}: expert worker peer {} failed ({}); disconnect() it and route its "
        "tokens elsewhere",
        what, peer, detail::ucs_text(p.failure)));
  }
  const auto layout = detail::dispatch_layout(n, slots, hidden, options_.dtype);
  if (!layout)
    return Error(fmt::format(
        "DispatchClient::{}: bad shape tokens={} slots={} hidden={} (hidden must be > 0, slots >= "
        "0, message below 4 GiB)",
        what, n, slots, hidden));
  return *layout;
}

Status DispatchClient::Impl::send_payload(int peer, uint64_t epoch, uint64_t step, int32_t layer,
                                          int32_t micro_batch, int64_t step_tokens, int64_t n,
                                          int32_t slots, int64_t hidden, const void* payload,
                                          PayloadMemory memory) {
  if (in_callback_)
    return Error(
        "DispatchClient::send_payload called from inside on_reply; send after wait() returns");
  if (memory == PayloadMemory::Cuda && !ucx_->cuda_memory())
    return Error(
        "DispatchClient::send_payload: this UCX does not take CUDA device memory (built without "
        "CUDA support, or no GPU); stage the payload through host memory");
  const auto layout = check_send("send_payload", peer, n, slots, hidden);
  if (!layout) return layout.error();
  if (layout->total > 0 && payload == nullptr)
    return Error("DispatchClient::send_payload: the payload of " + std::to_string(n) +
                 " tokens is null");
  SendSlot* s = acquire_slot(0);
  s->lazy = false;
  s->detached = false;
  s->external = true;
  s->external_payload = payload;
  const Post f{epoch, step, layer, micro_batch, step_tokens, n, slots, hidden, layout->total};
  return post(
      peer, s, f, layout->total > 0 ? payload : nullptr, layout->total, ucp_dt_make_contig(1),
      memory == PayloadMemory::Cuda ? UCS_MEMORY_TYPE_CUDA : UCS_MEMORY_TYPE_HOST, "send_payload");
}

Status DispatchClient::Impl::post(int peer, SendSlot* s, const Post& f, const void* buffer,
                                  size_t count, ucp_datatype_t datatype, ucs_memory_type_t memory,
                                  const char* what) {
  Peer& p = *peers_[peer];
  const uint64_t seq = next_seq_;
  out_header_.Clear();
  out_header_.set_version(detail::kWireVersion);
  out_header_.set_epoch(f.epoch);
  out_header_.set_step(f.step);
  out_header_.set_layer(f.layer);
  out_header_.set_micro_batch(f.micro_batch);
  out_header_.set_n_tokens(f.n);
  out_header_.set_slots(f.slots);
  out_header_.set_step_tokens(f.step_tokens);
  out_header_.set_hidden(f.hidden);
  out_header_.set_dtype(detail::to_proto(options_.dtype));
  out_header_.set_seq(seq);
  auth_->sign(out_header_);
  if (detail::grows(s->header, out_header_.ByteSizeLong())) ++stats_.buffers;
  detail::serialize_into(out_header_, s->header);
  detail::seal_header(s->header);

  detail::FaultAction fault;
  if (faults_) fault = faults_->next(detail::FaultPoint::Dispatch);
  if (fault) {
    spdlog::debug("transport=client event=fault_injected seq={} drop={} corrupt={} delay_ms={}",
                  seq, fault.drop, fault.corrupt, fault.delay.count());
    if (fault.delay.count() > 0) std::this_thread::sleep_for(fault.delay);
    if (fault.corrupt) detail::corrupt_header(s->header, seq);
  }

  ucp_request_param_t prm{};
  prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                     UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FIELD_DATATYPE |
                     UCP_OP_ATTR_FIELD_MEMORY_TYPE;
  prm.flags = UCP_AM_SEND_FLAG_REPLY;
  prm.cb.send = &on_send_done;
  prm.user_data = s;
  prm.datatype = datatype;
  prm.memory_type = memory;
  // A dropped dispatch is never posted; the caller sees it sent and unanswered.
  void* req = fault.drop ? nullptr
                         : ucp_am_send_nbx(p.ep, detail::kDispatchAmId, s->header.data(),
                                           s->header.size(), buffer, count, &prm);
  if (UCS_PTR_IS_ERR(req)) {
    release_slot(s);
    ++stats_.send_errors;
    return Error(fmt::format("DispatchClient::{}: UCX refused the dispatch to peer {}: {}", what,
                             peer, detail::ucs_text(UCS_PTR_STATUS(req))));
  }
  ++next_seq_;
  if (pending_.capacity() == pending_.size()) ++stats_.buffers;
  pending_.push_back(Pending{peer, f.epoch, f.step, f.layer, f.micro_batch, f.slots, f.n, f.hidden,
                             options_.dtype, State::kWaiting, nullptr, false});
  ++remaining_;
  ++stats_.dispatches;
  stats_.bytes_out += f.total;
  if (req == nullptr) {
    release_slot(s);
  } else {
    s->request = req;
    s->seq = seq;
  }
  return {};
}

void DispatchClient::Impl::on_send_done(void* request, ucs_status_t status, void* user) {
  auto* s = static_cast<SendSlot*>(user);
  Impl* self = s->self;
  ucp_request_free(request);
  if (status != UCS_OK) {
    ++self->stats_.send_errors;
    spdlog::debug("transport=client event=send_failed seq={} status={}", s->seq,
                  detail::ucs_text(status));
    if (Pending* p = self->pending_for(s->seq); p != nullptr && p->state == State::kWaiting)
      self->finish(*p, State::kFailed);
  }
  self->release_slot(s);
}

ucs_status_t DispatchClient::Impl::on_reply_am(void* arg, const void* header, size_t header_length,
                                               void* data, size_t length,
                                               const ucp_am_recv_param_t* param) {
  return static_cast<Impl*>(arg)->on_reply(header, header_length, data, length, param);
}

ucs_status_t DispatchClient::Impl::on_reply(const void* header, size_t header_length, void* data,
                                            size_t length, const ucp_am_recv_param_t* param) {
  in_header_.Clear();
  const detail::Unsealed sealed = detail::unseal_header(header, header_length);
  if (!sealed.intact) ++stats_.checksum_failures;
  if (sealed.body == 0 || !in_header_.ParseFromArray(header, static_cast<int>(sealed.body))) {
    ++stats_.late_replies;
    spdlog::warn("transport=client event=dropped_reply reason=\"header does not parse{}\"",
                 sealed.intact ? "" : " (its checksum does not match)");
    return UCS_OK;
  }
  Pending* p = pending_for(in_header_.seq());
  if (p == nullptr || p->state != State::kWaiting || p->epoch != in_header_.epoch() ||
      p->step != in_header_.step() || p->layer != in_header_.layer() ||
      p->micro_batch != in_header_.micro_batch()) {
    ++stats_.late_replies;  // after its round, a duplicate, not what was asked, or corrupted
    return UCS_OK;          // a rendezvous payload is dropped by UCX
  }
  ReplyBuf* r = acquire_reply(length);
  r->seq = in_header_.seq();
  p->reply = r;
  if (!sealed.intact) {
    // Its fields cannot be trusted: the dispatch fails like one answered with an error.
    r->error =
        "reply refused: its header checksum does not match (corrupted between the expert worker "
        "and this attention worker)";
  } else if (!auth_->verify(in_header_)) {
    // Never use its bytes; the dispatch fails like one answered with an error.
    ++stats_.auth_failures;
    r->error =
        "reply refused: its authentication tag does not verify with this worker's cluster token "
        "(every worker needs the same --cluster-token or MOEMESH_CLUSTER_TOKEN)";
  } else if (!in_header_.error().empty()) {
    r->error = in_header_.error();
  } else {
    const auto layout = detail::reply_layout(p->n_tokens, p->slots, p->hidden, p->dtype);
    if (in_header_.n_tokens() != p->n_tokens || in_header_.slots() != p->slots ||
        in_header_.hidden() != p->hidden || in_header_.dtype() != detail::to_proto(p->dtype) ||
        !layout || layout->total != length) {
      r->error = "malformed reply: " + std::to_string(length) +
                 " bytes for n_tokens=" + std::to_string(in_header_.n_tokens()) +
                 " hidden=" + std::to_string(in_header_.hidden()) +
                 ", expected n_tokens=" + std::to_string(p->n_tokens) +
                 " hidden=" + std::to_string(p->hidden);
    }
  }
  if (!r->error.empty()) {
    p->state = State::kReady;  // stays counted in remaining_ until delivered
    ready_.push_back(r->seq);
    return UCS_OK;
  }
  r->length = length;
  if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
    ucp_request_param_t prm{};
    prm.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    prm.cb.recv_am = &on_receive_done;
    prm.user_data = r;
    void* buffer = nullptr;
    size_t count = length;
    if (fused_ && p->dtype == WireDtype::BF16 && !options_.bf16_views) {
      // partial lands in buf as f32 straight from UCX's buffers, then rejected.
      const size_t elems = static_cast<size_t>(p->n_tokens * p->hidden);
      const size_t rejected = length - 2 * elems;
      if (r->buf.reserve(elems * 4 + rejected)) ++stats_.buffers;
      r->wire = {
          nullptr, 0, reinterpret_cast<float*>(r->buf.data()), elems, r->buf.data() + elems * 4,
          rejected};
      r->converted = true;
      prm.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
      prm.datatype = detail::bf16_message_datatype();
      buffer = &r->wire;
      count = 1;
    } else {
      if (r->buf.reserve(length)) ++stats_.buffers;
      buffer = r->buf.data();
    }
    r->payload = r->buf.data();
    void* req = ucp_am_recv_data_nbx(ucx_->worker(), data, buffer, count, &prm);
    if (req == nullptr) {
      p->state = State::kReady;
      ready_.push_back(r->seq);
    } else if (UCS_PTR_IS_ERR(req)) {
      r->error = "receiving the reply failed: " + detail::ucs_text(UCS_PTR_STATUS(req));
      p->state = State::kReady;
      ready_.push_back(r->seq);
    } else {
      r->request = req;
      p->state = State::kReceiving;
    }
    return UCS_OK;
  }
  const bool persistent = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA) != 0;
  if (length > 0 && persistent && reinterpret_cast<uintptr_t>(data) % 4 == 0) {
    r->am_data = data;
    r->payload = static_cast<const std::byte*>(data);
  } else if (length > 0) {
    if (r->buf.reserve(length)) ++stats_.buffers;
    std::memcpy(r->buf.data(), data, length);
    r->payload = r->buf.data();
  }
  p->state = State::kReady;
  ready_.push_back(r->seq);
  return r->am_data != nullptr ? UCS_INPROGRESS : UCS_OK;
}

void DispatchClient::Impl::on_receive_done(void* request, ucs_status_t status, size_t, void* user) {
  auto* r = static_cast<ReplyBuf*>(user);
  Impl* self = r->self;
  ucp_request_free(request);
  r->request = nullptr;
  if (r->orphan) {  // its round ended or its peer was dropped
    self->drop_late(r);
    return;
  }
  Pending* p = self->pending_for(r->seq);
  if (p == nullptr || p->reply != r) {  // not expected: a receive outlives its round only orphaned
    self->drop_late(r);
    return;
  }
  if (status != UCS_OK) r->error = "receiving the reply failed: " + detail::ucs_text(status);
  p->state = State::kReady;
  self->ready_.push_back(r->seq);
}

void DispatchClient::Impl::deliver(const std::function<void(const Reply&)>& on_reply) {
  for (size_t k = 0; k < ready_.size(); ++k) {
    Pending* p = pending_for(ready_[k]);
    if (p == nullptr || p->state != State::kReady || p->reply == nullptr) continue;
    ReplyBuf* r = p->reply;
    Reply out;
    out.peer = p->peer;
    out.layer = p->layer;
    out.micro_batch = p->micro_batch;
    out.n_tokens = p->n_tokens;
    out.slots = p->slots;
    out.hidden = p->hidden;
    if (!r->error.empty()) {
      out.error = r->error;
    } else {
      const auto layout = detail::reply_layout(p->n_tokens, p->slots, p->hidden, p->dtype);
      const size_t elems = static_cast<size_t>(p->n_tokens * p->hidden);
      if (r->converted) {
        out.partial = reinterpret_cast<const float*>(r->payload);
        out.rejected = reinterpret_cast<const uint8_t*>(r->payload + elems * 4);
      } else if (p->dtype == WireDtype::BF16 && options_.bf16_views) {
        out.partial_bf16 = reinterpret_cast<const uint16_t*>(r->payload);
      } else if (p->dtype == WireDtype::BF16) {
        if (partial_f32_.reserve(elems * 4)) ++stats_.buffers;
        detail::bf16_to_f32_n(r->payload, reinterpret_cast<float*>(partial_f32_.data()), elems);
        out.partial = reinterpret_cast<const float*>(partial_f32_.data());
      } else {
        out.partial = reinterpret_cast<const float*>(r->payload);
      }
      if (!r->converted)
        out.rejected = reinterpret_cast<const uint8_t*>(r->payload + layout->rejected);
      stats_.bytes_in += r->length;
      p->answered = true;
    }
    ++stats_.replies;
    finish(*p, State::kDone);
    p->reply = nullptr;
    in_callback_ = true;
    try {
      if (on_reply) on_reply(out);
    } catch (...) {
      // Rethrown by wait() once the round is closed, so the client stays consistent.
      if (!callback_error_) callback_error_ = std::current_exception();
    }
    in_callback_ = false;
    release_reply(r);
  }
  ready_.clear();
}

std::vector<int> DispatchClient::Impl::wait(Clock::time_point deadline,
                                            const std::function<void(const Reply&)>& on_reply) {
  if (in_callback_) return {};
  // At least one progress call, so that late replies are drained even in an empty round.
  auto last_event = Clock::now();
  Clock::time_point now;
  do {
    const unsigned events = ucp_worker_progress(ucx_->worker());
    now = Clock::now();
    if (!ready_.empty()) deliver(on_reply);
    if (events != 0)
      last_event = now;
    else if (now - last_event >= kYieldAfter)
      sched_yield();  // spinning for a while: where cores are shared, let the expert workers run
  } while (remaining_ > 0 && now < deadline);
  if (!ready_.empty()) deliver(on_reply);
  materialize_unanswered();

  std::vector<int> missing;
  for (Pending& p : pending_) {
    if (p.state == State::kDone) continue;
    ++stats_.timeouts;
    if (p.reply != nullptr) p.reply->orphan = true;  // a receive still in flight
    missing.push_back(p.peer);
  }
  std::sort(missing.begin(), missing.end());
  missing.erase(std::unique(missing.begin(), missing.end()), missing.end());
  pending_.clear();
  ready_.clear();
  remaining_ = 0;
  round_base_ = next_seq_;
  if (callback_error_) std::rethrow_exception(std::exchange(callback_error_, nullptr));
  return missing;
}

// The round ends: x may change once wait() returns. A lazy send still in flight whose dispatch
// was not answered may still be packed (the server has not pulled all of it), so its rows are
// copied now. An answered one was received whole: UCX packs nothing more for it.
void DispatchClient::Impl::materialize_unanswered() {
  for (auto& slot : all_slots_) {
    SendSlot& s = *slot;
    if (s.request == nullptr || !s.lazy || s.detached) continue;
    s.detached = true;  // every such slot belongs to this round
    const Pending* p = pending_for(s.seq);
    if (p != nullptr && p->answered) continue;
    if (s.msg.materialize(s.own)) ++stats_.buffers;
  }
}

DispatchClient::DispatchClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DispatchClient::~DispatchClient() = default;

Expected<std::unique_ptr<DispatchClient>> DispatchClient::create(const DataPlaneOptions& options) {
  auto impl = std::make_unique<Impl>(options);
  if (Status st = impl->init(); !st.ok()) return st.error();
  return std::unique_ptr<DispatchClient>(new DispatchClient(std::move(impl)));
}

bool DispatchClient::cuda_memory() const {
  return impl_->cuda_memory();
}

bool DispatchClient::payload_in_flight(const void* payload) const {
  return impl_->payload_in_flight(payload);
}

Status DispatchClient::send_payload(int peer, uint64_t epoch, uint64_t step, int32_t layer,
                                    int32_t micro_batch, int64_t step_tokens, int64_t n_tokens,
                                    int32_t slots, int64_t hidden, const void* payload,
                                    PayloadMemory memory) {
  return impl_->send_payload(peer, epoch, step, layer, micro_batch, step_tokens, n_tokens, slots,
                             hidden, payload, memory);
}

std::optional<PayloadLayout> dispatch_payload_layout(int64_t n_tokens, int32_t slots,
                                                     int64_t hidden, WireDtype dtype) {
  const auto l = detail::dispatch_layout(n_tokens, slots, hidden, dtype);
  if (!l) return std::nullopt;
  return PayloadLayout{l->experts, l->weights, l->x, l->total};
}

Expected<int> DispatchClient::connect(std::string_view address) {
  return impl_->connect(address);
}
void DispatchClient::disconnect(int peer) {
  impl_->disconnect(peer);
}
bool DispatchClient::peer_failed(int peer) const {
  return impl_->peer_failed(peer);
}
Status DispatchClient::send(int peer, uint64_t epoch, uint64_t step, int32_t layer,
                            int32_t micro_batch, int64_t step_tokens, const float* x,
                            int64_t hidden, std::span<const int32_t> tokens, const int32_t* experts,
                            const float* weights, int32_t slots) {
  return impl_->send(peer, epoch, step, layer, micro_batch, step_tokens,
                     reinterpret_cast<const std::byte*>(x), WireDtype::F32, hidden, tokens, experts,
                     weights, slots);
}
Status DispatchClient::send_bf16(int peer, uint64_t epoch, uint64_t step, int32_t layer,
                                 int32_t micro_batch, int64_t step_tokens, const uint16_t* x_bf16,
                                 int64_t hidden, std::span<const int32_t> tokens,
                                 const int32_t* experts, const float* weights, int32_t slots) {
  return impl_->send(peer, epoch, step, layer, micro_batch, step_tokens,
                     reinterpret_cast<const std::byte*>(x_bf16), WireDtype::BF16, hidden, tokens,
                     experts, weights, slots);
}
std::vector<int> DispatchClient::wait(std::chrono::steady_clock::time_point deadline,
                                      const std::function<void(const Reply&)>& on_reply) {
  return impl_->wait(deadline, on_reply);
}
ClientStats DispatchClient::stats() const {
  return impl_->stats();
}

}  // namespace moemesh::transport
