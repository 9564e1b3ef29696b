// A UCP context with one worker, owned by one thread at a time (thread mode single), and the
// framing of worker addresses. Both sides of the data plane build on it.
#pragma once

#include <ucp/api/ucp.h>

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

#include "core/error.h"
#include "transport/data_plane.h"

namespace moemesh::transport::detail {

// "UCS_ERR_..." text of a status.
std::string ucs_text(ucs_status_t status);

// Frames raw ucp worker address bytes: magic "MMDP", version byte, u32 length, u32 FNV-1a checksum.
std::string frame_address(const void* raw, size_t length);
// The raw ucp address inside a framed address, or an error naming what is wrong with it.
Expected<std::string_view> unframe_address(std::string_view framed);

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
  // A short description of the options for messages: "UCX_TLS=tcp UCX_NET_DEVICES=<default>".
  const std::string& describe() const { return describe_; }

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
  std::string describe_;
};

}  // namespace moemesh::transport::detail
