// The data plane of the cluster: token batches of one MoE layer travel from attention workers to
// expert workers over UCX active messages, and gate-weighted partial sums travel back.
//
// Sides. An expert worker runs one DispatchServer; an attention worker runs one DispatchClient
// and connects it to every expert worker's address (DispatchServer::address(), carried over the
// control plane). DispatchClient::send() queues one message per (expert worker, layer,
// micro-batch): a protobuf header (proto/dataplane.proto) plus the gathered rows of the hidden
// states, their expert ids and gate weights. DispatchClient::wait() progresses until every
// dispatch sent since the previous wait() has its reply, or a deadline passes, and hands each
// reply to a callback.
//
// Threads. DispatchServer owns one thread that owns its UCX worker: it receives, calls the
// handler with every dispatch complete at that moment (several senders and layers together, so
// the handler can batch one expert's tokens across them) and sends the replies. It busy-polls
// while traffic flows and sleeps on the worker's event fd after ~1 ms of silence; the destructor
// stops and joins it within ~100 ms (plus whatever the handler is doing). stats() is thread-safe.
// DispatchClient has no thread: it is used by one thread, the caller's, which does all progress
// inside send() and wait() (wait() busy-polls: it is on the critical path of a step).
//
// Buffers. send() and send_bf16() copy tokens, experts and weights. The rows of x they send are
// gathered (converted to the wire dtype) into a reused buffer, except where UCX copies every
// message anyway (transports lists only shared memory and tcp, see detail::fused_ok()): there UCX
// packs them straight from x while it sends. So x must not change between send() and the return of
// the wait() that follows; then it may, even if a dispatch is still on its way (wait() copies the
// rows such a dispatch still needs before it returns). Every view in Dispatch is valid only during
// the handler call, every view in Reply only during the on_reply call. Buffers and protobuf
// messages are pooled and kept at their high-water mark: in steady state no heap allocation happens
// per message (ServerStats/ClientStats::buffers counts pool growth).
// send_payload() sends a message the caller laid out itself, host or (where cuda_memory())
// CUDA device memory, straight from there: UCX reads it until the send completes
// (payload_in_flight()), possibly after the wait() that covers it.
//
// Epochs, steps and deadlines. Every message carries the sender's epoch and step id and a
// sequence number; a reply is delivered only to the wait() that covers its dispatch, with the
// same epoch and step. Replies that arrive after their wait() ended (its deadline passed), or
// whose epoch/step do not match, or that duplicate one already delivered, are dropped and counted
// as late_replies. A dead or unreachable expert worker never crashes or hangs the caller: sends
// to it fail (send_errors) or stay unanswered, and wait() returns it among the peers that did not
// answer (counted as timeouts, one per unanswered dispatch) no later than the deadline, earlier
// when UCX already reported the peer's endpoint as failed. The caller then masks the peer,
// disconnect()s it and bumps its epoch (the control plane publishes the new placement).
//
// Options. `transports` becomes UCX_TLS of this side's UCX context ("" keeps UCX's default or
// the environment's UCX_TLS), `net_devices` UCX_NET_DEVICES. Both sides must share a transport
// ("tcp", "sm" / "posix,sysv,cma", "sm,tcp", ...). Endpoints use peer error handling; so that
// this does not silently move same-node traffic off shared memory, the first side created with
// transports that may include shared memory sets UCX_POSIX_ERROR_HANDLING=y and
// UCX_SYSV_ERROR_HANDLING=y in the process environment, unless they are already set.
// `dtype` is what a client puts on the wire for hidden states; a server replies in the dtype it
// received. Callers hand and take f32 (converted to and from a bf16 wire as UCX copies), unless
// `bf16_views` is set: then a bf16 message reaches the caller as it is on the wire, bf16 bits
// (Dispatch::x_bf16 and partial_bf16, Reply::partial_bf16), with no conversion in the data plane;
// DispatchClient::send_bf16() sends rows that are bf16 already. f32 messages keep f32 views.
//
// Authentication. With a `token` (the cluster token), every dispatch and reply header carries an
// HMAC-SHA256 tag of its fields under a key derived from the token (transport/detail/auth.h).
// A server refuses a dispatch whose tag does not verify before receiving its payload: it answers
// with an error reply, counts it (ServerStats::auth_failures) and logs the first one of each peer
// endpoint. A client turns a reply whose tag does not verify into an error reply
// (ClientStats::auth_failures). An empty token signs and checks nothing. The tensor bytes are
// not covered and nothing is encrypted: see docs/security.md.
//
// Integrity. Every header travels with a CRC-32 seal (detail/wire.h). A dispatch whose seal does
// not match is answered with an error reply when its header still parses, else dropped; a reply
// whose seal does not match becomes an error reply when it still names a dispatch of the round,
// else it is dropped as late. Both count as checksum_failures. Payload bytes are not covered.
//
// Fault injection. `faults` (a spec, see detail/faults.h) makes this side drop, delay or corrupt
// chosen messages, or stall the handler; only in a build configured with
// -DMOEMESH_FAULT_INJECTION=ON (start()/create() refuse a non-empty spec otherwise). Injected
// faults are counted in the stats (FaultCounts).
//
// Addresses. address() is the UCX worker address wrapped in a short checked frame (magic, length,
// checksum), so connect() rejects a truncated or foreign address with a message instead of
// handing garbage to UCX.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"

namespace moemesh::transport {

// Dtype of hidden states and partial sums on the wire.
enum class WireDtype { F32, BF16 };

// Where a payload handed to DispatchClient::send_payload() lives.
enum class PayloadMemory { Host, Cuda };

// Byte offsets of a dispatch payload's sections, in this order (each naturally aligned when the
// payload starts 4-byte aligned): experts int32 [n_tokens, slots] | weights f32 [n_tokens, slots]
// | x [n_tokens, hidden] in the wire dtype.
struct PayloadLayout {
  size_t experts = 0, weights = 0, x = 0, total = 0;
};
// nullopt when the shape is negative or the message would reach 4 GiB.
std::optional<PayloadLayout> dispatch_payload_layout(int64_t n_tokens, int32_t slots,
                                                     int64_t hidden, WireDtype dtype);

struct DataPlaneOptions {
  std::string transports;   // value for UCX_TLS ("" = UCX default; e.g. "tcp", "sm", "self,sm")
  std::string net_devices;  // value for UCX_NET_DEVICES ("" = UCX default)
  WireDtype dtype = WireDtype::F32;  // client side: what it sends; a server replies in kind
  std::string token;      // the cluster token: authenticates every header ("" = no authentication)
  std::string faults;     // fault-injection spec (test builds only, see detail/faults.h)
  std::string node_name;  // this process's node name: fault rules prefixed NAME/ apply if equal
  bool bf16_views = false;  // bf16 messages reach the caller as bf16 (see Options above)
};

// Faults this side injected (always zero outside fault-injection builds).
struct FaultCounts {
  uint64_t drops = 0;        // messages not sent
  uint64_t delays = 0;       // messages sent late
  uint64_t corruptions = 0;  // headers with a flipped bit
  uint64_t stalls = 0;       // handler calls started late
};

// One dispatch as the expert worker sees it; views valid only during the handler call.
struct Dispatch {
  uint64_t epoch = 0;
  uint64_t step = 0;
  int32_t layer = 0;
  int32_t micro_batch = 0;
  int64_t n_tokens = 0;     // rows in this message
  int32_t slots = 0;        // expert slots per token (top_k)
  int64_t step_tokens = 0;  // tokens of the sender's whole step for this layer
  int64_t hidden = 0;
  // x as f32 [n_tokens, hidden] (converted if the wire was bf16), or, with bf16_views and a bf16
  // wire, x_bf16 (bf16 bits as on the wire) and x null. Exactly one is set.
  const float* x = nullptr;
  const uint16_t* x_bf16 = nullptr;
  const int32_t* experts = nullptr;  // [n_tokens, slots]: expert id in the layer, -1 = not here
  const float* weights = nullptr;    // [n_tokens, slots]: gate weights
  // Filled by the handler (zero-initialised by the server before the call):
  // [n_tokens, hidden]: sum over this worker's slots of w * expert(x); partial_bf16 (bf16 bits,
  // sent as they are) when x_bf16 is set, else partial.
  float* partial = nullptr;
  uint16_t* partial_bf16 = nullptr;
  uint8_t* rejected = nullptr;   // [n_tokens, slots]: 1 = slot not computed (over capacity)
  std::string* error = nullptr;  // set non-empty to answer with an error instead
  std::chrono::steady_clock::time_point received;  // when the message arrived (for queue time)
};

struct ServerStats {
  uint64_t dispatches = 0;     // dispatches handed to the handler
  uint64_t replies = 0;        // replies sent (completed or in flight)
  uint64_t bytes_in = 0;       // payload bytes received
  uint64_t bytes_out = 0;      // payload bytes replied
  uint64_t errors = 0;         // malformed dispatches, error replies, failed reply sends
  uint64_t buffers = 0;        // buffer/slot allocations (pool growth; flat in steady state)
  uint64_t last_batch = 0;     // dispatches queued together in the last batch handed to the handler
  uint64_t auth_failures = 0;  // dispatches refused: their tag did not verify (also in errors)
  uint64_t checksum_failures = 0;  // dispatches whose header seal did not match (also in errors)
  FaultCounts faults;
};

class DispatchServer {
 public:
  // Called on the server thread with every dispatch that is complete at that moment (possibly
  // from several senders and layers); afterwards the server sends each reply. An exception
  // escaping the handler answers every dispatch of the batch with its message as the error.
  using Handler = std::function<void(std::span<Dispatch> batch)>;

  static Expected<std::unique_ptr<DispatchServer>> start(const DataPlaneOptions& options,
                                                         Handler handler);
  ~DispatchServer();  // stops and joins the thread
  DispatchServer(const DispatchServer&) = delete;
  DispatchServer& operator=(const DispatchServer&) = delete;

  const std::string& address() const;  // framed ucp worker address; travels over the control plane
  ServerStats stats() const;           // thread-safe

 private:
  class Impl;
  explicit DispatchServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// One reply; views valid during the on_reply call.
struct Reply {
  int peer = 0;
  int32_t layer = 0;
  int32_t micro_batch = 0;
  int64_t n_tokens = 0;
  int32_t slots = 0;
  int64_t hidden = 0;
  // [n_tokens, hidden]: partial (f32), or partial_bf16 (bf16 bits as on the wire) with
  // bf16_views and a bf16 wire; both null with an error.
  const float* partial = nullptr;
  const uint16_t* partial_bf16 = nullptr;
  const uint8_t* rejected = nullptr;  // [n_tokens, slots] (null with an error)
  std::string_view error;             // non-empty: the server answered with an error
};

struct ClientStats {
  uint64_t dispatches = 0;     // sends accepted
  uint64_t replies = 0;        // replies delivered to on_reply (error replies included)
  uint64_t timeouts = 0;       // dispatches without a reply when their wait() ended
  uint64_t late_replies = 0;   // replies dropped: after their wait(), wrong epoch/step, duplicate
  uint64_t send_errors = 0;    // sends refused or failed by UCX (dead or unreachable peer)
  uint64_t bytes_out = 0;      // payload bytes sent
  uint64_t bytes_in = 0;       // payload bytes of delivered replies
  uint64_t buffers = 0;        // buffer/slot allocations (pool growth; flat in steady state)
  uint64_t auth_failures = 0;  // replies whose tag did not verify (delivered as error replies)
  uint64_t checksum_failures = 0;  // replies whose header seal did not match
  FaultCounts faults;
};

// Attention-worker side. Used by ONE thread (the caller's); it has no thread of its own.
class DispatchClient {
 public:
  static Expected<std::unique_ptr<DispatchClient>> create(const DataPlaneOptions& options);
  ~DispatchClient();
  DispatchClient(const DispatchClient&) = delete;
  DispatchClient& operator=(const DispatchClient&) = delete;

  // Peer index for a server address; the same address gives the same index until disconnect().
  Expected<int> connect(std::string_view address);
  // Forgets a dead or removed peer: closes its endpoint, cancels what is in flight to it. Its
  // index is not reused; connecting to the address again gives a new index.
  void disconnect(int peer);
  // Whether UCX reported the peer's endpoint failed (a dead or unreachable expert worker), as
  // opposed to one that is merely slow to answer. False for an unknown or disconnected peer.
  bool peer_failed(int peer) const;

  // Queues one dispatch (sent immediately, non-blocking): rows tokens[i] of x ([*, hidden] f32),
  // converted to the wire dtype; experts/weights are [tokens.size(), slots]. x must hold still
  // until the next wait() returns (see Buffers above).
  Status send(int peer, uint64_t epoch, uint64_t step, int32_t layer, int32_t micro_batch,
              int64_t step_tokens, const float* x, int64_t hidden, std::span<const int32_t> tokens,
              const int32_t* experts, const float* weights, int32_t slots);
  // The same with rows of bf16 hidden states (x_bf16: bf16 bits, [*, hidden]), which go on the
  // wire as they are; needs dtype BF16 (refused otherwise).
  Status send_bf16(int peer, uint64_t epoch, uint64_t step, int32_t layer, int32_t micro_batch,
                   int64_t step_tokens, const uint16_t* x_bf16, int64_t hidden,
                   std::span<const int32_t> tokens, const int32_t* experts, const float* weights,
                   int32_t slots);

  // Whether this side's UCX takes CUDA device memory (built with CUDA support, on a machine with a
  // GPU): then send_payload() sends from device memory without a copy through the host (GPUDirect
  // RDMA where the network has it, UCX's own CUDA copies otherwise).
  bool cuda_memory() const;
  // Queues one dispatch whose payload the caller laid out already (dispatch_payload_layout() in
  // this client's wire dtype) in `memory` (Cuda only where cuda_memory()); UCX sends it from
  // there, without a copy. UCX reads the payload until the send completes, which may be after the
  // wait() that covers it (a peer that did not answer): the caller must neither change nor free
  // it while payload_in_flight() says so. Otherwise as send().
  Status send_payload(int peer, uint64_t epoch, uint64_t step, int32_t layer, int32_t micro_batch,
                      int64_t step_tokens, int64_t n_tokens, int32_t slots, int64_t hidden,
                      const void* payload, PayloadMemory memory);
  // Whether a send_payload() of `payload` has not completed yet.
  bool payload_in_flight(const void* payload) const;

  // Progresses until every dispatch sent since the last wait() has a reply or `deadline` passes
  // (at least one progress call, so an empty round drains late replies). Calls on_reply (may be
  // empty) for each reply as it arrives; returns the peers (ascending, each once) that did not
  // answer in time. Their late replies are dropped and counted later. Busy-polls. on_reply must
  // not call send() or wait() (refused); an exception it throws is rethrown once the round is
  // closed.
  std::vector<int> wait(std::chrono::steady_clock::time_point deadline,
                        const std::function<void(const Reply&)>& on_reply);

  ClientStats stats() const;

 private:
  class Impl;
  explicit DispatchClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// An address (DispatchServer::address()) as lower-case hex, for logs and tools that reach a
// worker's data plane from outside (tests/transport/dataplane_probe.cpp), and back; nullopt when
// `text` is not hex.
std::string address_to_hex(std::string_view address);
std::optional<std::string> address_from_hex(std::string_view text);

// bf16 bits <-> f32 as the data plane converts (round to nearest even, NaN stays NaN),
// vectorised; for callers with bf16 views.
void bf16_to_f32(const uint16_t* src, float* dst, size_t n);
void f32_to_bf16(const float* src, uint16_t* dst, size_t n);

// Whether this build can inject data-plane faults (-DMOEMESH_FAULT_INJECTION=ON, test builds).
bool fault_injection_available();

}  // namespace moemesh::transport
