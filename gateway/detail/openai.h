// Internal: the OpenAI-compatible request schema. Parses and validates JSON bodies of
// /v1/completions and /v1/chat/completions into engine requests, with errors in OpenAI's shape.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "core/chat_template.h"
#include "core/sampling.h"
#include "core/tokenizer.h"
#include "gateway/gateway.h"

namespace moemesh::gateway {

struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "BadRequestError";
  std::string param;
  // Set when a server limit refused the request: the reason label of
  // moemesh_requests_rejected_total (e.g. "n", "max_tokens", "prompt_length").
  std::string limit;
};
nlohmann::ordered_json error_body(const ApiError& e);

enum class Endpoint { Completions, Chat };

struct CompletionRequest {
  Endpoint endpoint = Endpoint::Completions;
  std::vector<std::vector<int32_t>> prompts;  // token ids, one list per prompt
  std::vector<std::string> prompt_texts;      // the text of each prompt (echo)
  SamplingParams sampling;
  int n = 1;
  bool stream = false;
  bool include_usage = false;
  std::vector<std::string> stop;
  bool include_stop_str_in_output = false;
  bool echo = false;
  bool logprobs = false;  // return logprobs (completions: "logprobs": k; chat: "logprobs": true)
  int top_logprobs = 0;
  bool tokens_as_ids = false;  // return_tokens_as_token_ids: logprob tokens as "token_id:N"
  bool skip_special_tokens = true;
};

// The server's limits on one request (GatewayOptions; flags --max-n, --max-tokens-limit).
struct RequestLimits {
  int max_n = 16;                // choices per prompt
  int64_t max_tokens_limit = 0;  // cap on max_tokens besides the context (0: the context only)
};

std::variant<CompletionRequest, ApiError> parse_request(const nlohmann::ordered_json& body,
                                                        Endpoint endpoint, const ServedModel& model,
                                                        const RequestLimits& limits = {});

// POST /tokenize and /detokenize bodies -> response JSON.
std::variant<nlohmann::ordered_json, ApiError> tokenize(const nlohmann::ordered_json& body,
                                                        const ServedModel& model);
std::variant<nlohmann::ordered_json, ApiError> detokenize(const nlohmann::ordered_json& body,
                                                          const ServedModel& model);

// GET /v1/models.
nlohmann::ordered_json models_list(const ServedModel& model);

}  // namespace moemesh::gateway
