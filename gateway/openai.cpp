#include <fmt/format.h>

#include <cmath>

#include "gateway/detail/openai.h"

namespace moemesh::gateway {
namespace {

using json = nlohmann::ordered_json;

ApiError bad(std::string param, std::string message) {
  ApiError e;
  e.param = std::move(param);
  e.message = std::move(message);
  return e;
}

// A request over one of the server's limits (counted by reason in /metrics).
ApiError over_limit(std::string param, std::string limit, std::string message) {
  ApiError e = bad(std::move(param), std::move(message));
  e.limit = std::move(limit);
  return e;
}

// Reads optional typed fields, remembering the first error.
class Fields {
 public:
  explicit Fields(const json& body) : body_(body) {}

  bool has(const char* key) const { return body_.contains(key) && !body_.at(key).is_null(); }

  std::optional<double> number(const char* key) {
    if (!has(key)) return std::nullopt;
    const json& v = body_.at(key);
    if (!v.is_number() || !std::isfinite(v.get<double>()))
      return fail(key, "a number"), std::nullopt;
    return v.get<double>();
  }
  std::optional<int64_t> integer(const char* key) {
    if (!has(key)) return std::nullopt;
    const json& v = body_.at(key);
    if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() &&
        std::abs(v.get<double>()) < 9e15)
      return static_cast<int64_t>(v.get<double>());
    if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > INT64_MAX))
      return fail(key, "an integer"), std::nullopt;
    return v.get<int64_t>();
  }
  std::optional<bool> boolean(const char* key) {
    if (!has(key)) return std::nullopt;
    const json& v = body_.at(key);
    if (!v.is_boolean()) return fail(key, "a boolean"), std::nullopt;
    return v.get<bool>();
  }
  std::optional<std::string> string(const char* key) {
    if (!has(key)) return std::nullopt;
    const json& v = body_.at(key);
    if (!v.is_string()) return fail(key, "a string"), std::nullopt;
    return v.get<std::string>();
  }
  void range(const char* key, std::optional<double> v, double lo, double hi, const char* what) {
    if (v && (*v < lo || *v > hi))
      error(bad(key, fmt::format("{} must be {}, got {}", key, what, *v)));
  }
  void error(ApiError e) {
    if (!error_) error_ = std::move(e);
  }
  const std::optional<ApiError>& first_error() const { return error_; }

 private:
  void fail(const char* key, const char* what) {
    error(bad(key, fmt::format("{} must be {}, got {}", key, what, body_.at(key).dump())));
  }
  const json& body_;
  std::optional<ApiError> error_;
};

bool valid_ids(const json& v, int64_t vocab, std::vector<int32_t>& out) {
  for (const json& e : v) {
    if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() >= vocab) return false;
    out.push_back(static_cast<int32_t>(e.get<int64_t>()));
  }
  return true;
}

// The text of a message's content: a string, or a list of {"type": "text", "text": ...} parts.
std::optional<std::string> content_text(const json& content, std::string& why) {
  if (content.is_null()) return std::string();
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) {
    why = "content must be a string or a list of content parts";
    return std::nullopt;
  }
  std::string text;
  for (const json& part : content) {
    if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
        !part["text"].is_string()) {
      why = "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported";
      return std::nullopt;
    }
    text += part["text"].get<std::string>();
  }
  return text;
}

// Validates messages and renders them with the chat template.
std::variant<std::string, ApiError> render_chat(const json& body, const ServedModel& model) {
  if (!body.contains("messages") || !body["messages"].is_array() || body["messages"].empty())
    return bad("messages", "messages must be a non-empty list of {\"role\", \"content\"} objects");
  if (!model.chat_template)
    return bad("messages",
               fmt::format("the model {} has no chat template; use /v1/completions", model.name));
  json messages = json::array();
  for (std::size_t i = 0; i < body["messages"].size(); ++i) {
    const json& m = body["messages"][i];
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
      return bad("messages",
                 fmt::format("messages[{}] must be an object with a string \"role\"", i));
    std::string why;
    std::optional<std::string> text =
        content_text(m.contains("content") ? m["content"] : json(), why);
    if (!text) return bad("messages", fmt::format("messages[{}]: {}", i, why));
    json copy = m;
    copy["content"] = *text;
    messages.push_back(std::move(copy));
  }
  bool add_generation_prompt = true;
  if (body.contains("add_generation_prompt")) {
    if (!body["add_generation_prompt"].is_boolean())
      return bad("add_generation_prompt", "add_generation_prompt must be a boolean");
    add_generation_prompt = body["add_generation_prompt"].get<bool>();
  }
  json extra = json::object();
  if (body.contains("tools") && !body["tools"].is_null()) {
    if (!body["tools"].is_array()) return bad("tools", "tools must be a list");
    extra["tools"] = body["tools"];
  }
  if (body.contains("chat_template_kwargs") && !body["chat_template_kwargs"].is_null()) {
    if (!body["chat_template_kwargs"].is_object())
      return bad("chat_template_kwargs", "chat_template_kwargs must be an object");
    for (auto it = body["chat_template_kwargs"].begin(); it != body["chat_template_kwargs"].end();
         ++it)
      extra[it.key()] = it.value();
  }
  Expected<std::string> text =
      apply_chat_template_ordered(*model.chat_template, messages, add_generation_prompt, extra);
  if (!text) return bad("messages", text.error().message());
  return *text;
}

}  // namespace

json error_body(const ApiError& e) {
  return {{"error",
           {{"message", e.message},
            {"type", e.type},
            {"param", e.param.empty() ? json() : json(e.param)},
            {"code", e.status}}}};
}

json models_list(const ServedModel& model) {
  return {{"object", "list"},
          {"data",
           {{{"id", model.name},
             {"object", "model"},
             {"created", model.created},
             {"owned_by", "moemesh"},
             {"root", model.root},
             {"parent", nullptr},
             {"max_model_len", model.max_model_len}}}}};
}

std::variant<CompletionRequest, ApiError> parse_request(const json& body, Endpoint endpoint,
                                                        const ServedModel& model,
                                                        const RequestLimits& limits) {
  if (!body.is_object()) return bad("", "the request body must be a JSON object");
  Fields f(body);
  CompletionRequest r;
  r.endpoint = endpoint;
  const bool chat = endpoint == Endpoint::Chat;

  if (std::optional<std::string> name = f.string("model"); name && *name != model.name) {
    ApiError e = bad("model", fmt::format("The model `{}` does not exist.", *name));
    e.status = 404;
    e.type = "NotFoundError";
    return e;
  }

  // Sampling parameters (OpenAI's defaults).
  SamplingParams& s = r.sampling;
  const auto temperature = f.number("temperature");
  f.range("temperature", temperature, 0, 100, "between 0 and 100");
  s.temperature = static_cast<float>(temperature.value_or(1.0));
  const auto top_p = f.number("top_p");
  if (top_p && (*top_p <= 0 || *top_p > 1))
    f.error(bad("top_p", fmt::format("top_p must be in (0, 1], got {}", *top_p)));
  s.top_p = static_cast<float>(top_p.value_or(1.0));
  const auto top_k = f.integer("top_k");
  if (top_k && *top_k < -1)
    f.error(bad("top_k", fmt::format("top_k must be -1 (off) or >= 0, got {}", *top_k)));
  s.top_k = static_cast<int32_t>(std::min<int64_t>(top_k.value_or(0), INT32_MAX));
  const auto min_p = f.number("min_p");
  f.range("min_p", min_p, 0, 1, "between 0 and 1");
  s.min_p = static_cast<float>(min_p.value_or(0));
  const auto presence = f.number("presence_penalty");
  f.range("presence_penalty", presence, -2, 2, "between -2 and 2");
  s.presence_penalty = static_cast<float>(presence.value_or(0));
  const auto frequency = f.number("frequency_penalty");
  f.range("frequency_penalty", frequency, -2, 2, "between -2 and 2");
  s.frequency_penalty = static_cast<float>(frequency.value_or(0));
  const auto repetition = f.number("repetition_penalty");
  if (repetition && (*repetition <= 0 || *repetition > 100))
    f.error(bad("repetition_penalty",
                fmt::format("repetition_penalty must be in (0, 100], got {}", *repetition)));
  s.repetition_penalty = static_cast<float>(repetition.value_or(1));
  if (const auto seed = f.integer("seed")) s.seed = static_cast<uint64_t>(*seed);
  const auto n = f.integer("n");
  if (n && *n < 1) f.error(bad("n", fmt::format("n must be at least 1, got {}", *n)));
  if (n && *n > limits.max_n)
    f.error(over_limit("n", "n",
                       fmt::format("n must be between 1 and {} (the server's --max-n), got {}",
                                   limits.max_n, *n)));
  r.n = static_cast<int>(n.value_or(1));
  const auto min_tokens = f.integer("min_tokens");
  if (min_tokens && *min_tokens < 0) f.error(bad("min_tokens", "min_tokens must be >= 0"));
  s.min_tokens = min_tokens.value_or(0);
  s.ignore_eos = f.boolean("ignore_eos").value_or(false);
  r.skip_special_tokens = f.boolean("skip_special_tokens").value_or(true);
  r.include_stop_str_in_output = f.boolean("include_stop_str_in_output").value_or(false);
  r.stream = f.boolean("stream").value_or(false);
  r.echo = !chat && f.boolean("echo").value_or(false);

  if (f.has("stream_options")) {
    const json& so = body["stream_options"];
    if (!so.is_object()) {
      f.error(bad("stream_options", "stream_options must be an object"));
    } else if (!r.stream) {
      f.error(bad("stream_options", "stream_options can only be set when stream is true"));
    } else if (so.contains("include_usage")) {
      if (!so["include_usage"].is_boolean())
        f.error(bad("stream_options", "stream_options.include_usage must be a boolean"));
      else
        r.include_usage = so["include_usage"].get<bool>();
    }
  }

  if (f.has("stop")) {
    const json& stop = body["stop"];
    if (stop.is_string()) {
      r.stop.push_back(stop.get<std::string>());
    } else if (stop.is_array() &&
               std::all_of(stop.begin(), stop.end(), [](const json& e) { return e.is_string(); })) {
      for (const json& e : stop) r.stop.push_back(e.get<std::string>());
    } else {
      f.error(bad("stop", "stop must be a string or a list of strings"));
    }
    for (const std::string& st : r.stop)
      if (st.empty()) f.error(bad("stop", "stop strings must not be empty"));
  }
  if (f.has("stop_token_ids")) {
    const json& ids = body["stop_token_ids"];
    if (!ids.is_array() || !valid_ids(ids, model.vocab_size, s.stop_token_ids))
      f.error(bad(
          "stop_token_ids",
          fmt::format("stop_token_ids must be a list of token ids below {}", model.vocab_size)));
  }
  if (f.has("logit_bias")) {
    const json& lb = body["logit_bias"];
    if (!lb.is_object()) {
      f.error(bad("logit_bias", "logit_bias must be an object mapping token ids to biases"));
    } else {
      for (auto it = lb.begin(); it != lb.end(); ++it) {
        int64_t id = -1;
        try {
          std::size_t used = 0;
          id = std::stoll(it.key(), &used);
          if (used != it.key().size()) id = -1;
        } catch (const std::exception&) {
          id = -1;
        }
        if (id < 0 || id >= model.vocab_size) {
          f.error(bad("logit_bias", fmt::format("logit_bias: \"{}\" is not a token id below {}",
                                                it.key(), model.vocab_size)));
          break;
        }
        if (!it.value().is_number() || std::abs(it.value().get<double>()) > 100) {
          f.error(
              bad("logit_bias",
                  fmt::format("logit_bias[{}] must be a number between -100 and 100", it.key())));
          break;
        }
        s.logit_bias.emplace_back(static_cast<int32_t>(id), it.value().get<float>());
      }
    }
  }

  // Logprobs: completions take an integer, chat a boolean plus top_logprobs.
  if (chat) {
    r.logprobs = f.boolean("logprobs").value_or(false);
    const auto top = f.integer("top_logprobs");
    if (top && (*top < 0 || *top > 20))
      f.error(bad("top_logprobs", "top_logprobs must be between 0 and 20"));
    if (top && *top > 0 && !r.logprobs)
      f.error(bad("top_logprobs", "top_logprobs needs logprobs: true"));
    r.top_logprobs = static_cast<int>(top.value_or(0));
  } else {
    const auto lp = f.integer("logprobs");
    if (lp && (*lp < 0 || *lp > 20)) f.error(bad("logprobs", "logprobs must be between 0 and 20"));
    r.logprobs = lp.has_value();
    r.top_logprobs = static_cast<int>(lp.value_or(0));
  }
  if (const auto as_ids = f.boolean("return_tokens_as_token_ids")) r.tokens_as_ids = *as_ids;
  s.logprobs = r.logprobs ? r.top_logprobs : -1;

  std::optional<int64_t> max_tokens =
      f.integer(chat && f.has("max_completion_tokens") ? "max_completion_tokens" : "max_tokens");
  const char* max_tokens_name =
      chat && f.has("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  if (max_tokens && *max_tokens < 1)
    f.error(bad(max_tokens_name,
                fmt::format("{} must be at least 1, got {}", max_tokens_name, *max_tokens)));
  if (max_tokens && limits.max_tokens_limit > 0 && *max_tokens > limits.max_tokens_limit)
    f.error(over_limit(max_tokens_name, "max_tokens",
                       fmt::format("{} is {}, over the server's limit of {} tokens "
                                   "(--max-tokens-limit)",
                                   max_tokens_name, *max_tokens, limits.max_tokens_limit)));
  if (f.first_error()) return *f.first_error();

  // The prompts.
  if (chat) {
    std::variant<std::string, ApiError> text = render_chat(body, model);
    if (auto* e = std::get_if<ApiError>(&text)) return *e;
    Expected<std::vector<int32_t>> ids =
        model.tokenizer->encode(std::get<std::string>(text), false);
    if (!ids) return bad("messages", ids.error().message());
    r.prompt_texts.push_back(std::get<std::string>(text));
    r.prompts.push_back(std::move(*ids));
  } else {
    if (!f.has("prompt")) return bad("prompt", "prompt is required");
    const json& p = body["prompt"];
    auto add_text = [&](const std::string& text) -> std::optional<ApiError> {
      Expected<std::vector<int32_t>> ids = model.tokenizer->encode(text, true);
      if (!ids) return bad("prompt", ids.error().message());
      r.prompt_texts.push_back(text);
      r.prompts.push_back(std::move(*ids));
      return std::nullopt;
    };
    auto add_ids = [&](const json& list) -> std::optional<ApiError> {
      std::vector<int32_t> ids;
      if (!valid_ids(list, model.vocab_size, ids))
        return bad("prompt",
                   fmt::format("prompt token ids must be integers below {}", model.vocab_size));
      r.prompt_texts.push_back(model.tokenizer->decode(ids, false));
      r.prompts.push_back(std::move(ids));
      return std::nullopt;
    };
    std::optional<ApiError> e;
    if (p.is_string()) {
      e = add_text(p.get<std::string>());
    } else if (p.is_array() && !p.empty() && p[0].is_number_integer()) {
      e = add_ids(p);
    } else if (p.is_array() && !p.empty()) {
      for (const json& item : p) {
        if (item.is_string())
          e = add_text(item.get<std::string>());
        else if (item.is_array())
          e = add_ids(item);
        else
          e = bad("prompt", "prompt must be a string, a list of strings, or a list of token ids");
        if (e) break;
      }
    } else {
      e = bad("prompt", "prompt must be a non-empty string, list of strings, or list of token ids");
    }
    if (e) return *e;
    if (r.prompts.size() > 64) return bad("prompt", "at most 64 prompts per request");
  }

  // The context: every prompt must leave room for at least one token, and for max_tokens.
  // Without max_tokens, chat fills the rest of the context (up to --max-tokens-limit).
  const char* prompt_param = chat ? "messages" : "prompt";
  for (const auto& ids : r.prompts) {
    const auto len = static_cast<int64_t>(ids.size());
    if (len == 0) return bad(prompt_param, "the prompt is empty after tokenization");
    if (len >= model.max_model_len)
      return over_limit(
          prompt_param, "prompt_length",
          fmt::format("This model's maximum context length is {} tokens. However, the {} has {} "
                      "tokens, which leaves no room for a completion. Please reduce the length "
                      "of the {}.",
                      model.max_model_len, chat ? "messages" : "prompt", len, prompt_param));
    const int64_t want = max_tokens.value_or(chat ? model.max_model_len - len : 16);
    if (len + want > model.max_model_len)
      return over_limit(
          max_tokens ? max_tokens_name : prompt_param, "max_tokens",
          fmt::format("This model's maximum context length is {} tokens. However, you "
                      "requested {} tokens ({} in the {}, {} in the completion). Please reduce "
                      "the length of the {} or {} (at most {} for this prompt).",
                      model.max_model_len, len + want, len, chat ? "messages" : "prompt", want,
                      prompt_param, max_tokens_name, model.max_model_len - len));
  }
  // One max_tokens for all prompts: the default for chat fills the context.
  int64_t fallback = chat ? model.max_model_len - static_cast<int64_t>(r.prompts[0].size()) : 16;
  if (limits.max_tokens_limit > 0) fallback = std::min(fallback, limits.max_tokens_limit);
  s.max_tokens = max_tokens.value_or(fallback);
  if (s.min_tokens > s.max_tokens)
    return bad("min_tokens", fmt::format("min_tokens ({}) must not exceed max_tokens ({})",
                                         s.min_tokens, s.max_tokens));
  if (Status st = s.validate(model.vocab_size); !st) return bad("", st.error().message());
  return r;
}

std::variant<json, ApiError> tokenize(const json& body, const ServedModel& model) {
  if (!body.is_object()) return bad("", "the request body must be a JSON object");
  Fields f(body);
  if (std::optional<std::string> name = f.string("model"); name && *name != model.name) {
    ApiError e = bad("model", fmt::format("The model `{}` does not exist.", *name));
    e.status = 404;
    e.type = "NotFoundError";
    return e;
  }
  const bool add_special = f.boolean("add_special_tokens").value_or(true);
  if (f.first_error()) return *f.first_error();
  std::string text;
  bool special = add_special;
  if (body.contains("messages")) {
    std::variant<std::string, ApiError> rendered = render_chat(body, model);
    if (auto* e = std::get_if<ApiError>(&rendered)) return *e;
    text = std::get<std::string>(rendered);
    special = false;
  } else if (body.contains("prompt") && body["prompt"].is_string()) {
    text = body["prompt"].get<std::string>();
  } else {
    return bad("prompt", "give \"prompt\" (a string) or \"messages\"");
  }
  Expected<std::vector<int32_t>> ids = model.tokenizer->encode(text, special);
  if (!ids) return bad("prompt", ids.error().message());
  return json{{"tokens", *ids}, {"count", ids->size()}, {"max_model_len", model.max_model_len}};
}

std::variant<json, ApiError> detokenize(const json& body, const ServedModel& model) {
  if (!body.is_object()) return bad("", "the request body must be a JSON object");
  if (body.contains("model") && body["model"].is_string() &&
      body["model"].get<std::string>() != model.name) {
    ApiError e = bad(
        "model", fmt::format("The model `{}` does not exist.", body["model"].get<std::string>()));
    e.status = 404;
    e.type = "NotFoundError";
    return e;
  }
  std::vector<int32_t> ids;
  if (!body.contains("tokens") || !body["tokens"].is_array() ||
      !valid_ids(body["tokens"], model.vocab_size, ids))
    return bad("tokens",
               fmt::format("tokens must be a list of token ids below {}", model.vocab_size));
  return json{{"prompt", model.tokenizer->decode(ids, false)}};
}

}  // namespace moemesh::gateway
