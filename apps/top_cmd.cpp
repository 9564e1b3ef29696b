// moemesh top: the operations console in a terminal. Polls a gateway's /admin/cluster and
// /admin/experts (the same snapshots /console draws) and prints the actors per node, balancedness
// per layer and the busiest experts, refreshing every --interval seconds (or once with --once).
#include <fmt/format.h>

#include <algorithm>
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <csignal>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <thread>

#include "apps/commands.h"
#include "core/error.h"

namespace moemesh::apps {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
using tcp = boost::asio::ip::tcp;
using json = nlohmann::json;

struct TopFlags {
  std::string url = "http://127.0.0.1:8000";
  double interval = 2.0;
  bool once = false;
  int experts = 16;  // busiest experts listed; -1: all
};

struct Target {
  std::string host, port;
};

Expected<Target> parse_url(const std::string& url) {
  std::string rest = url;
  if (rest.rfind("http://", 0) == 0)
    rest = rest.substr(7);
  else if (rest.find("://") != std::string::npos)
    return Error(fmt::format("--url {}: only http:// URLs are supported", url));
  rest = rest.substr(0, rest.find('/'));
  const auto colon = rest.rfind(':');
  Target t{rest, "80"};
  if (colon != std::string::npos) t = {rest.substr(0, colon), rest.substr(colon + 1)};
  if (t.host.empty() || t.port.empty() ||
      !std::all_of(t.port.begin(), t.port.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return Error(fmt::format("--url {}: expected http://HOST:PORT", url));
  return t;
}

Expected<json> get_json(const Target& t, const std::string& path) {
  try {
    boost::asio::io_context ioc;
    tcp::resolver resolver(ioc);
    beast::tcp_stream stream(ioc);
    stream.expires_after(std::chrono::seconds(5));
    stream.connect(resolver.resolve(t.host, t.port));
    http::request<http::empty_body> req{http::verb::get, path, 11};
    req.set(http::field::host, t.host);
    http::write(stream, req);
    beast::flat_buffer buffer;
    http::response<http::string_body> res;
    http::read(stream, buffer, res);
    beast::error_code ignored;
    stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
    json body = json::parse(res.body(), nullptr, false);
    if (body.is_discarded())
      return Error(
          fmt::format("GET {}: HTTP {} with a body that is not JSON", path, res.result_int()));
    if (res.result_int() != 200) {
      std::string message = body.contains("error") ? body["error"].value("message", "") : "";
      return Error(fmt::format("GET {}: HTTP {} {}", path, res.result_int(), message));
    }
    return body;
  } catch (const std::exception& e) {
    return Error(fmt::format("GET http://{}:{}{}: {} (is the gateway running there?)", t.host,
                             t.port, path, e.what()));
  }
}

// Protobuf's JSON mapping writes 64-bit integers as strings.
double num(const json& j, const char* key) {
  if (!j.contains(key)) return 0;
  const json& v = j[key];
  if (v.is_number()) return v.get<double>();
  if (v.is_string()) return std::strtod(v.get<std::string>().c_str(), nullptr);
  return 0;
}

std::string figures(const json& a) {
  if (a.contains("gateway")) {
    const json& g = a["gateway"];
    return fmt::format("streams {:.0f}  {:.1f} req/s  {:.0f} responses", num(g, "open_streams"),
                       num(g, "requests_per_second"), num(g, "requests_total"));
  }
  if (a.contains("router")) {
    const json& r = a["router"];
    return fmt::format("placement v{:.0f}  {:.0f} members  {:.0f} placed  {:.0f} rebalances",
                       num(r, "placement_version"), num(r, "members"),
                       num(r, "requests_placed_total"), num(r, "rebalances_total"));
  }
  if (a.contains("attention")) {
    const json& e = a["attention"].value("engine", json::object());
    return fmt::format("running {:.0f}  waiting {:.0f}  KV {:.1f}%  {:.0f} tokens out",
                       num(e, "running"), num(e, "waiting"), 100 * num(e, "kv_cache_usage"),
                       num(e, "generation_tokens_total"));
  }
  if (a.contains("expert")) {
    const json& x = a["expert"];
    double tokens = 0;
    std::size_t held = 0;
    if (x.contains("experts"))
      for (const json& c : x["experts"]) tokens += num(c, "tokens_total"), ++held;
    return fmt::format("{} experts  {:.0f} tokens  utilisation {:.1f}%", held, tokens,
                       100 * num(x, "utilisation"));
  }
  return "";
}

std::string render(const std::string& url, const json& cluster, const json* experts, int top) {
  std::string out = fmt::format(
      "moemesh top  {}  model {}  {}  placement v{:.0f}  capacity factor {}\n\n", url,
      cluster.value("model", "?"),
      cluster.value("ready", false) ? "ready"
                                    : "NOT READY: " + cluster.value("not_ready_reason", ""),
      num(cluster, "placement_version"),
      num(cluster, "capacity_factor") > 0 ? fmt::format("{:.2f}", num(cluster, "capacity_factor"))
                                          : std::string("none"));
  out += fmt::format("{:<22} {:<9} {:<14} {:<11} {:>8} {:>7} {:>8} {:>6}  {}\n", "NODE", "ROLE",
                     "NAME", "STATE", "UPTIME", "MAILBOX", "HANDLED", "ERRORS", "FIGURES");
  if (cluster.contains("actors"))
    for (const json& a : cluster["actors"])
      out += fmt::format("{:<22} {:<9} {:<14} {:<11} {:>7.0f}s {:>7.0f} {:>8.0f} {:>6.0f}  {}\n",
                         a.value("node", ""), a.value("role", ""), a.value("name", ""),
                         a.value("state", ""), num(a, "uptime_seconds"), num(a, "mailbox_depth"),
                         num(a, "messages_handled"), num(a, "errors_total"), figures(a));
  if (!experts) {
    out += "\n(single process: experts are local)\n";
    return out;
  }
  out += fmt::format("\n{:<6} {:>12} {:>14}   {}\n", "LAYER", "BALANCED", "TOKENS(WINDOW)",
                     "(window " + fmt::format("{:.0f}", num(*experts, "window_seconds")) + " s)");
  struct Row {
    double layer, expert, total, window, overflows, drops;
    std::string workers;
  };
  std::vector<Row> rows;
  for (const json& l : experts->value("layers", json::array())) {
    double window = 0;
    for (const json& e : l.value("experts", json::array())) {
      window += num(e, "tokens_window");
      std::string workers;
      for (const json& w : e.value("workers", json::array()))
        workers += (workers.empty() ? "" : ",") + w.get<std::string>();
      rows.push_back({num(e, "layer"), num(e, "expert"), num(e, "tokens_total"),
                      num(e, "tokens_window"), num(e, "overflows_total"), num(e, "drops_total"),
                      workers});
    }
    out += fmt::format("{:<6.0f} {:>12.3f} {:>14.0f}\n", num(l, "layer"), num(l, "balancedness"),
                       window);
  }
  std::stable_sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) {
    return a.total != b.total ? a.total > b.total
                              : std::tie(a.layer, a.expert) < std::tie(b.layer, b.expert);
  });
  if (top >= 0 && rows.size() > static_cast<std::size_t>(top)) rows.resize(top);
  out += fmt::format("\n{:<6} {:<7} {:>12} {:>14} {:>10} {:>7}  {}\n", "LAYER", "EXPERT", "TOKENS",
                     "TOKENS(WINDOW)", "OVERFLOWS", "DROPS", "WORKERS");
  for (const Row& r : rows)
    out += fmt::format("{:<6.0f} {:<7.0f} {:>12.0f} {:>14.0f} {:>10.0f} {:>7.0f}  {}\n", r.layer,
                       r.expert, r.total, r.window, r.overflows, r.drops, r.workers);
  return out;
}

int run_top(const TopFlags& f) {
  Expected<Target> target = parse_url(f.url);
  if (!target) {
    std::cerr << "moemesh top: error: " << target.error().message() << "\n";
    return 2;
  }
  for (;;) {
    Expected<json> cluster = get_json(*target, "/admin/cluster");
    std::string screen;
    int status = 0;
    if (!cluster) {
      screen = "moemesh top: error: " + cluster.error().message() + "\n";
      status = 1;
    } else {
      Expected<json> experts = Error("single process");
      if (!cluster->value("single_process", false)) experts = get_json(*target, "/admin/experts");
      screen = render(f.url, *cluster, experts ? &*experts : nullptr, f.experts);
      if (!experts && !cluster->value("single_process", false))
        screen += "\n" + experts.error().message() + "\n";
    }
    if (f.once) {
      (status ? std::cerr : std::cout) << screen;
      return status;
    }
    std::cout << "\x1b[H\x1b[2J" << screen << std::flush;
    std::this_thread::sleep_for(std::chrono::duration<double>(f.interval));
  }
}

}  // namespace

Runner add_top(CLI::App& app) {
  auto f = std::make_shared<TopFlags>();
  app.add_option("--url", f->url, "The gateway, http://HOST:PORT")->capture_default_str();
  app.add_option("--interval", f->interval, "Seconds between refreshes")
      ->check(CLI::Range(0.1, 3600.0))
      ->capture_default_str();
  app.add_flag("--once", f->once, "Print one snapshot and exit (non-zero when unreachable)");
  app.add_option("--experts", f->experts, "Busiest experts listed (-1: all)")
      ->check(CLI::Range(-1, 1 << 20))
      ->capture_default_str();
  return [f] { return run_top(*f); };
}

}  // namespace moemesh::apps
