// UCP context/worker wrapper and worker address framing (see detail/ucx.h).
#include "transport/detail/ucx.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>

namespace moemesh::transport::detail {

namespace {

constexpr char kAddressMagic[4] = {'M', 'M', 'D', 'P'};
constexpr uint8_t kAddressVersion = 2;
constexpr size_t kAddressHeader = 4 + 1 + 4 + 4 + 1;
// UCX 1.13's tcp segments when the environment sets none: 8k to send, 64k to receive.
constexpr const char* kUcxTcpTxDefault = "8k";
constexpr const char* kUcxTcpRxDefault = "64k";

uint32_t fnv1a(const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 16777619u;
  return h;
}

void put_u32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xffu));
}

uint32_t get_u32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t{static_cast<unsigned char>(p[i])} << (8 * i);
  return v;
}

// Whether UCX_TLS may select the posix/sysv shared-memory transports.
bool may_use_shared_memory(const std::string& tls) {
  if (tls.empty() || tls[0] == '^') return true;  // UCX default, or "all but ..."
  for (const char* name : {"sm", "shm", "posix", "sysv", "all"})
    if (tls.find(name) != std::string::npos) return true;
  return false;
}

// Whether UCX_TLS may select the tcp transport.
bool may_use_tcp(const std::string& tls) {
  if (tls.empty() || tls[0] == '^') return true;
  return tls.find("tcp") != std::string::npos || tls.find("all") != std::string::npos;
}

// Peer error handling keeps shared memory only when the mm transports expose it
// (notes/ucx-1.13.md, pitfall 2); the segment sizes: see kSharedMemorySegSize and kTcpTxSegSize.
// Set only for transports that may be used (UCX warns about unused variables at exit
// otherwise); values the user already set win (a UCX_MM_SEG_SIZE of theirs applies to both mm
// transports; a UCX_TCP_RX_SEG_SIZE of theirs keeps UCX's send segment, which must fit it).
void set_env_defaults(const std::string& tls) {
  if (may_use_shared_memory(tls)) {
    static std::once_flag once;
    std::call_once(once, [] {
      setenv("UCX_POSIX_ERROR_HANDLING", "y", 0);
      setenv("UCX_SYSV_ERROR_HANDLING", "y", 0);
      if (std::getenv("UCX_MM_SEG_SIZE") == nullptr) {
        setenv("UCX_POSIX_SEG_SIZE", kSharedMemorySegSize, 0);
        setenv("UCX_SYSV_SEG_SIZE", kSharedMemorySegSize, 0);
      }
    });
  }
  if (may_use_tcp(tls)) {
    static std::once_flag once;
    std::call_once(once, [] {
      if (std::getenv("UCX_TCP_RX_SEG_SIZE") == nullptr)
        setenv("UCX_TCP_TX_SEG_SIZE", kTcpTxSegSize, 0);
    });
  }
}

// The value of variable `name`, else of `inherited` (the UCX variable it inherits from; null:
// none), else `fallback`.
std::string env_or(const char* name, const char* inherited, const char* fallback) {
  if (const char* v = std::getenv(name)) return v;
  if (const char* v = inherited != nullptr ? std::getenv(inherited) : nullptr) return v;
  return fallback;
}

// The machine: its boot id (shared by the containers of one kernel), else its host name.
std::string machine_id() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  if (in && std::getline(in, id) && !id.empty()) return id;
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  return host;
}

// The value of `key` in a "k=v k=v" profile ("" when absent).
std::string_view profile_field(std::string_view profile, std::string_view key) {
  size_t at = 0;
  while (at < profile.size()) {
    const size_t end = std::min(profile.find(' ', at), profile.size());
    const std::string_view item = profile.substr(at, end - at);
    if (item.size() > key.size() && item.substr(0, key.size()) == key && item[key.size()] == '=')
      return item.substr(key.size() + 1);
    at = end + 1;
  }
  return {};
}

std::string or_default(const std::string& v) {
  return v.empty() ? "<UCX default>" : v;
}

}  // namespace

std::string ucs_text(ucs_status_t status) {
  return ucs_status_string(status);
}

std::optional<uint64_t> parse_memunits(std::string_view text) {
  uint64_t value = 0;
  size_t i = 0;
  for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i) {
    if (value > (uint64_t{1} << 40)) return std::nullopt;
    value = value * 10 + static_cast<uint64_t>(text[i] - '0');
  }
  if (i == 0) return std::nullopt;
  std::string_view unit = text.substr(i);
  if (!unit.empty() && (unit.back() == 'b' || unit.back() == 'B')) unit.remove_suffix(1);
  if (unit.empty()) return value;
  if (unit.size() != 1) return std::nullopt;
  switch (unit[0]) {
    case 'k':
    case 'K':
      return value << 10;
    case 'm':
    case 'M':
      return value << 20;
    case 'g':
    case 'G':
      return value << 30;
    default:
      return std::nullopt;
  }
}

std::optional<uint64_t> tcp_send_segment_bytes() {
  return parse_memunits(env_or("UCX_TCP_TX_SEG_SIZE", nullptr, kUcxTcpTxDefault));
}

std::string transport_profile(const std::string& tls) {
  std::string out;
  if (may_use_shared_memory(tls))
    out = "host=" + machine_id() +
          " posix=" + env_or("UCX_POSIX_SEG_SIZE", "UCX_MM_SEG_SIZE", "default") +
          " sysv=" + env_or("UCX_SYSV_SEG_SIZE", "UCX_MM_SEG_SIZE", "default");
  if (may_use_tcp(tls)) {
    if (!out.empty()) out += ' ';
    out += "tcp_tx=" + env_or("UCX_TCP_TX_SEG_SIZE", nullptr, kUcxTcpTxDefault) +
           " tcp_rx=" + env_or("UCX_TCP_RX_SEG_SIZE", nullptr, kUcxTcpRxDefault);
  }
  return out;
}

Status check_transport_profile(std::string_view peer, std::string_view local) {
  const std::string_view peer_host = profile_field(peer, "host");
  if (!peer_host.empty() && peer_host == profile_field(local, "host")) {
    for (std::string_view key : {"posix", "sysv"}) {
      const std::string_view theirs = profile_field(peer, key), ours = profile_field(local, key);
      if (theirs != ours)
        return Error(fmt::format(
            "the peer on this machine gives UCX's {} shared-memory transport segments of {} "
            "bytes, this process {}: UCX 1.13 crashes when two shared-memory peers differ; give "
            "every moemesh process on a machine the same UCX_POSIX_SEG_SIZE / UCX_SYSV_SEG_SIZE / "
            "UCX_MM_SEG_SIZE (or none)",
            key, theirs, ours));
    }
  }
  // Over tcp each side's send segments must fit the other's receive segments (UCX 1.13 aborts
  // the receiver otherwise).
  const auto tx_peer = parse_memunits(profile_field(peer, "tcp_tx"));
  const auto rx_peer = parse_memunits(profile_field(peer, "tcp_rx"));
  const auto tx_ours = parse_memunits(profile_field(local, "tcp_tx"));
  const auto rx_ours = parse_memunits(profile_field(local, "tcp_rx"));
  if (tx_peer && rx_peer && tx_ours && rx_ours && (*tx_ours > *rx_peer || *tx_peer > *rx_ours))
    return Error(fmt::format(
        "UCX tcp segments do not fit: the peer sends up to {} and receives up to {} bytes, this "
        "process sends up to {} and receives up to {}; UCX 1.13 aborts when a segment is larger "
        "than the receiver's: give every moemesh process the same UCX_TCP_TX_SEG_SIZE and "
        "UCX_TCP_RX_SEG_SIZE (or none), with the send size at most the receive size",
        *tx_peer, *rx_peer, *tx_ours, *rx_ours));
  return {};
}

std::string frame_address(const void* raw, size_t length, std::string_view profile) {
  profile = profile.substr(0, 255);
  std::string body(profile);
  body.append(static_cast<const char*>(raw), length);
  std::string out;
  out.reserve(kAddressHeader + body.size());
  out.append(kAddressMagic, 4);
  out.push_back(static_cast<char>(kAddressVersion));
  put_u32(out, static_cast<uint32_t>(length));
  put_u32(out, fnv1a(body.data(), body.size()));
  out.push_back(static_cast<char>(profile.size()));
  out += body;
  return out;
}

Expected<UnframedAddress> unframe_address(std::string_view framed) {
  if (framed.size() < kAddressHeader || std::memcmp(framed.data(), kAddressMagic, 4) != 0)
    return Error("data-plane address (" + std::to_string(framed.size()) +
                 " bytes) does not start with the MMDP frame: pass the bytes of "
                 "DispatchServer::address() unchanged");
  if (static_cast<uint8_t>(framed[4]) != kAddressVersion)
    return Error("data-plane address has frame version " +
                 std::to_string(static_cast<uint8_t>(framed[4])) + ", this build reads version " +
                 std::to_string(kAddressVersion) + ": run the same moemesh version on both sides");
  const uint32_t length = get_u32(framed.data() + 5);
  const size_t profile = static_cast<uint8_t>(framed[13]);
  if (framed.size() - kAddressHeader != size_t{length} + profile)
    return Error("data-plane address is truncated or padded: frame says " + std::to_string(length) +
                 " + " + std::to_string(profile) + " bytes, got " +
                 std::to_string(framed.size() - kAddressHeader) +
                 " (was it carried as a C string or cut?)");
  const std::string_view body = framed.substr(kAddressHeader);
  if (fnv1a(body.data(), body.size()) != get_u32(framed.data() + 9))
    return Error("data-plane address fails its checksum: the bytes were altered in transit");
  return UnframedAddress{body.substr(profile), body.substr(0, profile)};
}

}  // namespace moemesh::transport::detail

namespace moemesh::transport {

std::string address_to_hex(std::string_view address) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * address.size());
  for (unsigned char c : address) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  return out;
}

std::optional<std::string> address_from_hex(std::string_view text) {
  auto nibble = [](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  if (text.size() % 2 != 0) return std::nullopt;
  std::string out;
  out.reserve(text.size() / 2);
  for (size_t i = 0; i < text.size(); i += 2) {
    const int hi = nibble(text[i]), lo = nibble(text[i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out.push_back(static_cast<char>(hi * 16 + lo));
  }
  return out;
}

}  // namespace moemesh::transport

namespace moemesh::transport::detail {

Expected<std::unique_ptr<UcxWorker>> UcxWorker::create(const DataPlaneOptions& options,
                                                       const char* role, bool wakeup) {
  set_env_defaults(options.transports);
  std::unique_ptr<UcxWorker> w(new UcxWorker());
  w->describe_ = "UCX_TLS=" + or_default(options.transports) +
                 " UCX_NET_DEVICES=" + or_default(options.net_devices);
  const std::string where = std::string("data-plane ") + role + " (" + w->describe_ + ")";

  ucp_config_t* config = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &config);
  if (st != UCS_OK) return Error("UCX config read failed for the " + where + ": " + ucs_text(st));
  auto modify = [&](const char* name, const std::string& value) -> Status {
    if (value.empty()) return {};
    const ucs_status_t s = ucp_config_modify(config, name, value.c_str());
    if (s != UCS_OK)
      return Error(std::string("UCX refused UCX_") + name + "=" + value + " for the " + where +
                   ": " + ucs_text(s) + "; see `ucx_info -d` for what exists here");
    return {};
  };
  Status m = modify("TLS", options.transports);
  if (m.ok()) m = modify("NET_DEVICES", options.net_devices);
  if (!m.ok()) {
    ucp_config_release(config);
    return m.error();
  }

  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM | (wakeup ? UCP_FEATURE_WAKEUP : 0);
  st = ucp_init(&params, config, &w->context_);
  ucp_config_release(config);
  if (st != UCS_OK) {
    w->context_ = nullptr;
    return Error("UCX init failed for the " + where + ": " + ucs_text(st) +
                 "; check that DataPlaneOptions.transports (UCX_TLS) and net_devices name "
                 "transports and devices that exist here (`ucx_info -d`)");
  }

  // Whether UCX moves CUDA device memory itself (a UCX built with CUDA transports, with a GPU and
  // driver present): then device pointers go to UCX as they are.
  ucp_context_attr_t attr{};
  attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  if (ucp_context_query(w->context_, &attr) == UCS_OK)
    w->cuda_memory_ = (attr.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  st = ucp_worker_create(w->context_, &wp, &w->worker_);
  if (st != UCS_OK) {
    w->worker_ = nullptr;
    return Error("UCX worker creation failed for the " + where + ": " + ucs_text(st) +
                 "; check UCX_TLS / UCX_NET_DEVICES against `ucx_info -d`");
  }

  ucp_address_t* addr = nullptr;
  size_t addr_len = 0;
  st = ucp_worker_get_address(w->worker_, &addr, &addr_len);
  if (st != UCS_OK)
    return Error("UCX could not report the worker address of the " + where + ": " + ucs_text(st));
  w->profile_ = transport_profile(options.transports);
  w->address_ = frame_address(addr, addr_len, w->profile_);
  ucp_worker_release_address(w->worker_, addr);

  if (wakeup) {
    int efd = -1;
    st = ucp_worker_get_efd(w->worker_, &efd);
    if (st != UCS_OK)
      return Error("UCX gave no event fd to the " + where + ": " + ucs_text(st) +
                   "; every transport in UCX_TLS must support wakeup");
    w->epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
    if (w->epoll_fd_ < 0)
      return Error("epoll_create1 failed for the " + where + ": " + std::strerror(errno));
    epoll_event ev{};
    ev.events = EPOLLIN;
    if (epoll_ctl(w->epoll_fd_, EPOLL_CTL_ADD, efd, &ev) != 0)
      return Error("epoll_ctl failed for the " + where + ": " + std::strerror(errno));
  }
  spdlog::debug("transport=ucx event=worker_created role={} {} address_bytes={}", role,
                w->describe_, w->address_.size());
  return w;
}

UcxWorker::~UcxWorker() {
  if (epoll_fd_ >= 0) close(epoll_fd_);
  if (worker_ != nullptr) ucp_worker_destroy(worker_);
  if (context_ != nullptr) ucp_cleanup(context_);
}

Status UcxWorker::set_am_handler(unsigned id, ucp_am_recv_callback_t cb, void* arg) {
  ucp_am_handler_param_t p{};
  p.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                 UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
  p.id = id;
  p.flags = UCP_AM_FLAG_WHOLE_MSG | UCP_AM_FLAG_PERSISTENT_DATA;
  p.cb = cb;
  p.arg = arg;
  const ucs_status_t st = ucp_worker_set_am_recv_handler(worker_, &p);
  if (st != UCS_OK)
    return Error("UCX refused the active-message handler " + std::to_string(id) + ": " +
                 ucs_text(st));
  return {};
}

unsigned UcxWorker::progress() {
  unsigned total = 0;
  for (int i = 0; i < 64; ++i) {
    const unsigned n = ucp_worker_progress(worker_);
    if (n == 0) break;
    total += n;
  }
  return total;
}

void UcxWorker::wait_for_events(int timeout_ms) {
  if (epoll_fd_ < 0) return;
  const ucs_status_t st = ucp_worker_arm(worker_);
  if (st == UCS_ERR_BUSY) return;  // events pending: the caller progresses again
  if (st != UCS_OK) {
    spdlog::debug("transport=ucx event=arm_failed status={}", ucs_text(st));
    return;
  }
  epoll_event ev{};
  (void)epoll_wait(epoll_fd_, &ev, 1, timeout_ms);
}

ucs_status_t UcxWorker::wait_request(void* request, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  ucs_status_t st = ucp_request_check_status(request);
  while (st == UCS_INPROGRESS && std::chrono::steady_clock::now() < deadline) {
    ucp_worker_progress(worker_);
    st = ucp_request_check_status(request);
  }
  ucp_request_free(request);
  return st == UCS_INPROGRESS ? UCS_ERR_TIMED_OUT : st;
}

void UcxWorker::close_endpoint(ucp_ep_h ep, std::chrono::milliseconds timeout) {
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = UCP_EP_CLOSE_FLAG_FORCE;
  void* req = ucp_ep_close_nbx(ep, &p);
  if (req == nullptr) return;
  if (UCS_PTR_IS_ERR(req)) {
    spdlog::debug("transport=ucx event=ep_close_failed status={}", ucs_text(UCS_PTR_STATUS(req)));
    return;
  }
  const ucs_status_t st = wait_request(req, timeout);
  if (st != UCS_OK) spdlog::debug("transport=ucx event=ep_close status={}", ucs_text(st));
}

}  // namespace moemesh::transport::detail
