// A UCP context with one worker, owned by one thread at a time (thread mode single), and the
// framing of worker addresses. Both sides of the data plane build on it.
#pragma once

#include <ucp/api/ucp.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "core/error.h"
#include "transport/data_plane.h"

namespace moemesh::transport::detail {

// "UCS_ERR_..." text of a status.
std::string ucs_text(ucs_status_t status);

// Segment sizes moemesh gives UCX unless the environment sets them. Shared memory (posix and
// sysv, unless UCX_POSIX_SEG_SIZE, UCX_SYSV_SEG_SIZE or UCX_MM_SEG_SIZE is set): 32 KiB + 64;
// UCX's 8256 splits a hidden-2048 f32 token (8 KiB plus routing and header) in two, and with
// peer error handling every larger message crosses shared memory in fragments of this size.
// Sizes from 64 KiB on hang or crash UCX 1.13. Tcp send segments (unless UCX_TCP_TX_SEG_SIZE or
// UCX_TCP_RX_SEG_SIZE is set): 64 KiB instead of 8, which is UCX's default receive segment, so
// peers that keep UCX's defaults still fit.
inline constexpr const char* kSharedMemorySegSize = "32832";
inline constexpr const char* kTcpTxSegSize = "64k";

// What a peer must agree with for UCX not to crash: for shared memory, the machine (its boot id)
// and the posix/sysv segment sizes; for tcp, the send and receive segment sizes. E.g.
// "host=BOOT_ID posix=32832 sysv=32832 tcp_tx=64k tcp_rx=64k"; the parts `tls` rules out are
// left out. Read after the first UcxWorker::create() (which sets the defaults).
std::string transport_profile(const std::string& tls);
// An error naming the variables when `peer` and `local` (transport_profile() of each side) would
// crash UCX 1.13: shared-memory segment sizes that differ on one machine, or a tcp send segment
// larger than the other side's receive segment.
Status check_transport_profile(std::string_view peer, std::string_view local);
// UCX's memory units ("65536", "64k", "8K", "1m"); nullopt for anything else.
std::optional<uint64_t> parse_memunits(std::string_view text);
// The tcp send segment in effect: UCX_TCP_TX_SEG_SIZE, else UCX 1.13's 8k; nullopt when the
// variable is not a size.
std::optional<uint64_t> tcp_send_segment_bytes();

// Frames raw ucp worker address bytes: magic "MMDP", version byte (2), u32 length of the raw
// address, u32 FNV-1a checksum of what follows, u8 length of the transport profile, the profile,
// the raw address.
std::string frame_address(const void* raw, size_t length, std::string_view profile = {});
struct UnframedAddress {
  std::string_view raw;      // the ucp address
  std::string_view profile;  // the side's transport_profile()
};
// The parts of a framed address, or an error naming what is wrong with it.
Expected<UnframedAddress> unframe_address(std::string_view framed);

class UcxWorker {
 public:
  // role ("client"/"server") names the side in messages and logs. wakeup: the worker can sleep on
  // its event fd (UCP_FEATURE_WAKEUP) in wait_for_events().
  static Expected<std::unique_ptr<UcxWorker>> create(const DataPlaneOptions& options,
                                                     const char* role, bool wakeup);
  ~UcxWorker();
  UcxWorker(const UcxWorker&) = delete;
  UcxWorker& operator=(const UcxWorker&) = delete;

  ucp_worker_h worker() const { return worker_; }
  const std::string& address() const { return address_; }  // framed
  const std::string& profile() const { return profile_; }  // transport_profile()
  // A short description of the options for messages: "UCX_TLS=tcp UCX_NET_DEVICES=<default>".
  const std::string& describe() const { return describe_; }
  // Whether this UCX context takes CUDA device memory (UCS_MEMORY_TYPE_CUDA among the memory
  // types it reports): a UCX built with CUDA support, on a machine with a GPU.
  bool cuda_memory() const { return cuda_memory_; }

  Status set_am_handler(unsigned id, ucp_am_recv_callback_t cb, void* arg);

  // Progresses until ucp_worker_progress reports nothing more to do; returns the events seen.
  unsigned progress();

  // Sleeps until the worker has events or `timeout_ms` passes (needs wakeup). Returns at once
  // when events are already pending.
  void wait_for_events(int timeout_ms);
  // Wakes a wait_for_events() from any thread.
  void signal() { ucp_worker_signal(worker_); }

  // Closes an endpoint without flushing (cancels what is in flight on it) and progresses until
  // the close completes or `timeout` passes.
  void close_endpoint(ucp_ep_h ep, std::chrono::milliseconds timeout);

  // Progresses until `request` completes or `timeout` passes; frees it either way. Returns its
  // status (UCS_ERR_TIMED_OUT on timeout).
  ucs_status_t wait_request(void* request, std::chrono::milliseconds timeout);

 private:
  UcxWorker() = default;

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int epoll_fd_ = -1;
  std::string address_;
  std::string profile_;
  std::string describe_;
  bool cuda_memory_ = false;
};

}  // namespace moemesh::transport::detail
