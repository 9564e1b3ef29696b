// Dispatch + combine round trip of the data plane measured against ucx_perftest in the same run.
// A DispatchClient sends n tokens of hidden states (BF16 on the wire, or F32 with --dtype f32)
// to a DispatchServer in another process
// (this binary re-executed with --serve), which replies with partial sums of the same size; the
// median round trip is compared with twice the median one-way latency that `ucx_perftest -t
// ucp_am_lat` reports for a message of the hidden-state bytes over the same UCX_TLS (ucp_am_lat
// is a ping-pong test and prints half the round trip).
//
// Not like for like: moemesh endpoints use peer error handling (a dead expert worker must not
// crash the attention worker), ucx_perftest does not. In UCX 1.13 peer error handling requires
// memory invalidation for rendezvous lanes, which cma lacks, so large moemesh messages over shared
// memory go through the AM bcopy pipeline (two copies), as with ucx_perftest -e. moemesh also
// gathers rows into its send buffer, zeroes the partial sums and runs the handler; ucx_perftest
// touches no data. The bench's handler does what any expert handler must at least do: read x and
// write the partial sums (a copy).
//
//   build/bin/dispatch_bench [--transports "sm;tcp"] [--iterations N] [--hidden 2048,7168]
//                            [--tokens 1,16,64,256] [--dtype bf16|f32] [--caller-dtype bf16|f32]
//                            [--perftest PATH] [--no-perftest] [--token TOKEN] [--cpus A,B|none]
//                            [--handler copy|none]
//
// --dtype is the wire's; --caller-dtype what both sides' callers hold (default: the wire's). With
// a bf16 wire and bf16 callers (the default) nothing is converted: bf16 rows go out with
// send_bf16() and arrive as bf16 views (DataPlaneOptions::bf16_views), as for a model whose hidden
// states are bf16. --caller-dtype f32 measures f32 callers on a bf16 wire: each side converts
// (over copying transports inside UCX's copies, see transport/detail/wire.h).
//
// --handler copy (default): the server's handler copies x into the partial sums, the least work
// of any expert. --handler none: it leaves the partial sums as the server hands them over (zero),
// so the round trip is the data plane's alone (the same bytes still travel both ways), which is
// what ucx_perftest measures.
//
// --cpus binds the client (this process) to CPU A and the server to CPU B, and ucx_perftest's
// client and server likewise (its -c). Default: the first two CPUs this process may use, when it
// may use two or more; "none" binds nothing. Both sides busy-poll: on a shared CPU a round trip
// waits for the scheduler, for moemesh and ucx_perftest alike.
//
// --token authenticates every header with that cluster token on both sides (HMAC-SHA256, see
// transport/detail/auth.h); without it nothing is signed or checked, so the two runs show what
// authentication costs.
//
// --transports lists UCX_TLS values separated by ';' (a value may itself be a list:
// "sm;posix,sysv,cma").
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "transport/data_plane.h"

namespace {

using moemesh::transport::DataPlaneOptions;
using moemesh::transport::Dispatch;
using moemesh::transport::DispatchClient;
using moemesh::transport::DispatchServer;
using moemesh::transport::WireDtype;
using Clock = std::chrono::steady_clock;

constexpr int32_t kSlots = 8;  // top-k of the routing sent along (8 B per token and slot)

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, sep);)
    if (!item.empty()) out.push_back(item);
  return out;
}

// Binds the calling process (its threads started later too) to one CPU; -1: leaves it.
void bind_to(int cpu) {
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (sched_setaffinity(0, sizeof(set), &set) != 0)
    spdlog::warn("dispatch_bench: cannot bind to CPU {}", cpu);
}

// The first two CPUs this process may use, or {-1, -1} with fewer.
std::pair<int, int> default_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return {-1, -1};
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE && cpus.size() < 2; ++c)
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  return cpus.size() == 2 ? std::pair<int, int>{cpus[0], cpus[1]} : std::pair<int, int>{-1, -1};
}

// --serve: the expert-worker process. Prints its address in hex on stdout, serves until stdin
// closes. The handler copies x into partial: the reply has the bytes of the request's x.
int serve(const std::string& transports, const std::string& token, int cpu, bool copy,
          bool bf16_views) {
  bind_to(cpu);
  DataPlaneOptions o;
  o.transports = transports;
  o.token = token;
  o.bf16_views = bf16_views;
  auto server = DispatchServer::start(o, [copy](std::span<Dispatch> batch) {
    if (!copy) return;
    for (Dispatch& d : batch) {
      const auto elems = static_cast<size_t>(d.n_tokens * d.hidden);
      if (d.x_bf16 != nullptr)
        std::memcpy(d.partial_bf16, d.x_bf16, elems * sizeof(uint16_t));
      else
        std::memcpy(d.partial, d.x, elems * sizeof(float));
    }
  });
  if (!server.ok()) {
    std::fprintf(stderr, "dispatch_bench --serve: %s\n", server.error().message().c_str());
    return 1;
  }
  std::printf("%s\n", moemesh::transport::address_to_hex((*server)->address()).c_str());
  std::fflush(stdout);
  char buf[64];
  while (read(STDIN_FILENO, buf, sizeof(buf)) > 0) {
  }
  return 0;
}

// A child process with stdin and stdout connected to pipes.
struct Child {
  pid_t pid = -1;
  int in = -1;   // its stdin (we write)
  int out = -1;  // its stdout (we read)
};

// Everything the child needs is built before fork(): the parent has threads (UCX's), so the
// child only calls async-signal-safe functions before exec.
Child spawn(const std::vector<std::string>& argv, const std::string& ucx_tls,
            bool error_handling_env = false) {
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e)
    if ((ucx_tls.empty() || std::strncmp(*e, "UCX_TLS=", 8) != 0) &&
        std::strncmp(*e, "UCX_POSIX_ERROR_HANDLING=", 25) != 0 &&
        std::strncmp(*e, "UCX_SYSV_ERROR_HANDLING=", 24) != 0)  // set by DispatchServer itself
      env_strings.emplace_back(*e);
  if (!ucx_tls.empty()) env_strings.push_back("UCX_TLS=" + ucx_tls);
  if (error_handling_env) {  // as DispatchServer/DispatchClient set them (keeps sm under -e)
    env_strings.push_back("UCX_POSIX_ERROR_HANDLING=y");
    env_strings.push_back("UCX_SYSV_ERROR_HANDLING=y");
  }
  std::vector<char*> args, env;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  for (const std::string& e : env_strings) env.push_back(const_cast<char*>(e.c_str()));
  env.push_back(nullptr);
  static const char kExecFailed[] = "dispatch_bench: exec failed\n";

  int to_child[2], from_child[2];
  if (pipe(to_child) != 0 || pipe(from_child) != 0) return {};
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(to_child[0], STDIN_FILENO);
    dup2(from_child[1], STDOUT_FILENO);
    close(to_child[1]);
    close(from_child[0]);
    execve(args[0], args.data(), env.data());
    (void)!write(STDERR_FILENO, kExecFailed, sizeof(kExecFailed) - 1);
    _exit(127);
  }
  close(to_child[0]);
  close(from_child[1]);
  return {pid, to_child[1], from_child[0]};
}

std::string read_all(int fd) {
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) out.append(buf, static_cast<size_t>(n));
  return out;
}

// One line; false at end of file.
bool read_line(int fd, std::string& line) {
  line.clear();
  char c;
  ssize_t n;
  while ((n = read(fd, &c, 1)) == 1 && c != '\n') line.push_back(c);
  return n == 1 || !line.empty();
}

// The --serve process's address: the first hex line on its stdout (UCX may log there first).
std::string read_address(int fd) {
  for (std::string line; read_line(fd, line);) {
    const std::optional<std::string> bytes = moemesh::transport::address_from_hex(line);
    if (bytes && bytes->size() > 4 && bytes->compare(0, 4, "MMDP") == 0) return *bytes;
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  return {};
}

// Waits up to `timeout` for the child, then kills it. Returns its exit status (-1 if killed).
int reap(pid_t pid, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  int status = 0;
  while (Clock::now() < deadline) {
    if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  return -1;
}

int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof(a);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  close(fd);
  return port;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Round trip (us) by ucx_perftest ucp_am_lat: 2 x the median one-way latency it prints; 0 when
// it failed (the reason is logged). With error_handling, endpoints are created as moemesh creates
// them (`-e`: peer error handling).
double perftest_round_trip(const std::string& perftest, const std::string& tls, size_t bytes,
                           int iterations, bool error_handling, std::pair<int, int> cpus) {
  for (int attempt = 0; attempt < 3; ++attempt) {
    const std::string port = std::to_string(free_port());
    std::vector<std::string> server_args = {perftest, "-p", port};
    if (error_handling) server_args.push_back("-e");
    if (cpus.second >= 0)
      server_args.insert(server_args.end(), {"-c", std::to_string(cpus.second)});
    Child server = spawn(server_args, tls, error_handling);
    std::string out;
    int rc = -1;
    for (int tries = 0; tries < 40; ++tries) {  // until the server listens
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
      std::vector<std::string> client_args = {
          perftest, "127.0.0.1",
          "-p",     port,
          "-t",     "ucp_am_lat",
          "-s",     std::to_string(bytes),
          "-n",     std::to_string(iterations),
          "-w",     std::to_string(std::max(10, iterations / 10)),
          "-f",     "-v"};
      if (error_handling) client_args.push_back("-e");
      if (cpus.first >= 0)
        client_args.insert(client_args.end(), {"-c", std::to_string(cpus.first)});
      Child client = spawn(client_args, tls, error_handling);
      close(client.in);
      out = read_all(client.out);
      close(client.out);
      rc = reap(client.pid, std::chrono::seconds(60));
      if (rc == 0) break;
    }
    close(server.in);
    close(server.out);
    reap(server.pid, std::chrono::seconds(2));
    if (rc != 0) continue;
    // CSV: after the "iterations,50.0_percentile_lat,..." header, the line of numbers.
    const auto lines = split(out, '\n');
    bool header = false;
    for (const std::string& line : lines) {
      if (line.rfind("iterations,", 0) == 0) {
        header = true;
        continue;
      }
      const auto fields = split(line, ',');
      if (!header || fields.size() < 2) continue;
      char* end = nullptr;
      const double one_way = std::strtod(fields[1].c_str(), &end);
      if (end != fields[1].c_str() && one_way > 0) return 2 * one_way;
    }
    spdlog::warn("dispatch_bench: cannot parse ucx_perftest output: {}", out);
    return 0;
  }
  spdlog::warn("dispatch_bench: ucx_perftest failed for UCX_TLS={} size={}", tls, bytes);
  return 0;
}

struct Row {
  std::string transports;
  int64_t hidden = 0, tokens = 0;
  size_t bytes = 0;
  double moemesh_us = 0, perftest_us = 0, perftest_e_us = 0;
  uint64_t timeouts = 0;
};

}  // namespace

int main(int argc, char** argv) {
  std::string transports = "sm;tcp";
  int iterations = 200;
  std::string perftest = "/usr/bin/ucx_perftest";
  std::string serve_tls;
  bool serving = false;
  std::vector<int64_t> hiddens = {2048, 7168};
  std::vector<int64_t> token_counts = {1, 16, 64, 256};
  WireDtype dtype = WireDtype::BF16;
  std::optional<WireDtype> caller_dtype;
  bool run_perftest = true;
  std::string token;
  std::pair<int, int> cpus = default_cpus();
  int serve_cpu = -1;
  bool copy_handler = true;
  auto int_list = [](const std::string& s) {
    std::vector<int64_t> out;
    for (const std::string& v : split(s, ',')) out.push_back(std::max<int64_t>(1, std::stoll(v)));
    return out;
  };
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    const bool has_value = i + 1 < argc;
    if (flag == "--transports" && has_value) {
      transports = argv[++i];
    } else if (flag == "--iterations" && has_value) {
      iterations = std::max(1, std::stoi(argv[++i]));
    } else if (flag == "--perftest" && has_value) {
      perftest = argv[++i];
    } else if (flag == "--hidden" && has_value) {
      hiddens = int_list(argv[++i]);
    } else if (flag == "--tokens" && has_value) {
      token_counts = int_list(argv[++i]);
    } else if (flag == "--dtype" && has_value &&
               (std::string(argv[i + 1]) == "bf16" || std::string(argv[i + 1]) == "f32")) {
      dtype = std::string(argv[++i]) == "f32" ? WireDtype::F32 : WireDtype::BF16;
    } else if (flag == "--caller-dtype" && has_value &&
               (std::string(argv[i + 1]) == "bf16" || std::string(argv[i + 1]) == "f32")) {
      caller_dtype = std::string(argv[++i]) == "f32" ? WireDtype::F32 : WireDtype::BF16;
    } else if (flag == "--token" && has_value) {
      token = argv[++i];
    } else if (flag == "--cpus" && has_value) {
      const std::string v = argv[++i];
      const auto parts = split(v, ',');
      if (v == "none") {
        cpus = {-1, -1};
      } else if (parts.size() == 2) {
        cpus = {std::stoi(parts[0]), std::stoi(parts[1])};
      } else {
        std::fprintf(stderr, "dispatch_bench: --cpus takes A,B (two CPU numbers) or none\n");
        return 2;
      }
    } else if (flag == "--handler" && has_value &&
               (std::string(argv[i + 1]) == "copy" || std::string(argv[i + 1]) == "none")) {
      copy_handler = std::string(argv[++i]) == "copy";
    } else if (flag == "--serve-cpu" && has_value) {  // internal: the --serve process's CPU
      serve_cpu = std::stoi(argv[++i]);
    } else if (flag == "--no-perftest") {
      run_perftest = false;
    } else if (flag == "--serve" && has_value) {
      serving = true;
      serve_tls = argv[++i];
    } else {
      std::fprintf(
          stderr,
          "unknown flag %s; flags: --transports LIST (UCX_TLS values separated by ';', "
          "default \"sm;tcp\") --iterations N (default 200) --hidden LIST (default "
          "2048,7168) --tokens LIST (default 1,16,64,256) --dtype bf16|f32 (default "
          "bf16) --caller-dtype bf16|f32 (default: --dtype) --perftest PATH --no-perftest --token "
          "TOKEN --cpus A,B|none --handler copy|none\n",
          flag.c_str());
      return 2;
    }
  }
  if (!caller_dtype) caller_dtype = dtype;
  if (*caller_dtype == WireDtype::BF16 && dtype == WireDtype::F32) {
    std::fprintf(stderr, "dispatch_bench: --caller-dtype bf16 needs a bf16 wire (--dtype bf16)\n");
    return 2;
  }
  const bool bf16_views = *caller_dtype == WireDtype::BF16;
  if (serving) return serve(serve_tls, token, serve_cpu, copy_handler, bf16_views);
  signal(SIGPIPE, SIG_IGN);

  bind_to(cpus.first);
  const int warmup = std::max(5, iterations / 10);
  std::vector<Row> rows;
  char self[4096];
  const ssize_t self_len = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (self_len <= 0) {
    std::fprintf(stderr, "dispatch_bench: cannot find its own executable\n");
    return 1;
  }
  self[self_len] = 0;

  for (const std::string& tls : split(transports, ';')) {
    std::vector<std::string> server_args = {self, "--serve", tls};
    if (!token.empty()) server_args.insert(server_args.end(), {"--token", token});
    if (cpus.second >= 0)
      server_args.insert(server_args.end(), {"--serve-cpu", std::to_string(cpus.second)});
    if (!copy_handler) server_args.insert(server_args.end(), {"--handler", "none"});
    if (bf16_views) server_args.insert(server_args.end(), {"--caller-dtype", "bf16"});
    Child server = spawn(server_args, "");
    const std::string address = read_address(server.out);
    if (address.empty()) {
      std::fprintf(stderr, "dispatch_bench: the --serve process for UCX_TLS=%s did not start\n",
                   tls.c_str());
      reap(server.pid, std::chrono::seconds(5));
      return 1;
    }
    DataPlaneOptions o;
    o.transports = tls;
    o.dtype = dtype;
    o.token = token;
    o.bf16_views = bf16_views;
    auto client = DispatchClient::create(o);
    if (!client.ok()) {
      std::fprintf(stderr, "dispatch_bench: %s\n", client.error().message().c_str());
      return 1;
    }
    auto peer = (*client)->connect(address);
    if (!peer.ok()) {
      std::fprintf(stderr, "dispatch_bench (UCX_TLS=%s): %s\n", tls.c_str(),
                   peer.error().message().c_str());
      return 1;
    }
    std::mt19937 rng(1);
    for (int64_t hidden : hiddens)
      for (int64_t n : token_counts) {
        std::vector<float> x(static_cast<size_t>(n * hidden));
        std::normal_distribution<float> dist(0.0f, 1.0f);
        for (float& v : x) v = dist(rng);
        std::vector<uint16_t> x_bf16(bf16_views ? x.size() : 0);
        if (bf16_views) moemesh::transport::f32_to_bf16(x.data(), x_bf16.data(), x.size());
        std::vector<int32_t> tokens(static_cast<size_t>(n)),
            experts(static_cast<size_t>(n) * kSlots);
        std::vector<float> weights(experts.size(), 0.125f);
        for (int64_t t = 0; t < n; ++t) tokens[static_cast<size_t>(t)] = static_cast<int32_t>(t);
        for (size_t k = 0; k < experts.size(); ++k) experts[k] = static_cast<int32_t>(k % 64);
        const uint64_t timeouts_before = (*client)->stats().timeouts;
        std::vector<double> us;
        for (int it = 0; it < warmup + iterations; ++it) {
          const auto t0 = Clock::now();
          const auto step = static_cast<uint64_t>(it);
          const moemesh::Status st =
              bf16_views ? (*client)->send_bf16(*peer, 1, step, 0, 0, n, x_bf16.data(), hidden,
                                                tokens, experts.data(), weights.data(), kSlots)
                         : (*client)->send(*peer, 1, step, 0, 0, n, x.data(), hidden, tokens,
                                           experts.data(), weights.data(), kSlots);
          if (!st.ok()) {
            std::fprintf(stderr, "dispatch_bench: %s\n", st.error().message().c_str());
            return 1;
          }
          (*client)->wait(t0 + std::chrono::seconds(2), nullptr);
          if (it >= warmup)
            us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
        }
        Row r;
        r.transports = tls;
        r.hidden = hidden;
        r.tokens = n;
        r.bytes = static_cast<size_t>(n * hidden) * (dtype == WireDtype::BF16 ? 2 : 4);
        r.moemesh_us = median(us);
        r.timeouts = (*client)->stats().timeouts - timeouts_before;
        if (run_perftest) {
          r.perftest_us = perftest_round_trip(perftest, tls, r.bytes, iterations, false, cpus);
          r.perftest_e_us = perftest_round_trip(perftest, tls, r.bytes, iterations, true, cpus);
        }
        rows.push_back(r);
        spdlog::info("dispatch_bench: UCX_TLS={} hidden={} tokens={} done", tls, hidden, n);
      }
    client->reset();
    close(server.in);
    close(server.out);
    reap(server.pid, std::chrono::seconds(5));
  }

  double load[1] = {0};
  const long cores = sysconf(_SC_NPROCESSORS_ONLN);
  if (getloadavg(load, 1) == 1 && load[0] > 0.5 * static_cast<double>(cores))
    std::printf(
        "WARNING: load average %.1f on %ld cores: both sides busy-poll, so round trips on a busy "
        "machine are set by the scheduler (multiples of its tick), for moemesh and ucx_perftest "
        "alike\n",
        load[0], cores);
  std::printf(
      "dispatch+combine round trip, %s hidden states on the wire, %s at both callers, %d "
      "iterations (median), top-k %d routing sent along\nucx_perftest: -t ucp_am_lat -s BYTES, "
      "round trip = 2 x its median one-way "
      "latency; perftest_e_us: the same with -e (peer error handling, as moemesh endpoints);\n"
      "ratio = moemesh / perftest, ratio_e = moemesh / perftest -e\n",
      dtype == WireDtype::BF16 ? "BF16" : "F32", bf16_views ? "BF16" : "F32", iterations, kSlots);
  std::printf("handler: %s\n", copy_handler ? "copies x into the partial sums (--handler copy)"
                                            : "touches no data (--handler none)");
  if (cpus.first >= 0)
    std::printf("clients on CPU %d, servers on CPU %d (--cpus)\n", cpus.first, cpus.second);
  else
    std::printf("processes not bound to CPUs\n");
  int width = 7;
  for (const Row& r : rows) width = std::max(width, static_cast<int>(r.transports.size()));
  std::printf("%-*s %7s %7s %10s %11s %12s %14s %6s %8s %9s\n", width, "UCX_TLS", "hidden",
              "tokens", "bytes", "moemesh_us", "perftest_us", "perftest_e_us", "ratio", "ratio_e",
              "timeouts");
  auto ratio = [](double a, double b) { return b > 0 ? a / b : 0.0; };
  for (const Row& r : rows)
    std::printf("%-*s %7lld %7lld %10zu %11.1f %12.1f %14.1f %6.2f %8.2f %9llu\n", width,
                r.transports.c_str(), static_cast<long long>(r.hidden),
                static_cast<long long>(r.tokens), r.bytes, r.moemesh_us, r.perftest_us,
                r.perftest_e_us, ratio(r.moemesh_us, r.perftest_us),
                ratio(r.moemesh_us, r.perftest_e_us), static_cast<unsigned long long>(r.timeouts));
  return 0;
}
