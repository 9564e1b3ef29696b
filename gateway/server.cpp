#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <deque>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>

#include "actors/introspection.h"
#include "actors/sampling_proto.h"
#include "gateway/detail/admin.h"
#include "gateway/detail/console.h"
#include "gateway/detail/metrics.h"
#include "gateway/detail/openai.h"
#include "gateway/detail/request_state.h"
#include "gateway/gateway.h"

namespace moemesh {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
using gateway::ApiError;
using json = nlohmann::ordered_json;

namespace {

using tick_atom = caf::atom_constant<caf::atom("tick")>;

constexpr const char* kVersion = "0.1.0";

std::string random_hex(std::size_t n) {
  thread_local std::mt19937_64 rng(std::random_device{}());
  static const char* digits = "0123456789abcdef";
  std::string s(n, '0');
  for (char& c : s) c = digits[rng() & 15];
  return s;
}

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

struct Gateway::Impl : std::enable_shared_from_this<Gateway::Impl> {
  caf::actor_system& system;
  GatewayOptions options;
  net::io_context ioc;
  tcp::acceptor acceptor{ioc};
  std::vector<std::thread> threads;
  uint16_t bound_port = 0;

  mutable std::mutex mu;  // guards model, engine, router, metrics, stats_actor
  std::shared_ptr<const gateway::ServedModel> model;
  actors::engine_actor engine;
  actors::router_actor router;  // null in a single-process server
  std::shared_ptr<gateway::Metrics> metrics;
  caf::actor stats_actor;
  std::atomic<int64_t> last_stats_ok_ms{0};
  std::atomic<bool> last_ready{false};  // the engine (or the cluster) said it can serve
  std::atomic<bool> ever_ready{false};  // last_ready has been true once

  std::atomic<int> open_requests{0};
  std::atomic<int> queued_requests{0};  // accepted, no delta from the engine yet
  gateway::RejectCounters rejected;     // refusals by reason (moemesh_requests_rejected_total)
  // Guards open_by_client; admission checks and takes the three counts under it.
  std::mutex clients_mu;
  std::unordered_map<std::string, int> open_by_client;  // generation requests per client IP
  std::atomic<bool> stopping{false};
  std::atomic<bool> grace_ended{false};  // end_grace(): shutdown() cancels what is in flight now
  actors::ActorCounters counters;  // only `started` is used: the gateway counts HTTP responses

  std::mutex sessions_mu;  // guards sessions
  std::vector<std::weak_ptr<class Session>> sessions;

  explicit Impl(caf::actor_system& sys) : system(sys) {}
  void accept();
  bool healthy() const {
    const auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
                         std::chrono::steady_clock::now().time_since_epoch())
                         .count();
    return now - last_stats_ok_ms.load() < 5000 && last_ready.load();
  }
};

// One HTTP connection. Owned by the completion handlers of its strand; every member is touched
// only on that strand.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, std::shared_ptr<Gateway::Impl> gw)
      : client_(peer_address(socket)), stream_(std::move(socket)), gw_(std::move(gw)) {}
  ~Session() {
    // A session torn down with a request in flight (I/O stopped at shutdown) still ends its sink.
    if (sink_) caf::anon_send_exit(sink_, caf::exit_reason::user_shutdown);
  }

  void start() {
    net::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->do_read(); });
  }
  // Called from any thread: closes the connection (shutdown).
  void abort() {
    net::post(stream_.get_executor(), [self = shared_from_this()] {
      self->cancel_engine();
      self->client_gone_ = true;
      self->finish_request();
      beast::error_code ec;
      self->stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
      self->stream_.close();
    });
  }
  // Engine events, posted onto the strand by the request's sink actor.
  void on_submitted(const std::string& error, int status = 400);
  void on_delta(const std::string& bytes);

 private:
  void do_read();
  void on_read(beast::error_code ec);
  void handle(http::request<http::string_body>& req);
  void handle_generate(const http::request<http::string_body>& req, gateway::Endpoint endpoint,
                       const gateway::ServedModel& model, const actors::engine_actor& engine);
  void send(http::status status, std::string body, const char* content_type = "application/json");
  void send_error(const ApiError& e);
  void after_response();
  void monitor_disconnect();
  void stream_write(std::string data, bool last_chunk = false);
  void do_stream_write();
  void finish_request();
  void cancel_engine();
  void drain_and_close(std::size_t budget);
  // A write to the client failed: it is gone, so the engine stops its request.
  void on_write_failed() {
    client_gone_ = true;
    cancel_engine();
    finish_request();
  }
  void fail_stream(const std::string& message);
  // 429 when this request would exceed a limit on what the server holds, else takes its share.
  std::optional<ApiError> admit(bool stream);
  void release_admission();
  static std::string peer_address(const tcp::socket& socket) {
    beast::error_code ec;
    const auto endpoint = socket.remote_endpoint(ec);
    return ec ? std::string("unknown") : endpoint.address().to_string();
  }

  const std::string client_;  // the client's IP address (limits per client)
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::shared_ptr<Gateway::Impl> gw_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::shared_ptr<http::response<http::string_body>> response_;
  bool keep_alive_ = true;
  std::string request_id_header_;

  // The generation request in flight, if any.
  std::shared_ptr<gateway::RequestState> state_;
  std::shared_ptr<const gateway::ServedModel> model_;
  actors::engine_actor engine_;
  caf::actor sink_;
  int submitted_ = 0;
  bool headers_sent_ = false;
  bool client_gone_ = false;
  bool monitor_pending_ = false;
  bool resume_reading_ = false;
  std::optional<http::response<http::empty_body>> stream_header_;
  std::optional<http::response_serializer<http::empty_body>> stream_serializer_;
  std::deque<std::pair<std::shared_ptr<std::string>, bool>> out_;  // (chunk, is last)
  bool writing_ = false;
  bool queued_ = false;          // counted in queued_requests (no delta yet)
  bool client_counted_ = false;  // counted in open_by_client[client_]
  int retry_after_s_ = 0;        // the next response carries "Retry-After" when > 0
};

void Session::do_read() {
  if (gw_->stopping) return;
  parser_.emplace();
  parser_->body_limit(gw_->options.max_body_bytes);
  parser_->header_limit(64 * 1024);
  stream_.expires_after(gw_->options.idle_timeout);
  http::async_read(
      stream_, buffer_, *parser_,
      [self = shared_from_this()](beast::error_code ec, std::size_t) { self->on_read(ec); });
}

void Session::on_read(beast::error_code ec) {
  if (ec == http::error::end_of_stream || ec == net::error::eof || ec == beast::error::timeout ||
      ec == net::error::operation_aborted || ec == net::error::connection_reset) {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    return;
  }
  if (ec == http::error::body_limit) {
    keep_alive_ = false;
    ApiError e;
    e.status = 413;
    e.type = "RequestTooLarge";
    e.limit = "body_size";
    e.message =
        fmt::format("the request body exceeds the server's limit of {} bytes (--max-body-bytes)",
                    gw_->options.max_body_bytes);
    send_error(e);
    return;
  }
  if (ec) {
    keep_alive_ = false;
    ApiError e;
    e.message = fmt::format("malformed HTTP request: {}", ec.message());
    send_error(e);
    return;
  }
  http::request<http::string_body> req = parser_->release();
  keep_alive_ = req.keep_alive();
  request_id_header_ = std::string(req["x-request-id"]).substr(0, 256);
  try {
    handle(req);
  } catch (const std::exception& ex) {
    spdlog::error("gateway internal error path={} error={}", std::string(req.target()), ex.what());
    ApiError e;
    e.status = 500;
    e.type = "InternalServerError";
    e.message = fmt::format("internal error: {}", ex.what());
    if (!headers_sent_) send_error(e);
  }
}

void Session::send(http::status status, std::string body, const char* content_type) {
  response_ = std::make_shared<http::response<http::string_body>>(status, 11);
  response_->set(http::field::server, "moemesh");
  response_->set(http::field::content_type, content_type);
  if (!request_id_header_.empty()) response_->set("x-request-id", request_id_header_);
  if (retry_after_s_ > 0) response_->set(http::field::retry_after, std::to_string(retry_after_s_));
  retry_after_s_ = 0;
  response_->keep_alive(keep_alive_ && !gw_->stopping);
  response_->body() = std::move(body);
  response_->prepare_payload();
  if (auto m = std::atomic_load(&gw_->metrics)) m->count_http(static_cast<int>(status));
  stream_.expires_after(std::chrono::seconds(30));
  http::async_write(stream_, *response_,
                    [self = shared_from_this()](beast::error_code ec, std::size_t) {
                      if (ec || !self->response_->keep_alive()) {
                        beast::error_code ignored;
                        self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
                        // Read what the client still sends (e.g. the rest of a body that was too
                        // large), so that it can finish writing and read our answer instead of
                        // seeing a reset.
                        if (!ec) self->drain_and_close(64u << 20);
                        return;
                      }
                      self->after_response();
                    });
}

void Session::drain_and_close(std::size_t budget) {
  if (monitor_pending_) return;  // the monitor read already watches the socket
  stream_.expires_after(std::chrono::seconds(10));
  buffer_.clear();
  stream_.async_read_some(buffer_.prepare(64 * 1024),
                          [self = shared_from_this(), budget](beast::error_code ec, std::size_t n) {
                            if (ec || n >= budget) {
                              self->stream_.close();
                              return;
                            }
                            self->drain_and_close(budget - n);
                          });
}

void Session::send_error(const ApiError& e) {
  if (!e.limit.empty()) gw_->rejected.count(e.limit);
  if (e.status == 429) retry_after_s_ = 1;
  send(static_cast<http::status>(e.status),
       gateway::error_body(e).dump(-1, ' ', false, json::error_handler_t::replace));
}

void Session::after_response() {
  // Keep-alive: read the next request, once the disconnect monitor (if any) has returned.
  resume_reading_ = true;
  if (monitor_pending_) {
    beast::error_code ignored;
    stream_.socket().cancel(ignored);
  } else {
    resume_reading_ = false;
    do_read();
  }
}

void Session::handle(http::request<http::string_body>& req) {
  const std::string target(req.target());
  const std::string path = target.substr(0, target.find('?'));
  const bool get = req.method() == http::verb::get;
  const bool post = req.method() == http::verb::post;

  std::shared_ptr<const gateway::ServedModel> model;
  actors::engine_actor engine;
  std::shared_ptr<gateway::Metrics> metrics;
  {
    std::lock_guard<std::mutex> lock(gw_->mu);
    model = gw_->model;
    engine = gw_->engine;
    metrics = gw_->metrics;
  }

  if (path == "/health" && get) {
    const bool ok = model && gw_->healthy();
    return send(ok ? http::status::ok : http::status::service_unavailable, "", "text/plain");
  }
  if (path == "/version" && get) return send(http::status::ok, json{{"version", kVersion}}.dump());
  if (path == "/metrics" && get) {
    std::string text = metrics ? metrics->render() : std::string();
    gw_->rejected.render(text, metrics ? metrics->labels() : std::string());
    return send(http::status::ok, std::move(text), "text/plain; version=0.0.4; charset=utf-8");
  }

  if (gateway::is_admin_path(path)) {
    gateway::AdminContext ctx;
    ctx.system = &gw_->system;
    ctx.admin_token = gw_->options.admin_token;
    {
      std::lock_guard<std::mutex> lock(gw_->mu);
      ctx.router = gw_->router;
    }
    if (model) ctx.single_process_model = model->name;
    ctx.gateway_status = [gw = gw_, metrics] {
      proto::ActorStatus s = actors::actor_status(gw->counters, "gateway", "gateway", 0, 0);
      if (metrics) {
        *s.mutable_gateway() = metrics->gateway_figures();
        s.mutable_gateway()->set_open_streams(gw->open_requests.load());
        s.set_messages_handled(s.gateway().requests_total());
        s.set_errors_total(s.gateway().http_errors_total());
      }
      return s;
    };
    // The answer holds the session alive (no read is pending meanwhile); the router's answer is
    // bounded by a timeout.
    auto executor = stream_.get_executor();
    gateway::handle_admin(ctx, post, path, std::string(req[http::field::authorization]), req.body(),
                          [self = shared_from_this(), executor](gateway::AdminReply r) {
                            if (r.status == 401) self->gw_->rejected.count("auth");
                            net::post(executor, [self, r = std::move(r)]() mutable {
                              self->send(static_cast<http::status>(r.status), std::move(r.body));
                            });
                          });
    return;
  }
  if (get && (path == "/console" || path == "/console/"))
    return send(http::status::ok, std::string(gateway::console_html()), "text/html; charset=utf-8");
  if (get && path == "/console/chart.js") {
    Expected<std::string> js = gateway::console_asset(gw_->options.console_assets, "chart.min.js");
    if (!js) return send(http::status::not_found, js.error().message() + "\n", "text/plain");
    return send(http::status::ok, std::move(*js), "application/javascript");
  }
  const bool api = path.rfind("/v1/", 0) == 0 || path == "/tokenize" || path == "/detokenize";
  if (!api) {
    // Outside the API and the pages above: plain text.
    return send(http::status::not_found,
                fmt::format("no route {} {}\n", std::string(req.method_string()), path),
                "text/plain");
  }
  if (!gw_->options.api_key.empty()) {
    const std::string auth(req[http::field::authorization]);
    if (!gateway::same_secret(auth, "Bearer " + gw_->options.api_key)) {
      ApiError e;
      e.status = 401;
      e.type = "AuthenticationError";
      e.limit = "auth";
      e.message = "missing or wrong API key: send the header \"Authorization: Bearer <key>\"";
      return send_error(e);
    }
  }
  if (!model) {
    ApiError e;
    e.status = 503;
    e.type = "ServiceUnavailableError";
    e.message = "the model is loading; retry when /health answers 200";
    return send_error(e);
  }
  if (path == "/v1/models" && get)
    return send(http::status::ok, gateway::models_list(*model).dump());

  const bool known_post = path == "/v1/completions" || path == "/v1/chat/completions" ||
                          path == "/tokenize" || path == "/detokenize";
  if (!known_post || !post) {
    ApiError e;
    e.status = known_post || path == "/v1/models" ? 405 : 404;
    e.type = e.status == 405 ? "MethodNotAllowed" : "NotFoundError";
    e.message = fmt::format("no route {} {}", std::string(req.method_string()), path);
    return send_error(e);
  }
  const std::string content_type(req[http::field::content_type]);
  if (!content_type.empty() && content_type.find("application/json") == std::string::npos) {
    ApiError e;
    e.status = 415;
    e.type = "UnsupportedMediaType";
    e.message = fmt::format("Content-Type must be application/json, got \"{}\"", content_type);
    return send_error(e);
  }
  json body = json::parse(req.body(), nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) {
    ApiError e;
    e.message = "the request body is not valid JSON";
    return send_error(e);
  }
  if (path == "/tokenize" || path == "/detokenize") {
    auto r =
        path == "/tokenize" ? gateway::tokenize(body, *model) : gateway::detokenize(body, *model);
    if (auto* e = std::get_if<ApiError>(&r)) return send_error(*e);
    return send(http::status::ok,
                std::get<json>(r).dump(-1, ' ', false, json::error_handler_t::replace));
  }
  handle_generate(
      req,
      path == "/v1/chat/completions" ? gateway::Endpoint::Chat : gateway::Endpoint::Completions,
      *model, engine);
  model_ = model;
}

void Session::handle_generate(const http::request<http::string_body>& req,
                              gateway::Endpoint endpoint, const gateway::ServedModel& model,
                              const actors::engine_actor& engine) {
  json body = json::parse(req.body(), nullptr, false);
  gateway::RequestLimits limits;
  limits.max_n = gw_->options.max_n;
  limits.max_tokens_limit = gw_->options.max_tokens_limit;
  auto parsed = gateway::parse_request(body, endpoint, model, limits);
  if (auto* e = std::get_if<ApiError>(&parsed)) return send_error(*e);
  if (std::optional<ApiError> refused = admit(std::get<gateway::CompletionRequest>(parsed).stream))
    return send_error(*refused);
  gateway::CompletionRequest request = std::move(std::get<gateway::CompletionRequest>(parsed));
  const std::string id = (endpoint == gateway::Endpoint::Chat ? "chatcmpl-" : "cmpl-") +
                         (request_id_header_.empty() ? random_hex(32) : request_id_header_);
  state_ = std::make_shared<gateway::RequestState>(std::move(request), model, id, unix_now());
  engine_ = engine;
  submitted_ = 0;
  headers_sent_ = false;
  client_gone_ = false;

  // One engine request per prompt, submitted by the sink actor that then relays the deltas.
  std::vector<std::string> requests;
  const gateway::CompletionRequest& r = state_->request();
  for (std::size_t p = 0; p < r.prompts.size(); ++p) {
    proto::GenerateRequest g;
    g.set_request_id(state_->engine_id(p));
    for (int32_t t : r.prompts[p]) g.add_prompt_ids(t);
    *g.mutable_sampling() = to_proto(r.sampling);
    g.set_n(r.n);
    g.set_prompt_logprobs(r.echo && r.logprobs);
    requests.push_back(g.SerializeAsString());
  }
  std::weak_ptr<Session> weak = shared_from_this();
  auto executor = stream_.get_executor();
  // State travels as spawn arguments: CAF 0.17 dereferences an empty argument tuple (undefined
  // behaviour that UBSan reports) when a function actor takes none.
  sink_ = gw_->system.spawn(
      [weak, executor, engine](caf::event_based_actor* self,
                               std::vector<std::string> to_submit) -> caf::behavior {
        for (std::size_t p = 0; p < to_submit.size(); ++p) {
          self->request(engine, actors::kEngineRequestTimeout, actors::submit_atom::value,
                        to_submit[p], caf::actor_cast<caf::actor>(self))
              .then(
                  [weak, executor](const std::string& error) {
                    net::post(executor, [weak, error] {
                      if (auto s = weak.lock()) {
                        // A cluster without capacity right now: 503, retryable.
                        const bool busy = error.rfind(actors::kUnavailable, 0) == 0;
                        s->on_submitted(busy ? error.substr(actors::kUnavailable.size()) : error,
                                        busy ? 503 : 400);
                      }
                    });
                  },
                  [weak, executor](caf::error& err) {
                    const std::string msg = "the engine did not answer: " + caf::to_string(err);
                    net::post(executor, [weak, msg] {
                      if (auto s = weak.lock()) s->on_submitted(msg, 503);
                    });
                  });
        }
        return {[weak, executor](actors::delta_atom, const std::string& bytes) {
          net::post(executor, [weak, bytes] {
            if (auto s = weak.lock()) s->on_delta(bytes);
          });
        }};
      },
      requests);
  monitor_disconnect();
}

std::optional<ApiError> Session::admit(bool stream) {
  const GatewayOptions& o = gw_->options;
  auto too_many = [](std::string limit, std::string message) {
    ApiError e;
    e.status = 429;
    e.type = "RateLimitError";
    e.limit = std::move(limit);
    e.message = std::move(message);
    return e;
  };
  // Checked and taken under one lock, so that concurrent sessions cannot overshoot a limit.
  std::lock_guard<std::mutex> lock(gw_->clients_mu);
  if (const int open = gw_->open_requests.load(); open >= o.max_open_requests)
    return too_many("open_requests",
                    fmt::format("too many requests in flight: the server holds at most {} "
                                "(--max-open-requests); retry later",
                                o.max_open_requests));
  auto it = gw_->open_by_client.find(client_);
  if (const int mine = it == gw_->open_by_client.end() ? 0 : it->second;
      mine >= o.max_streams_per_client)
    return too_many("streams_per_client",
                    fmt::format("too many {}requests from this client: {} are open, the limit per "
                                "client address is {} (--max-streams-per-client); retry when one "
                                "has finished",
                                stream ? "streaming " : "", mine, o.max_streams_per_client));
  if (const int queued = gw_->queued_requests.load(); queued >= o.max_queued_requests)
    return too_many("queue_full",
                    fmt::format("too many requests waiting: {} requests are queued for the "
                                "engine, the limit is {} (--max-queued-requests); retry later",
                                queued, o.max_queued_requests));
  ++gw_->open_by_client[client_];
  client_counted_ = true;
  ++gw_->open_requests;
  ++gw_->queued_requests;
  queued_ = true;
  return std::nullopt;
}

void Session::release_admission() {
  if (queued_) --gw_->queued_requests;
  queued_ = false;
  if (client_counted_) {
    std::lock_guard<std::mutex> lock(gw_->clients_mu);
    auto it = gw_->open_by_client.find(client_);
    if (it != gw_->open_by_client.end() && --it->second <= 0) gw_->open_by_client.erase(it);
  }
  client_counted_ = false;
}

// A pending read while a request runs: EOF or a reset means the client left.
void Session::monitor_disconnect() {
  if (monitor_pending_) return;
  monitor_pending_ = true;
  stream_.expires_never();
  stream_.async_read_some(
      buffer_.prepare(4096), [self = shared_from_this()](beast::error_code ec, std::size_t n) {
        self->monitor_pending_ = false;
        if (!ec) self->buffer_.commit(n);  // the client's next request: keep it for do_read()
        if (self->resume_reading_) {
          self->resume_reading_ = false;
          self->do_read();
          return;
        }
        if (ec && ec != net::error::operation_aborted && self->state_) {
          spdlog::info("client disconnected request_id={}", self->state_->id());
          self->client_gone_ = true;
          self->cancel_engine();
          self->finish_request();
        }
      });
}

void Session::cancel_engine() {
  if (!state_) return;
  for (int p = 0; p < state_->num_prompts(); ++p)
    caf::anon_send(engine_, actors::cancel_atom::value,
                   state_->engine_id(static_cast<std::size_t>(p)), int32_t{-1});
}

void Session::on_submitted(const std::string& error, int status) {
  if (!state_ || client_gone_) return;
  if (!error.empty()) {
    // The engine refused a prompt: cancel those already queued and answer 400. Streaming headers
    // go out only once every prompt is accepted, so none have been sent.
    cancel_engine();
    finish_request();
    ApiError e;
    e.status = status;
    if (status == 503) e.type = "ServiceUnavailableError";
    e.message = error;
    send_error(e);
    return;
  }
  if (++submitted_ == state_->num_prompts() && state_->request().stream && !headers_sent_) {
    stream_header_.emplace(http::status::ok, 11);
    stream_header_->set(http::field::server, "moemesh");
    stream_header_->set(http::field::content_type, "text/event-stream");
    stream_header_->set(http::field::cache_control, "no-cache");
    if (!request_id_header_.empty()) stream_header_->set("x-request-id", request_id_header_);
    stream_header_->keep_alive(keep_alive_);
    stream_header_->chunked(true);
    stream_serializer_.emplace(*stream_header_);
    headers_sent_ = true;
    writing_ = true;
    if (auto m = std::atomic_load(&gw_->metrics)) m->count_http(200);
    http::async_write_header(stream_, *stream_serializer_,
                             [self = shared_from_this()](beast::error_code ec, std::size_t) {
                               self->writing_ = false;
                               if (ec) return self->on_write_failed();
                               self->do_stream_write();
                             });
  }
}

void Session::on_delta(const std::string& bytes) {
  if (!state_ || client_gone_) return;
  proto::SequenceDelta d;
  if (!d.ParseFromString(bytes)) return;
  const std::string& rid = d.request_id();
  const int p = state_->prompt_of(rid);
  if (p < 0) return;  // a delta of an earlier request on this connection
  if (queued_) {      // the engine runs it: no longer waiting
    --gw_->queued_requests;
    queued_ = false;
  }
  std::vector<std::string> events;
  std::vector<int> cancel;
  state_->on_delta(static_cast<std::size_t>(p), d, events, cancel);
  for (int index : cancel) caf::anon_send(engine_, actors::cancel_atom::value, rid, int32_t{index});
  if (auto m = std::atomic_load(&gw_->metrics))
    for (double g : state_->take_inter_token_gaps()) m->observe_inter_token(g);

  if (state_->request().stream) {
    if (state_->failed()) return fail_stream(state_->error());
    for (std::string& e : events) stream_write(std::move(e));
    if (state_->done()) {
      stream_write(state_->closing_events());
      stream_write("", /*last_chunk=*/true);
      finish_request();
    }
    return;
  }
  if (!state_->done()) return;
  auto st = state_;
  finish_request();
  if (st->failed()) {
    ApiError e;
    e.status = st->unavailable() ? 503 : 500;
    e.type = st->unavailable() ? "ServiceUnavailableError" : "InternalServerError";
    e.message = st->error();
    return send_error(e);
  }
  send(http::status::ok, st->response().dump(-1, ' ', false, json::error_handler_t::replace));
}

void Session::fail_stream(const std::string& message) {
  ApiError e;
  const bool unavailable = state_ && state_->unavailable();
  e.status = unavailable ? 503 : 500;
  e.type = unavailable ? "ServiceUnavailableError" : "InternalServerError";
  e.message = message;
  cancel_engine();
  if (headers_sent_) {
    stream_write(
        "data: " + gateway::error_body(e).dump(-1, ' ', false, json::error_handler_t::replace) +
        "\n\n");
    stream_write("data: [DONE]\n\n");
    stream_write("", true);
    finish_request();
  } else {
    finish_request();
    send_error(e);
  }
}

void Session::stream_write(std::string data, bool last_chunk) {
  out_.emplace_back(std::make_shared<std::string>(std::move(data)), last_chunk);
  if (headers_sent_ && !writing_) do_stream_write();
}

void Session::do_stream_write() {
  if (out_.empty() || writing_ || client_gone_) return;
  auto [chunk, last] = out_.front();
  out_.pop_front();
  writing_ = true;
  auto on_written = [self = shared_from_this(), last, chunk](beast::error_code ec, std::size_t) {
    self->writing_ = false;
    if (ec) return self->on_write_failed();
    if (last) {
      if (!self->keep_alive_ || self->gw_->stopping) {
        beast::error_code ignored;
        self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
        return;
      }
      self->after_response();
      return;
    }
    self->do_stream_write();
  };
  if (last) {
    net::async_write(stream_, http::make_chunk_last(), std::move(on_written));
  } else {
    net::async_write(stream_, http::make_chunk(net::buffer(*chunk)), std::move(on_written));
  }
}

void Session::finish_request() {
  if (!state_) return;
  if (auto m = std::atomic_load(&gw_->metrics)) {
    gateway::Metrics::RequestRecord r = state_->record();
    if (client_gone_) r.finished_reason = "abort";
    m->record_request(r);
  }
  if (sink_) caf::anon_send_exit(sink_, caf::exit_reason::user_shutdown);
  sink_ = caf::actor();
  state_.reset();
  release_admission();
  --gw_->open_requests;
}

void Gateway::Impl::accept() {
  acceptor.async_accept(net::make_strand(ioc), [self = shared_from_this()](beast::error_code ec,
                                                                           tcp::socket socket) {
    if (self->stopping) return;
    if (!ec) {
      auto session = std::make_shared<Session>(std::move(socket), self);
      {
        std::lock_guard<std::mutex> lock(self->sessions_mu);
        std::erase_if(self->sessions, [](const std::weak_ptr<Session>& w) { return w.expired(); });
        self->sessions.push_back(session);
      }
      session->start();
    }
    self->accept();
  });
}

Gateway::Gateway(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

Gateway::~Gateway() {
  shutdown(std::chrono::milliseconds(0));
}

Expected<std::unique_ptr<Gateway>> Gateway::start(caf::actor_system& system,
                                                  const GatewayOptions& options) {
  auto impl = std::make_shared<Impl>(system);
  impl->options = options;
  beast::error_code ec;
  const auto address = net::ip::make_address(options.host, ec);
  if (ec)
    return Error(fmt::format("--host {}: not an IP address ({})", options.host, ec.message()));
  const tcp::endpoint endpoint(address, options.port);
  impl->acceptor.open(endpoint.protocol(), ec);
  if (!ec) impl->acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(endpoint, ec);
  if (!ec) impl->acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec)
    return Error(
        fmt::format("cannot listen on {}:{}: {} (is another server using the port? choose "
                    "another with --port)",
                    options.host, options.port, ec.message()));
  impl->bound_port = impl->acceptor.local_endpoint().port();
  impl->accept();
  for (int i = 0; i < std::max(1, options.io_threads); ++i)
    impl->threads.emplace_back([raw = impl.get()] { raw->ioc.run(); });
  spdlog::info("gateway listening host={} port={}", options.host, impl->bound_port);
  return std::unique_ptr<Gateway>(new Gateway(std::move(impl)));
}

uint16_t Gateway::port() const {
  return impl_->bound_port;
}

bool Gateway::has_been_ready() const {
  return impl_->ever_ready.load();
}

void Gateway::set_router(actors::router_actor router) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->router = std::move(router);
}

void Gateway::serve_model(gateway::ServedModel model, actors::engine_actor engine) {
  auto metrics = std::make_shared<gateway::Metrics>(model.name);
  metrics->set_expert_series(impl_->options.expert_metrics);
  std::weak_ptr<Impl> weak = impl_;
  // Polls the engine's statistics: they feed /metrics, and their arrival proves the engine alive.
  caf::actor poller = impl_->system.spawn(
      [weak, metrics](caf::event_based_actor* self, actors::engine_actor target) -> caf::behavior {
        self->send(self, tick_atom::value);
        return {[=](tick_atom) {
          self->request(target, std::chrono::seconds(2), actors::stats_atom::value)
              .then(
                  [=](const std::string& bytes) {
                    proto::EngineStats s;
                    if (s.ParseFromString(bytes)) {
                      metrics->set_engine_stats(s);
                      if (auto gw = weak.lock()) {
                        gw->last_ready = s.ready();
                        if (s.ready()) gw->ever_ready = true;
                        gw->last_stats_ok_ms =
                            std::chrono::duration_cast<std::chrono::milliseconds>(
                                std::chrono::steady_clock::now().time_since_epoch())
                                .count();
                        metrics->set_open_streams(gw->open_requests.load());
                      }
                    }
                  },
                  [=](caf::error& err) {
                    spdlog::warn("engine stats request failed: {}", caf::to_string(err));
                  });
          // In a cluster, the router's per-expert statistics feed the moemesh_expert_* series.
          actors::router_actor router;
          if (auto gw = weak.lock()) {
            std::lock_guard<std::mutex> lock(gw->mu);
            router = gw->router;
          }
          if (router)
            self->request(router, std::chrono::seconds(2), actors::experts_atom::value)
                .then(
                    [=](const std::string& bytes) {
                      proto::ExpertsSnapshot x;
                      if (x.ParseFromString(bytes)) metrics->set_experts(x);
                    },
                    [=](caf::error& err) {
                      spdlog::warn("expert statistics request failed: {}", caf::to_string(err));
                    });
          self->delayed_send(self, std::chrono::milliseconds(500), tick_atom::value);
        }};
      },
      engine);
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::atomic_store(&impl_->metrics, metrics);
  impl_->model = std::make_shared<const gateway::ServedModel>(std::move(model));
  impl_->engine = engine;
  impl_->stats_actor = poller;
}

void Gateway::end_grace() {
  impl_->grace_ended = true;
}

void Gateway::shutdown(std::chrono::milliseconds grace) {
  if (impl_->stopping.exchange(true)) return;
  net::post(impl_->ioc, [impl = impl_] {
    beast::error_code ignored;
    impl->acceptor.close(ignored);
  });
  const auto deadline = std::chrono::steady_clock::now() + grace;
  while (impl_->open_requests.load() > 0 && std::chrono::steady_clock::now() < deadline &&
         !impl_->grace_ended.load())
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  {
    std::lock_guard<std::mutex> lock(impl_->sessions_mu);
    for (auto& w : impl_->sessions)
      if (auto s = w.lock()) s->abort();
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  impl_->ioc.stop();
  for (auto& t : impl_->threads) t.join();
  impl_->threads.clear();
  // Handlers still queued when the I/O threads stopped (a session's abort and its cancelled reads
  // and writes, the accept loop's cancellation) own their sessions, and every session owns the
  // Impl: left in the io_context they would keep it, the model and the tokenizer alive for ever.
  // Run them to completion here, on this thread; every socket is closed by now, so each round
  // only finishes operations and the loop ends.
  impl_->ioc.restart();
  for (int round = 0; round < 64 && impl_->ioc.poll() > 0; ++round) {
  }
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->stats_actor)
      caf::anon_send_exit(impl_->stats_actor, caf::exit_reason::user_shutdown);
    impl_->stats_actor = caf::actor();
  }
  spdlog::info("gateway stopped");
}

}  // namespace moemesh
