#include "gateway/detail/request_state.h"

#include <fmt/format.h>

#include <atomic>
#include <cmath>

namespace moemesh::gateway {
namespace {

using json = nlohmann::ordered_json;

// Largest n <= end such that text[0, n) does not end inside a UTF-8 sequence.
std::size_t utf8_boundary(const std::string& text, std::size_t end) {
  std::size_t n = std::min(end, text.size());
  std::size_t back = 0;
  while (n > 0 && back < 4 && (static_cast<unsigned char>(text[n - 1]) & 0xC0) == 0x80) {
    --n;
    ++back;
  }
  if (n == 0) return 0;
  const auto lead = static_cast<unsigned char>(text[n - 1]);
  const std::size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
  return need == back + 1 ? std::min(end, text.size()) : n - 1;
}

json bytes_of(const std::string& s) {
  json b = json::array();
  for (unsigned char ch : s) b.push_back(static_cast<int>(ch));
  return b;
}

}  // namespace

RequestState::RequestState(CompletionRequest request, const ServedModel& model, std::string id,
                           int64_t created)
    : req_(std::move(request)), model_(model), id_(std::move(id)), created_(created) {
  static std::atomic<uint64_t> counter{0};
  engine_prefix_ = id_ + "#" + std::to_string(counter++) + "-";
  arrival_ = last_event_ = Clock::now();
  for (const std::string& s : req_.stop) max_stop_len_ = std::max(max_stop_len_, s.size());
  for (std::size_t p = 0; p < req_.prompts.size(); ++p) {
    for (int i = 0; i < req_.n; ++i) {
      Choice c;
      c.index = static_cast<int>(p) * req_.n + i;
      c.decoder.emplace(model_.tokenizer, req_.skip_special_tokens, req_.prompts[p]);
      choices_.push_back(std::move(c));
    }
  }
}

int RequestState::prompt_of(const std::string& engine_id) const {
  if (engine_id.size() <= engine_prefix_.size() ||
      engine_id.compare(0, engine_prefix_.size(), engine_prefix_) != 0)
    return -1;
  int p = 0;
  for (std::size_t i = engine_prefix_.size(); i < engine_id.size(); ++i) {
    if (engine_id[i] < '0' || engine_id[i] > '9' || p > 1000000) return -1;
    p = p * 10 + (engine_id[i] - '0');
  }
  return p < num_prompts() ? p : -1;
}

RequestState::LogprobEntry RequestState::entry(const proto::SampledToken& t) const {
  LogprobEntry e;
  const int32_t id = t.id();
  auto render = [&](int32_t tid) {
    return req_.tokens_as_ids ? fmt::format("token_id:{}", tid)
                              : model_.tokenizer->decode(std::span<const int32_t>(&tid, 1), false);
  };
  e.token = render(id);
  e.logprob = t.logprob();
  e.has_logprob = !std::isnan(t.logprob());
  for (const proto::TokenLogprob& top : t.top()) {
    const int32_t tid = top.id();
    e.top.emplace_back(render(tid), top.logprob());
  }
  return e;
}

void RequestState::finish_choice(Choice& c, const std::string& reason) {
  if (c.finished) return;
  c.finished = true;
  c.finish_reason = reason;
  ++finished_choices_;
}

void RequestState::accept_text(Choice& c, const std::string& piece, std::vector<int>& cancel,
                               int seq_index) {
  if (c.finished || piece.empty()) return;
  const std::size_t before = c.text.size();
  c.text += piece;
  if (req_.stop.empty()) return;
  // A stop string may start up to max_stop_len - 1 bytes before the new piece.
  const std::size_t from = before > max_stop_len_ ? before - max_stop_len_ + 1 : 0;
  std::size_t best = std::string::npos;
  const std::string* hit = nullptr;
  for (const std::string& s : req_.stop) {
    const std::size_t pos = c.text.find(s, from);
    if (pos != std::string::npos && pos < best) {
      best = pos;
      hit = &s;
    }
  }
  if (hit == nullptr) return;
  c.text.resize(req_.include_stop_str_in_output ? best + hit->size() : best);
  c.stop_reason = *hit;
  finish_choice(c, "stop");
  cancel.push_back(seq_index);
}

std::string RequestState::chunk(const Choice& c, const std::string& text, bool with_logprobs,
                                bool final) const {
  json choice;
  choice["index"] = c.index;
  if (req_.endpoint == Endpoint::Chat) {
    choice["delta"] = json{{"content", text}};
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = with_logprobs ? logprobs_json(c.logprobs, c.emitted) : json();
  choice["finish_reason"] = final ? json(c.finish_reason) : json();
  if (final) choice["stop_reason"] = c.stop_reason;
  json body = {
      {"id", id_},
      {"object", req_.endpoint == Endpoint::Chat ? "chat.completion.chunk" : "text_completion"},
      {"created", created_},
      {"model", model_.name},
      {"choices", json::array({choice})}};
  return "data: " + body.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
}

json RequestState::logprobs_json(const std::vector<LogprobEntry>& entries,
                                 std::size_t text_offset) const {
  if (req_.endpoint == Endpoint::Chat) {
    json content = json::array();
    for (const LogprobEntry& e : entries) {
      json top = json::array();
      for (const auto& [tok, lp] : e.top)
        top.push_back({{"token", tok}, {"logprob", lp}, {"bytes", bytes_of(tok)}});
      content.push_back({{"token", e.token},
                         {"logprob", e.logprob},
                         {"bytes", bytes_of(e.token)},
                         {"top_logprobs", top}});
    }
    return {{"content", content}};
  }
  json tokens = json::array(), token_logprobs = json::array(), top_logprobs = json::array(),
       offsets = json::array();
  std::size_t offset = text_offset;
  for (const LogprobEntry& e : entries) {
    tokens.push_back(e.token);
    token_logprobs.push_back(e.has_logprob ? json(e.logprob) : json());
    if (e.has_logprob) {
      json top = json::object();
      for (const auto& [tok, lp] : e.top) top[tok] = lp;
      top_logprobs.push_back(top);
    } else {
      top_logprobs.push_back(nullptr);
    }
    offsets.push_back(offset);
    offset += e.token.size();
  }
  return {{"tokens", tokens},
          {"token_logprobs", token_logprobs},
          {"top_logprobs", top_logprobs},
          {"text_offset", offsets}};
}

void RequestState::on_delta(std::size_t p, const proto::SequenceDelta& d,
                            std::vector<std::string>& events, std::vector<int>& cancel) {
  const std::size_t ci = p * static_cast<std::size_t>(req_.n) + static_cast<std::size_t>(d.index());
  if (ci >= choices_.size()) return;
  Choice& c = choices_[ci];
  const auto now = Clock::now();
  if (d.queue_seconds() > 0 || d.prefill_seconds() > 0) {
    queue_s_ = std::max(queue_s_, d.queue_seconds());
    prefill_s_ = std::max(prefill_s_, d.prefill_seconds());
  }
  for (const proto::SampledToken& t : d.prompt_logprobs()) c.prompt_logprobs.push_back(entry(t));

  const std::string& engine_reason = d.finish_reason();
  const std::size_t n_tokens = static_cast<std::size_t>(d.tokens_size());
  for (std::size_t k = 0; k < n_tokens; ++k) {
    const proto::SampledToken& t = d.tokens(static_cast<int>(k));
    ++c.tokens;
    if (!first_token_) first_token_ = now;
    if (c.last_token) gaps_.push_back(std::chrono::duration<double>(now - *c.last_token).count());
    c.last_token = now;
    if (c.finished) continue;  // a stop string already ended it; the engine has not seen the cancel
    if (req_.logprobs) c.logprobs.push_back(entry(t));
    // A token that stopped the sequence (EOS or a stop_token_id) is not part of the text.
    const bool stop_token = engine_reason == "stop" && k + 1 == n_tokens;
    if (stop_token) {
      if (!req_.skip_special_tokens || !model_.tokenizer->is_special(t.id()))
        c.stop_reason = t.id();
      continue;
    }
    accept_text(c, c.decoder->step(t.id()), cancel, d.index());
  }

  if (!engine_reason.empty() && !c.finished) {
    accept_text(c, c.decoder->flush(), cancel, d.index());
    if (!c.finished) {
      if (engine_reason == "error") {
        error_ = d.error().empty() ? "the engine failed this request" : d.error();
        unavailable_ = d.unavailable();
      }
      finish_choice(c, engine_reason);
    }
  }

  if (!req_.stream) return;
  // Streaming: the role first (chat), echo, then the text that no stop string can still claim.
  if (!error_.empty()) return;  // the session sends the error event
  if (req_.endpoint == Endpoint::Chat && !c.role_sent) {
    json choice = {{"index", c.index},
                   {"delta", {{"role", "assistant"}, {"content", ""}}},
                   {"logprobs", nullptr},
                   {"finish_reason", nullptr}};
    json body = {{"id", id_},
                 {"object", "chat.completion.chunk"},
                 {"created", created_},
                 {"model", model_.name},
                 {"choices", json::array({choice})}};
    events.push_back("data: " + body.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n");
    c.role_sent = true;
  }
  std::string prefix;
  if (req_.echo && !c.echo_sent) {
    prefix = req_.prompt_texts[p];
    c.echo_sent = true;
  }
  const std::size_t hold = c.finished || max_stop_len_ == 0 ? 0 : max_stop_len_ - 1;
  const std::size_t safe = utf8_boundary(c.text, c.text.size() > hold ? c.text.size() - hold : 0);
  std::string piece = safe > c.emitted ? c.text.substr(c.emitted, safe - c.emitted) : std::string();
  const bool has_lp = req_.logprobs && !c.logprobs.empty();
  if (piece.empty() && prefix.empty() && !has_lp && !c.finished) return;
  events.push_back(chunk(c, prefix + piece, req_.logprobs, c.finished));
  c.emitted = std::max(c.emitted, safe);
  if (c.finished) c.emitted = c.text.size();
  c.logprobs.clear();
  last_event_ = now;
}

std::string RequestState::closing_events() const {
  std::string out;
  if (req_.include_usage) {
    json body = {
        {"id", id_},
        {"object", req_.endpoint == Endpoint::Chat ? "chat.completion.chunk" : "text_completion"},
        {"created", created_},
        {"model", model_.name},
        {"choices", json::array()}};
    const Metrics::RequestRecord r = record();
    body["usage"] = {{"prompt_tokens", r.prompt_tokens},
                     {"completion_tokens", r.generation_tokens},
                     {"total_tokens", r.prompt_tokens + r.generation_tokens}};
    out += "data: " + body.dump() + "\n\n";
  }
  out += "data: [DONE]\n\n";
  return out;
}

json RequestState::response() const {
  const Metrics::RequestRecord r = record();
  json choices = json::array();
  for (const Choice& c : choices_) {
    json choice;
    choice["index"] = c.index;
    std::vector<LogprobEntry> lps;
    const std::size_t p = static_cast<std::size_t>(c.index / req_.n);
    if (req_.echo) lps = c.prompt_logprobs;
    lps.insert(lps.end(), c.logprobs.begin(), c.logprobs.end());
    if (req_.endpoint == Endpoint::Chat) {
      choice["message"] = {{"role", "assistant"}, {"content", c.text}};
    } else {
      choice["text"] = req_.echo ? req_.prompt_texts[p] + c.text : c.text;
    }
    choice["logprobs"] = req_.logprobs ? logprobs_json(lps, 0) : json();
    choice["finish_reason"] = c.finish_reason;
    choice["stop_reason"] = c.stop_reason;
    choices.push_back(std::move(choice));
  }
  return {{"id", id_},
          {"object", req_.endpoint == Endpoint::Chat ? "chat.completion" : "text_completion"},
          {"created", created_},
          {"model", model_.name},
          {"choices", choices},
          {"usage",
           {{"prompt_tokens", r.prompt_tokens},
            {"completion_tokens", r.generation_tokens},
            {"total_tokens", r.prompt_tokens + r.generation_tokens}}}};
}

Metrics::RequestRecord RequestState::record() const {
  Metrics::RequestRecord r;
  for (const auto& ids : req_.prompts) r.prompt_tokens += static_cast<int64_t>(ids.size());
  std::string reason = "stop";
  for (const Choice& c : choices_) {
    r.generation_tokens += c.tokens;
    if (c.finish_reason == "error")
      reason = "error";
    else if (c.finish_reason == "abort" && reason != "error")
      reason = "abort";
    else if (c.finish_reason == "length" && reason == "stop")
      reason = "length";
  }
  r.finished_reason = reason;
  const auto now = Clock::now();
  r.e2e = std::chrono::duration<double>(now - arrival_).count();
  if (first_token_) {
    r.ttft = std::chrono::duration<double>(*first_token_ - arrival_).count();
    r.decode = std::chrono::duration<double>(now - *first_token_).count();
  }
  r.queue = queue_s_;
  r.prefill = prefill_s_;
  return r;
}

std::vector<double> RequestState::take_inter_token_gaps() {
  std::vector<double> out;
  out.swap(gaps_);
  return out;
}

}  // namespace moemesh::gateway
