// Fuzzes what the gateway does with a client's bytes before anything reaches the engine: the HTTP
// request parser (Boost.Beast, with the server's header and body limits), then for the API routes
// the JSON body and its validation (gateway/detail/openai.h: parse_request for /v1/completions and
// /v1/chat/completions, with the chat template and tokenizer; tokenize; detokenize) and the error
// body it answers with. The served model has the Qwen2 tokenizer and Qwen2.5 chat template of
// tests/fixtures. Input: one raw HTTP/1.1 request.
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "gateway/detail/openai.h"
#include "tests/fuzz/fuzz_common.h"

namespace http = boost::beast::http;
using nlohmann::ordered_json;

namespace {

moemesh::gateway::ServedModel& model() {
  static moemesh::gateway::ServedModel m;
  return m;
}

[[noreturn]] void fail_setup(const std::string& what) {
  std::fprintf(stderr, "openai_request_fuzz: %s\n", what.c_str());
  std::abort();
}

void check_answer(const moemesh::gateway::ApiError& e) {
  if (e.status < 400 || e.status > 599 || e.message.empty()) std::abort();
  (void)moemesh::gateway::error_body(e).dump(-1, ' ', false,
                                             ordered_json::error_handler_t::replace);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  moemesh::fuzz::quiet_logs();
  const auto fixtures = moemesh::fuzz::fixtures_dir();
  auto tok = moemesh::Tokenizer::load(fixtures / "tokenizers" / "qwen2" / "tokenizer.json");
  if (!tok) fail_setup(tok.error().message());
  auto tmpl = moemesh::load_chat_template(fixtures / "chat_templates" / "qwen2_5");
  if (!tmpl) fail_setup(tmpl.error().message());
  auto& m = model();
  m.name = "qwen2-fuzz";
  m.root = "/models/qwen2-fuzz";
  m.max_model_len = 2048;
  m.tokenizer = *tok;
  m.vocab_size = (*tok)->vocab_size();
  m.chat_template = std::make_shared<moemesh::ChatTemplateConfig>(std::move(*tmpl));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // As the server reads a request (gateway/server.cpp Session::do_read).
  http::request_parser<http::string_body> parser;
  parser.body_limit(1 << 20);
  parser.header_limit(64 * 1024);
  boost::beast::error_code ec;
  size_t used = 0;
  while (used < size && !parser.is_done()) {
    const size_t n = parser.put(boost::asio::buffer(data + used, size - used), ec);
    if (ec == http::error::need_more) {
      ec = {};
      if (n == 0) break;
    }
    if (ec) return 0;
    used += n;
  }
  if (!parser.is_done()) {
    // The client closed the connection: as http::read does, end_of_stream before any byte.
    if (!parser.got_some()) return 0;
    parser.put_eof(ec);
    if (ec || !parser.is_done()) return 0;
  }
  http::request<http::string_body> req = parser.release();
  const std::string target(req.target());
  const std::string path = target.substr(0, target.find('?'));
  (void)std::string(req[http::field::authorization]);
  (void)std::string(req["x-request-id"]).substr(0, 256);
  (void)req.keep_alive();

  const auto& m = model();
  if (path == "/v1/models") {
    (void)moemesh::gateway::models_list(m).dump();
    return 0;
  }
  ordered_json body = ordered_json::parse(req.body(), nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) return 0;
  if (path == "/tokenize" || path == "/detokenize") {
    auto r = path == "/tokenize" ? moemesh::gateway::tokenize(body, m)
                                 : moemesh::gateway::detokenize(body, m);
    if (auto* e = std::get_if<moemesh::gateway::ApiError>(&r)) {
      check_answer(*e);
    } else {
      (void)std::get<ordered_json>(r).dump(-1, ' ', false, ordered_json::error_handler_t::replace);
    }
    return 0;
  }
  const auto endpoint = path == "/v1/chat/completions" ? moemesh::gateway::Endpoint::Chat
                                                       : moemesh::gateway::Endpoint::Completions;
  auto parsed = moemesh::gateway::parse_request(body, endpoint, m);
  if (auto* e = std::get_if<moemesh::gateway::ApiError>(&parsed)) {
    check_answer(*e);
    return 0;
  }
  // What the engine will be asked for must be what the gateway promises to have checked.
  const auto& r = std::get<moemesh::gateway::CompletionRequest>(parsed);
  if (r.prompts.empty() || r.n < 1) std::abort();
  for (const auto& prompt : r.prompts)
    for (int32_t id : prompt)
      if (id < 0 || id >= m.vocab_size) std::abort();
  if (!r.sampling.validate(m.vocab_size)) std::abort();
  return 0;
}
