#include <fmt/format.h>
#include <google/protobuf/util/json_util.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <optional>

#include "gateway/detail/admin.h"
#include "proto/cluster.pb.h"

namespace moemesh::gateway {
namespace {

using json = nlohmann::ordered_json;

AdminReply error_reply(unsigned status, const std::string& type, const std::string& message) {
  json body = {
      {"error", {{"message", message}, {"type", type}, {"param", nullptr}, {"code", status}}}};
  return {status, body.dump()};
}

template <class Message>
AdminReply render_json(const Message& m) {
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string out;
  if (!google::protobuf::util::MessageToJsonString(m, &out, options).ok())
    return error_reply(500, "InternalServerError", "cannot render the snapshot as JSON");
  return {200, out};
}

template <class Message>
AdminReply to_json(const std::string& bytes) {
  Message m;
  if (!m.ParseFromString(bytes))
    return error_reply(502, "BadGateway", "the router's snapshot is malformed");
  return render_json(m);
}

// The cluster snapshot with the gateway's own status first among the actors.
std::function<AdminReply(const std::string&)> cluster_with_gateway(
    std::function<proto::ActorStatus()> gateway_status) {
  return [gateway_status](const std::string& bytes) {
    proto::ClusterSnapshot s;
    if (!s.ParseFromString(bytes))
      return error_reply(502, "BadGateway", "the router's snapshot is malformed");
    if (gateway_status) {
      *s.add_actors() = gateway_status();
      auto* actors = s.mutable_actors();
      for (int i = actors->size() - 1; i > 0; --i) actors->SwapElements(i, i - 1);
    }
    return render_json(s);
  };
}

// A JSON object body, or an error reply naming what was expected.
std::optional<json> json_body(const std::string& body) {
  json j = json::parse(body.empty() ? std::string("{}") : body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return std::nullopt;
  return j;
}

// Sends one request to the router from a short-lived actor and hands the answer to `done`.
template <class Atom, class Render, class... Args>
void ask_router(const AdminContext& ctx, Render render, std::function<void(AdminReply)> done,
                Args... args) {
  ctx.system->spawn(
      [render, done](caf::event_based_actor* self, actors::router_actor router, Args... as) {
        self->request(router, actors::kStatusTimeout * 2, Atom::value, as...)
            .then(
                [self, render, done](const std::string& bytes) {
                  done(render(bytes));
                  self->quit();
                },
                [self, done](caf::error& err) {
                  done(error_reply(503, "ServiceUnavailableError",
                                   "the router did not answer: " + caf::to_string(err)));
                  self->quit();
                });
      },
      ctx.router, args...);
}

}  // namespace

bool same_secret(std::string_view a, std::string_view b) {
  // Every byte of the longer input is read and compared, whatever the contents: the time depends
  // only on the two lengths (the client's own and the secret's), never on where they differ.
  // Bytes past the end of the shorter input compare against 0 and the lengths are compared too,
  // so a prefix of the secret does not match. `volatile` keeps the compiler from ending early.
  const std::size_t n = std::max(a.size(), b.size());
  volatile unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (std::size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff = diff | static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

bool is_admin_path(std::string_view path) {
  return path.rfind("/admin/", 0) == 0;
}

void handle_admin(const AdminContext& ctx, bool post, std::string_view path,
                  std::string_view authorization, const std::string& body,
                  std::function<void(AdminReply)> done) {
  const bool get_route = path == "/admin/cluster" || path == "/admin/experts";
  const bool post_route =
      path == "/admin/capacity" || path == "/admin/drain" || path == "/admin/rebalance";
  if (!get_route && !post_route)
    return done(error_reply(404, "NotFoundError", fmt::format("no admin route {}", path)));
  if ((get_route && post) || (post_route && !post))
    return done(error_reply(405, "MethodNotAllowed",
                            fmt::format("{} takes {}", path, get_route ? "GET" : "POST")));
  if (post_route) {
    if (ctx.admin_token.empty())
      return done(error_reply(403, "PermissionDenied",
                              "admin actions are off: start the server with --admin-token"));
    if (!same_secret(authorization, "Bearer " + ctx.admin_token))
      return done(error_reply(401, "AuthenticationError",
                              "missing or wrong admin token: send \"Authorization: Bearer "
                              "<admin token>\""));
  }
  if (!ctx.router) {
    if (path == "/admin/cluster") {
      json actors = json::array();
      if (ctx.gateway_status) {
        AdminReply g = render_json(ctx.gateway_status());
        actors.push_back(json::parse(g.body, nullptr, false));
      }
      json j = {{"join", ""},
                {"model", ctx.single_process_model},
                {"ready", true},
                {"single_process", true},
                {"members", json::array()},
                {"actors", actors}};
      return done({200, j.dump()});
    }
    return done(error_reply(404, "NotFoundError",
                            "this server runs as a single process: experts are local"));
  }
  if (path == "/admin/cluster")
    return ask_router<actors::cluster_atom>(ctx, cluster_with_gateway(ctx.gateway_status), done);
  if (path == "/admin/experts")
    return ask_router<actors::experts_atom>(ctx, to_json<proto::ExpertsSnapshot>, done);

  if (path == "/admin/drain") {
    std::optional<json> j = json_body(body);
    if (!j || !j->contains("worker") ||
        !((*j)["worker"].is_string() || (*j)["worker"].is_number_integer()))
      return done(error_reply(400, "BadRequestError",
                              "expected a JSON body {\"worker\": \"<name or worker id from "
                              "/admin/cluster>\"}"));
    const std::string which = (*j)["worker"].is_string()
                                  ? (*j)["worker"].get<std::string>()
                                  : std::to_string((*j)["worker"].get<int64_t>());
    return ask_router<actors::drain_atom>(
        ctx,
        [which](const std::string& error) {
          if (!error.empty()) return error_reply(400, "BadRequestError", error);
          return AdminReply{200, json{{"draining", which}}.dump()};
        },
        done, which);
  }
  if (path == "/admin/rebalance") {
    std::optional<json> j = json_body(body);
    double threshold = 1.0;
    if (j && j->contains("min_balancedness")) {
      if (!(*j)["min_balancedness"].is_number())
        j.reset();
      else
        threshold = (*j)["min_balancedness"].get<double>();
    }
    if (!j || !(threshold >= 0 && threshold <= 1))
      return done(error_reply(400, "BadRequestError",
                              "expected a JSON body {\"min_balancedness\": <0..1, optional>}"));
    return ask_router<actors::rebalance_atom>(
        ctx,
        [](const std::string& bytes) {
          proto::RebalanceReply r;
          if (!r.ParseFromString(bytes))
            return error_reply(502, "BadGateway", "the router's answer is malformed");
          if (!r.error().empty()) return error_reply(409, "ConflictError", r.error());
          return render_json(r);
        },
        done, threshold);
  }

  // POST /admin/capacity
  json j = json::parse(body, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("capacity_factor") ||
      !j["capacity_factor"].is_number())
    return done(error_reply(400, "BadRequestError",
                            "expected a JSON body {\"capacity_factor\": <number, 0 = no limit>}"));
  const double factor = j["capacity_factor"].get<double>();
  ask_router<actors::capacity_atom>(
      ctx,
      [factor](const std::string& error) {
        if (!error.empty()) return error_reply(400, "BadRequestError", error);
        return AdminReply{200, json{{"capacity_factor", factor}}.dump()};
      },
      done, factor);
}

}  // namespace moemesh::gateway
